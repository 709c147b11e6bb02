"""The evaluator: calibrate once, cache float references, then score policies.

For a policy it returns per site the ASQNR of the site's input (gamma) and output (beta) against
the float model on the calibration batch, and model-level metrics on the evaluation images:
logit SQNR, KL(float || quantized), top-1 agreement with float and top-1 accuracy.

Gamma's tap (DESIGN.md, "SQNR and SQNR diff"): in the ``paper`` wiring the tensor the integer
pipeline hands the site, before any method-specific conversion, the same tap for every method, so
sites whose upstream choices are equal get equal gamma whatever their own method; in ``native``
the kernel's input (each method's own input quantization is part of that wiring's upstream).
Beta compares the site outputs. Masked attention entries (Swin's shifted-window mask) are left
out of both (``asqnr(..., valid=)``).

Activation reuse: the forward is a chain of segments (stem, blocks, head). The inputs of the
segments are kept for the last evaluated policies; a policy whose first changed site lies in
segment ``k`` restarts from the nearest kept input at or before ``k``. Site metrics of earlier
segments are reused too. The kept inputs are bounded by ``reuse_memory`` bytes: where keeping
every segment's input for ``keep_runs`` policies would exceed it (a 224-px model on thousands of
images: many GiB), only every ``stride``-th segment's input is kept (measured on the first batch;
logged), so a restart recomputes at most ``stride - 1`` segments more.

ReLU repair (``relu_repair=RepairSettings(...)``, or ``True`` for the defaults; off by default):
a GELU site that chooses ``relu`` runs its block's MLP with weights re-fitted to the float block
(``policysearch.objectives.repair``), computed once per site and cached in memory and on disk;
other choices run the original weights. A site's weights depend on its own choice only, so the
segment reuse above stays exact. Off, ``relu`` just swaps the activation.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from policysearch.artifact import load_artifact
from policysearch.errors import PolicySearchError
from policysearch.models.loading import ModelError
from policysearch.models.segments import Segment, segments
from policysearch.models.wiring import (
    apply_policy,
    calibrate,
    find_sites,
    fitted_constants,
    float_mode,
    record_sites,
)
from policysearch.objectives.objective import Objective, load_objective
from policysearch.objectives.repair import ReluRepair, RepairSettings
from policysearch.objectives.sqnr import PowerWork, asqnr, kl_per_image, logit_metrics, sample_power
from policysearch.policy import Policy
from policysearch.result import EvalResult, PerImage, SiteMetrics
from policysearch.sites import Site

__all__ = ["Evaluator", "NonFiniteOutputError"]

log = logging.getLogger(__name__)


class NonFiniteOutputError(PolicySearchError):
    """A policy made the quantized model's logits NaN/inf; the message names the first site."""


def _nbytes(h: object) -> int:
    """Bytes of a segment input: a tensor, or the paper wiring's ``(x, scale)`` pair."""
    if isinstance(h, torch.Tensor):
        return h.numel() * h.element_size()
    if isinstance(h, (tuple, list)):
        return sum(_nbytes(t) for t in h)
    return 0


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


@dataclass
class _Run:
    """Cached activations of one evaluated policy."""

    policy: Policy
    inputs: list[list[torch.Tensor | None]]  # [batch][segment] -> input of that segment (None: not kept)
    logits: list[torch.Tensor]
    sites: dict[str, SiteMetrics] = field(default_factory=dict)


class Evaluator:
    """Scores policies on one prepared, calibrated model. Build once per process and reuse."""

    def __init__(
        self,
        model: nn.Module,
        *,
        calib_images: torch.Tensor,
        eval_images: torch.Tensor,
        eval_labels: torch.Tensor | None = None,
        objective: Objective | str = "kl",
        batch_size: int = 256,
        sqnr_batch: int = 64,
        device: str | torch.device = "cpu",
        reuse: bool = True,
        keep_runs: int = 2,
        reuse_memory: int = 2 * 2**30,
        progress: bool = False,
        relu_repair: RepairSettings | bool | None = None,
        artifact: str | None = None,
    ) -> None:
        """``artifact``: an integer artifact (``policysearch.artifact``) to load instead of calibrating
        on ``calib_images`` (which then only give the SQNR batch)."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.objective = load_objective(objective)
        self.reuse = reuse
        self.keep_runs = keep_runs
        if reuse_memory <= 0:
            raise PolicySearchError(f"reuse_memory must be a positive number of bytes, got {reuse_memory}")
        self.reuse_memory = reuse_memory
        #: keep every ``stride``-th segment's input (set from the first evaluated batch)
        self.stride: int | None = None
        self.progress = progress
        self.sites: list[Site] = find_sites(self.model)
        self.segments: list[Segment] = segments(self.model)
        self._site_segment = {s.name: self._segment_of(s.name) for s in self.sites}
        calib = calib_images.to(self.device)
        if artifact is not None:
            load_artifact(self.model, artifact)
        else:
            calibrate(self.model, calib.split(batch_size), progress=progress)  # minutes on a 224-px model
        # batch 0: the SQNR batch (site recording); the rest: evaluation images
        self.batches: list[torch.Tensor] = [calib[:sqnr_batch]] + list(eval_images.to(self.device).split(batch_size))
        self.labels = eval_labels.to(self.device) if eval_labels is not None else None
        self._runs: list[_Run] = []
        self._float_reference()
        repair = RepairSettings() if relu_repair is True else relu_repair
        #: the repairs of ``relu`` sites (None: ``relu`` only swaps the activation)
        self.relu_repair: ReluRepair | None = (
            ReluRepair(self.model, calib, batch_size=batch_size, settings=repair, device=self.device,
                       progress=progress) if isinstance(repair, RepairSettings) else None)
        self.evaluations = 0
        self.segment_calls = 0

    # -- set-up ------------------------------------------------------------------------------
    def _segment_of(self, site: str) -> int:
        for i, seg in enumerate(self.segments):
            if seg.owns(site):
                return i
        raise RuntimeError(f"site {site!r} belongs to no segment")  # wiring bug, not user input

    @torch.no_grad()
    def _float_reference(self) -> None:
        store: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        with float_mode(self.model), record_sites(self.model, lambda n, x, y, v: store.__setitem__(n, (x, y, v)),
                                                  masks=True):
            self.ref_logits = [self.model(self.batches[0])]
            store_copy = dict(store)
            self.ref_logits += [self.model(b) for b in self._bar(self.batches[1:], "float reference")]
        self.ref_sites = store_copy
        #: per site, the float references' per-sample powers (unmasked sites; asqnr's signal)
        self._ref_powers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._power_work = PowerWork()  # asqnr's float64 row sums, in one reused buffer
        if not all(bool(torch.isfinite(z).all()) for z in self.ref_logits):
            raise ModelError("the float model gives non-finite (NaN/inf) outputs on this data; "
                             "check the checkpoint's weights and the data's preprocessing")
        eval_ref = torch.cat(self.ref_logits[1:]) if len(self.batches) > 1 else self.ref_logits[0]
        self.float_metrics = {"top1": self._top1(eval_ref)}
        #: per-image predictions on the evaluation images: of the float model, and of the last
        #: ``evaluate`` (for paired comparisons, ``policysearch.stats``)
        self.float_predictions = eval_ref.argmax(-1).cpu()
        self.last_predictions: torch.Tensor | None = None

    def _top1(self, logits: torch.Tensor) -> float:
        if self.labels is None:
            return math.nan
        return float((logits.argmax(-1) == self.labels).double().mean())

    # -- evaluation --------------------------------------------------------------------------
    def first_changed_segment(self, policy: Policy, run: _Run) -> int:
        if (policy.weight_bits, policy.act_bits) != (run.policy.weight_bits, run.policy.act_bits):
            return 0
        for site, choice in policy.items():
            if run.policy[site.name] != choice:
                return self._site_segment[site.name]
        return len(self.segments)

    def _best_run(self, policy: Policy) -> tuple[_Run | None, int]:
        best, start = None, 0
        if self.reuse:
            for run in self._runs:
                k = self.first_changed_segment(policy, run)
                if k > start:
                    best, start = run, k
        start = min(start, len(self.segments) - 1)
        return best, start - start % (self.stride or 1)  # the nearest kept input at or before it

    def _set_stride(self, kept: Sequence[torch.Tensor | None], images: int) -> None:
        """The stride that keeps ``keep_runs`` policies' inputs under ``reuse_memory``, from one
        batch's inputs (``images`` images) scaled to every batch."""
        total_images = sum(len(b) for b in self.batches)
        # segment 0's input is the batch itself, held by the evaluator anyway
        per_run = sum(_nbytes(h) for h in kept[1:] if h is not None) / max(images, 1) * total_images
        self.stride = max(1, math.ceil(per_run * self.keep_runs / self.reuse_memory))
        if self.stride > 1:
            log.info("activation reuse keeps every %d%s segment's input (%.1f GiB for all of them over %d "
                     "policies; budget %.1f GiB)", self.stride, _ordinal(self.stride),
                     per_run * self.keep_runs / 2**30, self.keep_runs, self.reuse_memory / 2**30)

    @torch.no_grad()
    def evaluate(self, policy: Policy, *, strict: bool = False) -> EvalResult:
        """Score ``policy``. Non-finite logits give a failed result whose ``error`` names the first
        site that went non-finite; with ``strict`` they raise :class:`NonFiniteOutputError`."""
        apply_policy(self.model, policy)
        if self.relu_repair is not None:
            self.relu_repair.apply(policy)  # repaired MLP weights at relu sites, the originals elsewhere
        base, start = self._best_run(policy)
        recorded: dict[str, SiteMetrics] = {}
        inputs: list[list[torch.Tensor | None]] = []
        logits: list[torch.Tensor] = []
        bad_batch: int | None = None
        for b, x in enumerate(self._bar(self.batches, "evaluate")):
            seg_inputs = list(base.inputs[b][:start]) if base is not None else []
            h = base.inputs[b][start] if base is not None else x
            rec = (lambda n, xi, yo, v: recorded.__setitem__(n, self._site_metrics(n, xi, yo, v))) if b == 0 \
                else (lambda *a: None)
            with record_sites(self.model, rec, masks=True):
                for i, seg in enumerate(self.segments[start:], start):
                    if self.reuse:  # kept for later policies that restart there; else freed as it goes
                        seg_inputs.append(h if self.stride is None or i % self.stride == 0 else None)
                    h = seg.fn(h)
                    self.segment_calls += 1
            if self.reuse and self.stride is None:  # the first batch ever: measure, then thin it
                self._set_stride(seg_inputs, len(x))
                seg_inputs = [t if i % (self.stride or 1) == 0 else None for i, t in enumerate(seg_inputs)]
            inputs.append(seg_inputs)
            logits.append(h)
            # one check per batch; the evaluation images' logits (batch 0 is the SQNR batch)
            if bad_batch is None and (b > 0 or len(self.batches) == 1) and not bool(torch.isfinite(h).all()):
                bad_batch = b
        site_metrics = {n: m for n, m in (base.sites.items() if base is not None else ())
                        if self._site_segment[n] < start}
        site_metrics.update(recorded)
        run = _Run(policy=policy, inputs=inputs, logits=logits, sites=site_metrics)
        self._remember(run)
        self.evaluations += 1
        # data-aware methods: the constants fitted per site (the policy JSON's metrics carry them)
        fitted = fitted_constants(self.model)  # before any re-run below
        error = None if bad_batch is None else self._nonfinite_error(policy, bad_batch)
        if error is not None and strict:
            raise NonFiniteOutputError(error)
        result = self._result(run, error)
        return replace(result, metrics={**result.metrics, **fitted}) if fitted else result

    def _site_metrics(self, name: str, xq: torch.Tensor, yq: torch.Tensor, valid: torch.Tensor | None) -> SiteMetrics:
        """gamma and beta of one site, computed as the site runs (its quantized input and output are
        not kept past this call: one pass, no copies of every site's activations). The reference's
        power is computed once per site where nothing is masked (the same value every time)."""
        x_ref, y_ref, valid_ref = self.ref_sites[name]
        if valid is None:
            valid = valid_ref
        elif valid_ref is not None:
            valid = valid & valid_ref
        work = self._power_work
        if valid is not None:
            return SiteMetrics(gamma=asqnr(x_ref, xq, valid=valid, work=work),
                               beta=asqnr(y_ref, yq, valid=valid, work=work))
        powers = self._ref_powers.get(name)
        if powers is None:
            powers = self._ref_powers[name] = (sample_power(x_ref, work=work), sample_power(y_ref, work=work))
        return SiteMetrics(gamma=asqnr(x_ref, xq, signal=powers[0], work=work),
                           beta=asqnr(y_ref, yq, signal=powers[1], work=work))

    def _remember(self, run: _Run) -> None:
        if not self.reuse:
            return
        self._runs.append(run)
        del self._runs[: -self.keep_runs]

    def _nonfinite_error(self, policy: Policy, batch: int) -> str:
        """Re-run ``batch`` watching every site: which one first saw or made a NaN/inf."""
        found: list[tuple[str, str]] = []

        def watch(name: str, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None) -> None:
            if found:
                return
            if valid is not None:  # masked attention entries may be -inf by design
                x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
            if not bool(torch.isfinite(x).all()):
                found.append((name, "input"))
            elif not bool(torch.isfinite(y).all()):
                found.append((name, "output"))

        with record_sites(self.model, watch, masks=True):
            h = self.batches[batch]
            for seg in self.segments:
                h = seg.fn(h)
        head = "the quantized model produced non-finite logits (NaN/inf)"
        if not found:
            return (f"{head}; every site's output is finite, so they arise after the last site (the head): "
                    f"try more weight/activation bits (now w{policy.weight_bits}a{policy.act_bits})")
        name, where = found[0]
        choice = policy[name]
        if where == "output":
            return (f"{head}: the first non-finite values are the output of site {name!r} "
                    f"({self._kind(name)}, {choice}); choose another method or more bits at that site")
        return (f"{head}: the input of site {name!r} ({self._kind(name)}, {choice}) is already non-finite, "
                f"so they arise in the layers before it; try more weight/activation bits "
                f"(now w{policy.weight_bits}a{policy.act_bits}) or other methods at the sites before it")

    def _kind(self, name: str) -> str:
        return next(s.kind for s in self.sites if s.name == name)

    def _result(self, run: _Run, error: str | None = None) -> EvalResult:
        ordered = {s.name: run.sites[s.name] for s in self.sites if s.name in run.sites}
        eval_logits = torch.cat(run.logits[1:]) if len(run.logits) > 1 else run.logits[0]
        eval_ref = torch.cat(self.ref_logits[1:]) if len(self.ref_logits) > 1 else self.ref_logits[0]
        metrics = logit_metrics(eval_ref, eval_logits)
        metrics["top1"] = self._top1(eval_logits)
        self.last_predictions = eval_logits.argmax(-1).cpu()
        finite = [m for m in ordered.values() if math.isfinite(m.gamma) and math.isfinite(m.beta)]
        n = max(len(finite), 1)
        metrics["mean_sqnr_diff"] = sum(m.diff for m in finite) / n if finite else math.nan
        metrics["mean_sqnr_drop"] = sum(m.drop for m in finite) / n if finite else math.nan
        metrics["mean_beta"] = sum(m.beta for m in finite) / n if finite else math.nan
        values = self.objective.compute(metrics)
        if error is None and not bool(torch.isfinite(eval_logits).all()):
            error = "the quantized model produced non-finite logits (NaN/inf)"
        return EvalResult(values=values, metrics=metrics, sites=ordered, error=error,
                          images=self._per_image(eval_ref, eval_logits))

    def _per_image(self, ref: torch.Tensor, logits: torch.Tensor) -> PerImage:
        """Per-image correctness, agreement and KL, for paired intervals between policies."""
        pred = logits.argmax(-1)
        return PerImage.from_arrays(
            correct=None if self.labels is None else (pred == self.labels).cpu().numpy(),
            agree=(pred == ref.argmax(-1)).cpu().numpy(), kl=kl_per_image(ref, logits).cpu().numpy())

    def _bar(self, items: Sequence[torch.Tensor], desc: str) -> Sequence[torch.Tensor]:
        if not self.progress:
            return items
        return tqdm(items, desc=desc, unit="batch", leave=False)

    def clear_cache(self) -> None:
        self._runs.clear()

    @property
    def site_names(self) -> Sequence[str]:
        return [s.name for s in self.sites]
