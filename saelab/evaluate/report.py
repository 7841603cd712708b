"""Write evaluation results: eval.json, eval.md (comparison table) and PNGs; the stdout summary.

Owns presentation only: it takes `EvalResult`s (evaluate.py computes them) and turns them into files
and text. Plots go through `plots.py`.

    OUT/eval.json                  {"saelab_version", "context": {store, split, model, corpus}, "results": [...]}
    OUT/eval.md                    one comparison table + per-SAE details
    OUT/feature_density.png        log10 firing frequency, all SAEs overlaid
    OUT/<name>/feature_density.png, max_cos.png, l0_hist.png    per SAE
    OUT/pareto_l0_fvu.png          when several SAEs
    OUT/pareto_l0_ce_recovered.png when several SAEs and downstream numbers
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from saelab import plots

log = logging.getLogger(__name__)

# (header, field, format) of the comparison table; a None value prints as "-".
# Metrics outliers cannot dominate lead: per-token relative error, then the downstream numbers.
COLUMNS = [
    ("SAE", "name", "{}"), ("arch", "architecture", "{}"), ("hook", "hook", "{}"), ("d_sae", "d_sae", "{:,}"),
    ("L0", "l0", "{:.1f}"), ("rel err", "rel_error", "{:.3f}"), ("CE rec.", "ce_recovered", "{:.4f}"),
    ("KL", "kl", "{:.4f}"), ("FVU", "fvu", "{:.4f}"), ("FVU all", "fvu_with_outliers", "{:.4f}"),
    ("MSE", "mse", "{:.4g}"), ("cos", "cosine", "{:.4f}"),
    ("rel norm", "rel_norm", "{:.3f}"), ("dead %", "dead_frac", "{:.1%}"), ("dense %", "dense_frac", "{:.1%}"),
    ("max cos", "max_cos_mean", "{:.3f}"), ("CE clean", "ce_clean", "{:.4f}"), ("CE SAE", "ce_sae", "{:.4f}"),
    ("CE zero", "ce_zero", "{:.4f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _columns(results) -> list[tuple[str, str, str]]:
    downstream = any(r.ce_sae is not None for r in results)
    return [c for c in COLUMNS if downstream or not c[1].startswith(("ce_", "kl"))]


def markdown_table(results) -> str:
    """The comparison table, one row per SAE, as GitHub markdown."""
    cols = _columns(results)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_fmt(getattr(r, f), fmt) for _, f, fmt in cols) + " |")
    return "\n".join(lines)


def summary_text(results) -> str:
    """A one-screen plain-text summary (aligned columns) for stdout."""
    cols = [c for c in _columns(results) if c[1] not in ("hook", "architecture", "ce_zero")]
    rows = [[h for h, _, _ in cols]] + [[_fmt(getattr(r, f), fmt) for _, f, fmt in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    r0 = results[0]
    lines.append(f"{r0.n_tokens:,} tokens of split {r0.split!r}"
                 + (f"; downstream over {r0.downstream_tokens:,} token predictions" if r0.downstream_tokens else ""))
    return "\n".join(lines)


def _lead(r) -> str:
    """The sentence eval.md opens with, per SAE: the numbers a handful of outlier rows cannot move."""
    s = f"- **{r.name}**: per-token relative error **{r.rel_error:.3f}**"
    if r.ce_recovered is not None:
        s += (f", CE loss recovered **{r.ce_recovered:.3f}** (KL {r.kl:.4f} nats/token over "
              f"{r.downstream_tokens:,} predictions; {r.downstream_left or 0:,} positions left unedited as massive "
              "activations)")
    return s + f"; FVU {r.fvu:.4f} ({r.fvu_with_outliers:.4f} with the {r.flagged:,} flagged rows), L0 {r.l0:.1f}."


def save_error_by_position(path: Path, r) -> Path:
    """Mean per-token relative error at each position of the packed window (position 0 is BOS)."""
    fig, ax = plots.figure(6, 3.5)
    ys = [math.nan if v is None else v for v in r.rel_error_by_position]
    ax.plot(range(len(ys)), ys, lw=1)
    ax.set_xlabel("position in the window")
    ax.set_ylabel("relative error ||x - x_hat|| / ||x||")
    ax.set_title(f"Reconstruction error by position: {r.name}")
    return plots.save(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sae"


def write_outputs(results, out: str | Path, context: dict | None = None) -> dict[str, Path]:
    """Write eval.json, eval.md and the PNGs into `out` (created); return {what: path}."""
    from saelab import __version__

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    payload = {"saelab_version": __version__, "context": context or {}, "results": [r.to_dict() for r in results]}
    tmp = d / "eval.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(d / "eval.json")
    files["json"] = d / "eval.json"

    for r in results:
        sub = d / _slug(r.name)
        files[f"{r.name}/density"] = plots.save_feature_density(sub / "feature_density.png", [r.density_hist], [r.name],
                                                                title=f"Feature density: {r.name}")
        h = r.max_cos_hist
        files[f"{r.name}/max_cos"] = plots.save_histogram(sub / "max_cos.png", h["edges"], h["counts"],
                                                          f"Max cosine to another decoder direction: {r.name}",
                                                          "max cosine similarity")
        edges = [k - 0.5 for k in range(len(r.l0_hist) + 1)]
        files[f"{r.name}/l0"] = plots.save_histogram(sub / "l0_hist.png", edges, r.l0_hist, f"L0 per token: {r.name}",
                                                     "active latents", ylabel="tokens")
        if r.rel_error_by_position:
            files[f"{r.name}/position"] = save_error_by_position(sub / "error_by_position.png", r)
    if len(results) > 1:
        files["density"] = plots.save_feature_density(d / "feature_density.png", [r.density_hist for r in results],
                                                       [r.name for r in results])
        names = [r.name for r in results]
        l0 = [r.l0 for r in results]
        files["pareto_fvu"] = plots.save_pareto(d / "pareto_l0_fvu.png", l0, [r.fvu for r in results], names,
                                                "L0 (active latents per token)", "FVU", "L0 vs FVU (lower-left is better)")
        if any(r.ce_recovered is not None for r in results):
            ys = [r.ce_recovered if r.ce_recovered is not None else math.nan for r in results]
            files["pareto_ce"] = plots.save_pareto(d / "pareto_l0_ce_recovered.png", l0, ys, names,
                                                   "L0 (active latents per token)", "CE loss recovered",
                                                   "L0 vs CE loss recovered (upper-left is better)",
                                                   higher_is_better=True)

    md = ["# SAE evaluation", ""]
    ctx = context or {}
    md.append(f"Store `{ctx.get('store', '?')}`, split `{ctx.get('split', '?')}`, "
              f"{results[0].n_tokens:,} tokens per SAE.")
    md += [""] + [_lead(r) for r in results] + [""]
    md.append("*rel err* is the per-token relative error ||x - x_hat|| / ||x|| averaged over tokens: each token "
              "counts once, so a few massive rows cannot decide it. FVU sums squared errors over the rows used; "
              "*FVU all* also counts the rows collect flagged as massive activations.")
    if ctx.get("model"):
        model = ctx["model"]
        md.append(f"Downstream: model `{model.get('name', model) if isinstance(model, dict) else model}`, corpus "
                  f"`{ctx.get('corpus')}`, {results[0].downstream_tokens or 0:,} token predictions; CE in nats/token, "
                  "CE rec. = (CE zero - CE SAE) / (CE zero - CE clean).")
    md += ["", markdown_table(results), ""]
    for key, title in (("pareto_fvu", "L0 vs FVU"), ("pareto_ce", "L0 vs CE loss recovered"),
                       ("density", "Feature density")):
        if key in files:
            md.append(f"![{title}]({files[key].name})")
    for r in results:
        slug = _slug(r.name)
        md += ["", f"## {r.name}", "", f"`{r.path or '(in memory)'}`: {r.architecture}, hook `{r.hook}`, "
               f"d_in {r.d_in}, d_sae {r.d_sae:,}. Dead {r.dead:,}, dense {r.dense:,}; decoder norms "
               f"{r.decoder_norm_min:.3f} .. {r.decoder_norm_max:.3f}; max cosine to another direction "
               f"{r.max_cos_max:.3f}; explained variance {r.explained_variance:.4f}. Rows flagged as massive "
               f"activations: {r.flagged:,}; variance held by the top 0.1% / 0.5% / 1% of rows used: "
               + " / ".join(f"{100 * v:.1f}%" for v in r.variance_share_top.values()) + ".",
               "", f"![density]({slug}/feature_density.png) ![max cos]({slug}/max_cos.png) "
               f"![L0]({slug}/l0_hist.png)" + (f" ![error by position]({slug}/error_by_position.png)"
                                                 if r.rel_error_by_position else "")]
        if r.ce_sae is not None:
            md.append(f"\nCE mean-ablated {_fmt(r.ce_mean, '{:.4f}')}, recovered vs mean-ablation "
                      f"{_fmt(r.ce_recovered_mean, '{:.4f}')}.")
    (d / "eval.md").write_text("\n".join(md) + "\n")
    files["md"] = d / "eval.md"
    log.info("wrote %s", d / "eval.json")
    return files
