"""PNG figures of a circuit: the graph, the faithfulness curve, estimates against real ablations.

Drawing only (matplotlib on the Agg canvas, imported inside each function so importing is free);
every function takes a `Circuit` (or its parts) and a path.

    save_graph(path, circuit)          sites bottom (upstream) to top, positions left to right;
                                       node area ~ |score|, red = raises the metric when the node
                                       is patched, blue = lowers it; edge width ~ |weight|
    save_curve(path, circuits, labels) faithfulness against latent nodes kept (log x)
    save_validation(path, circuit)     attribution estimate against single-node ablation effect
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from saelab.circuits.circuit import Circuit
from saelab.circuits.sites import METRIC


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    return p


def layout(circuit: Circuit) -> dict[str, tuple[float, float]]:
    """(x, y) of each circuit node: y = site index, x = position (nodes of one cell spread out);
    the metric sits above the last site at the right."""
    nodes = circuit.circuit_nodes()
    cells: dict[tuple, list[dict]] = {}
    for n in nodes:
        cells.setdefault((n["site"], n["position"]), []).append(n)
    positions = sorted({n["position"] for n in nodes if n["position"] is not None})
    col = {p: i for i, p in enumerate(positions)}
    xy = {}
    for (site, pos), members in cells.items():
        x0 = col.get(pos, 0) if pos is not None else 0
        for k, n in enumerate(members):
            spread = 0.8 * (k - (len(members) - 1) / 2) / max(len(members), 1)
            xy[n["id"]] = (x0 + spread, float(site))
    xy[METRIC] = (max(len(positions) - 1, 0), len(circuit.sites) - 0.2 + 0.6)
    return xy


def save_graph(path, circuit: Circuit, title: str = "") -> Path:
    from matplotlib.collections import LineCollection

    nodes = circuit.circuit_nodes()
    xy = layout(circuit)
    labels = circuit.positions.get("labels", [])
    pos_used = sorted({n["position"] for n in nodes if n["position"] is not None})
    fig, ax = _figure(max(6.0, 0.9 * len(pos_used) + 2), max(4.0, 1.1 * len(circuit.sites) + 1.5))
    wmax = max((abs(e["weight"]) for e in circuit.edges), default=1.0) or 1.0
    segs, widths, colors = [], [], []
    for e in circuit.edges:
        if e["source"] in xy and e["target"] in xy:
            segs.append([xy[e["source"]], xy[e["target"]]])
            widths.append(0.3 + 3.0 * abs(e["weight"]) / wmax)
            colors.append((0.8, 0.1, 0.1, 0.45) if e["weight"] > 0 else (0.1, 0.2, 0.8, 0.45))
    ax.add_collection(LineCollection(segs, linewidths=widths, colors=colors, zorder=1))
    smax = max((abs(n["score"]) for n in nodes), default=1.0) or 1.0
    for n in nodes:
        x, y = xy[n["id"]]
        color = "#dc2626" if n["score"] > 0 else "#2563eb"
        marker = "s" if n["kind"] == "error" else "o"
        ax.scatter([x], [y], s=30 + 400 * abs(n["score"]) / smax, c=color, marker=marker, alpha=0.85,
                   edgecolors="black", linewidths=0.5, zorder=2)
        if n["kind"] == "latent":
            ax.annotate(str(n["index"]), (x, y), fontsize=6, ha="center", va="bottom", xytext=(0, 5),
                        textcoords="offset points", zorder=3)
    mx, my = xy[METRIC]
    ax.scatter([mx], [my], s=200, c="#f59e0b", marker="*", edgecolors="black", zorder=2)
    ax.annotate("metric", (mx, my), fontsize=8, ha="left", xytext=(6, 0), textcoords="offset points")
    ax.set_yticks(range(len(circuit.sites)), [s["name"] for s in circuit.sites], fontsize=7)
    if pos_used:
        ax.set_xticks(range(len(pos_used)), [f"{p}\n{labels[p]!r}"[:18] if p < len(labels) else str(p)
                                             for p in pos_used], fontsize=6)
    else:
        ax.set_xticks([0], ["all positions"])
    ax.set_ylim(-0.6, len(circuit.sites) + 0.6)
    ax.set_title(title or "circuit (circles: latents, squares: SAE errors; red raises the metric's "
                 "patching effect, blue lowers it)", fontsize=8)
    return _save(fig, path)


def save_curve(path, circuits: Sequence[Circuit], labels: Sequence[str], title: str = "faithfulness") -> Path:
    fig, ax = _figure(6.0, 4.0)
    for c, label in zip(circuits, labels):
        pts = [p for p in c.faithfulness["curve"] if p["n_features"] > 0]
        ax.plot([p["n_features"] for p in pts], [p["faithfulness"] for p in pts], marker="o", ms=3, label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("latent nodes kept (plus the error nodes ranked above them)")
    ax.set_ylabel("(m(C) - m(empty)) / (m(model) - m(empty))")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def save_validation(path, circuit: Circuit) -> Path:
    v = circuit.validation
    fig, ax = _figure(4.5, 4.0)
    pts = v.get("nodes", [])
    ax.scatter([p["estimate"] for p in pts], [p["effect"] for p in pts], s=12,
               c=["#6b7280" if p["id"].endswith(":err") else "#ea580c" for p in pts])
    lim = max([abs(p["estimate"]) for p in pts] + [abs(p["effect"]) for p in pts] + [1e-9])
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("linear estimate (attribution)")
    ax.set_ylabel("real effect of patching the node alone")
    if v.get("n_nodes"):
        ax.set_title(f"top {v['n_nodes']} nodes: Spearman {v['spearman']:.2f} [{v['low']:.2f}, {v['high']:.2f}]",
                     fontsize=9)
    return _save(fig, path)
