"""Plots of the RkCNN comparison experiments (matplotlib Agg, PNG): training curves, dead latents,
dead rate per layer. Pure rendering: the numbers come from rkcnn_compare / rkcnn_layers.

Training curves: for each method, the per-step training metric averaged over seeds (line) with the
min-max over seeds (band); steps where some seed has no row are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

COLORS = {"baseline": "tab:gray", "rkcnn": "tab:orange"}
CURVES = (("fvu", "train FVU"), ("l0", "train L0"), ("dead_frac", "dead fraction (train window)"))


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _read(path: str) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def plot_training_curves(path: Path, curves: dict[str, list[str]], title: str = "") -> Path:
    """One panel per metric of CURVES; `curves` = {method: [metrics.jsonl of each seed]}."""
    fig, axes = _figure(12, 3.4, len(CURVES))
    for ax, (key, label) in zip(axes, CURVES):
        for method, files in curves.items():
            per_seed = [{r["step"]: r[key] for r in _read(f) if isinstance(r.get(key), (int, float))} for f in files]
            steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
            if not steps:
                continue
            vals = [[d[s] for d in per_seed] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in vals], color=COLORS.get(method), label=method)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=COLORS.get(method), alpha=0.25)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        if key == "fvu":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_dead_latents(path: Path, per_seed: list[dict], title: str = "") -> Path:
    """Left: validation dead fraction per method (bar = mean, dots = seeds). Right: in the rkcnn runs,
    dead fraction of mined vs other latents (and the same index groups in the baseline runs)."""
    fig, (ax, ax2) = _figure(9, 3.6, 2)
    for i, method in enumerate(("baseline", "rkcnn")):
        v = [100 * r["dead_frac"] for r in per_seed if r["method"] == method]
        if v:
            ax.bar(i, sum(v) / len(v), color=COLORS[method], alpha=0.7)
            ax.plot([i] * len(v), v, "k.", markersize=8)
    ax.set_xticks([0, 1], ["baseline", "rkcnn"])
    ax.set_ylabel("dead latents on validation tokens (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("dead latents" + (f" ({title})" if title else ""), fontsize=10)
    width = 0.38
    for j, method in enumerate(("baseline", "rkcnn")):
        for i, group in enumerate(("mined", "other")):
            v = [100 * r[f"{group}_dead_frac"] for r in per_seed if r["method"] == method
                 and r.get(f"{group}_dead_frac") is not None and r[f"{group}_dead_frac"] == r[f"{group}_dead_frac"]]
            if v:
                x = i + (j - 0.5) * width
                ax2.bar(x, sum(v) / len(v), width, color=COLORS[method], alpha=0.7,
                        label=method if i == 0 else None)
                ax2.plot([x] * len(v), v, "k.", markersize=6)
    ax2.set_xticks([0, 1], ["'mined' latents", "other latents"])
    ax2.set_ylabel("dead (%)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("by latent group (baseline: same indices)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_dead_per_layer(path: Path, layers: list[int], stats: dict[str, list[tuple[float, float]]],
                        hook_template: str = "") -> Path:
    """Dead fraction (mean ± std over seeds, in %) against layer index, one line per method."""
    fig, (ax,) = _figure(7, 3.8)
    for method, ms in stats.items():
        ax.errorbar(layers, [100 * m for m, _ in ms], yerr=[100 * (s if s == s else 0) for _, s in ms],
                    color=COLORS.get(method), marker="o", capsize=3, label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("dead latents on validation tokens (%)")
    ax.set_title("dead latents per layer" + (f" ({hook_template})" if hook_template else ""), fontsize=10)
    ax.set_xticks(layers)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
