"""The Python API: search a policy for your own model and images in a few lines.

    import policysearch
    result = policysearch.search_policy(model, calib=images, eval=(images, labels), strategy="sqnr_diff")
    result.policy                  # the searched Policy
    result.metrics                 # the answer's top-1, KL, ... and the image counts behind them
    qmodel = result.apply(model)   # the integer model under the policy

:func:`search_policy` is a thin layer over the search the command line runs
(:func:`policysearch.search.search`): it validates the model and images, builds the run's
:class:`~policysearch.search.SearchConfig` from the keyword options (the same fields as
``policysearch run``'s options) and hands the model and images to that search as a
:class:`~policysearch.search.WorkSource`. The run is recorded as a command-line run is
(``results/<run>/``, the Optuna study), so ``policysearch report RUN`` and the dashboard read it,
and the same call again under the same ``run_name`` resumes it.

The verb is ``search_policy`` rather than ``search``: ``policysearch.search`` is the module of the
search driver (``from policysearch.search import search, SearchConfig``), and a package attribute
cannot be both that module and a function.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policysearch.device import resolve_device
from policysearch.errors import ConfigError
from policysearch.identity import IN_MEMORY, data_digest
from policysearch.models.loading import model_input_size
from policysearch.models.wiring import apply_policy, calibrate, find_sites, prepare
from policysearch.numerics import NUMERICS_VERSION
from policysearch.objectives import Evaluator, Objective, load_objective
from policysearch.objectives.repair import ReluRepair, RepairSettings
from policysearch.policy import Policy
from policysearch.report import summary_text
from policysearch.result import EvalResult
from policysearch.search import SearchConfig, SearchResult, run_fingerprint, search
from policysearch.spec import EvaluatorSpec

__all__ = ["PolicyResult", "search_policy"]

log = logging.getLogger(__name__)

#: SearchConfig fields the model and images passed to :func:`search_policy` decide
_FROM_INPUTS = ("model", "checkpoint", "num_classes", "img_size", "in_chans", "data", "calib_size", "eval_size")


# -- the images -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Images:
    """Calibration and evaluation images (and labels) as validated tensors."""

    calib: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor | None = None
    #: content hash of the three (the run's ``data_digest``), computed once
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "digest", data_digest(self.calib, self.eval_images, self.eval_labels))

    def _check(self) -> None:
        _check_images(self.calib, "calib")
        _check_images(self.eval_images, "eval")
        if self.calib.shape[1:] != self.eval_images.shape[1:]:
            raise ConfigError(f"calib images are {tuple(self.calib.shape[1:])} (C, H, W) but eval images are "
                              f"{tuple(self.eval_images.shape[1:])}; preprocess both the same way")
        y = self.eval_labels
        if y is None:
            return
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ConfigError(f"eval labels must be a 1-D integer tensor of class indices, got {y.dtype} "
                              f"of shape {tuple(y.shape)}")
        if len(y) != len(self.eval_images):
            raise ConfigError(f"{len(self.eval_images)} eval images but {len(y)} labels; give one label per image")
        if int(y.min()) < 0:
            raise ConfigError(f"eval labels must be class indices >= 0, got {int(y.min())}")


def _check_images(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or not x.dtype.is_floating_point:
        raise ConfigError(f"{what} images must be a float tensor (N, C, H, W), preprocessed as the model "
                          f"expects; got {x.dtype} of shape {tuple(x.shape)}")
    if len(x) == 0:
        raise ConfigError(f"{what} has no images")


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from a tensor, an ``(images, labels)`` pair, or an iterable of
    batches (a DataLoader) each an image tensor or an ``(images, labels, ...)`` pair."""
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
        raise ConfigError(f"{what} must be image tensors (N, C, H, W), an (images, labels) pair, or a DataLoader; "
                          f"got {type(data).__name__}")
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in data:
        x, y = (batch, None) if isinstance(batch, torch.Tensor) else _pair(batch, what)
        images.append(x)
        if y is not None:
            labels.append(torch.as_tensor(y))
    if not images:
        raise ConfigError(f"{what} gave no batches")
    if labels and len(labels) != len(images):
        raise ConfigError(f"some batches of {what} have labels and some do not")
    return torch.cat(images), (torch.cat(labels) if labels else None)


def _pair(batch: Any, what: str) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ConfigError(f"each batch of {what} must be an image tensor or an (images, labels) pair; "
                      f"got {type(batch).__name__}")


def _images(calib: Any, eval: Any) -> _Images:  # noqa: A002 - the API's keyword
    calib_x, _ = _tensors(calib, "calib")
    if eval is None:
        log.info("no eval images given: the %d calibration images are scored too (no labels: no top-1)", len(calib_x))
        eval_x, eval_y = calib_x, None
    else:
        eval_x, eval_y = _tensors(eval, "eval")
    return _Images(calib=calib_x.detach().cpu(), eval_images=eval_x.detach().cpu(),
                   eval_labels=None if eval_y is None else eval_y.detach().cpu())


# -- the model ------------------------------------------------------------------------------------

def _wired(model: Any, wiring: str) -> nn.Module:
    """A wired copy of ``model`` (the user's model is never changed)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module (a timm ViT, DeiT or Swin), got {type(model).__name__}")
    wired = prepare(copy.deepcopy(model).cpu().eval(), wiring=wiring)  # UnsupportedModelError names the fix
    find_sites(wired)
    return wired


@torch.no_grad()
def _check_fit(model: nn.Module, images: _Images) -> None:
    """The model takes the images and has a class for every label."""
    want, have = model_input_size(model), tuple(images.eval_images.shape[1:])
    try:
        logits = model(images.eval_images[:1])
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"the model takes input {want} (C, H, W) but the images are {have}; preprocess them "
                          f"to the model's input size ({type(exc).__name__}: {str(exc)[:120]})") from None
    if logits.dim() != 2:
        raise ConfigError(f"the model must return class logits (N, classes), got shape {tuple(logits.shape)}")
    y = images.eval_labels
    if y is not None and int(y.max()) >= logits.shape[1]:
        raise ConfigError(f"the labels go up to {int(y.max())} but the model has {logits.shape[1]} classes; build "
                          f"the model with num_classes={int(y.max()) + 1} (and weights trained for them)")


def _weights_digest(model: nn.Module) -> str:
    state = model.state_dict()
    keys = sorted(state)
    names = torch.frombuffer(bytearray("\n".join(keys).encode()), dtype=torch.uint8)
    raw = (state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8) for k in keys)  # any dtype, bf16 too
    return f"tensors:{type(model).__name__}:" + data_digest(names, *raw)


# -- the work source the search runs on -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, eq=False)
class InMemorySpec(EvaluatorSpec):
    """An evaluator spec whose model and images are held in memory instead of named."""

    module: nn.Module = field(repr=False)
    images: _Images = field(repr=False)
    weights: str = ""

    def key(self) -> str:
        plain = {f.name: getattr(self, f.name) for f in fields(EvaluatorSpec)}
        return repr((sorted((k, repr(v)) for k, v in plain.items()), self.weights, self.images.digest))

    def _repair_settings(self) -> RepairSettings | None:
        if not self.relu_repair:
            return None
        return RepairSettings(cache_dir=self.repair_cache_dir, weights_identity=self.weights)

    def build(self) -> Evaluator:
        torch.manual_seed(self.seed)
        objective = (load_objective(self.objective) if isinstance(self.objective, str)
                     else Objective.from_dict(self.objective))
        im = self.images
        evaluator = Evaluator(
            copy.deepcopy(self.module), calib_images=im.calib, eval_images=im.eval_images,
            eval_labels=im.eval_labels, objective=objective, batch_size=self.batch_size,
            sqnr_batch=self.sqnr_batch, device=resolve_device(self.device), reuse=self.reuse,
            progress=self.progress, relu_repair=self._repair_settings(),
        )
        evaluator.data_digest = im.digest
        return evaluator

    @torch.no_grad()
    def integer_model(self, policy: Policy, model: nn.Module | None = None) -> nn.Module:
        """``model`` (default: the searched one) wired, calibrated on the search's calibration
        images in the search's batches, and running ``policy``, as the evaluator scored it."""
        device = torch.device(resolve_device(self.device))
        qmodel = _wired(model, self.wiring) if model is not None else copy.deepcopy(self.module)
        qmodel = qmodel.to(device).eval()
        calib = self.images.calib.to(device)
        calibrate(qmodel, calib.split(self.batch_size))
        settings = self._repair_settings()
        repair = (ReluRepair(qmodel, calib, batch_size=self.batch_size, settings=settings, device=device)
                  if settings is not None else None)
        apply_policy(qmodel, policy)
        if repair is not None:
            repair.apply(policy)
        return qmodel


@dataclass(kw_only=True, eq=False)
class _Source:
    """The :class:`~policysearch.search.WorkSource` of an in-memory model and images."""

    module: nn.Module
    images: _Images
    weights: str
    #: the spec the search built its evaluator from (``apply`` rebuilds the integer model with it)
    built: InMemorySpec | None = None

    def fingerprint(self, config: SearchConfig) -> dict[str, Any]:
        fp = run_fingerprint(config)  # every field a named run has; model, weights and data from memory
        fp.update(model=config.model, model_args={}, weights=self.weights, data=IN_MEMORY,
                  numerics=NUMERICS_VERSION)
        return fp

    def spec(self, doc: Any, **overrides: Any) -> InMemorySpec:
        base = EvaluatorSpec.from_run(doc, **overrides)
        self.built = InMemorySpec(**{f.name: getattr(base, f.name) for f in fields(EvaluatorSpec)},
                                  module=self.module, images=self.images, weights=self.weights)
        return self.built


# -- the API --------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, eq=False)
class PolicyResult:
    """What :func:`search_policy` found: the policy, its metrics, and the integer model on demand."""

    #: the search's full result (baselines, sensitivity, headroom, verdict, run folder)
    search: SearchResult
    _spec: InMemorySpec = field(repr=False)

    @property
    def policy(self) -> Policy:
        return self.search.policy

    @property
    def run_dir(self) -> Path:
        return self.search.run_dir

    @property
    def metrics(self) -> dict[str, float | int]:
        """The answer's metrics (top-1 as a fraction, KL, agreement with float, logit SQNR, ...),
        the float model's top-1, and the image counts they were measured on."""
        im = self._spec.images
        return {**_plain(self.search.result), "float_top1": self.search.float_metrics.get("top1", float("nan")),
                "eval_images": len(im.eval_images), "calib_images": len(im.calib)}

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        """Each uniform policy's metrics (every site one method), by method."""
        return {m: _plain(r) for m, r in self.search.baselines.items()}

    def apply(self, model: nn.Module | None = None) -> nn.Module:
        """The integer model under :attr:`policy`: a wired copy of ``model`` (default: the model
        searched), calibrated on the search's calibration images; ``model`` itself is unchanged.
        On the search's device, in eval mode; its logits are those the search scored."""
        return self._spec.integer_model(self.policy, model)

    def summary(self) -> str:
        """The summary ``policysearch run`` prints."""
        return summary_text(self.search)


def _plain(result: EvalResult) -> dict[str, float]:
    return {k: v for k, v in result.metrics.items() if not k.startswith("fit:")}


def search_policy(model: nn.Module, *, calib: Any, eval: Any = None, bits: int | None = None,  # noqa: A002
                  name: str | None = None, progress: bool = True, **options: Any) -> PolicyResult:
    """Search a per-site integer policy for ``model`` (a timm ViT, DeiT or Swin; not changed).

    ``calib``: calibration images: a float tensor (N, C, H, W) preprocessed as the model expects,
    or a DataLoader of such batches (labels, if any, are ignored). ``eval``: the images policies are
    scored on: ``(images, labels)``, a tensor of images (no top-1 then), or a DataLoader of
    ``(images, labels)``; None scores the calibration images. ``bits``: weight and activation bits
    (or ``weight_bits`` / ``act_bits``). ``name``: the model's name in the run (default: its class).
    ``options``: any :class:`~policysearch.search.SearchConfig` field, as ``policysearch run``'s
    options: ``strategy``, ``space``, ``objective``, ``trials``, ``seed``, ``wiring``,
    ``run_name``, ``results_dir``, ``device``, ``batch_size``, ``max_latency``, ``min_top1``, ...
    Bad input raises :class:`~policysearch.errors.PolicySearchError` naming the fix.
    """
    config = _config(model, name=name, bits=bits, options=options)
    images = _images(calib, eval)
    wired = _wired(model, config.wiring)
    _check_fit(wired, images)
    config = _sized(config, images)
    source = _Source(module=wired, images=images, weights=_weights_digest(model))
    result = search(config, progress=progress, source=source)
    if source.built is None:
        raise RuntimeError("the search built no evaluator spec from its source")  # a driver bug, not input
    return PolicyResult(search=result, _spec=source.built)


def _config(model: Any, *, name: str | None, bits: int | None, options: dict[str, Any]) -> SearchConfig:
    valid = {f.name for f in fields(SearchConfig)} - set(_FROM_INPUTS)
    taken = sorted(set(options) & set(_FROM_INPUTS))
    if taken:
        raise ConfigError(f"{', '.join(taken)}: set by the model and images passed to search_policy; "
                          "leave them out (to use fewer images, pass fewer)")
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"search_policy got unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if options.get("runner", "local") != "local":
        raise ConfigError("a model in memory is searched with runner='local'; for Ray, save its weights and "
                          "run `policysearch run --strategy sqnr_diff --runner ray --model NAME --checkpoint FILE`")
    if bits is not None:
        options = {"weight_bits": bits, "act_bits": bits, **options}
    label = name or type(model).__name__
    try:
        return SearchConfig(model=label, data=IN_MEMORY, **options)
    except TypeError as exc:  # a value of the wrong type the dataclass cannot compare
        raise ConfigError(f"search_policy: {exc}") from None


def _sized(config: SearchConfig, images: _Images) -> SearchConfig:
    """The config with the image counts (recorded in config.yaml and the policy's provenance)."""
    return replace(config, calib_size=len(images.calib), eval_size=len(images.eval_images))

