"""Latency of ONNX models in ONNX Runtime, and the ``policysearch latency RUN`` stage.

:func:`measure` times several models **interleaved**: after a warm-up, each round runs every model
once, in an order rotated by one each round, so drift of the machine (30-50 % over minutes on the
project's shared CPUs) lands on every model alike. It reports the median of ``repeats`` (>= 20)
rounds per model and batch, with intra-op threads fixed (default 2, inter-op 1). With a GPU and
``onnxruntime-gpu``, ``provider="auto"`` picks TensorRT, else CUDA, else the CPU.

:func:`run_latency` is the stage: for a finished run it exports the float model, the model with
GELU replaced by ReLU at the policy's ``relu`` sites and at every GELU, quantizes them (static QDQ,
U8S8, calibrated on the run's calibration images), measures float / int8 GELU / int8 with the
policy's ReLU sites / int8 all-ReLU at batch 1 and 8, scores each ONNX model's top-1 on the run's
evaluation images, and writes ``results/<run>/latency.json``, the run record's
``stages.latency`` and the policy JSON's ``metrics.latency``.

Beside those ONNX Runtime QDQ models (int8 linear layers, float non-linear operators), the stage
times the searched policy itself, :data:`POLICY_VARIANT`: policysearch's integer model under the
run's policy as ``policysearch export RUN --onnx`` writes it (integer GEMMs as ``MatMulInteger``,
the policy's integer kernels as ONNX operators; bit-exact with policysearch where the export check
says so). ``latency.json``'s ``labels`` say in words which model each name is.

Weights: where the training stage distilled GELU sites into ReLU, the float and int8 GELU
models run the run's own (GELU-trained) weights and the ReLU models the stage's float ReLU model
(``relu_float.safetensors``), so each variant's top-1 is that of a model trained for it; otherwise
every variant runs the training stage's weights when there are some, else the run's.
``latency.json`` records which weights ran (``weights``, ``relu_weights``). The ReLU models' top-1
means something only for weights trained without GELU.

``RUN`` may also be the output folder of a standalone ``policysearch finetune --policy FILE``
(``finetune.json``): then ``latency.json`` goes there and ``finetune.json`` and ``policy.json``
gain its summary.

:func:`update_table` keeps ``results/latency.md``: rows are kept in a JSON block inside the file
and re-rendered, so each command that measures a model replaces only that model's rows.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policysearch.deploy import onnx_export, require_onnx
from policysearch.deploy.onnx_export import export_float, gelu_paths, onnx_logits
from policysearch.deploy.ort_int8 import quantize_int8
from policysearch.deploy.record import LatencyStage
from policysearch.errors import ConfigError
from policysearch.finetune.record import FinetuneStage
from policysearch.identity import machine_info
from policysearch.methods import get_method
from policysearch.models.zoo import weights_identity
from policysearch.policy import Policy, read_policy, write_policy
from policysearch.run import RUN_FILE, RunRecord, lock_run, policy_document, resolve_run_dir
from policysearch.rundoc import RUN_FORMAT

__all__ = [
    "LATENCY_FILE",
    "MIN_REPEATS",
    "ORT_INT8",
    "POLICY_VARIANT",
    "VARIANT_LABELS",
    "available_providers",
    "latency_text",
    "machine_info",
    "measure",
    "resolve_provider",
    "run_latency",
    "summary",
    "update_table",
]

log = logging.getLogger(__name__)

LATENCY_FILE = "latency.json"
LATENCY_FORMAT = "policysearch.latency/v1"
MIN_REPEATS = 20
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
#: the searched policy itself in ONNX Runtime: policysearch's integer model (``export --onnx``)
POLICY_VARIANT = "policy_integer"
#: each measured model in plain words (``latency.json``'s ``labels``, the CLI's output)
VARIANT_LABELS = {
    "float": "float model (fp32)",
    "int8_gelu": "ONNX Runtime's int8 QDQ model: int8 linear layers, float GELU, softmax and LayerNorm",
    "int8_policy": "ONNX Runtime's int8 QDQ model with ReLU at the policy's ReLU sites, other non-linear ops float",
    "int8_relu": "ONNX Runtime's int8 QDQ model with ReLU at every GELU, other non-linear ops float",
    POLICY_VARIANT: "the searched policy itself: policysearch's integer model (integer GEMMs as MatMulInteger, "
                    "the policy's integer kernels), as `policysearch export --onnx` writes it",
}


# -- sessions -------------------------------------------------------------------------------

def available_providers() -> list[str]:
    """ONNX Runtime's execution providers here, in the order :func:`resolve_provider` prefers."""
    _, ort = require_onnx()
    have = set(ort.get_available_providers())
    return [p for p in _PREFERRED if p in have]


def resolve_provider(provider: str = "auto") -> str:
    """``auto`` -> TensorRT, else CUDA, else CPU (what is installed); ``cpu`` / ``cuda`` / ``tensorrt``
    or a full provider name -> that one, or an error listing those available."""
    have = available_providers()
    if provider == "auto":
        return have[0] if have else "CPUExecutionProvider"
    full = {v: k for k, v in _SHORT.items()}.get(provider, provider)
    if full not in have:
        raise ConfigError(f"execution provider {provider!r} is not available in this onnxruntime; available: "
                          f"{', '.join(_SHORT.get(p, p) for p in have)} (GPU providers need onnxruntime-gpu)")
    return full


def _session(path: str | Path, *, threads: int, provider: str) -> Any:
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=providers)


def _input_shape(sess: Any) -> tuple[int, ...]:
    shape = sess.get_inputs()[0].shape
    dims = [d for d in shape[1:]]
    if not all(isinstance(d, int) for d in dims):
        raise ConfigError(f"the ONNX model's input shape {shape} has dynamic dimensions besides the batch")
    return tuple(dims)


# -- measurement ----------------------------------------------------------------------------

def measure(models: Mapping[str, str | Path], *, batches: Sequence[int] = (1, 8), repeats: int = MIN_REPEATS,
            warmup: int = 3, threads: int = 2, provider: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Median latency of each ONNX model at each batch size, measured interleaved.

    Returns ``{"results": {name: {str(batch): {"median_ms", "q1_ms", "q3_ms", "min_ms", "runs"}}},
    "ratios": ...}``-style dict (see :func:`_stats`), plus the settings and the machine's load
    before and after. ``repeats`` below :data:`MIN_REPEATS` is refused.
    """
    require_onnx()
    if repeats < MIN_REPEATS:
        raise ConfigError(f"--repeats must be at least {MIN_REPEATS} (a median needs them), got {repeats}")
    if not models:
        raise ConfigError("nothing to measure")
    provider = resolve_provider(provider)
    names = list(models)
    sessions = {n: _session(models[n], threads=threads, provider=provider) for n in names}
    shapes = {_input_shape(s) for s in sessions.values()}
    if len(shapes) != 1:
        raise ConfigError(f"the models take different inputs: {sorted(shapes)}")
    shape = shapes.pop()
    input_names = {n: s.get_inputs()[0].name for n, s in sessions.items()}
    rng = np.random.default_rng(seed)
    load_before = machine_info().get("load")
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    rounds: dict[str, list[dict[str, float]]] = {}
    for batch in batches:
        x = rng.standard_normal((int(batch), *shape), dtype=np.float32)
        for n in names:
            for _ in range(warmup):
                sessions[n].run(None, {input_names[n]: x})
        per_round: list[dict[str, float]] = []
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            times = {}
            for n in order:
                t0 = time.perf_counter()
                sessions[n].run(None, {input_names[n]: x})
                times[n] = (time.perf_counter() - t0) * 1e3
            per_round.append(times)
        for n in names:
            samples[n][str(batch)] = [t[n] for t in per_round]
        rounds[str(batch)] = per_round
    return {
        "provider": _SHORT.get(provider, provider), "threads": int(threads), "repeats": int(repeats),
        "warmup": int(warmup), "batches": [int(b) for b in batches], "input_shape": list(shape),
        "load_before": load_before, "load_after": machine_info().get("load"),
        "results": {n: {b: _stats(v) for b, v in samples[n].items()} for n in names},
        "_rounds": rounds,
    }


def _stats(values: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": round(statistics.median(values), 4), "q1_ms": round(q[0], 4), "q3_ms": round(q[2], 4),
            "min_ms": round(min(values), 4), "runs": len(values)}


def paired_ratio(measured: Mapping[str, Any], num: str, den: str, batch: int | str) -> dict[str, float]:
    """``num``/``den`` at ``batch``: ratio of medians and median of the per-round ratios."""
    b = str(batch)
    res = measured["results"]
    per_round = [r[num] / r[den] for r in measured["_rounds"][b]]
    return {"of_medians": round(res[num][b]["median_ms"] / res[den][b]["median_ms"], 4),
            "paired_median": round(statistics.median(per_round), 4)}


# -- the stage ------------------------------------------------------------------------------

def _relu_sites(policy: Any) -> list[str]:
    return [site.name for site, choice in policy.items() if get_method(site.kind, choice.method).replaces_op]


def _stage_file(record: RunRecord, name: str | None) -> str | None:
    if not name:
        return None
    path = Path(name)
    return str(path if path.is_absolute() or path.exists() else record.run_dir / path)


def _finetune_stage(record: RunRecord) -> FinetuneStage:
    """The run's training stage (an empty one when the run has not been fine-tuned)."""
    return record.doc.stage(FinetuneStage) or FinetuneStage()


def _finetuned_checkpoint(record: RunRecord) -> str | None:
    """The training stage's weights, when the run record names them (``stages.finetune.checkpoint``)."""
    return _stage_file(record, _finetune_stage(record).checkpoint)


def _variant_weights(record: RunRecord, checkpoint: str | None,
                     relu_checkpoint: str | None) -> tuple[str | None, str | None]:
    """``(GELU weights, ReLU weights)``: see the module docstring; None = the run's own weights."""
    relu_float = _stage_file(record, _finetune_stage(record).relu_float)
    if checkpoint is None and not relu_float:
        checkpoint = _finetuned_checkpoint(record)
    return checkpoint, relu_checkpoint or relu_float or checkpoint


def _weights_label(record: RunRecord, gelu: str | None, relu: str | None, policy_relu: list[str],
                   all_gelu: list[str]) -> str:
    own = str(record.data.get("fingerprint", {}).get("weights"))[:20]
    run_weights = (f"{record.data.get('config', {}).get('model')}'s own ({own})" if record.data.get("standalone")
                   else f"run {record.name} ({own})")
    gelu_label = (run_weights if gelu is None else
                  f"fine-tuned (training stage): {Path(gelu).name}" if gelu == _finetuned_checkpoint(record)
                  else f"checkpoint {Path(gelu).name}")
    if relu == gelu or not all_gelu:
        return gelu_label
    if relu == _stage_file(record, _finetune_stage(record).relu_float):
        kind = ("GELU-less distilled" if set(policy_relu) == set(all_gelu)
                else f"partly GELU-less ({len(policy_relu)}/{len(all_gelu)} ReLU)")
        return f"{kind} (training stage): {Path(relu).name}; GELU: {gelu_label}"
    return f"ReLU: checkpoint {Path(relu).name}; GELU: {gelu_label}"


def _finetune_folder_record(folder: Path) -> Any:
    """A standalone ``policysearch finetune --policy`` output folder, read as a finished run record."""
    try:
        rec = json.loads((folder / "finetune.json").read_text())
        doc = read_policy(folder / "policy.json")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} is not a readable fine-tuning folder ({exc}); run `policysearch finetune` "
                          "again to finish it") from None
    checkpoint = doc.model.get("checkpoint")
    settings = rec.get("settings", {})
    return RunRecord(folder, {
        "format": RUN_FORMAT, "name": folder.name, "status": "finished", "standalone": True,
        "config": {"model": rec["model"], "checkpoint": checkpoint, "data": rec["data"], "seed": settings.get("seed", 0),
                   "calib_size": rec.get("calib_size"), "eval_size": rec.get("eval_size"), "batch_size": 256},
        "fingerprint": {"wiring": rec.get("wiring"), "model_args": dict(doc.model.get("args") or {}),
                        "weights": weights_identity(rec["model"], checkpoint)},
        "answer": {"policy": doc.policy.to_dict(), "metrics": {"top1": rec.get("top1_after")}, "values": []},
        "float_metrics": {"top1": rec.get("float_top1")},
        "stages": {"finetune": {"checkpoint": rec.get("checkpoint"), "relu_float": rec.get("relu_float"),
                                "weights": rec.get("weights")}},
    })


def _latency_record(run: str, results_dir: str | Path) -> tuple[Any, bool]:
    """``(record, standalone)``: a run's record, or that of a standalone fine-tuning folder."""
    path = Path(run)
    if (path / "finetune.json").is_file() and not (path / RUN_FILE).is_file():
        return _finetune_folder_record(path), True
    return RunRecord.load(resolve_run_dir(run, results_dir)), False


def _write_back(record: Any, standalone: bool, doc: Mapping[str, Any]) -> None:
    """``latency.json``, then its summary in the run record and policy JSON (or ``finetune.json``)."""
    run_dir = record.run_dir
    with lock_run(run_dir):
        (run_dir / LATENCY_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        if standalone:
            rec_path = run_dir / "finetune.json"
            rec = json.loads(rec_path.read_text())
            rec["latency"] = {"file": LATENCY_FILE, **summary(doc)}
            rec_path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
            pdoc = read_policy(run_dir / "policy.json")
            metrics = {**dict(pdoc.metrics), "latency": rec["latency"]}
            write_policy(run_dir / "policy.json", dataclasses.replace(pdoc, metrics=metrics))
            return
        record = RunRecord.load(run_dir)
        record.set_stage(LatencyStage(file=LATENCY_FILE, **summary(doc)))
        outputs = record.data.setdefault("outputs", {})
        outputs["latency"] = LATENCY_FILE
        record.save()
        write_policy(run_dir / outputs.get("policy", "policy.json"), policy_document(record))


def run_latency(run: str, *, results_dir: str | Path = "results", batches: Sequence[int] = (1, 8),
                repeats: int = MIN_REPEATS, warmup: int = 3, threads: int = 2, provider: str = "auto",
                fmt: str = "u8s8", checkpoint: str | None = None, relu_checkpoint: str | None = None,
                keep_onnx: bool = True, table: str | Path | None = None, command: str | None = None,
                reuse: bool = False) -> dict[str, Any]:
    """The int8 latency check of a finished run (or fine-tuning folder); returns the ``latency.json`` document.

    ``reuse``: return the run's existing ``latency.json`` instead of measuring again when it was
    measured on the same weights, batches, provider request, int8 format and threads (the
    ``run --latency`` chain resumes this way).

    ``checkpoint`` / ``relu_checkpoint``: the weights of the GELU variants (float, int8 GELU) and of
    the variants with ReLU sites, instead of the defaults of the module docstring (``relu_checkpoint``
    defaults to the training stage's float ReLU model, else ``checkpoint``). ``keep_onnx``: keep the
    ONNX files in ``<run>/onnx/``. ``table``: also update that latency table (``results/latency.md``).
    """

    require_onnx()
    record, standalone = _latency_record(run, results_dir)
    run_dir = record.run_dir
    policy_document(record)  # refuses an unfinished run
    policy = Policy.from_dict(record.data["answer"]["policy"])
    gelu_ckpt, relu_ckpt = _variant_weights(record, checkpoint, relu_checkpoint)
    own = record.data.get("fingerprint", {}).get("weights")
    weights, relu_weights = gelu_ckpt or own, relu_ckpt or own
    if reuse and (done := _previous(run_dir, weights, relu_weights, batches, provider, fmt, threads)) is not None:
        log.info("%s: int8 latency already measured on these weights and settings (%s); reusing it",
                 record.name, LATENCY_FILE)
        return done
    model, data = onnx_export.load_run_model(record, integer=False, checkpoint=gelu_ckpt)
    relu_model = (model if relu_ckpt == gelu_ckpt
                  else onnx_export.load_run_model(record, integer=False, checkpoint=relu_ckpt, data=data)[0])
    calib = data.calib_images()
    images, labels = data.eval_tensors()
    all_gelu = gelu_paths(model)
    policy_relu = _relu_sites(policy)
    variants: dict[str, Any] = {"float": None, "int8_gelu": ()}
    if policy_relu and set(policy_relu) != set(all_gelu):
        variants["int8_policy"] = tuple(policy_relu)
    if all_gelu:
        variants["int8_relu"] = tuple(all_gelu)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="policysearch-latency-") as tmp:
        folder = run_dir / "onnx" if keep_onnx else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        example = calib[:2]
        paths: dict[str, Path] = {}
        float_paths: dict[tuple[str, ...], Path] = {}
        for name, relu in variants.items():
            key = tuple(relu or ())
            if key not in float_paths:
                stem = "float" if not key else ("float_relu" if name == "int8_relu" else "float_policy_relu")
                float_paths[key] = export_float(relu_model if key else model, folder / f"{stem}.onnx",
                                                relu=list(key) or None, example=example)
            if name == "float":
                paths[name] = float_paths[key]
            else:
                paths[name] = quantize_int8(float_paths[key], folder / f"{name}.onnx", calib, fmt=fmt)
        # the searched policy itself (its weights: those of the variants with its ReLU sites)
        int_model = onnx_export.load_run_model(record, integer=True, checkpoint=relu_ckpt if policy_relu else gelu_ckpt,
                                               data=data)[0]
        paths[POLICY_VARIANT] = onnx_export.export_integer(int_model, folder / f"{POLICY_VARIANT}.onnx", example)
        variants[POLICY_VARIANT] = tuple(policy_relu)
        t_export = time.perf_counter() - t_start
        measured = measure(paths, batches=batches, repeats=repeats, warmup=warmup, threads=threads,
                           provider=provider)
        batch = int(record.data.get("config", {}).get("batch_size") or 64)
        top1 = {name: _top1(onnx_logits(p, images, batch_size=batch, threads=threads), labels)
                for name, p in paths.items()}
    ratios: dict[str, Any] = {}
    for b in measured["batches"]:
        r: dict[str, Any] = {"int8_gelu/float": paired_ratio(measured, "int8_gelu", "float", b)}
        for name in ("int8_policy", "int8_relu", POLICY_VARIANT):
            if name in paths:
                r[f"{name}/int8_gelu"] = paired_ratio(measured, name, "int8_gelu", b)
        ratios[str(b)] = r
    measured.pop("_rounds")
    doc = {
        "format": LATENCY_FORMAT, "run": record.name, "model": record.data.get("config", {}).get("model"),
        "weights": weights, "relu_weights": relu_weights,
        "weights_label": _weights_label(record, gelu_ckpt, relu_ckpt, policy_relu, all_gelu), "command": command,
        "int8": {"format": fmt, "quantization": "static QDQ, min/max calibration", "calibration_images": len(calib)},
        "variants": {name: {"relu_sites": list(variants[name] or ()), "file": str(paths[name].name) if keep_onnx else None}
                     for name in paths},
        "policy_relu_sites": policy_relu, "gelu_sites": all_gelu,
        "labels": {name: VARIANT_LABELS[name] for name in paths}, "top1_images": int(len(images)),
        **measured, "ratios": ratios,
        "top1": {**top1, "torch_float": record.data.get("float_metrics", {}).get("top1"),
                 "torch_policy": record.data.get("answer", {}).get("metrics", {}).get("top1")},
        "eval_images": len(images), "machine": machine_info(), "export_quantize_s": round(t_export, 2),
        "provider_requested": provider, "versions": _versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "note": ("float and int8_gelu run `weights`, the ReLU variants `relu_weights`; a ReLU variant's top-1 "
                 "is meaningful only for weights trained GELU-less (the training stage's distillation)"),
    }
    _write_back(record, standalone, doc)
    if table is not None:
        update_table(table, rows_from_latency(doc), command=command)
    return doc


def _previous(run_dir: Path, weights: Any, relu_weights: Any, batches: Sequence[int], provider: str, fmt: str,
              threads: int) -> dict[str, Any] | None:
    """The run's ``latency.json`` when it was measured with these settings, else None."""
    path = run_dir / LATENCY_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (doc.get("weights") == weights and doc.get("relu_weights", doc.get("weights")) == relu_weights
            and doc.get("int8", {}).get("format") == fmt
            and doc.get("threads") == threads and doc.get("provider_requested") == provider
            and sorted(int(b) for b in doc.get("batches", ())) == sorted(int(b) for b in batches))
    return doc if same else None


def summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a ``latency.json`` document (the run record and the policy's metrics)."""
    out: dict[str, Any] = {"provider": doc.get("provider"), "threads": doc.get("threads"),
                           "int8": doc.get("int8", {}).get("format"), "weights": doc.get("weights"),
                           "relu_weights": doc.get("relu_weights", doc.get("weights"))}
    out["median_ms"] = {name: {b: v["median_ms"] for b, v in per.items()} for name, per in doc["results"].items()}
    out["ratios"] = {b: {k: v["paired_median"] for k, v in r.items()} for b, r in doc.get("ratios", {}).items()}
    out["top1"] = {k: v for k, v in doc.get("top1", {}).items() if k in doc["results"]}
    return out


def _top1(logits: Any, labels: Any) -> float | None:
    if labels is None or len(labels) == 0:
        return None
    return round(float((logits.argmax(-1) == labels).float().mean()), 6)


def _versions() -> dict[str, str]:
    onnx, ort = require_onnx()
    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__}


# -- results/latency.md ---------------------------------------------------------------------

_BLOCK = re.compile(r"<!-- latency-rows\n(.*?)\n-->", re.S)
#: the rows issue 10 asks for; those not yet measured are listed as missing
EXPECTED_ROWS = (
    ("swin_tiny_patch4_window7_224", "random (timm, pretrained=False)"),
    ("deit_small_patch16_224", "random (timm, pretrained=False)"),
    ("fmnist_vit", "GELU-less distilled (training stage)"),
    ("fmnist_swin", "GELU-less distilled (training stage)"),
)


def rows_from_latency(doc: Mapping[str, Any], *, weights_label: str | None = None) -> list[dict[str, Any]]:
    """Table rows (one per batch) from a ``latency.json`` document or a benchmark's equivalent."""
    rows = []
    res, top1 = doc["results"], doc.get("top1", {})
    relu_name = "int8_relu" if "int8_relu" in res else None
    for b in doc["batches"]:
        b = str(b)
        ratios = doc.get("ratios", {}).get(b, {})
        ratio = ratios.get(f"{relu_name}/int8_gelu", {}).get("paired_median") if relu_name else None
        rows.append({
            "model": doc["model"], "weights": weights_label or doc.get("weights_label") or str(doc.get("weights")), "batch": int(b),
            "float_ms": res["float"][b]["median_ms"], "int8_gelu_ms": res["int8_gelu"][b]["median_ms"],
            "int8_relu_ms": res[relu_name][b]["median_ms"] if relu_name else None, "relu_gelu": ratio,
            "gelu_float": ratios.get("int8_gelu/float", {}).get("paired_median"),
            "top1": {k: top1.get(k) for k in ("float", "int8_gelu", "int8_relu")},
            "int8": doc.get("int8", {}).get("format"), "provider": doc.get("provider"), "threads": doc.get("threads"),
            "load": doc.get("load_before"), "date": str(doc.get("created", ""))[:10], "command": doc.get("command"),
        })
    return rows


def update_table(path: str | Path, rows: Sequence[Mapping[str, Any]], *, command: str | None = None) -> Path:
    """Replace the rows of the same (model, weights, batch, threads) in the table at ``path``; re-render it."""
    path = Path(path)
    kept: list[dict[str, Any]] = []
    if path.is_file():
        m = _BLOCK.search(path.read_text())
        if m:
            kept = json.loads(m.group(1))
    new = [{**r, "command": r.get("command") or command} for r in rows]
    def key(r: Mapping[str, Any]) -> tuple:
        return r["model"], r["weights"], r["batch"], r.get("threads") or 0

    keys = {key(r) for r in new}
    merged = sorted([r for r in kept if key(r) not in keys] + new, key=lambda r: (key(r)[:2], key(r)[3], key(r)[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_render(merged))
    return path


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _render(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "# int8 latency: float, int8 with GELU, int8 with ReLU (ONNX Runtime)",
        "",
        "Median of >= 20 interleaved runs per model (each round runs every variant once, rotating the",
        "order), fixed intra-op threads, static QDQ int8 (min/max calibration). `ReLU/GELU` and",
        "`int8 GELU/float` are medians of the per-round ratios (target for ReLU/GELU: <= 0.89 at batch 8, the",
        "GELU-less Swin paper's 11 %). Load is the 1/5/15-minute load average when the measurement started. Top-1 only where the",
        "model has trained weights (ReLU columns: meaningful only for weights trained without GELU).",
        "Every row names the command that produced it; re-running that command replaces its rows.",
        "Rows on `results/finetune/geluless/...` measure the GELU-less jobs of `results/finetune.md`",
        "(`python reproduce/finetune_tables.py run geluless` first): float and int8 GELU on the model's",
        "own GELU weights, int8 ReLU on the distilled float ReLU model; top-1 on all 10,000 test images.",
        "",
        "Numerics: the policysearch numerics version does not apply: ONNX Runtime computes these int8 figures, "
        "not policysearch's integer kernels (the GELU-less rows' weights: see `results/finetune.md`).",
        "",
        "| model | weights | batch | float ms | int8 GELU ms | int8 ReLU ms | ReLU/GELU | int8 GELU/float "
        "| top-1 float / int8 GELU / int8 ReLU | int8 | threads | load | date | by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|---|",
    ]
    commands = list(dict.fromkeys(r.get("command") for r in rows if r.get("command")))
    for r in rows:
        t = r.get("top1") or {}
        top = " / ".join(_fmt(None if t.get(k) is None else 100 * t[k], ".2f") for k in ("float", "int8_gelu", "int8_relu"))
        speed = r.get("gelu_float") or (r["int8_gelu_ms"] / r["float_ms"] if r.get("float_ms") else None)
        by = f"[{commands.index(r['command']) + 1}]" if r.get("command") in commands else "-"
        load = "/".join(f"{v:.2f}" for v in r["load"]) if r.get("load") else "-"
        lines.append(f"| {r['model']} | {r['weights']} | {r['batch']} | {_ms(r['float_ms'])} | {_ms(r['int8_gelu_ms'])} "
                     f"| {_ms(r.get('int8_relu_ms'))} | {_fmt(r.get('relu_gelu'), '.3f')} | {_fmt(speed, '.3f')} "
                     f"| {top if any(t.values()) else '-'} | {r.get('int8') or '-'} | {r.get('threads') or '-'} "
                     f"| {load} | {r.get('date') or '-'} | {by} |")
    lines += ["", "Produced by (the `by` column):", ""] + [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    missing = [f"{m} ({w})" for m, w in EXPECTED_ROWS
               if not any(r["model"] == m and str(r["weights"]).startswith(w.split(" (")[0]) for r in rows)]
    lines += ["", "Rows still missing: " + (", ".join(missing) if missing else "none") + "."]
    if missing:
        lines += ["The zoo models' rows come from `policysearch latency RUN --table results/latency.md` on a run",
                  "whose weights were distilled GELU-less by the training stage."]
    lines += ["", "<!-- latency-rows", json.dumps(list(rows), indent=0), "-->", ""]
    return "\n".join(lines)


#: the measured models that are ONNX Runtime's own int8 quantization, not the searched policy
ORT_INT8 = ("int8_gelu", "int8_policy", "int8_relu")


def latency_text(doc: Mapping[str, Any]) -> str:
    """``latency.json`` in words: each model's medians and top-1 (with its image count), which
    models are ONNX Runtime's own int8 QDQ quantization and which is the searched policy, and what
    each ratio is (the median over rounds of the per-round ratio, so it need not equal the ratio of
    the medians printed above it)."""
    n = doc.get("top1_images")
    on = f" on {n} images" if n else ""
    lines = [f"{doc['run']}: {doc['model']} on {doc['provider']}, {doc['threads']} threads, int8 "
             f"{doc['int8']['format']}, median of {doc['repeats']} interleaved runs (load {doc['load_before']})"]
    for name, per in doc["results"].items():
        t = doc["top1"].get(name)
        lines.append(f"  {name:14s} " + "  ".join(f"b{b} {v['median_ms']:8.2f} ms" for b, v in per.items())
                     + ("" if t is None else f"  top-1 {100 * t:.2f}%{on}"))
    labels = doc.get("labels", {})
    ort = [k for k in ORT_INT8 if k in labels]
    if ort:
        lines.append(f"  {', '.join(ort)}: ONNX Runtime's own int8 QDQ quantization (int8 linear layers, float "
                     "non-linear operators), not the searched policy")
    if POLICY_VARIANT in labels:
        lines.append(f"  {POLICY_VARIANT}: the searched policy itself (policysearch's integer kernels)")
    for name, label in labels.items():  # which model is which, in words
        lines.append(f"    {name}: {label}")
    lines.append("  ratios: A/B = the median over the interleaved rounds of (A's time / B's time) in the same "
                 "round (a paired median; it need not equal the ratio of the two medians above); below 1: A faster")
    for b, r in doc["ratios"].items():
        lines.append(f"  batch {b}: " + ", ".join(f"{k} {v['paired_median']:.3f}" for k, v in r.items()))
    return "\n".join(lines)
