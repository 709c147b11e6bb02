"""ReLU repair: a GELU site that chooses ``relu`` is evaluated with its block's MLP re-fitted.

Swapping GELU for ReLU in a GELU-trained block changes the block's function, and a search that
scores the swap as it stands charges ``relu`` with a loss that a short distillation mostly
recovers (Tayaranian et al. 2024). So, for the block of such a site, the evaluator uses a
*repaired* MLP: ``fc1 -> ReLU -> fc2`` starting from the float weights, with only ``fc1`` and
``fc2`` trained (Adam, ``steps`` steps, cosine decay, batches of ``batch_tokens`` tokens) to
minimise the MSE between its output and the float ``fc1 -> GELU -> fc2`` output, on the inputs of
that MLP recorded from the float model on the calibration images (at most ``max_tokens`` tokens,
sampled uniformly; an MLP acts on each token alone, so tokens are the samples). The repair is in
float; the policy then quantizes the repaired weights as usual (per-channel weights at the
policy's ``weight_bits``). The block's own activation quantizers inside the MLP (fc1's output,
the activation's output, fc2's output) are re-calibrated on the repaired float ReLU MLP with the
same calibration batches, as ``wiring.calibrate`` calibrated the originals; all other ranges stay.

**Keyed by what it depends on, not by bit width.** The repaired weights depend on the float
weights (all of them: the MLP's inputs come from every block upstream), the calibration images,
the site and the settings, so a repair is computed once per (weights, calibration data, site,
settings), whatever the policy's bit widths and the site's ``Choice.bits``: the training target
is the float block and the training is float, so a bit width would only multiply the work without
changing the result. (A quantization-aware repair, which would depend on the bits, is what the
training stage's QAT does afterwards.) The activation ranges are re-calibrated per evaluator
(one float pass over the calibration images for every new batch of repaired sites), so a cached
repair serves both wirings and every observer.

**Caches.** In memory per evaluator (a site is repaired once, whatever candidates follow) and on
disk under ``RepairSettings.cache_dir`` (``results/cache/relu_repair/<site>-<hash>.safetensors``),
the hash over the weights identity (``policysearch.models.zoo.weights_identity`` where the caller gives
it) and a content hash of the model's parameters (always: ``random:timm-init`` alone would not
tell two seeds apart), the calibration images' digest (``policysearch.spec.data_digest``), the
site name, the settings and :data:`REPAIR_VERSION`. A fresh evaluator, in this or another run,
loads the file instead of training; a file whose tensors do not fit the model is ignored (a
warning) and recomputed. The key does not name the device: the first to compute a repair writes
it and every later run reuses it. Two processes that need the same new repair at once both train
it (the file is replaced atomically).

**Opt-in.** ``Evaluator(..., relu_repair=RepairSettings(...))`` (or ``True``) turns it on; it is
off by default because an evaluator on weights already distilled to ReLU (the training stage's
checkpoint) must not re-fit them to a GELU float model.

**Side effects on the metrics.** At the ``relu`` site itself gamma compares the repaired fc1
output with the float fc1 output and beta ReLU with GELU, so both are low by construction; the
sites after it and the model-level metrics are what show the repair. A repaired site changes only
its own block's MLP segment (``models.segments``), and the weights of a site are a function of
its choice alone, so the evaluator's segment reuse stays exact.

**How close it comes** (``python benchmarks/bench_relu_repair.py``, CPU): ``fmnist_vit`` with its shipped weights,
``--data fmnist-sample`` (512 calibration images, top-1 on the 2,000 test images), ``paper``
wiring, W8A8, uniform ``ibert`` with every GELU site ``relu``, default settings: float model
90.25%; uniform ``ibert`` with GELU 90.40%; ``relu`` unrepaired 87.05%; ``relu`` repaired 90.05%
(0.20 points under float; KL to float 0.0020 against 0.068 unrepaired). The six repairs cut the
MLP output MSE, relative to the float output's mean square, from 0.024-0.25 to 0.0005-0.0042 and
took about 6 s each. The training stage's full iterative GELU -> ReLU distillation
(``policysearch.finetune.relu``: end-to-end KD on training images, then QAT) was not re-run for
this comparison; its figures for the same model belong in ``results/finetune.md``.

Pieces shared with the training stage: ``train.surgery.swap_to_relu`` makes the student's ReLU,
``train.surgery.frozen_copy`` the teacher, ``train.Schedule`` the learning-rate schedule.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from policysearch.errors import ConfigError, PolicySearchError
from policysearch.identity import data_digest
from policysearch.methods import get_method
from policysearch.models.wiring import find_sites, float_mode
from policysearch.policy import Policy
from policysearch.quant.observers import Observer
from policysearch.train.surgery import frozen_copy, swap_to_relu
from policysearch.train.trainer import Schedule

__all__ = [
    "DEFAULT_CACHE_DIR",
    "REPAIR_VERSION",
    "RepairError",
    "RepairSettings",
    "RepairedMlp",
    "ReluRepair",
    "mlp_output_mse",
    "repair_mlp",
]

log = logging.getLogger(__name__)

#: bump on any change that alters the repaired weights for the same inputs (it enters the cache key)
REPAIR_VERSION = "1"
#: where repairs are kept across runs, relative to the working directory (the CLI's results dir)
DEFAULT_CACHE_DIR = Path("results") / "cache" / "relu_repair"
_FORMAT = "policysearch.relu-repair/v1"
_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class RepairError(PolicySearchError, ValueError):
    """A ``relu`` site whose block cannot be repaired (not an ``fc1 -> act -> fc2`` MLP)."""


@dataclass(frozen=True, kw_only=True)
class RepairSettings:
    """How a ``relu`` site's MLP is repaired (the fields above ``cache_dir`` enter the cache key).

    ``steps`` Adam steps at ``lr`` (cosine decay to 0) on batches of ``batch_tokens`` tokens drawn
    (``seed``) from at most ``max_tokens`` recorded tokens. ``cache_dir``: the disk cache (None:
    memory only). ``weights_identity``: ``policysearch.models.zoo.weights_identity(model, checkpoint)``
    where the caller knows it (it joins the parameters' content hash in the key)."""

    steps: int = 300
    lr: float = 1e-3
    batch_tokens: int = 1024
    max_tokens: int = 32768
    seed: int = 0
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR
    weights_identity: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"relu repair: {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"relu repair: lr must be a positive number, got {self.lr!r}")

    def key_fields(self) -> dict[str, Any]:
        """The settings that change the repaired weights."""
        d = asdict(self)
        del d["cache_dir"], d["weights_identity"]
        return d


@dataclass
class RepairedMlp:
    """The repaired float weights of one site's MLP (``bias`` entries None where it has none)."""

    site: str
    weights: dict[str, torch.Tensor | None]
    mse_before: float  # MLP output MSE of plain ReLU (float weights) against the float GELU MLP
    mse_after: float  # ... of the repaired ReLU MLP
    target_power: float  # mean square of the float MLP output (to read the MSEs relatively)
    seconds: float = 0.0
    source: str = "computed"  # "computed" or the cache file it was loaded from

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.weights.items() if v is not None}


# -- the training ---------------------------------------------------------------------------------
def _linear(src: nn.Module) -> nn.Linear:
    w = src.weight
    lin = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None, device=w.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(w)
        if src.bias is not None:
            lin.bias.copy_(src.bias)
    return lin


def _float_mlp(mlp: nn.Module) -> nn.Sequential:
    """``fc1 -> act -> fc2`` in float, copied from a (wired) timm MLP; ``act`` its float GELU."""
    act = getattr(mlp.act, "float_op", mlp.act)  # a wired site keeps the original operator
    return nn.Sequential(OrderedDict(fc1=_linear(mlp.fc1), act=copy.deepcopy(act), fc2=_linear(mlp.fc2)))


def _chunks(x: torch.Tensor, n: int = 8192) -> Iterable[torch.Tensor]:
    return x.split(n)


@torch.no_grad()
def mlp_output_mse(mlp: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of ``mlp(inputs)`` against ``targets`` (token rows, in chunks)."""
    total = 0.0
    for x, t in zip(_chunks(inputs), _chunks(targets)):
        total += float(F.mse_loss(mlp(x), t, reduction="sum"))
    return total / max(targets.numel(), 1)


def repair_mlp(teacher: nn.Module, inputs: torch.Tensor, settings: RepairSettings, *, site: str = "",
               progress: bool = False) -> RepairedMlp:
    """Fit ``fc1 -> ReLU -> fc2`` (from ``teacher``'s weights) to ``teacher``'s output on ``inputs``.

    ``teacher``: a float ``nn.Sequential(fc1=..., act=GELU, fc2=...)`` (left unchanged);
    ``inputs``: ``(tokens, dim)`` rows, on the device to train on. Deterministic for the same
    inputs, settings and device."""
    start = time.perf_counter()
    teacher = frozen_copy(teacher)
    student = swap_to_relu(copy.deepcopy(teacher), ["act"])
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        targets = torch.cat([teacher(x) for x in _chunks(inputs)])
    power = float(targets.pow(2).mean())
    before = mlp_output_mse(student, inputs, targets)
    schedule = Schedule(lr=settings.lr, total=settings.steps)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    batch = min(settings.batch_tokens, inputs.shape[0])
    steps: Iterable[int] = range(settings.steps)
    if progress:
        steps = tqdm(steps, desc=f"relu repair {site}", unit="step", leave=False)
    with torch.enable_grad():
        student.train()
        for step in steps:
            idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen).to(inputs.device)
            for g in optimizer.param_groups:
                g["lr"] = schedule.lr_at(step)
            loss = F.mse_loss(student(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    student.eval()
    after = mlp_output_mse(student, inputs, targets)
    weights = {"fc1.weight": student.fc1.weight.detach().clone(),
               "fc1.bias": student.fc1.bias.detach().clone() if student.fc1.bias is not None else None,
               "fc2.weight": student.fc2.weight.detach().clone(),
               "fc2.bias": student.fc2.bias.detach().clone() if student.fc2.bias is not None else None}
    return RepairedMlp(site=site, weights=weights, mse_before=before, mse_after=after, target_power=power,
                       seconds=time.perf_counter() - start)


# -- the evaluator's side: recording, caches, swapping ---------------------------------------------
def _param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _observers(module: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in module.named_modules() if isinstance(m, Observer)}


@dataclass
class _SiteState:
    """One GELU site's MLP: its original weights and ranges, and what is swapped in now."""

    mlp: nn.Module
    original: dict[str, torch.Tensor | None] = field(default_factory=dict)
    original_ranges: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    repaired: RepairedMlp | None = None
    repaired_ranges: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    current: str = "original"  # or "repaired"


def _params_of(mlp: nn.Module) -> dict[str, torch.Tensor | None]:
    return {"fc1.weight": mlp.fc1.weight, "fc1.bias": mlp.fc1.bias,
            "fc2.weight": mlp.fc2.weight, "fc2.bias": mlp.fc2.bias}


def _ranges_of(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {p: {k: v.detach().clone() for k, v in obs.state_dict().items()} for p, obs in _observers(module).items()}


class ReluRepair:
    """The repairs of one evaluator's model: computes, caches and swaps them (module docstring).

    ``model``: the wired, calibrated model; ``calib_images`` and ``batch_size``: exactly what it
    was calibrated on. :meth:`apply` before each forward makes every GELU site's MLP run repaired
    weights where the policy chooses ``relu`` and the original weights elsewhere."""

    def __init__(self, model: nn.Module, calib_images: torch.Tensor, *, batch_size: int,
                 settings: RepairSettings, device: torch.device, progress: bool = False) -> None:
        self.model = model
        self.calib = calib_images
        self.batch_size = batch_size
        self.settings = settings
        self.device = device
        self.progress = progress
        self.cache_dir = Path(settings.cache_dir) if settings.cache_dir is not None else None
        self.gelu_sites = [s.name for s in find_sites(model) if s.kind == "gelu"]
        self._states: dict[str, _SiteState] = {}
        self._identity: dict[str, Any] | None = None
        #: how many repairs were trained / loaded from disk by this object (tests, logs)
        self.trainings = 0
        self.loads = 0

    # -- public -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, policy: Policy) -> None:
        """Swap repaired weights in at the policy's ``relu`` GELU sites and originals elsewhere."""
        relu = [s.name for s, c in policy.items() if get_method(s.kind, c.method).replaces_op]
        new = [s for s in relu if s not in self._states or self._states[s].repaired is None]
        if new:
            self._restore_all()  # the float passes below must see the float model
            self._prepare(new)
        for name in self.gelu_sites:
            if name in self._states or name in relu:
                self._set(name, "repaired" if name in relu else "original")

    def key(self, site: str) -> str:
        """The disk cache key of ``site``'s repair (``<site>-<hash>``)."""
        payload = {"format": _FORMAT, "version": REPAIR_VERSION, **self._ids(), "site": site,
                   "settings": self.settings.key_fields()}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
        return f"{site}-{digest}"

    def repaired(self, site: str) -> RepairedMlp | None:
        state = self._states.get(site)
        return state.repaired if state is not None else None

    # -- internals ----------------------------------------------------------------------------
    def _ids(self) -> dict[str, Any]:
        if self._identity is None:  # computed before any swap: the original parameters

            self._restore_all()
            self._identity = {"weights": self.settings.weights_identity, "params": _param_digest(self.model),
                              "calib": data_digest(self.calib)}
        return self._identity

    def _mlp(self, site: str) -> nn.Module:
        parent, _, attr = site.rpartition(".")
        mlp = self.model.get_submodule(parent) if parent else None
        ok = (mlp is not None and attr == "act" and all(hasattr(getattr(mlp, n, None), "weight") for n in ("fc1", "fc2"))
              and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity))
        if not ok:
            raise RepairError(f"site {site!r}: relu repair needs an MLP 'fc1 -> act -> fc2' around it, found "
                              f"{type(mlp).__name__ if mlp is not None else 'none'}; evaluate without relu repair")
        return mlp

    def _state(self, site: str) -> _SiteState:
        state = self._states.get(site)
        if state is None:
            mlp = self._mlp(site)
            state = _SiteState(mlp=mlp, original={k: (v.detach().clone() if v is not None else None)
                                                  for k, v in _params_of(mlp).items()},
                               original_ranges=_ranges_of(mlp))
            self._states[site] = state
        return state

    @torch.no_grad()
    def _set(self, site: str, which: str) -> None:
        state = self._state(site)
        if state.current == which:
            return
        weights = state.original if which == "original" else state.repaired.weights  # type: ignore[union-attr]
        ranges = state.original_ranges if which == "original" else state.repaired_ranges
        for name, p in _params_of(state.mlp).items():
            if p is not None:
                p.copy_(weights[name])  # in place: bumps the version, which the weight caches key on
        observers = _observers(state.mlp)
        for path, sd in ranges.items():
            observers[path].load_state_dict(sd)
        state.current = which

    def _restore_all(self) -> None:
        for name in list(self._states):
            self._set(name, "original")

    def _prepare(self, sites: Sequence[str]) -> None:
        states = {s: self._state(s) for s in sites}
        todo: list[str] = []
        for s in sites:
            loaded = self._load(s)
            if loaded is not None:
                states[s].repaired = loaded
            else:
                todo.append(s)
        if todo:
            inputs = self._record(todo)
            for s in todo:
                teacher = _float_mlp(states[s].mlp)
                rep = repair_mlp(teacher, inputs.pop(s).to(self.device), self.settings, site=s,
                                 progress=self.progress)
                self.trainings += 1
                path = self._save(s, rep)
                log.info("relu repair %s: computed (%d steps, %.1fs), MLP output MSE %.4g -> %.4g "
                         "(float output mean square %.4g)%s", s, self.settings.steps, rep.seconds,
                         rep.mse_before, rep.mse_after, rep.target_power, f"; cached in {path}" if path else "")
                states[s].repaired = rep
        self._calibrate(sites)

    @torch.no_grad()
    def _float_pass(self, hooks: dict[str, Callable[..., None]]) -> None:
        handles = [self._states[s].mlp.register_forward_hook(fn) for s, fn in hooks.items()]
        try:
            with float_mode(self.model):
                for x in self.calib.split(self.batch_size):
                    self.model(x)
        finally:
            for h in handles:
                h.remove()

    def _record(self, sites: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each site's MLP inputs on the calibration images (float model), at most max_tokens rows."""
        n_images = self.calib.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(self.settings.seed)
        kept: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

        def hook(site: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0].detach()
                rows = x.reshape(-1, x.shape[-1])
                share = math.ceil(self.settings.max_tokens * x.shape[0] / n_images)
                if share < rows.shape[0]:
                    rows = rows[torch.randperm(rows.shape[0], generator=gen)[:share].to(rows.device)]
                kept[site].append(rows.float().cpu())
            return fn

        self._float_pass({s: hook(s) for s in sites})
        return {s: torch.cat(v)[: self.settings.max_tokens] for s, v in kept.items()}

    @torch.no_grad()
    def _calibrate(self, sites: Sequence[str]) -> None:
        """The ranges of each repaired MLP's quantizers: its float ReLU copy observes the MLP's
        inputs of one float pass over the calibration batches (the model's own output unchanged)."""
        copies: dict[str, nn.Module] = {}
        for s in sites:
            c = copy.deepcopy(self._states[s].mlp)
            for name, p in _params_of(c).items():
                if p is not None:
                    p.copy_(self._states[s].repaired.weights[name])  # type: ignore[union-attr]
            c.act.float_op = nn.ReLU()
            for m in c.modules():
                if hasattr(m, "observer"):
                    m.observer.reset()
                for flag, value in (("calibrating", True), ("enabled", False)):
                    if isinstance(getattr(m, flag, None), bool):
                        setattr(m, flag, value)
            copies[s] = c

        def hook(site: str) -> Callable[..., None]:
            def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                copies[site](*args)
            return fn

        self._float_pass({s: hook(s) for s in sites})
        for s in sites:
            self._states[s].repaired_ranges = _ranges_of(copies[s])

    # -- disk ---------------------------------------------------------------------------------
    def _file(self, site: str) -> Path | None:
        return self.cache_dir / f"{self.key(site)}.safetensors" if self.cache_dir is not None else None

    def _load(self, site: str) -> RepairedMlp | None:
        path = self._file(site)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # a truncated or foreign file: recompute
            log.warning("relu repair %s: cache file %s unreadable (%s); recomputing", site, path, exc)
            return None
        params = _params_of(self._states[site].mlp)
        fits = all((p is None) == (k not in tensors) and (p is None or tuple(p.shape) == tuple(tensors[k].shape))
                   for k, p in params.items())
        if not fits or meta.get("format") != _FORMAT:
            log.warning("relu repair %s: cache file %s does not fit the model; recomputing", site, path)
            return None
        ref = params["fc1.weight"]
        weights = {k: (tensors[k].to(ref.device, ref.dtype) if k in tensors else None) for k in _TENSORS}
        self.loads += 1
        rep = RepairedMlp(site=site, weights=weights, mse_before=float(meta.get("mse_before", "nan")),
                          mse_after=float(meta.get("mse_after", "nan")),
                          target_power=float(meta.get("target_power", "nan")), source=str(path))
        log.info("relu repair %s: loaded from cache %s (MLP output MSE %.4g -> %.4g)", site, path,
                 rep.mse_before, rep.mse_after)
        return rep

    def _save(self, site: str, rep: RepairedMlp) -> Path | None:
        path = self._file(site)
        if path is None:
            return None
        meta = {"format": _FORMAT, "version": REPAIR_VERSION, "site": site,
                "settings": json.dumps(self.settings.key_fields(), sort_keys=True),
                **{k: str(v) for k, v in self._ids().items()},
                "mse_before": repr(rep.mse_before), "mse_after": repr(rep.mse_after),
                "target_power": repr(rep.target_power)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(rep.tensors(), str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only results dir: keep the repair in memory only
            log.warning("relu repair %s: could not write the cache file %s (%s)", site, path, exc)
            return None
        return path
