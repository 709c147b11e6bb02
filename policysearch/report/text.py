"""Plain-text summaries (the CLI prints what these return)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from policysearch.errors import ConfigError
from policysearch.policy import read_policy
from policysearch.spaces.site import KIND_METHODS

__all__ = ["evaluate_policy_file", "export_run", "summary_text"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def method_table(counts: dict[str, dict[str, int]]) -> str:
    """Method counts per kind, like the paper's Table 3."""
    methods = sorted({m for c in counts.values() for m in c})
    head = f"{'kind':10s}" + "".join(f"{m:>8s}" for m in methods)
    rows = [head]
    for kind in KIND_METHODS:
        if kind in counts:
            rows.append(f"{kind:10s}" + "".join(f"{counts[kind].get(m, 0):>8d}" for m in methods))
    return "\n".join(rows)


def summary_text(res: Any) -> str:
    lines = [f"run {res.run_name}: {res.evaluated} evaluations, {res.reused} reused from the study",
             "", "method counts per kind:", method_table(res.policy.method_counts()), "",
             f"{'policy':24s}{'top-1':>9s}{'agree':>9s}{'KL':>10s}"]
    lines.append(f"{'float':24s}{_pct(res.float_metrics.get('top1')):>9s}")
    rows = [(f"uniform {m}", r) for m, r in res.baselines.items()] + [("result", res.result)]
    for name, r in rows:
        m = r.metrics
        if not r.ok:
            lines.append(f"{name:24s}  failed: {r.error}")
            continue
        lines.append(f"{name:24s}{_pct(m.get('top1')):>9s}{_pct(m.get('agreement')):>9s}"
                     f"{m.get('kl', math.nan):>10.4f}")
    lines += ["", f"written: {res.run_dir}/policy.json, config.yaml, sensitivity.csv"]
    return "\n".join(lines)


def export_run(run: str, *, out: str | None = None, results_dir: str = "results") -> Path:
    """The policy JSON of a finished run, validated, optionally copied to ``out``."""
    run_dir = Path(run) if Path(run).is_dir() else Path(results_dir) / run
    src = run_dir / "policy.json"
    if not src.is_file():
        raise ConfigError(f"no finished run at {run_dir} (missing policy.json); run `policysearch run` first")
    read_policy(src)  # validates
    if out is None:
        return src
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    read_policy(dst)
    return dst


def evaluate_policy_file(policy: str | None, *, model: str | None, checkpoint: str | None, data: str,
                         device: str = "auto", eval_size: int | None = None) -> str:
    """Evaluate a policy file (or the float model) and compare with the metrics it records."""
    from policysearch.spec import EvaluatorSpec, get_evaluator

    doc = read_policy(policy) if policy else None
    if model is None:
        model = (doc.model.get("name") if doc else None) or "fmnist_vit"
        checkpoint = checkpoint or (doc.model.get("checkpoint") if doc else None)
    calib_size = None
    if doc is not None:  # evaluate on the images the run used, calibrated the same way
        eval_size = eval_size if eval_size is not None else doc.provenance.get("eval_size")
        calib_size = doc.provenance.get("calib_size")
    spec = EvaluatorSpec(model=model, checkpoint=checkpoint, data=data, device=device, eval_size=eval_size,
                         calib_size=calib_size, progress=True)
    ev = get_evaluator(spec)
    n_eval = ev.labels.numel() if ev.labels is not None else 0
    lines = [f"model {model}, data {data} ({n_eval} evaluation images): "
             f"float top-1 {_pct(ev.float_metrics.get('top1'))}"]
    if doc is None:
        return "\n".join(lines)
    res = ev.evaluate(doc.policy)
    lines.append(f"policy {policy}: top-1 {_pct(res.metrics.get('top1'))}, "
                 f"agreement {_pct(res.metrics.get('agreement'))}, KL {res.metrics.get('kl', math.nan):.5f}")
    recorded = doc.metrics
    for key in ("top1", "agreement", "kl", "logit_sqnr"):
        if key in recorded and recorded[key] is not None:
            a, b = float(recorded[key]), float(res.metrics[key])
            same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
            lines.append(f"  {key:11s} recorded {a:.6g}  now {b:.6g}  {'match' if same else 'DIFFERS'}")
    return "\n".join(lines)
