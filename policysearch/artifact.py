"""The integer artifact: every quantization parameter of a calibrated model under a policy, in one
safetensors file (``policysearch.integer/v1``; fields in ``docs/policy-format.md``).

:func:`save_artifact` writes it from a prepared, calibrated model under a policy; :func:`load_artifact`
puts it into a freshly prepared model of the same architecture and weights, which then computes
the same integers without seeing a calibration image. What is *read back*: every observer's range
(the activation ranges, per channel for FQ-ViT's PTF), FQ-ViT's PTF exponents, each site's fitted
range and each data-aware kernel's fitted constants. What is *recorded for other tools* (derived
from the above and the weights; checked, not read back): the integer weights and their
per-channel scales, each activation quantizer's scale, the dyadic requantization multipliers and
shifts, the int32 biases and the kernels' output scales, as one forward under the policy computes
them. The safetensors header (``__metadata__``) holds the format, the numerics version, the
wiring, the policy and how the calibration images were chosen.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from policysearch.errors import PolicySearchError
from policysearch.models.site import QuantSite
from policysearch.models.wiring import WiringInfo, apply_policy, example_input
from policysearch.numerics import NUMERICS_VERSION
from policysearch.policy import Policy
from policysearch.quant import IntAct, Observer, PTFQuant, QuantAct, QuantConv2d, QuantLinear, dyadic_params

__all__ = ["ARTIFACT_FORMAT", "ArtifactError", "artifact_reference", "load_artifact", "read_artifact",
           "save_artifact", "sidecar_path"]

#: the artifact's format; a reader refuses another
ARTIFACT_FORMAT = "policysearch.integer/v1"
_OBSERVER_BUFFERS = ("min_val", "max_val", "ch_min", "ch_max")
#: the layers with integer weights (the ``paper`` wiring's IntLinear / IntConv2d subclass them)
_LAYERS = (QuantLinear, QuantConv2d)


class ArtifactError(PolicySearchError):
    """An integer artifact that cannot be written, read or does not fit the model."""


def sidecar_path(policy_path: str | Path) -> Path:
    """Where ``export`` writes the artifact of ``policy_path``: ``<stem>.integer.safetensors`` beside it."""
    p = Path(policy_path)
    return p.with_name(p.stem + ".integer.safetensors")


def _info(model: nn.Module) -> WiringInfo:
    info = getattr(model, "_policysearch", None)
    if not isinstance(info, WiringInfo):
        raise ArtifactError("the model is not prepared; call policysearch.prepare(model) with the policy's wiring first")
    return info


def _weight_ints(m: QuantLinear | QuantConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = m.integer_weights()
    dtype = torch.int8 if m.weight_bits <= 8 else torch.int32
    return q.to(dtype), s.float()


def _probe(model: nn.Module) -> dict[str, torch.Tensor]:
    """The derived values one forward under the policy computes (static once calibrated): each
    activation quantizer's scale, the dyadic ratio of its input and output grids, the int32 biases."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def on_act(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
            if f"{name}.scale" in out or not isinstance(result, tuple) or result[1] is None:
                return
            s_out = result[1].detach().float().cpu()
            out[f"{name}.scale"] = s_out.reshape(-1) if s_out.dim() else s_out
            s_in = args[1] if len(args) > 1 else kwargs.get("scale", kwargs.get("pre_scale"))
            if not isinstance(mod, IntAct):
                return
            s_id = args[3] if len(args) > 3 else kwargs.get("identity_scale")
            for suffix, s in (("", s_in), ("_identity", s_id)):
                if isinstance(s, torch.Tensor):
                    m, e = dyadic_params(s.detach().float().cpu().reshape(-1) / s_out)
                    out[f"{name}.requant_multiplier{suffix}"], out[f"{name}.requant_shift{suffix}"] = m.long(), e.long()
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (IntAct, QuantAct)):
            hooks.append(mod.register_forward_hook(on_act(name), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input(model))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for name, mod in model.named_modules():
        pc = mod.last_int_params() if isinstance(mod, _LAYERS) else None
        if pc is not None:
            out[f"{name}.acc_scale"] = pc[0].detach().float().cpu()
            if pc[1] is not None:
                out[f"{name}.bias_int"] = pc[1].detach().cpu().to(torch.int64)
        if isinstance(mod, QuantSite) and isinstance(mod.last_out_scale, torch.Tensor):
            out[f"{name}.out_scale"] = mod.last_out_scale.detach().float().cpu().reshape(-1)
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`load_artifact` reads back (module docstring), by module path."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Observer):
            for b in _OBSERVER_BUFFERS:
                t = getattr(mod, b)
                if t.numel() or b in ("min_val", "max_val"):
                    out[f"{name}.{b}"] = t.detach().float().cpu().clone()
        elif isinstance(mod, PTFQuant):
            for bits, alpha in mod.alphas().items():
                out[f"{name}.alpha.{bits}"] = alpha.detach().to(torch.int8).cpu()
        elif isinstance(mod, QuantSite):
            if mod.fit_range is not None:
                out[f"{name}.fit_range"] = torch.tensor(mod.fit_range, dtype=torch.float64)
            out.update(_kernel_state(name, mod))
        elif isinstance(mod, _LAYERS):
            q, s = _weight_ints(mod)
            out[f"{name}.weight_int"], out[f"{name}.weight_scale"] = q.cpu(), s.cpu()
    return out


def _kernel_state(name: str, site: QuantSite) -> dict[str, torch.Tensor]:
    if not site.enabled or site.choice.method == "fp32":
        return {}
    kern = site.kernel(site.choice.method)
    if not hasattr(kern, "constants"):
        return {}
    out = {f"{name}.kernel.{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in kern.constants().items()}
    if kern.fitted_range is not None:
        out[f"{name}.kernel.fitted_range"] = torch.tensor(kern.fitted_range, dtype=torch.float64)
    return out


def save_artifact(model: nn.Module, path: str | Path, *, calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the integer artifact of ``model`` (prepared, calibrated, under a policy) to ``path``.

    ``calibration``: how the calibration images were chosen (data, seed, selection rule, digest),
    merged with what :func:`~policysearch.models.wiring.calibrate` recorded (image count, chunk).
    Returns the reference a policy JSON keeps (:func:`artifact_reference`)."""
    info = _info(model)
    if info.policy is None or not info.calibrated:
        raise ArtifactError("save_artifact needs a calibrated model under a policy: prepare, calibrate and "
                            "apply_policy first")
    tensors = {**_probe(model), **_state(model)}  # probe first: it creates the caches _state reads
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    calib = {**(info.calibration or {}), **dict(calibration or {})}
    meta = {"format": ARTIFACT_FORMAT, "numerics": NUMERICS_VERSION, "wiring": info.wiring,
            "observer": info.observer, "policy": json.dumps(info.policy.to_dict(), sort_keys=True),
            "calibration": json.dumps(calib, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return artifact_reference(path, relative_to=path.parent)


def artifact_reference(path: str | Path, *, relative_to: str | Path | None = None) -> dict[str, Any]:
    """The policy JSON's ``integer_model`` block for the artifact at ``path``: its file name (relative
    to ``relative_to``), format, numerics version, sha256 and calibration record."""
    path = Path(path)
    meta, _ = _header(path)
    name = str(path.relative_to(relative_to)) if relative_to is not None else str(path)
    return {"file": name, "format": meta["format"], "numerics": meta["numerics"],
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "calibration": json.loads(meta.get("calibration", "{}"))}


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    if not path.is_file():
        raise ArtifactError(f"integer artifact {path} does not exist; write it with `policysearch export RUN`")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from None


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of an artifact, its format and numerics version checked."""
    path = Path(path)
    meta, _ = _header(path)
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: unknown artifact format {meta.get('format')!r}; this policysearch reads "
                            f"{ARTIFACT_FORMAT}")
    if meta.get("numerics") != NUMERICS_VERSION:
        raise ArtifactError(f"{path} was written by numerics {meta.get('numerics')!r} but this policysearch computes "
                            f"{NUMERICS_VERSION!r}: its integers would differ; export the run again")
    decoded: dict[str, Any] = dict(meta)
    for key in ("policy", "calibration"):
        decoded[key] = json.loads(meta.get(key, "{}"))
    return decoded, load_file(str(path))


def _take(tensors: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"{path} has no {key!r}: it was written for another model or wiring")
    return tensors[key]


def _modules(model: nn.Module, cls: type | tuple[type, ...]) -> Iterator[tuple[str, Any]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, cls))


def load_artifact(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the artifact at ``path`` into ``model`` (prepared with the artifact's wiring, not
    calibrated: nothing is observed) and apply its policy; returns the model.

    The model's integer weights and scales must equal those recorded (the same weights, the same
    bit widths), else an :class:`ArtifactError` names the first layer that differs."""
    path = Path(path)
    meta, tensors = read_artifact(path)
    info = _info(model)
    if info.wiring != meta["wiring"]:
        raise ArtifactError(f"{path} is for the {meta['wiring']!r} wiring but the model is wired {info.wiring!r}; "
                            f"prepare a fresh model with wiring={meta['wiring']!r}")
    device = next(model.parameters()).device
    for name, obs in _modules(model, Observer):
        state = {b: _take(tensors, f"{name}.{b}", path).to(device) for b in _OBSERVER_BUFFERS
                 if b in ("min_val", "max_val") or f"{name}.{b}" in tensors}
        obs.reset()
        obs.load_state_dict(state, strict=False)
        obs.last = None
    for name, site in _modules(model, QuantSite):
        fr = tensors.get(f"{name}.fit_range")
        site.fit_range = None if fr is None else (float(fr[0]), float(fr[1]))
    info.calibrated = True
    info.calibration = meta["calibration"]
    policy = Policy.from_dict(meta["policy"])
    apply_policy(model, policy)
    for name, ptf in _modules(model, PTFQuant):
        prefix = f"{name}.alpha."
        ptf.load_alphas({int(k[len(prefix):]): v.to(device=device, dtype=torch.float32)
                         for k, v in tensors.items() if k.startswith(prefix)})
    for name, site in _modules(model, QuantSite):
        _load_kernel(name, site, tensors)
    _check_weights(model, tensors, path)
    return model


def _load_kernel(name: str, site: QuantSite, tensors: Mapping[str, torch.Tensor]) -> None:
    prefix = f"{name}.kernel."
    values = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not values or not site.enabled or site.choice.method == "fp32":
        return
    fit_range, site.fit_range = site.fit_range, None  # create the kernel without fitting it
    kern = site.kernel(site.choice.method)
    fr = values.pop("fitted_range", None)
    kern.load_fit({k: float(v) for k, v in values.items()}, None if fr is None else (float(fr[0]), float(fr[1])))
    site.fit_range = fit_range


def _check_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    for name, mod in _modules(model, _LAYERS):
        q, s = _weight_ints(mod)
        if not (torch.equal(q.cpu(), _take(tensors, f"{name}.weight_int", path))
                and torch.equal(s.cpu(), _take(tensors, f"{name}.weight_scale", path))):
            raise ArtifactError(f"{name}: the model's integer weights differ from those {path} records: load the "
                                "weights the policy JSON's model block names (model.checkpoint / model.weights)")
