"""Rendering for `saelab experiment reasoning`: PNG plots and report.md from the results dict.

Computes nothing new: every number comes from `reasoning.run`. Plots use the Agg canvas via
`saelab.plots` helpers (no pyplot global state).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from saelab.plots import figure, save


def write_plots(results: dict, enr, out: Path) -> dict[str, str]:
    """enrichment.png, complexity.png, categories.png (with categories), ablation.png; {name: file}."""
    plots: dict[str, str] = {}
    fig, ax = figure(5.5, 5.0)
    eps = 0.5 / max(results["tokens"]["reasoning"], 1)
    ax.scatter(np.maximum(enr.freq_b, eps), np.maximum(enr.freq_a, eps), s=3, alpha=0.4, color="grey")
    top = [r["feature"] for r in results["enrichment"]["top"]]
    if top:
        ax.scatter(np.maximum(enr.freq_b[top], eps), np.maximum(enr.freq_a[top], eps), s=12, color="C3", label="top enriched")
        ax.legend()
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("firing frequency on prose"), ax.set_ylabel("firing frequency on reasoning")
    ax.set_title("features: reasoning vs prose")
    save(fig, out / "enrichment.png")
    plots["enrichment"] = "enrichment.png"

    cx = results["complexity"]
    if "activity" in cx:
        fig, ax = figure(6.0, 4.5)
        cats = cx["categories"]
        for i, c in enumerate(sorted(set(cats))):
            sel = [j for j, k in enumerate(cats) if k == c]
            ax.scatter([cx["n_steps"][j] for j in sel], [cx["activity"][j] for j in sel], s=10, label=c, color=f"C{i}")
        r = cx["correlations"]["activity"][0]["spearman"]
        ax.set_title(f"top-feature activity vs steps (Spearman {r['r']:.2f} [{r['low']:.2f}, {r['high']:.2f}])")
        ax.set_xlabel("solution steps"), ax.set_ylabel("mean summed activation of top features")
        if len(set(cats)) > 1:
            ax.legend(fontsize=7)
        save(fig, out / "complexity.png")
        plots["complexity"] = "complexity.png"
    if cx.get("by_category"):
        fig, ax = figure(6.0, 4.0)
        names = list(cx["by_category"])
        est = [cx["by_category"][c]["estimate"] for c in names]
        err = [[e - cx["by_category"][c]["low"] for c, e in zip(names, est)],
               [cx["by_category"][c]["high"] - e for c, e in zip(names, est)]]
        ax.bar(range(len(names)), est, yerr=err, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("mean top-feature activity (95% CI)")
        save(fig, out / "categories.png")
        plots["categories"] = "categories.png"

    ab = results["ablation"]
    if ab.get("top"):
        fig, ax = figure(6.0, 4.0)
        groups = [("top", [ab["top"]])] + [("control", ab["controls"])]
        xs, labels = 0, []
        for gi, (name, runs) in enumerate(groups):
            for ci, corpus in enumerate(("reasoning", "prose")):
                vals = [r[corpus]["delta_loss"] for r in runs]
                est = float(np.mean([v["estimate"] for v in vals]))
                if len(vals) == 1:
                    lo, hi = vals[0]["low"], vals[0]["high"]
                else:
                    sd = float(np.std([v["estimate"] for v in vals], ddof=1))
                    lo, hi = est - sd, est + sd
                ax.bar(xs, est, yerr=[[est - lo], [hi - est]], capsize=3, color=f"C{ci}")
                labels.append(f"{name}\n{corpus}")
                xs += 1
        ax.set_xticks(range(xs), labels, fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("loss change, nats/token\n(top: 95% CI; control: mean +- std over seeds)")
        ax.set_title(f"ablating {len(ab['features'])} features")
        save(fig, out / "ablation.png")
        plots["ablation"] = "ablation.png"
    plots["report"] = str(out / "report.md")
    return plots


def _ci(d: dict, digits: int = 4) -> str:
    if d is None or any(not isinstance(d.get(k), (int, float)) or math.isnan(d[k]) for k in ("low", "high")):
        return f"{d.get('estimate', float('nan')):+.{digits}f}" if d else "n/a"
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def write_report(results: dict, path: Path) -> None:
    """report.md: the four steps, their numbers with CIs, and the plots."""
    r, e, cx, ce, ab = results, results["enrichment"], results["complexity"], results["calc_vs_expl"], results["ablation"]
    cfg = r["config"]
    L = [f"# Reasoning features: {r['model']['name']} @ {r['hook']}", "",
         f"SAE `{r['sae']['path']}` ({r['sae']['architecture']}, {r['sae']['d_sae']} features). "
         f"Reasoning `{cfg['reasoning_corpus']}` ({r['tokens']['reasoning']:,} tokens), prose "
         f"`{cfg['prose_corpus']}` ({r['tokens']['prose']:,} tokens)." + (" **Dry run** (tiny random model)." if r["dry_run"] else ""),
         "", "## 1. Features enriched on reasoning vs prose", "",
         f"{e['n_reasoning_enriched']} features fire significantly more often on reasoning, {e['n_prose_enriched']} "
         f"more often on prose (two-proportion z-test, Benjamini-Hochberg q <= {cfg['alpha']}); "
         f"{e['dead_in_both']} never fired on either.", "",
         "| feature | freq reasoning | freq prose | log2 ratio | q | strongest contexts |", "|---|---|---|---|---|---|"]
    for t in e["top"]:
        ex = " / ".join(x.replace("|", "\\|") for x in t["examples"][:2])
        L.append(f"| {t['feature']} | {t['freq_reasoning']:.4f} | {t['freq_prose']:.4f} | {t['log2_ratio']:.2f} | "
                 f"{t['q']:.1e} | {ex} |")
    L += ["", "![enrichment](enrichment.png)", "", "## 2. Complexity", ""]
    if "correlations" in cx:
        for measure, rows in cx["correlations"].items():
            for c in rows:
                s, p = c["spearman"], c["pearson"]
                L.append(f"- {measure} vs {c['against']}: Spearman {s['r']:.3f} [{s['low']:.3f}, {s['high']:.3f}] "
                         f"(p {s['p']:.2g}); Pearson {p['r']:.3f} [{p['low']:.3f}, {p['high']:.3f}], n = {s['n']}")
        if cx.get("by_category"):
            L += ["", "| category | mean activity (95% CI) |", "|---|---|"]
            L += [f"| {c} | {_ci(v)} |" for c, v in cx["by_category"].items()]
        else:
            L.append("- no categories (pass --problems-json to add them)")
        L += ["", "![complexity](complexity.png)"] + (["", "![categories](categories.png)"] if cx.get("by_category") else [])
    else:
        L.append("Skipped: no enriched feature or fewer than 4 problems.")
    L += ["", "## 3. Calculation vs explanation", "",
          f"{ce['n_calc']:,} calculation tokens, {ce['n_expl']:,} explanation tokens in the reasoning text."]
    if "calc_features" in ce:
        L.append(f"{ce['n_calc_specific']} features are specific to calculation, {ce['n_expl_specific']} to explanation "
                 f"(q <= {cfg['alpha']}); of the top reasoning features, a share of "
                 f"{ce['top_reasoning_features_calc_share']:.2f} lean towards calculation.")
        for key, title in (("calc_features", "calculation"), ("expl_features", "explanation")):
            L.append(f"- {title}: " + ", ".join(f"{x['feature']} ({x['freq_in']:.3f} vs {x['freq_out']:.3f})" for x in ce[key]))
    L += ["", "## 4. Causal ablation", ""]
    if ab.get("top"):
        t, cs, tm = ab["top"], ab["control_summary"], ab["top_minus_control"]
        fm = ab["frequency_match"]
        L += [f"Ablating the top {len(ab['features'])} reasoning features (error term kept) on held-out text; "
              f"control: {len(ab['controls'])} random sets matched by firing-frequency bin (chosen mean log10 freq "
              f"{fm['chosen_log10_freq_mean']:.2f}, controls {', '.join(f'{x:.2f}' for x in fm['control_log10_freq_mean'])}).", "",
              "| ablated | dloss reasoning | dloss prose | specificity (reasoning - prose) |", "|---|---|---|---|",
              f"| top | {_ci(t['reasoning']['delta_loss'])} | {_ci(t['prose']['delta_loss'])} | {_ci(t['specificity'])} |"]
        for i, c in enumerate(ab["controls"]):
            L.append(f"| control {i} | {_ci(c['reasoning']['delta_loss'])} | {_ci(c['prose']['delta_loss'])} | {_ci(c['specificity'])} |")
        L += ["", f"Controls: reasoning {cs['reasoning_delta']['mean']:+.4f} +- {cs['reasoning_delta']['std']:.4f}, "
              f"prose {cs['prose_delta']['mean']:+.4f} +- {cs['prose_delta']['std']:.4f} (mean +- std over seeds).",
              f"Top minus control, paired by sequence: reasoning {_ci(tm['reasoning'])}, prose {_ci(tm['prose'])}.",
              "", "![ablation](ablation.png)"]
    else:
        L.append("Skipped: no feature passed the enrichment test.")
    L += ["", "Intervals: 95%; bootstrap over sequences (loss changes), Welch (specificity), Fisher z (correlations)."]
    path.write_text("\n".join(L) + "\n")
