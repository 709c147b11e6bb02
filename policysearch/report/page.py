"""The report's page: its tables and the one self-contained HTML document (no script,
stylesheet, font or image from elsewhere) that shows them with the figures inlined."""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import policysearch.methods as _catalogue
from policysearch.report.inspect import Totals, images_of
from policysearch.report.reading import KINDS, NOT_RUN, Figure, ReportData, _f
from policysearch.report.verdict import headroom_rows, report_lines

__all__ = ["FIGURES_DIR", "render", "tables"]

FIGURES_DIR = "figures"


# -- the training and latency stages ------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, Mapping):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(d, list) and len(d) > 12:
        return [(prefix[:-1], f"[{len(d)} entries]")]
    return [(prefix[:-1], d)]


def _latency_rows(stage: Mapping[str, Any], run_dir: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(batch sizes, variant rows, ratio rows) from ``stages.latency`` (or its latency.json)."""
    median = stage.get("median_ms")
    top1 = dict(stage.get("top1") or {})
    ratios = stage.get("ratios") or {}
    if not isinstance(median, Mapping) and stage.get("file"):
        try:
            doc = json.loads((run_dir / str(stage["file"])).read_text())
            median = {n: {b: v.get("median_ms") for b, v in per.items()} for n, per in doc.get("results", {}).items()}
            top1 = top1 or dict(doc.get("top1") or {})
        except (OSError, ValueError, AttributeError):
            median = None
    if not isinstance(median, Mapping):
        return [], [], []
    batches = sorted({str(b) for per in median.values() if isinstance(per, Mapping) for b in per}, key=_batch_key)
    rows = [[name] + [_ms(per.get(b)) for b in batches] + [_pct(top1.get(name))]
            for name, per in median.items() if isinstance(per, Mapping)]
    ratio_rows = []
    for b in sorted(ratios, key=_batch_key):
        for k, v in (ratios[b] if isinstance(ratios[b], Mapping) else {}).items():
            if isinstance(v, Mapping):
                ratio_rows += [[str(b), f"{k} ({kk})", _num(vv, ".3f")] for kk, vv in v.items()]
            else:
                ratio_rows.append([str(b), str(k), _num(v, ".3f")])
    return batches, rows, ratio_rows


def _batch_key(b: str) -> tuple[int, str]:
    return (int(b), b) if str(b).isdigit() else (10**9, str(b))


# -- the page -------------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    f = _f(v)
    return "n/a" if not math.isfinite(f) else f"{100 * f:.2f}%"


def _num(v: Any, spec: str = ".2f") -> str:
    f = _f(v)
    return "n/a" if not math.isfinite(f) else format(f, spec)


def _ms(v: Any) -> str:
    return _num(v, ".2f")


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]], *, cls: str = "",
           bold: Sequence[int] = ()) -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if head:
        out += ["<thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for i, r in enumerate(rows):
        out.append('<tr class="hl">' if i in bold else "<tr>")
        out += [f"<td>{_e(c)}</td>" for c in r]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def tables(data: ReportData) -> dict[str, Any]:
    """The report's tables as plain rows (they go into the page and into its digest)."""
    run = data.run
    metrics = run["answer"].get("metrics", {})
    images = images_of(run)
    acc_head = ["policy", f"top-1 ({images} images)" if images else "top-1", "agreement with float", "KL(float || q)",
                "logit SQNR (dB)", "mean β-γ (dB)"]
    versus = dict((run.get("headroom") or {}).get("vs_best_uniform") or {})  # paired 95% vs the best uniform
    if (run.get("verdict") or {}).get("answer_vs_best_uniform"):
        versus["result"] = run["verdict"]["answer_vs_best_uniform"]

    def row(name: str, m: Mapping[str, Any]) -> list[str]:
        top1 = (versus.get(name.split(" (")[0]) or {}).get("top1")
        vs = f" ({top1['diff']:+.2f} [{top1['low']:+.2f}, {top1['high']:+.2f}] points vs the best uniform)" if top1 else ""
        return [name, _pct(m.get("top1")) + vs, _pct(m.get("agreement")), _num(m.get("kl"), ".3g"),
                _num(m.get("logit_sqnr")), _num(m.get("mean_sqnr_diff"))]

    acc = [["float", _pct(run.get("float_metrics", {}).get("top1")), "", "", "", ""]]
    for method, b in (run.get("baselines") or {}).items():
        acc.append(row(f"uniform {method}", b) if not b.get("error") else [f"uniform {method}", f"failed: {b['error']}",
                                                                            "", "", "", ""])
    bold = len(acc)
    acc.append(row(f"result ({run.get('config', {}).get('strategy')})", metrics))
    ft = data.finetune
    after = ft.after if ft is not None else None
    on = f" ({ft.eval_images} images)" if ft is not None and ft.eval_images else ""  # the stage's evaluation
    if after and ft is not None and isinstance(ft.before, Mapping):
        acc.append(row(f"result before training{on}", ft.before))
    acc.append(row(f"result after training{on}", after) if after else ["result after training", NOT_RUN, "", "", "", ""])
    counts: dict[str, dict[str, int]] = {}
    for s, c in data.choices.items():
        k = data.kinds[s]
        counts.setdefault(k, {})
        counts[k][c] = counts[k].get(c, 0) + 1
    order = _catalogue.ordered()
    methods = sorted({m for c in counts.values() for m in c},
                     key=lambda m: (order.index(m.split("@")[0]) if m.split("@")[0] in order else len(order), m))
    count_rows = [[k] + [str(counts[k].get(m, 0)) for m in methods] + [str(sum(counts[k].values()))]
                  for k in KINDS if k in counts]
    uni = list(data.uniform_sites)
    trained = data.trained_sites()
    site_rows = []
    for s in data.order:
        m = data.answer_sites.get(s, {})
        site_rows.append([s, data.kinds[s], data.choices[s], _num(m.get("gamma")), _num(m.get("beta")),
                          _num(_f(m.get("beta")) - _f(m.get("gamma")))]
                         + ([_num(trained.get(s, {}).get("beta"))] if trained else [])
                         + [_num(data.uniform_sites[u].get(s, {}).get("beta")) for u in uni])
    lat = data.stages.get("latency")
    batches, lat_rows, ratio_rows = _latency_rows(lat, data.run_dir) if lat else ([], [], [])
    return {
        "accuracy": {"head": acc_head, "rows": acc, "bold": [bold]},
        "counts": {"head": ["kind", *methods, "sites"], "rows": count_rows},
        "sites": {"head": ["site", "kind", "chosen", "γ (dB)", "β (dB)", "β-γ (dB)"]
                  + (["β after training"] if trained else []) + [f"β uniform {u}" for u in uni], "rows": site_rows},
        "latency": {"head": ["variant", *[f"batch {b} (ms, median)" for b in batches], "top-1 (runtime)"],
                    "rows": lat_rows, "ratios": ratio_rows},
    }


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 16px}
table{border-collapse:collapse;margin:10px 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}tr.hl td{font-weight:bold;background:#fff8e0}
table.kv td{text-align:left}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:4px}figcaption b{color:#222}
.missing{color:#8a4b00}.notrun{color:#777;font-style:italic}code{background:#f3f3f3;padding:1px 4px}
details{margin:8px 0}
"""


def render(data: ReportData, figs: Sequence[Figure], missing: Sequence[str], tabs: Mapping[str, Any], *,
           answer_trial: int | None, generated: str) -> str:
    """The HTML page (figures inlined as base64 PNG)."""
    run, cfg = data.run, data.run.get("config", {})
    fp = run.get("fingerprint", {})
    name = data.name
    p: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>policysearch report: {_e(name)}</title>", f"<style>{_CSS}</style></head><body><main>",
        f'<h1>policysearch report: <span id="run-name">{_e(name)}</span></h1>',
        f'<p class="sub">study <b id="study-name">{_e(data.study_name or name)}</b> · strategy '
        f"<b>{_e(cfg.get('strategy'))}</b> · objective <b>{_e(run.get('objective', {}).get('name'))}</b> · model "
        f"<b>{_e(cfg.get('model'))}</b> · generated {_e(generated)}</p>",
    ]
    kv = [("model", f"{cfg.get('model')} (weights {fp.get('weights')})"), ("data", cfg.get("data")),
          ("evaluation images", cfg.get("eval_size") or "all"), ("calibration images", cfg.get("calib_size") or "the data's"),
          ("bits", f"W{cfg.get('weight_bits')}A{cfg.get('act_bits')}"), ("wiring", cfg.get("wiring")),
          ("space", cfg.get("space")), ("strategy", cfg.get("strategy")),
          ("objective", run.get("objective", {}).get("name")), ("sites", len(data.order)),
          ("evaluations", Totals.of_record(run).text()),  # the whole search, every invocation
          ("finished", run.get("finished")),
          ("study", f"{data.study_name} in {data.storage}")]
    if answer_trial is not None:
        kv.append(("answer trial", f"#{answer_trial} (a copy of evaluation #{data.evaluation_trial}, with this "
                                   "page, its figures and the policy JSON as artifacts)"))
    evaluations = {k: n for k, n in data.trial_kinds.items() if k != "answer"}
    if evaluations:
        kv.append(("evaluations in the study", f"{sum(evaluations.values())}: "
                   + ", ".join(f"{n} {k}" for k, n in sorted(evaluations.items()))))
    if data.study_error:
        kv.append(("study", f"not read: {data.study_error}"))
    kv.append(("look at the study", f"policysearch dashboard {name}"))
    p += ["<h2>Run</h2>", _table(None, [[k, v] for k, v in kv], cls="kv")]

    acc = tabs["accuracy"]
    p += ["<h2>Accuracy</h2>",
          f"<p>On the run's {_e(cfg.get('eval_size') or 'all')} evaluation images. KL and agreement against the "
          "float model; SQNR in dB, 20·log10.</p>", _table(acc["head"], acc["rows"], bold=acc["bold"])]
    if run.get("headroom"):  # the ceiling (every non-linear site in float) and how the answer compares
        p += ['<h2 id="headroom">Headroom and verdict</h2>', _table(*headroom_rows(run["headroom"])),
              *(f"<p>{_e(line)}</p>" for line in report_lines(run))]
    cnt = tabs["counts"]
    p += ["<h2>Methods chosen per kind (Table 3)</h2>", _table(cnt["head"], cnt["rows"])]

    by_name = {f.name: f for f in figs}
    p.append("<h2>Figures</h2>")
    for f in figs:
        b64 = base64.b64encode(f.png).decode("ascii")
        p.append(f'<figure id="{_e(f.name.split(".")[0])}"><img data-file="{FIGURES_DIR}/{_e(f.name)}" '
                 f'alt="{_e(f.title)}" src="data:image/png;base64,{b64}">'
                 f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>")
    for m in missing:
        p.append(f'<p class="missing">{_e(m)}</p>')
    if "fig4_pareto.png" not in by_name:
        p.append('<p class="notrun">Accuracy against latency: not run (no latency metric in the study and no '
                 "latency stage).</p>")

    p.append("<h2>Training stage</h2>")
    ft = data.stages.get("finetune")
    if ft:  # per-site values are in Figure 3 and the per-site table
        p.append(_table(None, [[k, v] for k, v in _flatten(ft) if ".sites." not in f".{k}"], cls="kv"))
    else:
        p.append(f'<p class="notrun" id="finetune-status">{NOT_RUN} (<code>policysearch finetune {_e(name)}</code>)</p>')

    p.append("<h2>Latency stage</h2>")
    lat = data.stages.get("latency")
    lt = tabs["latency"]
    if lat:
        if lt["rows"]:
            p.append(_table(lt["head"], lt["rows"]))
        if lt["ratios"]:
            p.append(_table(["batch", "ratio", "value"], lt["ratios"]))
        p.append("<details><summary>every recorded field</summary>"
                 + _table(None, [[k, v] for k, v in _flatten(lat)], cls="kv") + "</details>")
    else:
        p.append(f'<p class="notrun" id="latency-status">{NOT_RUN} (<code>policysearch latency {_e(name)}</code>)</p>')

    st = tabs["sites"]
    p += ["<h2>Per-site SQNR of the chosen policy</h2>",
          "<details open><summary>every site, in forward order</summary>", _table(st["head"], st["rows"]), "</details>",
          f"<p class=\"sub\">policysearch {_e(run.get('versions', {}).get('policysearch', ''))}, "
          f"data digest {_e(fp.get('data_digest', ''))}, run folder {_e(data.run_dir)}</p>",
          "</main></body></html>"]
    return "\n".join(p) + "\n"

