"""ONNX export: the float model (with GELU or ReLU MLPs) and the simulated-integer model of a policy.

Every export uses PyTorch's legacy TorchScript exporter (``dynamo=False``, opset 17, a dynamic
batch axis): it exports timm's DeiT and Swin in seconds and needs no ``onnxscript``.

**Float models.** :func:`export_float` writes the model as it is; :func:`replace_gelu` first
swaps ``nn.GELU`` for ``nn.ReLU`` at chosen MLPs (``blocks.N.mlp.act`` in ViT/DeiT,
``layers.N.blocks.M.mlp.act`` in Swin), the GELU-less model of the Tayaranian et al. paper.

**The integer model** (``policysearch export RUN --onnx FILE``, :func:`export_run_onnx`): the
model policysearch evaluates (``load_model`` + ``prepare`` + ``calibrate`` + ``apply_policy``),
traced. Its operators are floor / round / clamp and power-of-two scalings of integer-valued
float32 tensors, which ONNX has; a few kernel helpers do not trace and are replaced while exporting
only (:func:`export_friendly`, nothing in the kernel modules changes):

* ``kernels._common.exp2_int`` builds ``2**k`` from float32 bits (``Tensor.view(torch.float32)``
  on int32), which the tracer rejects; it is replaced by ``exp2_int_traceable``, ``Pow(2, k)``
  with the same saturation (0 below ``k = -126``, ``inf`` above 127), equal for every ``k`` (tested);
* each method's own untraceable functions, the catalogue's ``onnx_swaps`` (``policysearch.methods``):
  FQ-ViT's ``log_round_power`` (the Log-Int-Softmax code) also reads float32 bits; it is replaced by
  ``log_round_power_traceable``, the same power of two from ``frexp`` (equal for every ratio, tested);
* ``torch.frexp`` (dyadic requantization, I-BERT's softmax requantization, FQ-ViT's exact
  ``floor(log2)``) has no ONNX symbolic; one is registered that computes the same mantissa and
  exponent with Log / Floor / Pow and a one-step correction either way (exact; tested);
* ``aten::log2`` gets a symbolic whose ``ln 2`` has the input's precision (torch's is float32, so
  FQ-ViT's float64 ``log2`` landed below 15 at ``2^-15`` minus a few ulps; tested).

**Agreement** (:func:`compare_onnx`). In the ``paper`` wiring the linear layers are integer GEMMs
(``aten::_int_mm`` becomes ``MatMulInteger``, int8 x int8 -> int32; the patch embedding is the same
GEMM over its patches, attention's matmuls are float32 products proven exact by their bounds) and
every integer-only kernel is integer arithmetic in float32 whose float steps (roundings, square
roots, ``log2``) are correctly rounded in both libraries (numerics 2026.12.4: torch's own
float32 ``sqrt`` / ``log2`` on CPU are not, so the kernels take them through float64 or exactly).
Such a model under a policy of integer-only methods therefore exports **bit-exactly**
(:data:`EXACT_TOLERANCE`: every logit identical, on any batch size). Where a float operator
remains, the agreement is within a tolerance, and :func:`expected_agreement` says why: a site
under ``fp32`` (float softmax / GELU / LayerNorm: ``exp``, ``erf`` and ``rsqrt`` differ in their
last bit between libraries), the ``native`` wiring (the linear layers are float32 GEMMs of
dequantized operands, whose sums ONNX Runtime adds in another order; where that moves a value
across a rounding boundary the next quantizer picks the neighbouring integer) and the float model
(:data:`FLOAT_TOLERANCE`). The integer model's tolerance is :data:`INTEGER_TOLERANCE`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policysearch import methods
from policysearch.data import load_data
from policysearch.deploy import require_onnx
from policysearch.errors import ConfigError, PolicySearchError
from policysearch.models import apply_policy, calibrate, prepare
from policysearch.models.loading import check_compatible, load_model, model_data_config, model_input_size
from policysearch.models.site import is_gelu
from policysearch.numerics import NUMERICS_VERSION
from policysearch.policy import Policy, PolicyDocument
from policysearch.run import RunRecord, policy_document, resolve_run_dir

__all__ = [
    "EXACT_TOLERANCE",
    "ExportError",
    "FLOAT_TOLERANCE",
    "INTEGER_TOLERANCE",
    "OPSET",
    "Agreement",
    "OnnxExport",
    "compare_onnx",
    "export_float",
    "export_friendly",
    "export_integer",
    "export_onnx",
    "export_run_onnx",
    "expected_agreement",
    "gelu_paths",
    "load_run_model",
    "onnx_logits",
    "onnx_metadata",
    "replace_gelu",
]

log = logging.getLogger(__name__)

OPSET = 17


class ExportError(PolicySearchError):
    """The exported ONNX model does not reproduce the PyTorch model within the stated tolerance."""

#: ONNX Runtime against PyTorch, float model: max |Δlogit| <= rel x max |logit|, top-1 on >= top1
FLOAT_TOLERANCE = {"rel": 1e-4, "top1": 1.0}
#: the integer model where a float op remains (module docstring: float32 GEMMs, float sites)
INTEGER_TOLERANCE = {"rel": 0.05, "top1": 0.99}
#: the ``paper`` wiring's integer model under integer-only methods: every logit identical
EXACT_TOLERANCE = {"rel": 0.0, "top1": 1.0}


# -- float models: GELU -> ReLU -------------------------------------------------------------


def gelu_paths(model: nn.Module) -> list[str]:
    """The module paths of every GELU in ``model`` (timm: each MLP's ``mlp.act``), in order."""
    return [path for path, m in model.named_modules() if path and is_gelu(m)]


def replace_gelu(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """Replace the GELU at each of ``paths`` (default: every GELU) by ``nn.ReLU``, in place.

    Returns the replaced paths. A path that is not a GELU of the model is a :class:`ConfigError`
    naming it. Swin's constructor takes no ``act_layer``, so this works on built models.
    """
    available = gelu_paths(model)
    todo = list(available if paths is None else paths)
    bad = [p for p in todo if p not in available]
    if bad:
        raise ConfigError(f"not a GELU of {type(model).__name__}: {', '.join(bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''}; its GELUs are at {', '.join(available[:3])} ...")
    for path in todo:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, nn.ReLU())
    return todo


# -- export ---------------------------------------------------------------------------------

def _frexp_symbolic(g: Any, x: Any) -> tuple[Any, Any]:
    """ONNX for ``torch.frexp``: ``x = m * 2**e``, ``0.5 <= |m| < 1`` (``frexp(0) = (0, 0)``)."""
    dtype = torch.float64 if x.type().scalarType() == "Double" else torch.float32

    def const(v: float) -> Any:
        return g.op("Constant", value_t=torch.tensor(v, dtype=dtype))

    zero, one, half, two = const(0.0), const(1.0), const(0.5), const(2.0)
    absx = g.op("Abs", x)
    is_zero = g.op("Equal", absx, zero)
    a = g.op("Where", is_zero, one, absx)
    e = g.op("Add", g.op("Floor", g.op("Div", g.op("Log", a), const(0.6931471805599453))), one)
    m = g.op("Div", a, g.op("Pow", two, e))  # a power-of-two division: exact
    big = g.op("GreaterOrEqual", m, one)  # log rounded down: one step back
    e = g.op("Where", big, g.op("Add", e, one), e)
    m = g.op("Where", big, g.op("Mul", m, half), m)
    small = g.op("Less", m, half)  # log rounded up
    e = g.op("Where", small, g.op("Sub", e, one), e)
    m = g.op("Where", small, g.op("Mul", m, two), m)
    m = g.op("Where", is_zero, zero, g.op("Mul", m, g.op("Sign", x)))
    e = g.op("Where", is_zero, zero, e)
    return m, g.op("Cast", e, to_i=6)  # int32, as torch.frexp's exponent


#: swaps every integer model needs (the kernels' shared ``exp2_int``); each method adds its own
#: (the catalogue's ``onnx_swaps``)
_COMMON_SWAPS = (("policysearch.kernels._common:exp2_int", "policysearch.kernels._common:exp2_int_traceable"),)


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
def _int_mm_symbolic(g: Any, a: Any, b: Any) -> Any:
    return g.op("MatMulInteger", a, b)


def _log2_symbolic(g: Any, x: Any) -> Any:
    """``log(x) / ln 2`` with ``ln 2`` in ``x``'s precision (torch's own symbolic takes a float32
    ``ln 2``, 2.7e-9 off: a float64 ``log2`` rounded to float32, as FQ-ViT's ``get_MN`` takes it,
    would then land on the wrong side of an integer just below a power of two)."""
    dtype = torch.float64 if x.type().scalarType() == "Double" else torch.float32
    return g.op("Div", g.op("Log", x), g.op("Constant", value_t=torch.tensor(math.log(2.0), dtype=dtype)))


@contextlib.contextmanager
def export_friendly() -> Iterator[None]:
    """While exporting: traceable twins of the kernel functions that do not trace (``exp2_int``,
    and each catalogue method's ``onnx_swaps``), ONNX symbolics for ``aten::frexp``,
    ``aten::_int_mm`` (``MatMulInteger``: the linear layers stay int8 GEMMs) and ``aten::log2``
    (its ``ln 2`` in the input's precision).

    Swaps the function object in every loaded ``policysearch`` module that holds it under its name
    (the kernel modules keep their code), and restores everything on exit.
    """
    pairs = list(_COMMON_SWAPS) + [pair for desc in methods.catalogue() for pair in desc.onnx_swaps]
    swapped: list[tuple[object, str, object]] = []
    for target, twin in dict(pairs).items():
        original, replacement, attr = _resolve(target), _resolve(twin), target.partition(":")[2]
        for name, module in list(sys.modules.items()):
            if (name == "policysearch" or name.startswith("policysearch.")) and \
                    getattr(module, attr, None) is original:
                swapped.append((module, attr, original))
                setattr(module, attr, replacement)
    torch.onnx.register_custom_op_symbolic("aten::frexp", _frexp_symbolic, OPSET)
    # the integer engine's int8 x int8 -> int32 GEMM (quant.intmm): ONNX's MatMulInteger
    torch.onnx.register_custom_op_symbolic("aten::_int_mm", _int_mm_symbolic, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::log2", _log2_symbolic, OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::frexp", OPSET)
        torch.onnx.unregister_custom_op_symbolic("aten::_int_mm", OPSET)
        torch.onnx.unregister_custom_op_symbolic("aten::log2", OPSET)
        for module, attr, value in swapped:
            setattr(module, attr, value)


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *, integer: bool = False) -> Path:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch axis; input ``x``, output ``logits``.

    ``example`` is one input batch (its batch size only shapes the trace). ``integer=True`` exports
    under :func:`export_friendly` (the simulated-integer model). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = export_friendly() if integer else contextlib.nullcontext()
    try:
        with ctx, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on constant shapes and scales
            torch.onnx.export(
                model, (example.to(device),), str(path), dynamo=False, opset_version=OPSET,
                input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    _set_metadata(path, onnx_metadata(model))
    return path


def onnx_metadata(model: nn.Module) -> dict[str, str]:
    """The ``metadata_props`` an exported file carries: the input size (C, H, W), the mean and std
    its inputs are normalised with, the numerics version and, under a policy, the policy JSON."""
    cfg = model_data_config(model)
    meta = {"policysearch.input_size": json.dumps(list(cfg["input_size"])),
            "policysearch.mean": json.dumps(list(cfg["mean"])), "policysearch.std": json.dumps(list(cfg["std"])),
            "policysearch.numerics": NUMERICS_VERSION}
    info = getattr(model, "_policysearch", None)
    policy = getattr(info, "policy", None)
    if policy is not None and any(getattr(m, "enabled", False) for m in model.modules()):
        meta["policysearch.policy"] = json.dumps(PolicyDocument(policy=policy, wiring=info.wiring).to_json())
    return meta


def _set_metadata(path: Path, meta: dict[str, str]) -> None:
    onnx, _ = require_onnx()
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def _example(model: nn.Module, batch: int) -> torch.Tensor:

    return torch.randn(batch, *model_input_size(model), generator=torch.Generator().manual_seed(0))


def export_float(model: nn.Module, path: str | Path, *, relu: Sequence[str] | bool | None = None,
                 example: torch.Tensor | None = None) -> Path:
    """Export the float model; ``relu``: GELU paths to replace by ReLU first (``True``: all).

    With ``relu`` the model is copied first, so ``model`` itself is left unchanged.
    """

    if relu:
        model = copy.deepcopy(model)
        replace_gelu(model, None if relu is True else list(relu))
    return export_onnx(model, path, example if example is not None else _example(model, 2))


def export_integer(model: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Export a prepared, calibrated model under its applied policy (the simulated-integer model)."""
    info = getattr(model, "_policysearch", None)
    if info is None or getattr(info, "policy", None) is None:
        raise ConfigError("export_integer needs a model under a policy: prepare, calibrate and apply_policy first")
    # one forward first: values the quantizers derive once from calibration data and then cache
    # (FQ-ViT's PTF factors come from the last calibration batch) enter the trace as their small
    # results, not as that batch baked in and the derivation recomputed on every run
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example.to(next(model.parameters()).device))
    model.train(was_training)
    return export_onnx(model, path, example, integer=True)


# -- agreement -----------------------------------------------------------------------------

def _session(path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None) -> Any:

    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


def onnx_logits(path_or_session: Any, images: torch.Tensor, *, batch_size: int = 64,
                threads: int | None = None) -> torch.Tensor:
    """The ONNX model's outputs on ``images``, run by ONNX Runtime (CPU) in batches."""
    sess = _session(path_or_session, threads=threads) if isinstance(path_or_session, (str, Path)) else path_or_session
    name = sess.get_inputs()[0].name
    outs = [torch.from_numpy(sess.run(None, {name: b.detach().cpu().contiguous().numpy()})[0])
            for b in images.split(batch_size)]
    return torch.cat(outs)


def expected_agreement(model: nn.Module) -> tuple[dict[str, float], str]:
    """``(tolerance, why)``: what ONNX Runtime must reproduce of ``model`` (module docstring).

    :data:`EXACT_TOLERANCE` for the ``paper`` wiring under a policy of integer-only methods;
    :data:`INTEGER_TOLERANCE` for another model under a policy, :data:`FLOAT_TOLERANCE` for the
    float model, each with the reason in words.
    """
    info = getattr(model, "_policysearch", None)
    policy = getattr(info, "policy", None)
    if policy is None:
        return dict(FLOAT_TOLERANCE), "the float model: its float operators differ in their last bit between libraries"
    float_sites = [site.name for site, choice in policy.items()
                   if not methods.get_method(site.kind, choice.method).integer_only]
    reasons = []
    if getattr(info, "wiring", None) != "paper":
        reasons.append(f"the {info.wiring} wiring's linear layers are float32 GEMMs, summed in another order "
                       "by ONNX Runtime")
    if float_sites:
        reasons.append(f"{len(float_sites)} site(s) keep a float operator ({', '.join(float_sites[:3])}"
                       f"{' ...' if len(float_sites) > 3 else ''}), whose last bit differs between libraries")
    if reasons:
        return dict(INTEGER_TOLERANCE), "; ".join(reasons)
    return dict(EXACT_TOLERANCE), "integer GEMMs (MatMulInteger) and integer-only kernels"


@dataclass(frozen=True)
class Agreement:
    """ONNX Runtime's outputs against PyTorch's on the same images, in the same batches."""

    images: int
    max_abs: float  # max |ort - torch| over all logits
    logit_scale: float  # max |torch logit|
    rel: float  # max_abs / logit_scale
    exact: float  # fraction of logits bit-identical
    top1: float  # fraction of images with the same argmax
    tolerance: dict[str, float]
    basis: str = ""  # why this tolerance (:func:`expected_agreement`)

    @property
    def ok(self) -> bool:
        return self.rel <= self.tolerance["rel"] and self.top1 >= self.tolerance["top1"]

    @property
    def bit_exact(self) -> bool:
        """Every logit identical (max |diff| 0)."""
        return self.max_abs == 0.0

    @property
    def exact_required(self) -> bool:
        return self.tolerance["rel"] == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "bit_exact": self.bit_exact}

    def __str__(self) -> str:
        why = f" ({self.basis})" if self.basis else ""
        if self.bit_exact:
            return (f"bit-exact on {self.images} images: every logit identical (max |diff| 0), top-1 agrees on "
                    f"{100 * self.top1:.1f}%{why}")
        found = (f"{self.images} images: top-1 agrees on {100 * self.top1:.1f}%, {100 * self.exact:.1f}% of logits "
                 f"bit-identical, max |diff| {self.max_abs:.3g} ({self.rel:.2g} of max |logit| {self.logit_scale:.3g})")
        if self.exact_required:
            return f"NOT bit-exact, as it should be{why}: {found}"
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{found}; {verdict} the tolerance (rel <= {self.tolerance['rel']:g}, top-1 >= "
                f"{self.tolerance['top1']:g}), not bit-exact by design{why}")


@torch.no_grad()
def compare_onnx(path: str | Path, model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                 tolerance: dict[str, float] | None = None) -> Agreement:
    """Run ``path`` in ONNX Runtime and ``model`` in PyTorch on ``images`` (same batches) and compare.

    ``tolerance`` defaults to what :func:`expected_agreement` expects of ``model`` (bit-exact for
    the ``paper`` wiring under integer-only methods).
    """
    expected, basis = expected_agreement(model)
    if tolerance is None:
        tolerance = expected
    elif dict(tolerance) != expected:
        basis = "a tolerance given by the caller"
    model.eval()
    device = next(model.parameters()).device
    ref = torch.cat([model(b.to(device)).float().cpu() for b in images.split(batch_size)])
    got = onnx_logits(path, images, batch_size=batch_size)
    if got.shape != ref.shape:
        raise ValueError(f"ONNX output shape {tuple(got.shape)} != PyTorch's {tuple(ref.shape)}")
    diff = (got - ref).abs()
    scale = float(ref.abs().max())
    max_abs = float(diff.max())
    return Agreement(images=len(images), max_abs=max_abs, logit_scale=scale,
                     rel=max_abs / scale if scale > 0 else float(max_abs > 0),
                     exact=float((diff == 0).float().mean()),
                     top1=float((got.argmax(-1) == ref.argmax(-1)).float().mean()), tolerance=dict(tolerance),
                     basis=basis)


# -- a run's models -------------------------------------------------------------------------

def _run_model_args(record: Any) -> dict[str, Any]:
    config = record.data.get("config", {})
    args = dict(record.data.get("fingerprint", {}).get("model_args") or {})
    for key in ("num_classes", "img_size", "in_chans"):
        if config.get(key) is not None:
            args.setdefault(key, config[key])
    return args


def load_run_model(record: Any, *, integer: bool, checkpoint: str | None = None,
                   data: Any = None) -> tuple[nn.Module, Any]:
    """``(model, data)`` of a finished run: the model as the run built it, and the run's data.

    ``integer=True``: prepared with the run's wiring, calibrated on the run's calibration images
    (in the run's batches) and under the run's answer policy, as the evaluator scored it;
    ``integer=False``: the float model. ``checkpoint`` replaces the run's weights (e.g. a
    fine-tuned file); the weights are seeded as the run seeded them. ``data``: the run's data when
    the caller has already loaded it (a second model of the same run), else it is loaded here.
    """

    policy_document(record)  # a clear error when the run has not finished
    config = record.data.get("config", {})
    torch.manual_seed(int(config.get("seed", 0)))  # timm weights without a checkpoint: as the run
    model = load_model(config["model"], checkpoint=checkpoint or config.get("checkpoint"), **_run_model_args(record))
    wiring = record.data.get("fingerprint", {}).get("wiring") or config.get("wiring") or "native"
    if integer:
        prepare(model, wiring=wiring)
    if data is None:
        data = load_data(config.get("data", "fmnist-sample"), model=model, calib_size=config.get("calib_size"),
                         eval_size=config.get("eval_size"))
    check_compatible(model, data)
    if integer:
        calibrate(model, data.calib_images().split(int(config.get("batch_size") or 256)))
        apply_policy(model, Policy.from_dict(record.data["answer"]["policy"]))
    return model.eval(), data


@dataclass(frozen=True)
class OnnxExport:
    """What ``policysearch export RUN --onnx FILE`` wrote and how well ONNX Runtime reproduces it."""

    path: Path
    run: str
    wiring: str
    agreement: Agreement
    top1_onnx: float | None
    top1_torch: float | None
    top1_recorded: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "run": self.run, "wiring": self.wiring, "agreement": self.agreement.to_dict(),
                "top1_onnx": self.top1_onnx, "top1_torch": self.top1_torch, "top1_recorded": self.top1_recorded}

    def __str__(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        return (f"{self.path} ({self.wiring} wiring: {_ops_line(self.path)})\n"
                f"ONNX Runtime against policysearch on the calibration images: {self.agreement}\n"
                f"top-1 on the evaluation images: ONNX Runtime {pct(self.top1_onnx)}, policysearch "
                f"{pct(self.top1_torch)} (the run recorded {pct(self.top1_recorded)})")


def export_run_onnx(run: str, out: str | Path, *, results_dir: str | Path = "results",
                    top1: bool = True, checkpoint: str | None = None) -> OnnxExport:
    """Export the integer model of a finished run under its answer policy to ``out`` and check it.

    The check runs ONNX Runtime and PyTorch on the run's calibration images (and, with ``top1``,
    scores both on its evaluation images). The ``paper`` wiring under integer-only methods must
    agree bit-exactly, any other model within :data:`INTEGER_TOLERANCE` (:func:`expected_agreement`);
    anything less is an :class:`ExportError` (the file stays, for inspection).
    """

    require_onnx()
    record = RunRecord.load(resolve_run_dir(run, results_dir))
    model, data = load_run_model(record, integer=True, checkpoint=checkpoint)
    calib = data.calib_images()
    path = export_integer(model, out, calib[:2])
    batch = int(record.data.get("config", {}).get("batch_size") or 64)
    agreement = compare_onnx(path, model, calib, batch_size=batch)
    top1_onnx = top1_torch = None
    if top1:
        images, labels = data.eval_tensors()
        with torch.no_grad():
            top1_torch = _top1(torch.cat([model(b) for b in images.split(batch)]), labels)
        top1_onnx = _top1(onnx_logits(path, images, batch_size=batch), labels)
    result = OnnxExport(path=path, run=record.name, wiring=model._policysearch.wiring, agreement=agreement,
                        top1_onnx=top1_onnx, top1_torch=top1_torch,
                        top1_recorded=record.data.get("answer", {}).get("metrics", {}).get("top1"))
    if not agreement.ok:
        raise ExportError(f"the exported ONNX model does not reproduce policysearch: {agreement} (file left at {path})")
    return result


def _top1(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if labels is None or len(labels) == 0:
        return None
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def _ops_line(path: Path) -> str:
    """How the file computes its linear layers, in words (``MatMulInteger`` / ``ConvInteger`` counts)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    integer = {op: ops.count(op) for op in ("MatMulInteger", "ConvInteger") if op in ops}
    floats = {op: ops.count(op) for op in ("MatMul", "Gemm", "Conv") if op in ops}
    text = ", ".join(f"{n} {op}" for op, n in integer.items()) + " (int32 accumulators)" if integer else "no integer GEMM"
    return text + (f", {', '.join(f'{n} float {op}' for op, n in floats.items())}" if floats else "")
