"""Compare policysearch's kernels with the official operators, integer for integer.

    python benchmarks/check_against_reference.py --ibert I-BERT/ --fqvit FQ-ViT/ --ivit I-ViT/

Each argument is a local checkout of the official repository (kssteven418/I-BERT on branch
``ibert``, megvii-research/FQ-ViT, zkkli/I-ViT; none is shipped or downloaded here). The operator
files are copied to a temporary folder with their package-relative imports made local, their
``.cuda()`` calls become no-ops, and fresh reference modules are run on the same ``(x, scale)`` as
our kernels. Prints the largest difference in units of the output scale (0 = same integers).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
from pathlib import Path

import torch

from policysearch import kernels

FILES = {
    "ibert": ("fairseq/quantization/utils", ["quant_utils.py", "quant_modules.py"]),
    "ivit": ("models/quantization_utils", ["quant_utils.py", "quant_modules.py"]),
}


def _stage(repo: Path, name: str, tmp: Path) -> object:
    sub, files = FILES[name]
    dest = tmp / f"ref_{name}"
    dest.mkdir()
    for f in files:
        text = (repo / sub / f).read_text()
        text = re.sub(r"^from \.quant_utils import \*", "from .quant_utils import *", text, flags=re.M)
        text = re.sub(r"^from fairseq.*$", "", text, flags=re.M)
        (dest / f).write_text(text)
    (dest / "__init__.py").write_text("")
    return importlib.import_module(f"ref_{name}.quant_modules")


def _q(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.abs().max() / (2 ** (bits - 1) - 1)
    return torch.round(x / s) * s, s.reshape(1)


def _norm(c: int) -> torch.nn.LayerNorm:
    ln = torch.nn.LayerNorm(c)
    torch.nn.init.normal_(ln.weight, 1, 0.1)
    torch.nn.init.normal_(ln.bias, 0, 0.1)
    return ln


def check_ibert(ib: object) -> dict[str, float]:
    out = {}
    for s_val in (1e-4, 1e-3, 0.05):
        s = torch.tensor([s_val])
        x = torch.round(torch.randn(4, 3, 20, 20) * 3 / s) * s
        for b in (8, 16):
            yr, _ = ib.IntSoftmax(b, quant_mode="symmetric")(x, s)
            yo, so = kernels.create("softmax", "ibert", bits=b)(x, s)
            out[f"ibert softmax s={s_val} bits={b}"] = float((yr - yo).abs().max() / so)
    for s_val in (1e-5, 1e-4, 1e-3):
        s = torch.tensor([s_val])
        x = torch.round(torch.randn(4, 10, 64) * 2 / s) * s
        yr, _ = ib.IntGELU(quant_mode="symmetric")(x, s)
        yo, so = kernels.create("gelu", "ibert")(x, s)
        out[f"ibert gelu s={s_val}"] = float((yr - yo).abs().max() / so)
    ln = _norm(64)
    for spread in (3.0, 300.0):
        x, s = _q(torch.randn(4, 10, 64) * spread, 22)
        ref = ib.IntLayerNorm(32, quant_mode="symmetric")
        ref.set_param(ln)
        yr, _ = ref(x, s)
        yo, so = kernels.create("layernorm", "ibert", norm=ln)(x, s)
        out[f"ibert layernorm spread={spread}"] = float(((yr - yo).abs() / so).max())
    return out


def check_ivit(iv: object) -> dict[str, float]:
    out = {}
    for b in (8, 16):
        x, s = _q(torch.randn(4, 3, 20, 20) * 3, 8)
        yr, sr = iv.IntSoftmax(b)(x, s)
        yo, so = kernels.create("softmax", "ivit", bits=b)(x, s)
        out[f"ivit softmax bits={b}"] = float((yr - yo).abs().max() / so)
    x, s = _q(torch.randn(4, 10, 64) * 2, 8)
    yr, _ = iv.IntGELU()(x, s)
    yo, so = kernels.create("gelu", "ivit")(x, s)
    out["ivit gelu"] = float((yr - yo).abs().max() / so)
    ln = _norm(64)
    x, s = _q(torch.randn(4, 10, 64) * 3, 16)
    ref = iv.IntLayerNorm(64)
    ref.weight, ref.bias = ln.weight, ln.bias
    yr, _ = ref(x, s)
    yo, so = kernels.create("layernorm", "ivit", norm=ln)(x, s)
    out["ivit layernorm"] = float(((yr - yo).abs() / so).max())
    return out


def check_fqvit(repo: Path) -> dict[str, float]:
    sys.path.insert(0, str(repo))
    from models.ptq.bit_type import BIT_TYPE_DICT
    from models.ptq.layers import QIntLayerNorm, QIntSoftmax

    out = {}
    x, s = _q(torch.randn(8, 3, 30, 30) * 4, 8)
    yr = QIntSoftmax(log_i_softmax=True, quant=True, bit_type=BIT_TYPE_DICT["uint4"])(x, s)
    yo, so = kernels.create("softmax", "fqvit")(x, s)
    out["fqvit softmax (LIS, 4-bit)"] = float((yr - yo).abs().max() / so)

    class _Scale:
        def __init__(self, scale: torch.Tensor) -> None:
            self.scale = scale

    ln = _norm(64)
    ref = QIntLayerNorm(64)
    ref.weight, ref.bias, ref.mode = ln.weight, ln.bias, "int"
    scales = 0.02 * 2 ** torch.randint(0, 4, (64,)).float()  # PTF: base * 2^alpha per channel
    x = torch.round(torch.randn(4, 10, 64) * 3 / scales) * scales
    out_scale = torch.tensor(0.03)
    with torch.no_grad():
        yr = ref(x, _Scale(scales), _Scale(out_scale))
        yo, _ = kernels.create("layernorm", "fqvit", norm=ln)(x, scales, out_scale=out_scale)
    out["fqvit layernorm (PTF)"] = float(((yr - yo).abs() / out_scale).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ibert", type=Path)
    ap.add_argument("--fqvit", type=Path)
    ap.add_argument("--ivit", type=Path)
    ap.add_argument("--seeds", type=int, default=5, help="random inputs per check")
    args = ap.parse_args()
    torch.Tensor.cuda = lambda self, *a, **k: self  # the references move tensors to CUDA
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        sys.path.insert(0, tmp)
        checks = []
        if args.ibert:
            checks.append(lambda m=_stage(args.ibert, "ibert", Path(tmp)): check_ibert(m))
        if args.ivit:
            checks.append(lambda m=_stage(args.ivit, "ivit", Path(tmp)): check_ivit(m))
        if args.fqvit:
            checks.append(lambda: check_fqvit(args.fqvit))
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            for check in checks:
                for name, diff in check().items():
                    results[name] = max(diff, results.get(name, 0.0))
    for name, diff in results.items():
        print(f"{name:40s} max |ours - reference| = {diff:g} output LSB ({args.seeds} seeds)")


if __name__ == "__main__":
    main()
