"""The fine-tuning stage: ``finetune(run)`` or ``finetune(policy=FILE)``.

For a finished run (``results/<run>/run.json``) or a policy file, on the data's training split
(never an evaluation image):
1. *before*: the policy evaluated as the search evaluated it (same model, data, calibration and
   evaluation images, wiring);
2. where the policy runs ``relu`` at GELU sites: iterative GELU -> ReLU distillation in float
   (:mod:`policysearch.finetune.relu`); the final float ReLU model is saved
   (``relu_float.safetensors``) for the int8 latency stage and is where QAT starts;
3. QAT of the policy's integer model with distillation from the original float model (frozen),
   straight-through gradients and running activation ranges (:mod:`policysearch.finetune.qat`);
4. the fine-tuned weights (``finetuned.safetensors``, a plain timm state dict: any command takes it
   as ``--checkpoint``) and *after*: the policy evaluated on them exactly as ``policysearch eval`` /
   ``apply`` evaluate a policy file (load, wire, calibrate on the calibration images, evaluate),
   so those commands reproduce the recorded figures.

Outputs go to the run folder (``stages.finetune`` in run.json, and ``policy.json`` gains the
accuracy before/after and the settings) or, for a policy file, to ``--out`` (default
``<results-dir>/finetune-<model>-<policy hash>``: ``finetune.json`` and ``policy.json``). Every
training stage checkpoints each epoch under ``finetune/`` and resumes from there: running the
same command again continues an interrupted fine-tuning and skips finished stages; other settings
are refused (``restart=True`` starts over).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policysearch.data import load_data
from policysearch.device import resolve_device
from policysearch.finetune.batches import TrainBatches
from policysearch.finetune.errors import FinetuneError, FinetuneStopped
from policysearch.finetune.kd import freeze
from policysearch.finetune.qat import RANGE_MODES, build_student, qat_train
from policysearch.finetune.record import FinetuneStage, finetune_metrics, finetune_provenance
from policysearch.finetune.relu import ORDERS, relu_distill
from policysearch.identity import machine_info
from policysearch.kernels._common import STE_MODES
from policysearch.methods import get_method
from policysearch.models.loading import check_compatible, load_model, model_class_names
from policysearch.models.zoo import weights_identity
from policysearch.numerics import NUMERICS_VERSION
from policysearch.policy import Policy, PolicyDocument, read_policy, write_policy
from policysearch.run import RunRecord, check_writable, lock_run, policy_document, resolve_run_dir
from policysearch.spec import EvaluatorSpec

__all__ = ["FINETUNE_FORMAT", "FinetuneResult", "FinetuneSettings", "finetune", "float_weights"]

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "policysearch.finetune/v1"
WEIGHTS_FILE = "finetuned.safetensors"
RELU_FILE = "relu_float.safetensors"
STAGE_DIR = "finetune"
_UNSET: Any = object()


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """Everything that changes the fine-tuned weights (checked on resume)."""

    #: QAT length: epochs over the training split, or optimizer steps (default: 1 epoch)
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    #: linear warm-up over this fraction of each stage's steps, then cosine decay
    warmup: float = 0.05
    grad_clip: float = 1.0
    batch_size: int = 128
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    seed: int = 0
    #: "reference" (the integer graph, straight-through floors and rounds) or "float"
    ste: str = "reference"
    #: "ema" (I-ViT's running ranges) or "frozen"
    ranges: str = "ema"
    momentum: float = 0.95
    relu_blocks_per_stage: int = 1
    relu_order: str = "forward"
    #: each ReLU stage's length and learning rate (default: those of QAT)
    relu_epochs: int | None = None
    relu_steps: int | None = None
    relu_lr: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise FinetuneError("give the QAT length as --epochs or --steps, not both")
        if self.relu_epochs is not None and self.relu_steps is not None:
            raise FinetuneError("give the ReLU stages' length as --relu-epochs or --relu-steps, not both")
        for name in ("epochs", "steps", "relu_epochs", "relu_steps", "batch_size", "relu_blocks_per_stage"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be positive, got {v}")
        for name in ("lr", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.relu_lr is not None and not self.relu_lr > 0:
            raise FinetuneError(f"--relu-lr must be positive, got {self.relu_lr}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise FinetuneError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 <= self.warmup < 1.0:
            raise FinetuneError(f"the warm-up fraction must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.momentum < 1.0:
            raise FinetuneError(f"the range momentum must be in [0, 1), got {self.momentum}")
        checks = (("ste", STE_MODES), ("ranges", RANGE_MODES), ("relu_order", ORDERS))
        for name, valid in checks:
            if getattr(self, name) not in valid:
                raise FinetuneError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is unknown; "
                                    f"valid: {', '.join(valid)}")

    def qat_length(self) -> dict[str, int]:
        return {"steps": self.steps} if self.steps is not None else {"epochs": self.epochs or 1}

    def relu_length(self) -> dict[str, int]:
        if self.relu_steps is not None:
            return {"steps": self.relu_steps}
        if self.relu_epochs is not None:
            return {"epochs": self.relu_epochs}
        return self.qat_length()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class FinetuneResult:
    """What :func:`finetune` did; ``record`` is what it wrote to ``stages.finetune``."""

    out_dir: Path
    policy: Any
    weights: Path
    relu_weights: Path | None
    before: dict[str, Any]
    after: dict[str, Any]
    float_top1: float
    relu_float_top1: float | None
    eval_images: int
    record: dict[str, Any] = field(default_factory=dict)
    policy_file: Path | None = None

    def summary(self) -> str:
        def pct(v: Any) -> str:
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}%"

        s = self.record.get("settings", {})
        length = f"{s.get('steps')} steps" if s.get("steps") else f"{s.get('epochs') or 1} epoch(s)"
        lines = [f"fine-tuned {self.record.get('model')} under the policy ({length} of QAT, "
                 f"STE {s.get('ste')}, ranges {s.get('ranges')}), top-1 on {self.eval_images} evaluation images:",
                 f"  float model        {pct(self.float_top1)}"]
        if self.relu_float_top1 is not None:
            n = len(self.record.get("relu_stages", []))
            lines.append(f"  float ReLU model   {pct(self.relu_float_top1)}  ({n} distillation stage(s))")
        lines += [f"  policy before      {pct(self.before.get('top1'))}",
                  f"  policy after       {pct(self.after.get('top1'))}  "
                  f"(agreement with its float model {pct(self.after.get('agreement'))})"]
        lines.append(f"written: {self.weights}" + (f", {self.relu_weights}" if self.relu_weights else "")
                     + (f", {self.policy_file}" if self.policy_file else ""))
        return "\n".join(lines)


# -- inputs -----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class _Job:
    #: the model, weights, architecture, wiring, data, image counts and seed the job trains and evaluates on
    spec: EvaluatorSpec
    policy: Any
    out_dir: Path
    record: Any = None  # RunRecord in run mode
    doc: Any = None  # PolicyDocument in policy-file mode


def _resolve(run: str | None, policy: Any, *, model: str | None, checkpoint: str | None, data: str | None,
             wiring: str | None, model_args: dict[str, Any] | None, results_dir: str | Path, out: str | Path | None,
             eval_size: Any, calib_size: Any) -> _Job:
    if (run is None) == (policy is None):
        raise FinetuneError("give a run (policysearch finetune RUN) or a policy file (--policy FILE), not both")
    if run is not None:
        run_dir = resolve_run_dir(run, results_dir)
        record = RunRecord.load(run_dir)
        run_doc = policy_document(record)  # refuses an unfinished run; names the run's model, data, ...
        spec = _job_spec(run_doc, model=model, checkpoint=checkpoint, data=data, wiring=wiring,
                         model_args=model_args, eval_size=eval_size, calib_size=calib_size)
        return _Job(spec=spec, policy=run_doc.policy, out_dir=Path(out) if out is not None else run_dir,
                    record=record)
    doc = policy if isinstance(policy, PolicyDocument) else (
        PolicyDocument(policy=policy) if isinstance(policy, Policy) else read_policy(policy))
    spec = _job_spec(doc, model=model, checkpoint=checkpoint, data=data, wiring=wiring, model_args=model_args,
                     eval_size=eval_size, calib_size=calib_size)
    digest = hashlib.sha256(doc.policy.key().encode()).hexdigest()[:8]
    default_out = Path(results_dir) / f"finetune-{spec.model.replace('/', '-')}-{digest}"
    return _Job(spec=spec, policy=doc.policy, out_dir=Path(out) if out is not None else default_out, doc=doc)


def _job_spec(doc: PolicyDocument, *, model: str | None, checkpoint: str | None, data: str | None,
              wiring: str | None, model_args: dict[str, Any] | None, eval_size: Any, calib_size: Any) -> EvaluatorSpec:
    """What the policy file (or the run's policy JSON) records, with the arguments given on top:
    another ``model`` than the file's uses none of its weights or architecture."""
    given: dict[str, Any] = {"model": model, "checkpoint": None, "model_args": ()} if model else {}
    given.update({k: v for k, v in (("checkpoint", checkpoint), ("data", data), ("wiring", wiring)) if v})
    given.update({k: v for k, v in (("eval_size", eval_size), ("calib_size", calib_size)) if v is not _UNSET})
    if model_args is not None:
        given["model_args"] = tuple(sorted(model_args.items()))
    return EvaluatorSpec.from_policy(doc, **given)


def _identity(job: _Job, settings: FinetuneSettings) -> dict[str, Any]:
    spec = job.spec
    return {"model": spec.model, "model_args": dict(spec.model_args),
            "weights": weights_identity(spec.model, spec.checkpoint), "wiring": spec.wiring, "data": spec.data,
            "calib_size": spec.calib_size, "policy": job.policy.key(),
            "numerics": NUMERICS_VERSION, "settings": settings.to_dict()}


def _check_resume(stage_dir: Path, identity: dict[str, Any], restart: bool) -> None:
    path = stage_dir / "settings.json"
    if restart and stage_dir.exists():
        shutil.rmtree(stage_dir)
    if path.is_file():
        old = json.loads(path.read_text())
        flat_old = {**{k: v for k, v in old.items() if k != "settings"}, **old.get("settings", {})}
        flat_new = {**{k: v for k, v in identity.items() if k != "settings"}, **identity["settings"]}
        differ = [k for k in sorted(set(flat_old) | set(flat_new))
                  if json.dumps(flat_old.get(k), sort_keys=True) != json.dumps(flat_new.get(k), sort_keys=True)]
        if differ:
            shown = "; ".join(f"{k}: {str(flat_old.get(k))[:40]} -> {str(flat_new.get(k))[:40]}" for k in differ[:6])
            raise FinetuneError(f"{stage_dir} holds a fine-tuning with other settings ({shown}); repeat its "
                                "options to resume it, or pass --restart to start over")
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1, default=str) + "\n")


# -- pieces -----------------------------------------------------------------------------------

def float_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU float32, contiguous copies of a state dict's tensors (what safetensors stores)."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in state.items()}


def _save_weights(state: dict[str, torch.Tensor], path: Path, model: nn.Module) -> None:
    from safetensors.torch import save_file

    names = model_class_names(model)
    # one metadata key: safetensors writes several in random order, which would change the file hash
    meta = {"class_names": json.dumps(names)} if names else {"policysearch": "finetuned"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(float_weights(state), str(tmp), metadata=meta)
    tmp.replace(path)


@torch.no_grad()
def _top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
          batch_size: int = 256, reference: torch.Tensor | None = None) -> dict[str, float]:
    was = model.training
    model.eval()
    logits = torch.cat([model(x.to(device)).float().cpu() for x in images.split(batch_size)])
    model.train(was)
    out = {"top1": float((logits.argmax(-1) == labels).double().mean())}
    if reference is not None:
        out["agreement"] = float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
    return out


def _metrics(result: Any) -> dict[str, Any]:
    keys = ("top1", "agreement", "kl", "logit_sqnr", "mean_sqnr_diff", "mean_sqnr_drop", "mean_beta")
    out = {k: result.metrics[k] for k in keys if k in result.metrics}
    out["sites"] = {k: v.to_dict() for k, v in result.sites.items()}
    if result.error:
        out["error"] = result.error
    return out


def _evaluator(job: _Job, checkpoint: str | None, device: str, progress: bool) -> Any:
    return dataclasses.replace(job.spec, checkpoint=checkpoint, device=device, reuse=False, progress=progress).build()


@torch.no_grad()
def _predicted(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class of every image (eval mode), as int16 on the CPU."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = torch.cat([model(x.to(device)).argmax(-1).cpu() for x in images.split(batch_size)])
    model.train(was)
    return out.to(torch.int16)


def _evaluator_predictions(ev: Any, images: torch.Tensor, top1: float | None) -> torch.Tensor:
    """Per-image predictions of the evaluator's model as it stands (policy applied, calibrated);
    they must give the top-1 the evaluator reported (a check that these are its images)."""
    pred = _predicted(ev.model, images)
    if top1 is not None and ev.labels is not None:
        mine = float((pred.long() == ev.labels.cpu()).double().mean())
        if abs(mine - top1) > 1e-9:
            log.warning("per-image predictions give top-1 %.6f, the evaluator %.6f", mine, top1)
    return pred


def _warmup(settings: FinetuneSettings, length: dict[str, int], steps_per_epoch: int) -> int:
    total = length["steps"] if "steps" in length else length["epochs"] * steps_per_epoch
    return int(round(settings.warmup * total))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the stage --------------------------------------------------------------------------------

def finetune(run: str | None = None, *, policy: Any = None, model: str | None = None, checkpoint: str | None = None,
             data: str | None = None, wiring: str | None = None, model_args: dict[str, Any] | None = None,
             results_dir: str | Path = "results", out: str | Path | None = None, eval_size: Any = _UNSET,
             calib_size: Any = _UNSET, device: str = "auto", progress: bool = True, restart: bool = False,
             stop_after: int | None = None, predictions: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune a run's answer (``run``: a run name or folder) or a policy (``policy``: a file, a
    ``PolicyDocument`` or a ``Policy``); see the module docstring. ``options`` are the fields of
    :class:`FinetuneSettings` (epochs or steps, lr, batch_size, kd_temperature, kd_weight, seed,
    ste, ranges, relu_blocks_per_stage, relu_order, ...). ``model`` / ``checkpoint`` / ``data`` /
    ``wiring`` / ``eval_size`` / ``calib_size`` override what the run or policy file records
    (``eval_size=None``: every evaluation image). ``stop_after``: stop (``FinetuneStopped``) after
    that many optimizer steps over all training stages, as an interruption would; the same call
    without it resumes. ``predictions``: also save every evaluation image's predicted class (float
    model, before, float ReLU model, after) to ``finetune/predictions.npz`` (paired comparisons)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(FinetuneSettings)}
    if unknown:
        raise FinetuneError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
    settings = FinetuneSettings(**options)
    job = _resolve(run, policy, model=model, checkpoint=checkpoint, data=data, wiring=wiring, model_args=model_args,
                   results_dir=results_dir, out=out, eval_size=eval_size, calib_size=calib_size)
    dev_name = resolve_device(device)
    check_writable(job.out_dir)
    with lock_run(job.out_dir):
        return _finetune(job, settings, torch.device(dev_name), dev_name, progress=progress, restart=restart,
                         stop_after=stop_after, predictions=predictions)


def _finetune(job: _Job, settings: FinetuneSettings, dev: torch.device, dev_name: str, *, progress: bool,
              restart: bool, stop_after: int | None, predictions: bool) -> FinetuneResult:
    t0 = time.perf_counter()
    stage_dir = job.out_dir / STAGE_DIR
    identity = _identity(job, settings)
    _check_resume(stage_dir, identity, restart)

    spec = job.spec
    torch.manual_seed(spec.seed)
    teacher = freeze(load_model(spec.model, checkpoint=spec.checkpoint, **dict(spec.model_args))).to(dev)
    bundle = load_data(spec.data, model=teacher, calib_size=spec.calib_size, eval_size=spec.eval_size)
    check_compatible(teacher, bundle)
    if not bundle.has_train:
        raise FinetuneError(f"the data {bundle.spec} has no training split ({bundle.train_missing}); fine-tuning "
                            "never trains on evaluation images: use --data fmnist or an imagefolder with train/")
    train_set = bundle.train_dataset()

    eval_x, eval_y = bundle.eval_tensors()
    predicted: dict[str, torch.Tensor] = {"labels": eval_y.to(torch.int16)}

    # before: the policy as the search evaluated it
    ev = _evaluator(job, spec.checkpoint, dev_name, progress)
    before = _metrics(ev.evaluate(job.policy))
    float_top1 = float(ev.float_metrics["top1"])
    eval_images = int(ev.labels.numel()) if ev.labels is not None else 0
    if predictions:
        predicted["before"] = _evaluator_predictions(ev, eval_x, before.get("top1"))
        predicted["float"] = _predicted(teacher, eval_x)
    del ev
    calib = bundle.calib_images()
    common = dict(lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
                  grad_clip=settings.grad_clip, seed=settings.seed, device=dev, progress=progress)
    budget = stop_after

    # GELU -> ReLU distillation, where the policy chose relu
    relu_sites = [s.name for s, c in job.policy.items() if get_method(s.kind, c.method).replaces_op]
    relu_path: Path | None = None
    relu_top1: float | None = None
    relu_records: list[dict[str, Any]] = []
    start_checkpoint = spec.checkpoint
    if relu_sites:
        loader = TrainBatches(train_set, settings.batch_size, seed=settings.seed)
        length = settings.relu_length()
        relu_model, relu_records = relu_distill(
            teacher, relu_sites, loader, blocks_per_stage=settings.relu_blocks_per_stage, order=settings.relu_order,
            temperature=settings.kd_temperature, weight=settings.kd_weight, checkpoint_root=stage_dir,
            stop_after=budget, warmup_steps=_warmup(settings, length, len(loader)),
            **{**common, "lr": settings.relu_lr or settings.lr}, **length)
        if budget is not None:
            budget -= sum(r["steps"] for r in relu_records)
        relu_path = job.out_dir / RELU_FILE
        _save_weights(relu_model.state_dict(), relu_path, relu_model)
        relu_top1 = _top1(relu_model, eval_x, eval_y, dev)["top1"]
        if predictions:
            predicted["relu_float"] = _predicted(relu_model, eval_x)
        start_checkpoint = str(relu_path)
        del relu_model

    # QAT of the policy's integer model, taught by the original float model
    student, float_state = build_student(spec.model, checkpoint=start_checkpoint, model_args=dict(spec.model_args),
                                         wiring=spec.wiring, policy=job.policy, calib_images=calib, device=dev,
                                         seed=spec.seed)
    loader = TrainBatches(train_set, settings.batch_size, seed=settings.seed + 1)
    length = settings.qat_length()
    res = qat_train(student, loader, teacher=teacher, ste=settings.ste, ranges=settings.ranges,
                    momentum=settings.momentum, temperature=settings.kd_temperature, weight=settings.kd_weight,
                    checkpoint_dir=stage_dir / "qat", stop_at_step=budget, desc="qat",
                    warmup_steps=_warmup(settings, length, len(loader)), **common, **length)
    if not res.finished:
        raise FinetuneStopped(f"stopped in QAT at step {res.steps}/{res.total_steps}; run again to resume")
    with torch.no_grad():
        teacher_logits = torch.cat([teacher(x.to(dev)).float().cpu() for x in eval_x.split(256)])
    trained_ranges = _top1(student, eval_x, eval_y, dev, reference=teacher_logits)
    weights_path = job.out_dir / WEIGHTS_FILE
    _save_weights(float_state, weights_path, teacher)
    del student, teacher

    # after: the policy on the fine-tuned weights, as `policysearch eval` / `apply` evaluate it
    ev = _evaluator(job, str(weights_path), dev_name, progress)
    after = _metrics(ev.evaluate(job.policy))
    if predictions:
        predicted["after"] = _evaluator_predictions(ev, eval_x, after.get("top1"))
        import numpy as np

        np.savez_compressed(stage_dir / "predictions.npz", **{k: v.numpy() for k, v in predicted.items()})
    del ev

    def relpath(p: Path | None) -> str | None:
        return p.name if p is not None and p.parent == job.out_dir else (str(p) if p else None)

    record = {
        "format": FINETUNE_FORMAT, "model": spec.model, "wiring": spec.wiring, "data": spec.data,
        "eval_size": spec.eval_size, "calib_size": spec.calib_size, "eval_images": eval_images,
        "weights": relpath(weights_path), "relu_float": relpath(relu_path),
        # the weights the int8 latency stage measures: the float ReLU model where GELU-less, else these
        "checkpoint": relpath(relu_path) if relu_path is not None else relpath(weights_path),
        "float_top1": float_top1, "relu_float_top1": relu_top1,
        "top1_before": before.get("top1"), "top1_after": after.get("top1"),
        "before": before, "after": after, "trained_ranges": trained_ranges,
        "settings": settings.to_dict(), "relu_sites": relu_sites, "relu_stages": relu_records,
        "qat": res.info(), "device": dev_name, "seconds": round(time.perf_counter() - t0, 1), "finished": _now(),
        "machine": _machine(), "numerics": NUMERICS_VERSION,
    }
    policy_file = _write_outputs(job, record)
    return FinetuneResult(out_dir=job.out_dir, policy=job.policy, weights=weights_path, relu_weights=relu_path,
                          before=before, after=after, float_top1=float_top1, relu_float_top1=relu_top1,
                          eval_images=eval_images, record=record, policy_file=policy_file)


def _machine() -> dict[str, Any]:
    """Where the job ran: float results can differ in a few images between CPUs and BLAS builds."""

    info = machine_info()
    info.pop("load", None)
    return {**info, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _write_outputs(job: _Job, record: dict[str, Any]) -> Path:
    if job.record is not None:  # run mode: stages.finetune, then policy.json rebuilt from the record
        rec = RunRecord.load(job.record.run_dir)
        rec.set_stage(FinetuneStage.from_json(record))
        outputs = rec.data.setdefault("outputs", {})
        outputs["finetuned"] = record["weights"]
        if record.get("relu_float"):
            outputs["relu_float"] = record["relu_float"]
        rec.save()
        dst = rec.run_dir / outputs.get("policy", "policy.json")
        write_policy(dst, policy_document(rec))
        return dst
    (job.out_dir / "finetune.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    doc = job.doc
    spec = job.spec
    model = {**dict(doc.model), "name": spec.model, "args": dict(spec.model_args), "checkpoint": spec.checkpoint,
             "finetuned": record["weights"], **({"relu_float": record["relu_float"]} if record["relu_float"] else {})}
    metrics = {**dict(doc.metrics), "finetune": finetune_metrics(record)}
    provenance = {**dict(doc.provenance), "finetune": finetune_provenance(record)}
    dst = job.out_dir / "policy.json"
    write_policy(dst, PolicyDocument(policy=doc.policy, model=model, metrics=metrics, provenance=provenance,
                                     wiring=spec.wiring))
    return dst
