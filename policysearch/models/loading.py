"""Models by name: a zoo name (weights shipped in the package) or any timm name plus a checkpoint.

timm models are always created with ``pretrained=False``: nothing is ever downloaded. Weights come
from the package (zoo) or from ``checkpoint`` (safetensors, or a torch file holding a state dict,
possibly wrapped in ``{'state_dict': ...}`` / ``{'model': ...}`` and with ``module.`` prefixes).

A fine-tuned checkpoint loads with just the model name: the architecture arguments it needs
(``num_classes`` from the classifier head, ``in_chans`` from the patch embedding, ``img_size`` from
a ViT's position embedding) are read off its tensors, or off its metadata (safetensors metadata,
or keys beside ``state_dict`` in a torch file: ``num_classes``, ``img_size``, ``in_chans``,
``class_names``). Explicit arguments always win. Class names, where known, are attached to the
model (:func:`model_class_names`).

Every problem raises one :class:`ModelError` that names the problem and the fix.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.data import resolve_data_config
from torch import nn

from policysearch.errors import PolicySearchError
from policysearch.models import zoo
from policysearch.models.families import find_family

__all__ = [
    "Checkpoint",
    "ModelError",
    "check_compatible",
    "infer_model_args",
    "load_checkpoint",
    "load_model",
    "model_class_names",
    "model_data_config",
    "model_input_size",
    "model_num_classes",
    "read_checkpoint",
    "read_state_dict",
    "set_class_names",
]

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
#: metadata a checkpoint may carry (safetensors metadata, or keys beside the state dict)
_META_KEYS = ("num_classes", "img_size", "in_chans", "class_names", "classes")
#: classifier weights, in the order they are looked for (ViT/DeiT, Swin, others)
_HEAD_KEYS = ("head.weight", "head.fc.weight", "classifier.weight", "fc.weight")
_ARCH_ARGS = ("num_classes", "in_chans", "img_size")
#: the attribute :func:`set_class_names` sets
CLASS_NAMES_ATTR = "_policysearch_class_names"


class ModelError(PolicySearchError, ValueError):
    """A model that cannot be built or loaded, or that does not fit the data."""


# ---------------------------------------------------------------------------------------- build


def load_model(name: str, *, checkpoint: str | Path | None = None, num_classes: int | None = None,
               in_chans: int | None = None, img_size: int | tuple[int, int] | None = None) -> nn.Module:
    """A zoo model (package weights unless ``checkpoint``) or a timm model (``pretrained=False``),
    in eval mode. ``num_classes`` / ``in_chans`` / ``img_size`` override the architecture; those
    left out are read from ``checkpoint`` where it tells them (see :func:`infer_model_args`) and
    logged. The model's class names, when known, are attached to it (:func:`model_class_names`):
    the checkpoint's metadata, else a zoo model's own when the class count is unchanged."""
    given = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans),
                               ("img_size", img_size)) if v is not None}
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    inferred: dict[str, tuple[Any, str]] = {}
    if ckpt is not None:
        inferred = {k: v for k, v in _infer(ckpt, skip=given).items() if k not in given}
        if inferred:
            log.info("%s: read from checkpoint %s: %s", name, ckpt.path,
                     ", ".join(f"{k}={v} ({how})" for k, (v, how) in inferred.items()))
    overrides = {**{k: v for k, (v, _) in inferred.items()}, **given}
    entry = zoo.get(name) if name in zoo.ZOO else None
    if entry is not None:
        model = _build_zoo(entry, overrides, checkpoint)
    else:
        model = _build_timm(name, overrides, inferred)
        if ckpt is None:
            log.warning("model %s has random weights (timm, pretrained=False); pass a checkpoint for real ones", name)
        elif "img_size" not in overrides and (family := find_family(model)) and not family.state_tells_img_size:
            log.info("%s: a %s state dict does not tell its input size; building at the model's default %s "
                     "(pass img_size / --img-size if the checkpoint was trained at another size)",
                     name, family.title, model_input_size(model)[1:])
    if ckpt is not None:
        _load_state(model, ckpt.state, ckpt.path, inferred)
    _attach_class_names(model, entry, ckpt)
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
        path = zoo.weights_path(entry.name)
        if not path.is_file():
            raise ModelError(f"the weights of zoo model {entry.name} ({path}) are not in the package; "
                             f"reinstall policysearch or run `python reproduce/train_zoo.py {entry.name}`")
        load_checkpoint(model, path)
    return model


def _build_timm(name: str, overrides: dict[str, Any], inferred: Mapping[str, Any] = ()) -> nn.Module:
    if not timm.is_model(name):
        raise ModelError(_unknown_model_message(name))
    try:
        return timm.create_model(name, pretrained=False, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        note = f" ({', '.join(inferred)} read from the checkpoint)" if inferred else ""
        raise ModelError(f"cannot build timm model {name} with {overrides}{note}: {e}; "
                         "check the model name and the --num-classes / --img-size / --in-chans values") from None


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, zoo.list_zoo() + timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"unknown model {name!r}: not a zoo model ({', '.join(zoo.list_zoo())}) and not a timm model name; "
            f"any timm name works (see `timm.list_models()`), with a checkpoint for its weights{hint}")


# ---------------------------------------------------------------------------------- class names


def set_class_names(model: nn.Module, names: Sequence[str] | None) -> None:
    """Attach class names to ``model`` (``names[i]`` names output ``i``; None: unknown), as the
    ``_policysearch_class_names`` attribute and in its ``pretrained_cfg``."""
    names = [str(n) for n in names] if names is not None else None
    model.__dict__[CLASS_NAMES_ATTR] = names
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        if names is None:
            cfg.pop("class_names", None)
        else:
            cfg["class_names"] = list(names)


def model_class_names(model: nn.Module) -> list[str] | None:
    """The class names of ``model``'s outputs (``[i]`` names output ``i``), or None when unknown:
    those :func:`load_model` attached, else a ``class_names`` list in its ``pretrained_cfg``."""
    if CLASS_NAMES_ATTR in model.__dict__:
        names = model.__dict__[CLASS_NAMES_ATTR]
        return list(names) if names is not None else None
    names = (getattr(model, "pretrained_cfg", None) or {}).get("class_names")
    n = model_num_classes(model)
    if names and (n is None or len(names) == n):
        return [str(x) for x in names]
    return None


def _attach_class_names(model: nn.Module, entry: Any, ckpt: Checkpoint | None) -> None:
    n = model_num_classes(model)
    names = ckpt.class_names if ckpt is not None else None
    if names is not None:
        if n is not None and len(names) != n:
            raise ModelError(f"checkpoint {ckpt.path} lists {len(names)} class names but the model has {n} "  # type: ignore[union-attr]
                             "outputs; fix (or remove) the class_names in the checkpoint's metadata")
    elif entry is not None and n == entry.num_classes:
        names = list(entry.class_names)
    set_class_names(model, names)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and n is not None:
        cfg["num_classes"] = n


# ----------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors (unwrapped, prefixes removed) and its metadata (parsed)."""

    path: Path
    state: dict[str, torch.Tensor]
    #: num_classes / in_chans (int), img_size (int or (h, w)), class_names (list of str), where present
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a safetensors or torch checkpoint: its tensors and its metadata (safetensors metadata,
    or ``num_classes`` / ``img_size`` / ``in_chans`` / ``class_names`` keys beside the state dict)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist (or is not a file); check the path given as "
                         "the checkpoint (--checkpoint)")
    readers = (_read_safetensors, _read_torch) if path.suffix == ".safetensors" else (_read_torch, _read_safetensors)
    errors = []
    for reader in readers:
        try:
            obj, raw_meta = reader(path)
            break
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means "try the other format"
            errors.append(f"{reader.__name__[6:]}: {type(e).__name__}: {str(e)[:200]}")
    else:
        raise ModelError(f"checkpoint {path} is neither a safetensors file nor a torch state dict "
                         f"({'; '.join(errors)}); save `model.state_dict()` with torch.save or safetensors")
    state, wrapper_meta = _unwrap(obj, path)
    return Checkpoint(path=path, state=_strip_prefixes(state),
                      metadata=_parse_metadata({**wrapper_meta, **raw_meta}, path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch checkpoint, unwrapped and with ``module.`` prefixes removed."""
    return read_checkpoint(path).state


def _read_safetensors(path: Path) -> tuple[Any, dict[str, Any]]:
    state = load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return state, meta


def _read_torch(path: Path) -> tuple[Any, dict[str, Any]]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "can still be loaded" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(
                f"checkpoint {path} was refused by torch.load(weights_only=True), which reads tensors only, "
                f"because it holds pickled Python objects{what}, so if you trust the file re-save it as a plain "
                "state dict (torch.save(model.state_dict(), 'model.pth')) or as safetensors and pass that file."
            ) from None
        raise


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta: dict[str, Any] = {}
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        for k in _META_KEYS:
            if k in obj and not isinstance(obj[k], torch.Tensor) and k not in meta:
                meta[k] = obj[k]
        rest = {k: v for k, v in obj.items() if not (k in _META_KEYS and k in meta)}
        if rest and _all_tensors(rest):
            obj = rest
            break
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(f"checkpoint {path} holds no state dict (found {keys}); expected tensors by name, "
                         f"directly or under one of {', '.join(_WRAPPERS)}")
    return dict(obj), meta


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


def _parse_metadata(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Checkpoint metadata -> typed values; safetensors metadata values are strings (JSON allowed)."""
    out: dict[str, Any] = {}
    for key in _META_KEYS:
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        target = "class_names" if key == "classes" else key
        if target in out:
            continue
        try:
            out[target] = _meta_value(target, value)
        except (TypeError, ValueError):
            shown = repr(raw[key])[:80]
            raise ModelError(f"checkpoint {path}: metadata {key}={shown} is not "
                             f"{'a list of class names' if target == 'class_names' else 'a positive integer'}"
                             f"{' or [height, width]' if target == 'img_size' else ''}; fix or remove it") from None
    return out


def _meta_value(key: str, value: Any) -> Any:
    if key == "class_names":
        if isinstance(value, str):
            value = [v.strip() for v in value.splitlines() if v.strip()]
        elif isinstance(value, Mapping):  # {name: index} (torchvision's class_to_idx) or {index: name}
            items = [(int(v), str(k)) if not isinstance(v, str) else (int(k), v) for k, v in value.items()]
            value = [name for _, name in sorted(items)]
        if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
            raise TypeError(key)
        return [str(v) for v in value]
    if key == "img_size" and isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(key)
        h, w = (_positive(v) for v in value)
        return h if h == w else (h, w)
    return _positive(value)


def _positive(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise TypeError(value)
    n = int(value)
    if n < 1:
        raise ValueError(value)
    return n


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _infer(ckpt: Checkpoint, skip: Mapping[str, Any] = ()) -> dict[str, tuple[Any, str]]:
    """Architecture arguments -> (value, where it was read); metadata must agree with the tensors."""
    state = ckpt.state
    out: dict[str, tuple[Any, str]] = {}
    head = next((k for k in _HEAD_KEYS if k in state and state[k].ndim == 2), None)
    if head is not None:
        out["num_classes"] = (int(state[head].shape[0]), f"{head} {tuple(state[head].shape)}")
        dist = state.get("head_dist.weight")
        if dist is not None and dist.ndim == 2 and dist.shape[0] != state[head].shape[0]:
            raise ModelError(f"checkpoint {ckpt.path} is inconsistent: {head} has {state[head].shape[0]} outputs "
                             f"but head_dist.weight {dist.shape[0]}; re-export it from the trained model")
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        out["in_chans"] = (int(proj.shape[1]), f"patch_embed.proj.weight {tuple(proj.shape)}")
        pos = state.get("pos_embed")
        if pos is not None and pos.ndim == 3 and proj.shape[-1] == proj.shape[-2]:
            patch, n = int(proj.shape[-1]), int(pos.shape[1])
            prefix = sum(int(state[k].shape[1]) for k in ("cls_token", "dist_token", "reg_token")
                         if k in state and state[k].ndim == 3)
            for grid in (n - prefix, n):  # position embeddings with, then without, the prefix tokens
                side = math.isqrt(grid) if grid > 0 else 0
                if side and side * side == grid:
                    out["img_size"] = (side * patch, f"pos_embed: {n} tokens = {n - grid} prefix + "
                                                     f"{side}x{side} patches of {patch}")
                    break
    for key in _ARCH_ARGS:
        if key not in ckpt.metadata or key in skip:
            continue
        value = ckpt.metadata[key]
        if key in out and (_pair(out[key][0]) if key == "img_size" else out[key][0]) != (
                _pair(value) if key == "img_size" else value):
            raise ModelError(f"checkpoint {ckpt.path}: its metadata says {key}={value} but its tensors say "
                             f"{out[key][0]} ({out[key][1]}); fix the metadata, or pass "
                             f"--{key.replace('_', '-')} to choose")
        out.setdefault(key, (value, "metadata"))
    return out


def infer_model_args(checkpoint: str | Path | Checkpoint) -> dict[str, Any]:
    """The architecture arguments ``checkpoint`` tells: ``num_classes`` (classifier head),
    ``in_chans`` (patch embedding), ``img_size`` (a ViT's position embedding and patch size), and
    any of them in its metadata. Swin state dicts do not tell ``img_size``."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    return {k: v for k, (v, _) in _infer(ckpt).items()}


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Load ``checkpoint`` into ``model`` strictly; a mismatch raises a :class:`ModelError`."""
    ckpt = read_checkpoint(checkpoint)
    _load_state(model, ckpt.state, ckpt.path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                inferred: Mapping[str, tuple[Any, str]] | None = None) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape}
    if missing or unexpected or shapes:
        message = _mismatch_message(model, path, missing, unexpected, shapes)
        if inferred:
            message += f" (built with {', '.join(f'{k}={v}' for k, (v, _) in inferred.items())} read from the checkpoint)"
        raise ModelError(message)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)


def _mismatch_message(model: nn.Module, path: Path, missing: list[str], unexpected: list[str],
                      shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    parts = [f"checkpoint {path} does not fit the model"]
    if shapes:
        parts.append("shape mismatch: " + ", ".join(f"{k} {a} vs model {b}" for k, (a, b) in list(shapes.items())[:4]))
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
    return "; ".join(parts) + "; " + _mismatch_fix(model, missing, unexpected, shapes)


def _head_keys(model: nn.Module) -> set[str]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    weights = {*_HEAD_KEYS, "head_dist.weight", f"{classifier}.weight"}
    return weights | {k.removesuffix("weight") + "bias" for k in weights}


def _mismatch_fix(model: nn.Module, missing: list[str], unexpected: list[str],
                  shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    heads = _head_keys(model)
    if shapes and set(shapes) <= heads and not missing and not unexpected:
        weight = next(k for k in shapes if k.endswith("weight")) if any(k.endswith("weight") for k in shapes) else None
        n = shapes[weight][0][0] if weight else shapes[next(iter(shapes))][0][0]
        return f"the checkpoint has {n} classes: pass num_classes={n} (--num-classes {n})"
    if missing and set(missing) <= heads and not unexpected and not shapes:
        return "the checkpoint has no classifier head: pass num_classes=0 (--num-classes 0) to load it as features"
    if {"dist_token", "head_dist.weight"} & set(unexpected):
        return ("the checkpoint is a distilled DeiT (dist_token, head_dist): use a distilled model name, "
                "e.g. deit_tiny_distilled_patch16_224")
    if {"dist_token", "head_dist.weight"} & set(missing):
        return "the model is a distilled DeiT but the checkpoint is not: use the model name without 'distilled'"
    proj = shapes.get("patch_embed.proj.weight")
    if proj is not None and len(proj[0]) == len(proj[1]) == 4:
        (d, c, *p), (dm, cm, *pm) = proj
        if p != pm:
            return (f"the checkpoint uses {p[0]}x{p[1]} patches, the model {pm[0]}x{pm[1]}: "
                    f"use the model name with patch {p[0]} it was trained with")
        if c != cm and d == dm:
            return f"the checkpoint takes {c} input channels: pass in_chans={c} (--in-chans {c})"
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
        k = data.num_classes
        raise ModelError(f"the model has {n} classes but the data {data.spec} has {k}; pass --num-classes {k} "
                         f"(Python: num_classes={k}) for a {k}-class head, with a --checkpoint trained for "
                         f"those classes (random weights without one), or use data with the model's {n} classes")
    want = model_input_size(model)
    have = tuple(data.input_size)
    if want[0] != have[0] or (want[1:] != have[1:] and not _flexible_size(model)):
        raise ModelError(f"the model takes input {want} (C, H, W) but the data {data.spec} gives {have}; "
                         "load the data with the model's preprocessing "
                         "(load_data(spec, model=model) or model_cfg=model_data_config(model))")
