"""The report's figures (matplotlib, extra ``report``), each returned as PNG bytes.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend state, no
display needed. The PNGs carry no timestamp, so the same data gives the same bytes.

- :func:`sensitivity_figure`: per site and method, SQNR diff (beta - gamma) as bars and output
  SQNR (beta) as lines, along depth, one panel per kind (Kim et al. 2024, Fig. 1);
- :func:`histogram_figure`: float against quantized outputs at chosen sites (Fig. 2);
- :func:`site_sqnr_figure`: per-site output SQNR of the chosen policy against each uniform one
  along depth, and after training where the run has it (Fig. 3);
- :func:`pareto_figure`: accuracy against latency with the non-dominated front.

SQNR values are dB in the stored 20·log10 convention.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import policysearch.methods as _catalogue
from policysearch.errors import ConfigError

__all__ = [
    "histogram_figure",
    "method_colour",
    "pareto_figure",
    "pareto_front",
    "require_matplotlib",
    "sensitivity_figure",
    "short_site",
    "site_sqnr_figure",
]

KIND_ORDER = tuple(_catalogue.kinds())


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or one actionable error."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError('the report needs matplotlib: pip install "policysearch[report]"') from None
    return matplotlib


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def method_colour(method: str, i: int = 0) -> str:
    """The method's colour in every figure (the catalogue's ``colour``); a name the catalogue does
    not know (an old run's) takes matplotlib's ``C{i + 5}``."""
    return _catalogue.colour(method) or f"C{(i + 5) % 10}"


def short_site(name: str) -> str:
    """A short axis label: ``blocks.3.attn.softmax`` -> ``3.softmax``, ``layers.1.blocks.0.norm1`` ->
    ``1.0.norm1``, ``norm`` -> ``norm``."""
    parts = [p for p in name.split(".") if p not in ("blocks", "layers", "attn", "mlp")]
    return ".".join(parts) or name


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _methods(present: Sequence[str]) -> list[str]:
    known = [m for m in _catalogue.ordered() if m in present]
    return known + sorted(m for m in set(present) if m not in known)


# -- Fig. 1 -----------------------------------------------------------------------------------

def sensitivity_figure(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> bytes:
    """Per-site SQNR diff per method (bars, left axis) and output SQNR beta (lines, right axis),
    one panel per kind; ``rows``: sensitivity.csv rows (site, kind, method, gamma, beta, sqnr_diff),
    ``order``: the sites in forward order."""
    if not rows:
        raise ValueError("no sensitivity rows to draw")
    rank = {s: i for i, s in enumerate(order)}
    kinds = [k for k in KIND_ORDER if any(r["kind"] == k for r in rows)]
    kinds += sorted({r["kind"] for r in rows} - set(kinds))
    methods = _methods([r["method"] for r in rows])
    n_max = max(len({r["site"] for r in rows if r["kind"] == k}) for k in kinds)
    fig = _figure(min(16.0, max(8.0, 0.45 * n_max * max(1, len(methods)) / 2 + 3)), 2.9 * len(kinds) + 0.4)
    axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
    twins = []
    for ax, kind in zip(axes, kinds):
        sites = sorted({r["site"] for r in rows if r["kind"] == kind}, key=lambda s: rank.get(s, len(rank)))
        x = {s: i for i, s in enumerate(sites)}
        twin = ax.twinx()
        twins.append(twin)
        here = [m for m in methods if any(r["kind"] == kind and r["method"] == m for r in rows)]
        width = 0.8 / max(1, len(here))
        for j, method in enumerate(here):
            mine = sorted((r for r in rows if r["kind"] == kind and r["method"] == method), key=lambda r: x[r["site"]])
            xs = [x[r["site"]] - 0.4 + width * (j + 0.5) for r in mine]
            color = method_colour(method, methods.index(method))
            ax.bar(xs, [_finite(r["sqnr_diff"]) for r in mine], width, color=color, alpha=0.5,
                   label=f"{method}: SQNR diff (bars)")
            twin.plot(xs, [_finite(r["beta"]) for r in mine], marker="o", ms=4, lw=1.6, color=color,
                      label=f"{method}: output SQNR (lines)")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(range(len(sites)), [short_site(s) for s in sites], rotation=45 if len(sites) > 8 else 0,
                      ha="right" if len(sites) > 8 else "center", fontsize=8)
        ax.set_xlim(-0.6, len(sites) - 0.4)
        ax.set_ylabel("SQNR diff β-γ (dB)")
        twin.set_ylabel("output SQNR β (dB)")
        ax.set_title(f"{kind}: {len(sites)} site{'s' if len(sites) != 1 else ''}, each measured in the uniform "
                     "policy of its method", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    entries: dict[str, Any] = {}
    for a in [*axes, *twins]:
        for handle, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    # one column per method (the legend fills column by column): its bars above its line
    labels = sorted(entries, key=lambda lab: (methods.index(lab.split(":")[0]), lab.endswith("(lines)")))
    fig.legend([entries[lab] for lab in labels], labels, loc="outside lower center",
               ncol=min(len(methods), 5), fontsize=8, frameon=False)
    return _png(fig)


# -- Fig. 2 -----------------------------------------------------------------------------------

def histogram_figure(samples: Mapping[str, Mapping[str, Any]], *, bins: int = 80) -> bytes:
    """Histograms of site outputs, one panel per site: ``samples[site]`` = ``{"title": str,
    "float": array, "quantized": [(label, method, array, highlight), ...]}`` (1-d arrays); float
    filled grey, each quantized output a step line in its method's colour (``highlight``: black, wide)."""
    if not samples:
        raise ValueError("no site outputs to draw")
    sites = list(samples)
    cols = min(3, len(sites))
    rows = math.ceil(len(sites) / cols)
    fig = _figure(4.6 * cols, 3.4 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, site in zip(axes, sites):
        entry = samples[site]
        ref = np.asarray(entry["float"], dtype=np.float64)
        ref = ref[np.isfinite(ref)]
        lo, hi = (float(ref.min()), float(ref.max())) if ref.size else (0.0, 1.0)
        for _, _, values, _ in entry.get("quantized", ()):  # the bulk of every series, outliers to the edges
            v = np.asarray(values, dtype=np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                q_lo, q_hi = np.percentile(v, [0.5, 99.5])
                lo, hi = min(lo, float(q_lo)), max(hi, float(q_hi))
        if hi <= lo:
            hi = lo + 1.0
        pad = 0.01 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(ref, bins=edges, color="#bbbbbb", label="float", density=True)
        for i, (label, method, values, highlight) in enumerate(entry.get("quantized", ())):
            v = np.asarray(values, dtype=np.float64)
            v = np.clip(v[np.isfinite(v)], lo, hi)
            style = {"color": "black", "lw": 1.9} if highlight else {"color": method_colour(method, i), "lw": 1.1}
            ax.hist(v, bins=edges, histtype="step", density=True, label=label, **style)
        ax.set_yscale("log")
        ax.set_title(entry.get("title", site), fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("output value")
        ax.set_ylabel("density (log)")
    for ax in axes[len(sites):]:
        ax.set_visible(False)
    entries: dict[str, Any] = {}
    for ax in axes[:len(sites)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label.split(" (")[0], handle)  # "chosen policy (ivit)" -> one entry
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=len(entries), fontsize=8,
               frameon=False)
    return _png(fig)


# -- Fig. 3 -----------------------------------------------------------------------------------

def site_sqnr_figure(order: Sequence[str], answer: Mapping[str, Mapping[str, float]],
                     answer_methods: Mapping[str, str], uniform: Mapping[str, Mapping[str, Mapping[str, float]]],
                     after_training: Mapping[str, Mapping[str, float]] | None = None) -> bytes:
    """Output SQNR (beta) and input SQNR (gamma) per site along depth: the chosen policy
    (black, markers coloured by the method it chose), each uniform policy, and the chosen policy
    after training when given. ``answer``/``uniform[m]``/``after_training``: ``{site: {"gamma", "beta"}}``."""
    sites = [s for s in order if s in answer or any(s in u for u in uniform.values())]
    if not sites:
        raise ValueError("no per-site SQNR to draw")
    x = list(range(len(sites)))
    fig = _figure(min(16.0, max(8.0, 0.32 * len(sites) + 3)), 7.2)
    ax_b, ax_g = fig.subplots(2, 1, sharex=True)
    for ax, key, label in ((ax_b, "beta", "output SQNR β (dB)"), (ax_g, "gamma", "input SQNR γ (dB)")):
        for i, (method, per_site) in enumerate(uniform.items()):
            ax.plot(x, [_finite(per_site.get(s, {}).get(key)) for s in sites], lw=1.2, alpha=0.85,
                    color=method_colour(method, i), label=f"uniform {method}")
        ys = [_finite(answer.get(s, {}).get(key)) for s in sites]
        ax.plot(x, ys, lw=2.2, color="black", label="chosen policy", zorder=3)
        for method in _methods(list(answer_methods.values())):
            pts = [(i, y) for i, (s, y) in enumerate(zip(sites, ys)) if answer_methods.get(s) == method]
            if pts:
                ax.scatter(*zip(*pts), s=30, color=method_colour(method), edgecolor="black", zorder=4,
                           label=f"chosen: {method}")
        if after_training:
            ax.plot(x, [_finite(after_training.get(s, {}).get(key)) for s in sites], lw=1.8, ls="--",
                    color="#444444", label="chosen policy after training", zorder=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_b.set_title("per-site SQNR along depth: the chosen policy against each uniform policy", fontsize=10)
    ax_g.set_xticks(x, [short_site(s) for s in sites], rotation=60, ha="right", fontsize=7)
    handles, labels = ax_b.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    return _png(fig)


# -- accuracy against latency -----------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(latency, accuracy)`` that no other point beats on both (lower
    latency, higher accuracy), sorted by latency."""
    idx = [i for i, (lat, acc) in enumerate(points) if math.isfinite(lat) and math.isfinite(acc)]
    front = [i for i in idx if not any(points[j][0] <= points[i][0] and points[j][1] >= points[i][1]
                                       and points[j] != points[i] for j in idx)]
    return sorted(front, key=lambda i: points[i][0])


def pareto_figure(panels: Mapping[str, Mapping[str, Any]]) -> bytes:
    """One panel per entry: ``{"points": [(latency, top1, label), ...], "xlabel": str}``; every
    point drawn, the non-dominated front joined and labelled."""
    if not panels:
        raise ValueError("nothing to draw")
    fig = _figure(5.6 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, panel) in zip(axes, panels.items()):
        pts = [(float(p[0]), float(p[1])) for p in panel["points"]]
        labels = [str(p[2]) if len(p) > 2 else "" for p in panel["points"]]
        front = pareto_front(pts)
        ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], s=22, color="#1f77b4", alpha=0.6,
                   label="policies")
        ax.plot([pts[i][0] for i in front], [100 * pts[i][1] for i in front], "-o", color="#d62728",
                ms=5, label="Pareto front")
        for i in front:
            if labels[i]:
                ax.annotate(labels[i], (pts[i][0], 100 * pts[i][1]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.set_xlabel(panel.get("xlabel", "latency"))
        ax.set_ylabel("top-1 (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return _png(fig)
