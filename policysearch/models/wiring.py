"""Find the non-linear sites of a timm ViT/DeiT/Swin and wire quantized modules in their place.

``prepare(model, wiring=...)`` replaces, in place: every LayerNorm and GELU by a
:class:`QuantSite`, every ``Attention`` / ``WindowAttention`` by a quantized attention with an
explicit softmax site, every other Linear and the patch-embedding Conv2d by quantized versions.
Until a policy is applied the model computes exactly what it computed before. Site names are
module paths, the softmax being ``<attention path>.softmax``; their order is the order the
forward pass reaches them.

Two wirings (DESIGN.md, "Contracts: Wiring"):

* ``paper`` (default): every method inside one integer pipeline after I-ViT's reference ViT and
  Swin (``policysearch.models.paper``): activation quantizers where I-ViT has them, a 16-bit
  integer residual stream, dyadic requantization; at a site every method receives the same
  quantized tensor. The blocks, patch embedding, patch merging and head are rebuilt around
  ``(x, scale)`` pairs, and the model's ``forward`` runs them (an instance attribute).
* ``native``: timm's own forward with quantized modules in place; each method is fed as its own
  paper wires it (``policysearch.models.precision``), the residual stream stays float.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from timm.layers import Mlp, PatchEmbed
from torch import nn
from tqdm.auto import tqdm

from policysearch.errors import ConfigError
from policysearch.models.families import (
    Family,
    UnsupportedModelError,
    family_of,
    get_family,
    supported_families,
)
from policysearch.models.paper import PaperHead, PaperMlp, PaperPatchEmbed
from policysearch.models.precision import expects, softmax_output_bits
from policysearch.models.segments import install_forward
from policysearch.models.site import QuantSite, Recorder, is_gelu
from policysearch.policy import Policy, PolicyError
from policysearch.quant import IntAct, IntConv2d, IntLinear, QuantConv2d, QuantLinear
from policysearch.sites import Site

__all__ = [
    "CALIB_CHUNK",
    "WIRINGS",
    "UnsupportedModelError",
    "WiringInfo",
    "apply_policy",
    "calib_chunks",
    "calibrate",
    "example_input",
    "find_sites",
    "fitted_constants",
    "float_mode",
    "model_family",
    "prepare",
    "record_sites",
    "sites_of",
]

log = logging.getLogger(__name__)


@dataclass
class WiringInfo:
    family: str  # the family's registered name (``families.get_family``)
    observer: str
    wiring: str = "paper"
    sites: list[Site] = field(default_factory=list)
    calibrated: bool = False
    policy: Policy | None = None
    #: how it was calibrated: ``{"images": N, "chunk": C}`` (None: not calibrated, or loaded)
    calibration: dict | None = None


def model_family(model: nn.Module) -> str:
    """The name of ``model``'s family (``families.family_of``)."""
    return family_of(model).name



def _attention_problem(path: str, m: nn.Module) -> str | None:
    for attr in ("q_norm", "k_norm", "norm"):
        sub = getattr(m, attr, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return f"{path} ({type(m).__name__} with {attr}={type(sub).__name__})"
    if getattr(m, "gate", None) is not None:
        return f"{path} ({type(m).__name__} with a gate)"
    return None


_UNSUPPORTED_NONLINEAR = (nn.Softmax, nn.SiLU, nn.Mish, nn.Hardswish, nn.GroupNorm, nn.BatchNorm1d)


def _check(model: nn.Module, family: Family) -> None:
    wired = family.native_attentions() + family.paper_attentions()
    problems: list[str] = []
    attn_paths: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p in attn_paths):
            continue
        if family.attention_swap(m) is not None:
            attn_paths.append(path)
            if (p := _attention_problem(path, m)) is not None:
                problems.append(p)
        elif "Attention" in type(m).__name__ and not isinstance(m, wired):
            problems.append(f"{path} ({type(m).__name__})")
            attn_paths.append(path)
        elif isinstance(m, _UNSUPPORTED_NONLINEAR) or type(m).__name__ in ("RmsNorm", "SwiGLU", "GluMlp"):
            problems.append(f"{path} ({type(m).__name__})")
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            problems.append(f"{path} (LayerNorm over {tuple(m.normalized_shape)})")
    if problems:
        shown = ", ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise UnsupportedModelError(
            f"unsupported modules in {type(model).__name__}: {shown}. policysearch wires plain "
            f"softmax attention, GELU MLPs and LayerNorm as in the model families {supported_families()}."
        )


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


WIRINGS = ("paper", "native")


def prepare(model: nn.Module, *, observer: str = "minmax", wiring: str = "paper") -> nn.Module:
    """Wire quantized modules into ``model`` in place and return it.

    ``wiring``: ``"paper"`` (default) or ``"native"`` (see the module docstring). Idempotent for the
    same wiring; a model prepared with one wiring cannot be re-wired with the other.
    """
    if wiring not in WIRINGS:
        raise ConfigError(f"unknown wiring {wiring!r}; valid: {', '.join(WIRINGS)}")
    info = getattr(model, "_policysearch", None)
    if isinstance(info, WiringInfo):
        if info.wiring != wiring:
            raise ConfigError(f"the model is already wired {info.wiring!r}; build a fresh model for the "
                              f"{wiring!r} wiring")
        return model
    family = family_of(model)
    _check(model, family)
    if wiring == "paper":
        _prepare_paper(model, family, observer)
    else:
        _prepare_native(model, family, observer)
    model._policysearch = WiringInfo(family=family.name, observer=observer, wiring=wiring)  # type: ignore[attr-defined]
    model._policysearch.sites = _trace_sites(model)  # type: ignore[attr-defined]
    if not model._policysearch.sites:  # type: ignore[attr-defined]
        raise UnsupportedModelError(f"{type(model).__name__} has no Softmax, GELU or LayerNorm site")
    return model


def _prepare_native(model: nn.Module, family: Family, observer: str) -> None:
    for path, m in list(model.named_modules()):
        if (swap := family.attention_swap(m)) is not None:
            _set(model, path, swap.native(m, _site(path + ".softmax", "softmax", None, family, observer), observer))
    attentions = family.native_attentions()
    for path, m in list(model.named_modules()):
        if isinstance(m, (*attentions, QuantSite, QuantLinear, QuantConv2d)):
            continue
        if model.get_submodule(path) is not m:  # already replaced (an Mlp's fc1, wired with its GELU)
            continue
        if isinstance(m, nn.LayerNorm):
            _set(model, path, _site(path, "layernorm", m, family, observer))
        elif is_gelu(m):
            _set(model, path, _site(path, "gelu", m, family, observer, _fc1_of(model, path, observer)))
        elif isinstance(m, nn.Linear) and not _inside(model, path, (*attentions, QuantLinear)):
            _set(model, path, QuantLinear(m, observer))
        elif isinstance(m, nn.Conv2d) and path.endswith("patch_embed.proj"):
            _set(model, path, QuantConv2d(m, observer))


def _paper_problems(model: nn.Module, family: Family) -> list[str]:
    """What the ``paper`` wiring cannot rebuild (checked before anything is replaced)."""
    problems = []
    if not isinstance(getattr(model, "patch_embed", None), PatchEmbed):
        problems.append(f"patch_embed ({type(getattr(model, 'patch_embed', None)).__name__})")
    problems += family.paper_problems(model)
    for path, m in model.named_modules():
        if isinstance(m, Mlp) and not isinstance(m.norm, nn.Identity):
            problems.append(f"{path}.norm (an MLP with an inner norm)")
    return problems


def _prepare_paper(model: nn.Module, family: Family, observer: str) -> None:
    problems = _paper_problems(model, family)
    if problems:
        raise UnsupportedModelError(
            f"the 'paper' wiring cannot rebuild {type(model).__name__}: {', '.join(problems[:8])}; "
            "use wiring='native' (--wiring native) for this model"
        )

    def site(name: str, kind: str, op: nn.Module | None) -> QuantSite:
        return QuantSite(name, kind, op, softmax_bits=softmax_output_bits(family.name), observer=observer, wiring="paper")

    for path, m in list(model.named_modules()):
        if (swap := family.attention_swap(m)) is not None:
            _set(model, path, swap.paper(m, site(path + ".softmax", "softmax", None), observer))
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.LayerNorm) and not _inside(model, path, QuantSite):
            _set(model, path, site(path, "layernorm", m))
        elif is_gelu(m) and not _inside(model, path, QuantSite):
            _set(model, path, site(path, "gelu", m))
    rebuilt = ((Mlp, PaperMlp), *family.paper_blocks())
    for cls, new in rebuilt:  # inner modules first: an MLP is rebuilt before its block
        for path, m in list(model.named_modules()):
            if type(m) is cls:
                _set(model, path, new(m, observer))
    model.patch_embed = PaperPatchEmbed(model.patch_embed, observer)
    family.prepare_paper_ends(model, observer)
    model.paper_head = PaperHead(model, observer, family.name)
    left = [p for p, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Conv2d) and not _inside(model, p, (IntLinear, IntConv2d))]
    if left:
        raise UnsupportedModelError(f"the 'paper' wiring left float layers in {type(model).__name__}: "
                                    f"{', '.join(left[:8])}; use wiring='native' for this model")
    install_forward(model)


def _inside(model: nn.Module, path: str, types: type | tuple[type, ...]) -> bool:
    parts = path.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), types) for i in range(1, len(parts)))


def _site(
    name: str, kind: str, op: nn.Module | None, family: Family, observer: str, fc1: QuantLinear | None = None
) -> QuantSite:
    return QuantSite(name, kind, op, softmax_bits=softmax_output_bits(family.name), observer=observer, producer=fc1)


def _fc1_of(model: nn.Module, gelu_path: str, observer: str) -> QuantLinear | None:
    parent_path = gelu_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    fc1 = getattr(parent, "fc1", None)
    if isinstance(fc1, nn.Linear):
        q = QuantLinear(fc1, observer)
        parent.fc1 = q
        return q
    return fc1 if isinstance(fc1, QuantLinear) else None


def example_input(model: nn.Module) -> torch.Tensor:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    weight = getattr(getattr(pe, "proj", None), "weight", None)
    chans = weight.shape[1] if weight is not None else None
    if size is None or chans is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        chans, *size = cfg.get("input_size", (3, 224, 224))
    if isinstance(size, int):
        size = (size, size)
    param = next(model.parameters())
    return torch.zeros(1, chans, *size, device=param.device, dtype=param.dtype)


def _trace_sites(model: nn.Module) -> list[Site]:
    order: list[str] = []
    with record_sites(model, lambda name, x, y: order.append(name)), float_mode(model), torch.no_grad():
        was_training = model.training
        model.eval()
        model(example_input(model))
        model.train(was_training)
    kinds = {m.site_name: m.kind for m in _quant_sites(model)}
    seen = list(dict.fromkeys(order))
    missing = [n for n in kinds if n not in seen]
    if missing:
        log.warning("sites not reached by the forward pass (kept last): %s", ", ".join(missing))
    return [Site(name=n, kind=kinds[n]) for n in seen + missing]


def _quant_sites(model: nn.Module) -> Iterator[QuantSite]:
    return (m for m in model.modules() if isinstance(m, QuantSite))


def sites_of(model: nn.Module) -> dict[str, QuantSite]:
    """The wired model's site modules by name."""
    return {m.site_name: m for m in _quant_sites(model)}


def find_sites(model: nn.Module) -> list[Site]:
    """Every Softmax, GELU and LayerNorm site in forward order (wires the model if needed)."""
    return list(_prepared(model)._policysearch.sites)


def _prepared(model: nn.Module) -> nn.Module:
    """``model`` as wired (any wiring), or wired now with the default wiring."""
    return model if isinstance(getattr(model, "_policysearch", None), WiringInfo) else prepare(model)


def _info(model: nn.Module) -> WiringInfo:
    info = getattr(model, "_policysearch", None)
    if not isinstance(info, WiringInfo):
        raise UnsupportedModelError("the model is not prepared; call policysearch.prepare(model) first")
    return info


def _set_flag(model: nn.Module, attr: str, value: bool) -> None:
    for m in model.modules():
        if hasattr(m, attr) and isinstance(getattr(m, attr), bool) and not isinstance(m, nn.Dropout):
            setattr(m, attr, value)


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run the exact float model (quantization switched off)."""
    states = [(m, m.enabled) for m in model.modules() if isinstance(getattr(m, "enabled", None), bool)]
    _set_flag(model, "enabled", False)
    try:
        yield model
    finally:
        for m, e in states:
            m.enabled = e


@contextlib.contextmanager
def record_sites(model: nn.Module, recorder: Callable[..., None], *, masks: bool = False) -> Iterator[None]:
    """Call ``recorder(name, site_input, output)`` at every site during the block.

    ``site_input``: in the ``paper`` wiring the tensor the pipeline hands the site (before any
    method-specific conversion, the same tap for every method); in ``native`` the kernel's input.
    With ``masks=True`` the recorder gets a fourth argument, ``valid``: None, or a boolean tensor
    broadcasting to the site's input that is False at masked attention entries (Swin's shifted
    window mask), to be left out of comparisons.
    """
    rec: Recorder = recorder if masks else (lambda n, x, y, v: recorder(n, x, y))  # type: ignore[assignment]
    sites = list(_quant_sites(model))
    for s in sites:
        s.recorder = rec
    try:
        yield
    finally:
        for s in sites:
            s.recorder = None


#: images per calibration forward: :func:`calibrate` regroups whatever batches it is given into
#: chunks of this many images, in order, so the ranges (EMA observers average per chunk, FQ-ViT's PTF
#: searches the last chunk) do not depend on how the caller split the images
CALIB_CHUNK = 256


def calib_chunks(batches: Iterable[torch.Tensor], chunk: int = CALIB_CHUNK) -> Iterator[torch.Tensor]:
    """The images of ``batches``, in order, regrouped into chunks of ``chunk`` (the last may be
    smaller). A batch that already is one whole chunk passes through as it is."""
    if chunk < 1:
        raise ConfigError(f"the calibration chunk must be a positive number of images, got {chunk}")
    pending: list[torch.Tensor] = []
    held = 0
    for x in batches:
        if not pending and x.shape[0] == chunk:
            yield x
            continue
        pending.append(x)
        held += x.shape[0]
        while held >= chunk:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield joined[:chunk]
            rest = joined[chunk:]
            pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
    if held:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], *, progress: bool = False,
              chunk: int = CALIB_CHUNK) -> nn.Module:
    """Observe activation ranges on float forwards of ``batches`` (images); returns the model.

    The images are regrouped into chunks of ``chunk`` (:func:`calib_chunks`): any split of the same
    images in the same order gives the same ranges (``policysearch run`` splits them by 256)."""
    info = _info(_prepared(model))
    batches = calib_chunks(batches, chunk)
    was_training = model.training
    model.eval()
    for m in model.modules():
        if hasattr(m, "observer"):
            m.observer.reset()
        if isinstance(m, QuantSite):
            m.fit_range = None  # the data-aware kernels' range is observed afresh
    if progress:
        batches = tqdm(batches, desc="calibrate", unit="batch", leave=False)
    with float_mode(model):
        _set_flag(model, "calibrating", True)
        try:
            n = images = 0
            for x in batches:
                model(x.to(next(model.parameters()).device))
                n, images = n + 1, images + x.shape[0]
        finally:
            _set_flag(model, "calibrating", False)
    if n == 0:
        raise ValueError("calibration needs at least one batch of images")
    model.train(was_training)
    info.calibrated = True
    info.calibration = {"images": images, "chunk": chunk}
    return model


def fitted_constants(model: nn.Module) -> dict[str, float]:
    """``{"fit:<site>:<name>": value}``: the constants each data-aware method of the applied
    policy fitted at its site (``kernels.data_aware``), for the result's metrics."""
    return {f"fit:{name}:{k}": v for name, site in sites_of(model).items()
            for k, v in site.fitted_constants().items()}


def apply_policy(model: nn.Module, policy: Policy) -> nn.Module:
    """Make ``model`` run ``policy`` (wires it first if needed) and return it.

    The policy must name exactly the model's sites. An uncalibrated model quantizes each
    activation from its own range (dynamic); call :func:`calibrate` first for static ranges.
    """
    info = _info(_prepared(model))
    names = [s.name for s in info.sites]
    unknown = [s.name for s in policy.sites if s.name not in names]
    if unknown:
        raise PolicyError(
            f"policy names site(s) the model does not have: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; list the model's sites with `policysearch list sites`"
        )
    missing = [n for n in names if n not in policy]
    if missing:
        raise PolicyError(f"policy assigns no method to site(s): {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
    kinds = {s.name: s.kind for s in info.sites}
    for site, _ in policy.items():
        if kinds[site.name] != site.kind:
            raise PolicyError(f"site {site.name!r} is a {kinds[site.name]} in the model, not {site.kind}")
    if not info.calibrated:
        log.warning("model not calibrated: activations are quantized dynamically per tensor")
    _set_bits(model, policy)
    _set_flag(model, "enabled", True)
    info.policy = policy
    return model


def _set_bits(model: nn.Module, policy: Policy) -> None:
    info = _info(model)
    if info.wiring == "paper":
        _set_bits_paper(model, policy)
        return
    attentions = get_family(info.family).native_attentions()
    modules = dict(model.named_modules())
    for m in modules.values():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.weight_bits, m.act_bits = policy.weight_bits, policy.act_bits
        elif isinstance(m, attentions):
            m.act_bits = m.qk_bits = policy.act_bits
    for site, choice in policy.items():
        mod = modules[site.name]
        mod.choice, mod.act_bits = choice, policy.act_bits
        if expects(site.kind, choice.method) != "accumulator" or choice.bits is None:
            continue
        # I-BERT eats the accumulator: its bits are those of the producing matmul's operands
        parent = modules[site.name.rpartition(".")[0]]
        if site.kind == "softmax":
            parent.qk_bits = choice.bits
        elif site.kind == "gelu" and isinstance(getattr(parent, "fc1", None), QuantLinear):
            parent.fc1.act_bits = choice.bits


#: the residual stream's width in the paper wiring (I-ViT's QuantAct(16))
RESIDUAL_BITS = 16


def _set_bits_paper(model: nn.Module, policy: Policy) -> None:
    modules = dict(model.named_modules())
    for m in modules.values():
        if isinstance(m, (IntLinear, IntConv2d)):
            m.weight_bits, m.act_bits = policy.weight_bits, policy.act_bits
        elif isinstance(m, IntAct):
            m.bits = RESIDUAL_BITS if m.role == "residual" else policy.act_bits
    for site, choice in policy.items():
        mod = modules[site.name]
        mod.choice, mod.act_bits = choice, policy.act_bits
        for act in mod._input_act:  # the quantizer handing the site its input: Choice.bits
            act.bits = choice.bits if choice.bits is not None else policy.act_bits
        if mod.in_act is not None:
            mod.in_act.bits = choice.bits if choice.bits is not None else RESIDUAL_BITS
