"""Record or compare the integer forward's outputs bit for bit (a guard for speed-only changes).

    PYTHONPATH=. python benchmarks/check_int_identical.py --save /tmp/golden.pt   # before a change
    PYTHONPATH=. python benchmarks/check_int_identical.py --check /tmp/golden.pt  # after it

Per model (random timm weights, ``pretrained=False``; the zoo's fmnist_vit) the ``paper``-wired
model is calibrated on random images and run under uniform ibert / ivit / fqvit policies (and one
mixed policy with 6-bit activations) on fresh random inputs; it stores the logits and the
evaluator's per-site gamma / beta, and ``--check`` demands equality on every one (NaN equal to NaN).
"""
from __future__ import annotations

import argparse
import copy

import torch

import policysearch as ps
from policysearch.models.loading import load_model, model_input_size
from policysearch.objectives import Evaluator
from policysearch.policy import Policy

MODELS = {"fmnist_vit": 4, "deit_small_patch16_224": 2, "swin_tiny_patch4_window7_224": 1}


def load(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A zoo model with its weights, or a timm model with random weights (``pretrained=False``)."""
    model = load_model(name)
    return model, tuple(model_input_size(model))


def policies(sites: list) -> dict[str, Policy]:
    out = {m: Policy.uniform(sites, m, fallback={"gelu": "ivit"}) for m in ("ibert", "ivit", "fqvit")}
    methods = {"softmax": ("ibert", "ivit@6", "fqvit"), "gelu": ("ivit", "ibert"),
               "layernorm": ("ivit", "fqvit", "ibert@12")}
    mixed = {s.name: methods[s.kind][i % len(methods[s.kind])] for i, s in enumerate(sites)}
    out["mixed6"] = Policy.from_mapping(sites, mixed, act_bits=6)
    out["w6a8"] = Policy.uniform(sites, "ivit", weight_bits=6)
    return out


def run(name: str, batch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base, size = load(name)
    model = ps.prepare(copy.deepcopy(base), wiring="paper")
    calib = torch.randn(batch * 2, *size)
    ps.calibrate(model, [calib])
    sites = ps.find_sites(model)
    x = torch.randn(batch, *size) * 1.5
    out: dict[str, torch.Tensor] = {}
    ev = Evaluator(model, calib_images=calib, eval_images=x, batch_size=batch, sqnr_batch=batch, reuse=False)
    for key, pol in policies(sites).items():
        with torch.no_grad():
            ps.apply_policy(model, pol)
            out[f"{name}/{key}/logits"] = model(x)
        r = ev.evaluate(pol)
        out[f"{name}/{key}/sites"] = torch.tensor([[m.gamma, m.beta] for m in r.sites.values()], dtype=torch.float64)
        out[f"{name}/{key}/metrics"] = torch.tensor([r.metrics[k] for k in sorted(r.metrics)
                                                     if isinstance(r.metrics[k], float)], dtype=torch.float64)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN (top-1 without labels is NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--check")
    ap.add_argument("--model", action="append")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, torch.Tensor] = {}
    for name in args.model or MODELS:
        res.update(run(name, MODELS.get(name, 2)))
    if args.save:
        torch.save(res, args.save)
        print(f"saved {len(res)} tensors")
        return
    gold = torch.load(args.check)
    bad = [k for k in res if k not in gold or not _same(res[k], gold[k])]
    for k in bad:
        print("DIFFERS:", k)
    print(f"{len(res) - len(bad)}/{len(res)} identical")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
