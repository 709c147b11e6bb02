"""Models by name: a zoo name (weights shipped in the package) or any timm name plus a checkpoint.

timm models are always created with ``pretrained=False``: nothing is ever downloaded. Weights come
from the package (zoo) or from ``checkpoint`` (safetensors, or a torch file holding a state dict,
possibly wrapped in ``{'state_dict': ...}`` / ``{'model': ...}`` and with ``module.`` prefixes).
Every problem raises one :class:`ModelError` that names the problem and the fix.
"""
from __future__ import annotations

import difflib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelError",
    "check_compatible",
    "load_checkpoint",
    "load_model",
    "model_data_config",
    "model_input_size",
    "model_num_classes",
    "read_state_dict",
]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")


class ModelError(ValueError):
    """A model that cannot be built or loaded, or that does not fit the data."""


# ---------------------------------------------------------------------------------------- build


def load_model(name: str, *, checkpoint: str | Path | None = None, num_classes: int | None = None,
               in_chans: int | None = None, img_size: int | tuple[int, int] | None = None) -> nn.Module:
    """A zoo model (package weights unless ``checkpoint``) or a timm model (``pretrained=False``),
    in eval mode. ``num_classes`` / ``in_chans`` / ``img_size`` override the architecture."""
    overrides = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans),
                                   ("img_size", img_size)) if v is not None}
    from policysearch.models import zoo

    if name in zoo.ZOO:
        model = _build_zoo(zoo.get(name), overrides, checkpoint)
    else:
        model = _build_timm(name, overrides)
        if checkpoint is None:
            log.warning("model %s has random weights (timm, pretrained=False); pass a checkpoint for real ones", name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def _build_zoo(entry: Any, overrides: dict[str, Any], checkpoint: str | Path | None) -> nn.Module:
    changed = {k: v for k, v in overrides.items() if entry.kwargs.get(k) != v}
    if changed and checkpoint is None:
        raise ModelError(f"zoo model {entry.name} ships weights for "
                         f"{ {k: entry.kwargs.get(k) for k in changed} }, not {changed}; "
                         "drop the override or pass a checkpoint trained for it")
    if not entry.shipped_weights:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return entry.build(**overrides)
    model = entry.build(**overrides)
    if checkpoint is None:
        from policysearch.models.zoo import weights_path

        path = weights_path(entry.name)
        if not path.is_file():
            raise ModelError(f"the weights of zoo model {entry.name} ({path}) are not in the package; "
                             f"reinstall policysearch or run `python -m policysearch.models.zoo.train {entry.name}`")
        load_checkpoint(model, path)
    return model


def _build_timm(name: str, overrides: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(_unknown_model_message(name))
    try:
        return timm.create_model(name, pretrained=False, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ModelError(f"cannot build timm model {name} with {overrides}: {e}") from None


def _unknown_model_message(name: str) -> str:
    import timm

    from policysearch.models.zoo import list_zoo

    close = difflib.get_close_matches(name, list_zoo() + timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"unknown model {name!r}: not a zoo model ({', '.join(list_zoo())}) and not a timm model name; "
            f"any timm name works (see `timm.list_models()`), with a checkpoint for its weights{hint}")


# ----------------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch checkpoint, unwrapped and with ``module.`` prefixes removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist (or is not a file); check the path")
    readers = (_read_safetensors, _read_torch) if path.suffix == ".safetensors" else (_read_torch, _read_safetensors)
    errors = []
    for reader in readers:
        try:
            obj = reader(path)
            break
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means "try the other format"
            errors.append(f"{reader.__name__[6:]}: {type(e).__name__}: {str(e)[:200]}")
    else:
        raise ModelError(f"checkpoint {path} is neither a safetensors file nor a torch state dict "
                         f"({'; '.join(errors)}); save `model.state_dict()` with torch.save or safetensors")
    return _strip_prefixes(_unwrap(obj, path))


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "can still be loaded" in str(e):
            raise ModelError(f"checkpoint {path} holds pickled Python objects, not just tensors; "
                             "save `model.state_dict()` instead of the model object") from None
        raise


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(obj, Mapping) or _all_tensors(obj):
            break
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(f"checkpoint {path} holds no state dict (found {keys}); expected tensors by name, "
                         f"directly or under one of {', '.join(_WRAPPERS)}")
    return dict(obj)


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Load ``checkpoint`` into ``model`` strictly; a mismatch raises a :class:`ModelError`."""
    state = read_state_dict(checkpoint)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape}
    if missing or unexpected or shapes:
        raise ModelError(_mismatch_message(model, Path(checkpoint), missing, unexpected, shapes))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    log.info("loaded %d tensors from %s", len(state), checkpoint)


def _mismatch_message(model: nn.Module, path: Path, missing: list[str], unexpected: list[str],
                      shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    parts = [f"checkpoint {path} does not fit the model"]
    if shapes:
        parts.append("shape mismatch: " + ", ".join(f"{k} {a} vs model {b}" for k, (a, b) in list(shapes.items())[:4]))
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    return "; ".join(parts) + "; " + _mismatch_fix(model, shapes)


def _mismatch_fix(model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    head = f"{(getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'head')}.weight"
    if head in shapes and len(shapes) <= 2:
        n = shapes[head][0][0]
        return f"the checkpoint has {n} classes: pass num_classes={n} (--num-classes {n})"
    if any("pos_embed" in k or "relative_position" in k for k in shapes):
        return "the checkpoint was trained at another input size: pass its img_size (--img-size)"
    if any(k.startswith("patch_embed") for k in shapes):
        return "the checkpoint has another number of input channels: pass in_chans (--in-chans)"
    return "the checkpoint is for another architecture: pass the model name it was trained with"


# ------------------------------------------------------------------------------------ data fit


def model_num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return getattr(head, "out_features", None)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects: from its patch embedding, else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, *size = cfg.get("input_size", (3, 224, 224))
    pe = getattr(model, "patch_embed", None)
    weight = getattr(getattr(pe, "proj", None), "weight", None)
    if weight is not None:
        chans = int(weight.shape[1])
    img = getattr(pe, "img_size", None)
    if img is not None:
        size = [img, img] if isinstance(img, int) else list(img)
    return int(chans), int(size[0]), int(size[1])


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """Preprocessing for ``model``: input_size, mean, std, interpolation, crop_pct, crop_mode
    (timm's data config, with the input size and channel count the model actually has)."""
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(model=model))
    size = model_input_size(model)
    cfg["input_size"] = size
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        if len(values) != size[0]:
            values = (sum(values) / len(values),) * size[0] if len(values) > 1 else values * size[0]
        cfg[key] = values
    return cfg


def _flexible_size(model: nn.Module) -> bool:
    pe = getattr(model, "patch_embed", None)
    return bool(getattr(model, "dynamic_img_size", False)) or not getattr(pe, "strict_img_size", True)


def check_compatible(model: nn.Module, data: Any) -> None:
    """Raise :class:`ModelError` unless ``model`` and ``data`` agree on classes and input size."""
    n = model_num_classes(model)
    if n is not None and n != data.num_classes:
        raise ModelError(f"the model has {n} classes but the data {data.spec} has {data.num_classes}; "
                         f"use a model with {data.num_classes} classes (num_classes={data.num_classes} "
                         "and a checkpoint trained for them) or data with the model's classes")
    want = model_input_size(model)
    have = tuple(data.input_size)
    if want[0] != have[0] or (want[1:] != have[1:] and not _flexible_size(model)):
        raise ModelError(f"the model takes input {want} (C, H, W) but the data {data.spec} gives {have}; "
                         "load the data with the model's preprocessing "
                         "(load_data(spec, model=model) or model_cfg=model_data_config(model))")
