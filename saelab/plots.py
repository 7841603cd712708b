"""Shared PNG helpers: histograms, the feature-density plot and Pareto scatter plots.

Owns only drawing: every function takes plain numbers (lists, tensors or arrays) and a path and
writes one PNG. It computes no metric (`metrics.py` does) and never touches pyplot's global state:
figures are built with `matplotlib.figure.Figure` on the Agg canvas, so it is safe in threads, in
tests and on machines without a display. matplotlib is imported inside each function, so importing
this module is free.

    fig, ax = figure(6, 4); ...; save(fig, path)        any other plot: the one figure set-up
    save_histogram(path, edges, counts, ...)          bars from a precomputed histogram
    save_feature_density(path, hists, labels)         log10 firing frequency, one step line per SAE
    save_pareto(path, xs, ys, labels, ...)            scatter + frontier line (lower-left is better
                                                      for L0 vs FVU; use `higher_is_better` otherwise)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def figure(width: float = 6.0, height: float = 4.0, rows: int = 1, cols: int = 1):
    """A Figure on the Agg canvas (no pyplot state) and its axes: one Axes, or an array for rows x cols."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    if rows == cols == 1:
        return fig, fig.add_subplot(1, 1, 1)
    return fig, fig.subplots(rows, cols)


def save(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parent folders created) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    log.debug("wrote %s", p)
    return p


def save_histogram(path: str | Path, edges: Sequence[float], counts: Sequence[int], title: str,
                   xlabel: str, ylabel: str = "latents", logy: bool = False) -> Path:
    """Bar plot of a precomputed histogram (`len(edges) == len(counts) + 1`)."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"a histogram needs len(edges) = len(counts) + 1, got {len(edges)} and {len(counts)}")
    fig, ax = figure()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(list(edges[:-1]), list(counts), width=widths, align="edge", color="tab:blue", edgecolor="none")
    if logy and any(c > 0 for c in counts):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save(fig, path)


def save_feature_density(path: str | Path, hists: Sequence[dict], labels: Sequence[str],
                         title: str = "Feature density") -> Path:
    """Log10 firing-frequency histograms (dicts from `metrics.log10_density_histogram`), one per SAE.

    Dead latents cannot sit on a log axis; their count goes in the legend.
    """
    fig, ax = figure()
    for h, label in zip(hists, labels):
        edges, counts = h["edges"], h["counts"]
        ax.stairs(counts, edges, label=f"{label} (dead: {h['dead']})", fill=len(hists) == 1, alpha=0.8)
    ax.set_title(title)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.legend(fontsize="small")
    return save(fig, path)


def pareto_front(xs: Sequence[float], ys: Sequence[float], higher_is_better: bool = False) -> list[int]:
    """Indices of the points not dominated by another (smaller x always better), sorted by x."""
    order = sorted((i for i in range(len(xs)) if xs[i] == xs[i] and ys[i] == ys[i]), key=lambda i: (xs[i], -ys[i] if higher_is_better else ys[i]))
    front, best = [], None
    for i in order:
        y = ys[i]
        if best is None or (y > best if higher_is_better else y < best):
            front.append(i)
            best = y
    return front


def save_pareto(path: str | Path, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                xlabel: str, ylabel: str, title: str, higher_is_better: bool = False,
                logx: bool = False) -> Path:
    """Scatter of one point per SAE, labelled, with the Pareto frontier drawn as a line.

    NaN points (e.g. a metric that was not computed) are skipped.
    """
    fig, ax = figure()
    ok = [i for i in range(len(xs)) if xs[i] == xs[i] and ys[i] == ys[i]]
    ax.scatter([xs[i] for i in ok], [ys[i] for i in ok], color="tab:blue", zorder=3)
    for i in ok:
        ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize="small")
    front = pareto_front(xs, ys, higher_is_better)
    if len(front) > 1:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", zorder=2, label="Pareto front")
        ax.legend(fontsize="small")
    if logx and ok and min(xs[i] for i in ok) > 0:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return save(fig, path)
