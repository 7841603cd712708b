"""Plots of the RkCNN comparison experiments (matplotlib Agg, PNG): training curves, dead latents,
dead rate per layer, and the toy experiment. Pure rendering: the numbers come from rkcnn_compare / rkcnn_layers.

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


# ---------------------------------------------------------------------------------------------
# the toy experiment (seed 0)


def _heatmap(path: Path, M, title: str, xlabel: str, ylabel: str, vmin: float, vmax: float, cmap: str = "viridis"):
    fig, (ax,) = _figure(5.5, 4.0)
    im = ax.imshow(M.numpy(), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax)
    if M.numel() <= 400:
        for (i, j), v in zip(((i, j) for i in range(M.shape[0]) for j in range(M.shape[1])), M.flatten().tolist()):
            dark = v < 0.6 * vmax if cmap == "viridis" else abs(v) > 0.6 * vmax
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if dark else "k")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_toy(out: Path, cfg, d: dict, names: dict[str, str]) -> dict[str, str]:
    """Score histogram, top-10 kept scores, |cos| kept vs true, true-feature overlap (seed 0)."""
    import torch

    from saelab.plots import save_histogram

    scores = d["scores_H"].double()
    lo, hi = float(scores.min()), float(scores.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(scores, bins=30, min=lo, max=hi).long().tolist()
    save_histogram(out / names["score_distribution"], torch.linspace(lo, hi, 31).tolist(), counts,
                   title=f"{cfg.score} score of {cfg.h} random {cfg.m}-dim subsets (seed 0)",
                   xlabel=f"{cfg.score} score", ylabel="subsets")
    top = d["kept_scores"][:10]
    fig, (ax,) = _figure(5.5, 4.0)
    ax.bar(range(1, len(top) + 1), top.tolist(), color="tab:blue")
    ax.axhline(cfg.min_top_score, color="tab:red", ls="--", label=f"threshold {cfg.min_top_score}")
    ax.set_xlabel("rank (kept directions)")
    ax.set_ylabel(f"{cfg.score} score")
    ax.set_title("Top-10 kept scores (seed 0)", fontsize=10)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / names["top10_scores"], format="png")
    cos = d["cos_RF"]
    _heatmap(out / names["cos_mined_vs_true"], cos[:40, :40], f"|cos| kept vs true (match >= {cfg.match_threshold})",
             "true feature i", "kept direction (rank)", vmin=0, vmax=1)
    ov = d["overlap_FF"][:40, :40]
    lim = float(ov.abs().max())
    _heatmap(out / names["feature_overlap"], ov, "True-feature overlap (seed 0)", "feature j", "feature i",
             vmin=-lim, vmax=lim, cmap="RdBu_r")
    return dict(names)


def plot_arms(path: Path, results: dict) -> Path:
    """rkcnn-arms: dead %, final FVU and FVU at step 0 per arm (bar = mean, dots = seeds)."""
    names = list(results["arms"])
    fig, axes = _figure(max(8.0, 0.45 * len(names) * 3), 4.2, 3)
    for ax, (metric, label, scale) in zip(axes, (("dead_frac", "dead latents (%)", 100.0), ("fvu", "final FVU", 1.0),
                                                 ("fvu_step0", "FVU at step 0", 1.0))):
        for i, name in enumerate(names):
            v = [scale * r[metric] for r in results["per_run"] if r["arm"] == name and r[metric] == r[metric]]
            if v:
                color = "tab:gray" if name.startswith("baseline") else "tab:orange"
                ax.bar(i, sum(v) / len(v), color=color, alpha=0.7)
                ax.plot([i] * len(v), v, "k.", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_title(label, fontsize=10)
        if metric == "fvu_step0":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
