"""The cost profile: latency of every (site shape, method) kernel and of the linear layers of a model.

``policysearch profile --model M [--device cpu|cuda] [--batch B]`` (:func:`profile_model`) runs one
float forward of ``M`` at batch ``B`` to record the input shape of every site
(``policysearch.models.record_sites``) and of every linear layer, then times, on the device:
* every method of the site's kind (``policysearch.kernels.create(kind, method)``, the default
  output bits) on a quantized copy of the site's recorded input, once per distinct
  (kind, shape) (LayerNorm: with the first site's ``nn.LayerNorm``);
* every distinct linear layer (``nn.Linear`` and the patch embedding's ``Conv2d``), in float, as
  the stand-in for its int8 GEMM (the same in every policy).

All callables are timed interleaved (each round runs every one once, in an order rotated by one
each round), after a warm-up, with the thread count fixed (default 1: on a shared 2-core machine
two threads made the sub-millisecond kernels' timings scatter by 10x); a sample is as many
back-to-back calls as last about 2 ms; the median of ``repeats`` rounds is kept. The JSON goes to ``results/profiles/<model>-<device>-b<batch>.json`` (git-ignored: it
belongs to the machine that measured it).

These are emulated kernels (integer arithmetic in float32 PyTorch), a proxy for what an integer
runtime would spend; the int8 runtime check (``policysearch latency RUN``) is the ground truth
where a runtime exists. :func:`method_costs` turns a profile into the relative cost per
(kind, method) that the method catalogue's ``cost`` slot holds
(``policysearch.methods.load_cost_profile``), and :func:`policy_cost` predicts a policy's latency.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policysearch import kernels
from policysearch.device import resolve_device
from policysearch.errors import ConfigError
from policysearch.identity import machine_info, profile_path
from policysearch.methods import get_method
from policysearch.models import float_mode, prepare, record_sites, sites_of
from policysearch.models.loading import load_model, model_input_size

__all__ = ["PROFILE_FORMAT", "method_costs", "policy_cost", "profile_model", "profile_path", "read_profile"]

log = logging.getLogger(__name__)

PROFILE_FORMAT = "policysearch.profile/v1"
MIN_REPEATS = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lim = 2 ** (bits - 1) - 1
    scale = (x.abs().amax() / lim).clamp(min=1e-8).reshape(())
    return torch.clamp(torch.round(x / scale), -lim, lim) * scale, scale


def _kernel_call(kind: str, method: str, x: torch.Tensor, norm: nn.LayerNorm | None) -> Callable[[], Any]:
    spec = get_method(kind, method)
    kern = kernels.create(kind, method, norm=norm).to(x.device).eval()
    bits = 16 if spec.expects == "accumulator" or kind == "layernorm" else 8
    xq, scale = _quantize(x, bits)
    kwargs: dict[str, Any] = {}
    if kind == "layernorm" and method == "fqvit":
        # the wiring hands FQ-ViT's LayerNorm its output grid (the next quantizer's scale)
        with torch.no_grad():
            y = nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        kwargs["out_scale"] = (y.abs().amax() / 127).clamp(min=1e-8)

    def call() -> Any:
        return kern(xq, scale, **kwargs)

    return call


def _site_shapes(model: nn.Module, example: torch.Tensor) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every site's name, kind and input shape in forward order, and one recorded input per site."""
    prepare(model, wiring="native")  # site input shapes are those of the float model in any wiring
    inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str, x: torch.Tensor, *_: Any) -> None:  # (name, input, output[, valid])
        inputs.setdefault(name, x.detach().clone())

    with torch.no_grad(), float_mode(model), record_sites(model, recorder):
        model(example)
    modules = sites_of(model)
    order = [s.name for s in model._policysearch.sites]
    missing = [n for n in order if n not in inputs]
    if missing:
        raise ConfigError(f"the float forward reached no input at site(s) {', '.join(missing[:5])}")
    sites = [{"name": n, "kind": modules[n].kind, "shape": list(inputs[n].shape)} for n in order]
    return sites, inputs


def _linear_shapes(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    hooks = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and path.endswith("patch_embed.proj")):
            def hook(mod: nn.Module, args: tuple, _out: Any, path: str = path) -> None:
                found.append({"name": path, "type": type(mod).__name__, "shape": list(args[0].shape),
                              "module": mod})
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


def _time_interleaved(calls: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                      device: torch.device, sample_ms: float = 2.0) -> dict[str, dict[str, float]]:
    """Median (and min) ms per call of each callable, rounds interleaved.

    A sample is ``number`` back-to-back calls (chosen per callable so that a sample lasts about
    ``sample_ms``, as ``timeit`` does), so sub-millisecond kernels are not timed at the clock's and
    the scheduler's resolution.
    """
    names = list(calls)
    with torch.no_grad():
        number: dict[str, int] = {}
        for n in names:
            for _ in range(warmup):
                calls[n]()
            _sync(device)
            t0 = time.perf_counter()
            calls[n]()
            _sync(device)
            once = (time.perf_counter() - t0) * 1e3
            number[n] = max(1, min(1000, int(sample_ms / max(once, 1e-4))))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                call, count = calls[n], number[n]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(count):
                    call()
                _sync(device)
                samples[n].append((time.perf_counter() - t0) * 1e3 / count)
    out = {}
    for n, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[n] = {"median_ms": round(statistics.median(v), 5), "q1_ms": round(q[0], 5), "q3_ms": round(q[2], 5),
                  "min_ms": round(min(v), 5), "calls_per_sample": number[n]}
    return out


def profile_model(model: str, *, device: str = "cpu", batch: int = 8, repeats: int = MIN_REPEATS,
                  warmup: int = 3, threads: int | None = 1, checkpoint: str | None = None,
                  model_args: Mapping[str, Any] | None = None, results_dir: str | Path = "results",
                  out: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure the cost profile of ``model`` (a zoo or timm name) and write it; returns the document.

    ``out`` defaults to :func:`profile_path`. ``threads``: torch intra-op threads while measuring
    (restored afterwards); ``None`` leaves torch's setting.
    """

    if repeats < MIN_REPEATS:
        raise ConfigError(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    if batch < 1:
        raise ConfigError(f"--batch must be positive, got {batch}")
    dev = torch.device(resolve_device(device))
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        net = load_model(model, checkpoint=checkpoint, **dict(model_args or {})).to(dev).eval()
        example = torch.randn(batch, *model_input_size(net), generator=torch.Generator().manual_seed(seed)).to(dev)
        linears = _linear_shapes(net, example)
        sites, inputs = _site_shapes(net, example)
        modules = sites_of(net)
        calls: dict[str, Callable[[], Any]] = {}
        groups: dict[tuple[str, tuple[int, ...]], str] = {}  # (kind, shape) -> the first site with it
        for s in sites:
            key = (s["kind"], tuple(s["shape"]))
            if key in groups:
                continue
            groups[key] = s["name"]
            norm = modules[s["name"]].float_op if s["kind"] == "layernorm" else None
            for method in kernels.methods(s["kind"]):
                calls[f"kernel|{s['kind']}|{method}|{'x'.join(map(str, key[1]))}"] = _kernel_call(
                    s["kind"], method, inputs[s["name"]], norm)
        linear_keys: dict[tuple, str] = {}
        for lin in linears:
            mod = lin["module"]
            sig = (lin["type"], tuple(lin["shape"]), tuple(mod.weight.shape))
            lin["key"] = linear_keys.setdefault(sig, f"linear|{len(linear_keys)}")
            if lin["key"] not in calls:
                x = torch.randn(*lin["shape"], device=dev)
                calls[lin["key"]] = (lambda m=mod, x=x: m(x))
        load_before = machine_info().get("load")
        t0 = time.perf_counter()
        timed = _time_interleaved(calls, repeats=repeats, warmup=warmup, device=dev)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    kernels_out = []
    for (kind, shape), first in groups.items():
        for method in kernels.methods(kind):
            t = timed[f"kernel|{kind}|{method}|{'x'.join(map(str, shape))}"]
            kernels_out.append({"kind": kind, "shape": list(shape), "method": method, "first_site": first, **t})
    per_site = {(k["kind"], tuple(k["shape"]), k["method"]): k["median_ms"] for k in kernels_out}
    for s in sites:
        s["ms"] = {m: per_site[(s["kind"], tuple(s["shape"]), m)] for m in kernels.methods(s["kind"])}
    linear_out = [{"name": lin["name"], "type": lin["type"], "shape": lin["shape"],
                   "weight": list(lin["module"].weight.shape), **timed[lin["key"]]} for lin in linears]
    doc: dict[str, Any] = {
        "format": PROFILE_FORMAT, "model": model, "checkpoint": checkpoint, "model_args": dict(model_args or {}),
        "device": dev.type if dev.type == "cpu" else str(dev), "batch": int(batch), "threads": torch_threads(threads, old_threads),
        "repeats": int(repeats), "warmup": int(warmup), "seconds": round(elapsed, 2),
        "sites": sites, "kernels": kernels_out, "linear": linear_out,
        "totals_ms": {"linear": round(sum(x["median_ms"] for x in linear_out), 5)},
        "machine": {**machine_info(), "load_before": load_before}, "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "note": "emulated integer kernels in PyTorch: a proxy; `policysearch latency RUN` measures an int8 runtime",
    }
    doc["methods"] = method_costs(doc)
    path = Path(out) if out is not None else profile_path(model, doc["device"], batch, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    doc["path"] = str(path)
    return doc


def torch_threads(requested: int | None, previous: int) -> int:
    return int(requested) if requested else int(previous)


def read_profile(path: str | Path) -> dict[str, Any]:
    """A profile document, checked for its format."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the profile {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{path} is not a {PROFILE_FORMAT} profile")
    return doc


def method_costs(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{kind: {method: cost}}``: each method's summed latency over the model's sites of that kind,
    relative to ``fp32`` at the same sites (1.0 = as fast as the float operator)."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(s["kind"] for s in doc["sites"]):
        sites = [s for s in doc["sites"] if s["kind"] == kind]
        base = sum(s["ms"]["fp32"] for s in sites)
        out[kind] = {m: round(sum(s["ms"][m] for s in sites) / base, 4) for m in sites[0]["ms"]} if base > 0 else {}
    return out


def policy_cost(doc: Mapping[str, Any], policy: Any) -> dict[str, float]:
    """The profile's predicted latency of ``policy`` (ms: linear layers + each site's method) and
    that relative to every site in ``fp32``. Sites the profile lacks are an error."""
    by_name = {s["name"]: s for s in doc["sites"]}
    missing = [site.name for site, _ in policy.items() if site.name not in by_name]
    if missing:
        raise ConfigError(f"the profile of {doc.get('model')} has no site(s) {', '.join(missing[:5])}")
    unknown = sorted({f"{site.kind}/{choice.method}" for site, choice in policy.items()
                      if choice.method not in by_name[site.name]["ms"]})
    if unknown:
        raise ConfigError(f"the profile has no timing for {', '.join(unknown)}; profile the model again")
    linear = float(doc.get("totals_ms", {}).get("linear", 0.0))
    sites = sum(by_name[site.name]["ms"][choice.method] for site, choice in policy.items())
    base = sum(by_name[site.name]["ms"]["fp32"] for site, _ in policy.items())
    return {"ms": linear + sites, "sites_ms": sites, "linear_ms": linear, "relative": (linear + sites) / (linear + base)}
