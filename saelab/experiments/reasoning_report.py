"""Rendering for `saelab experiment reasoning`: claims.png and report.md from the results dict.

Computes nothing new: every number comes from `reasoning.run`. Plots use the Agg canvas via
`saelab.plots` helpers (no pyplot global state).
"""
from __future__ import annotations

from pathlib import Path

from saelab.experiments.reasoning_analysis import p_two_sided
from saelab.plots import figure, save

CLAIMS = (
    ("reasoning_vs_prose", "reasoning features exist and differ from prose features",
     "activity on test replies - on test prose (per token)"),
    ("math_vs_logic", "math vs logic", "whole-problem activity, algebraic categories - Combinatorics"),
    ("math_vs_logic_notation", "math vs logic, notation held fixed",
     "partial correlation with 1[algebraic] | notation density, length"),
    ("complexity", "activity tracks complexity", "partial Spearman with #steps | notation density, length"),
    ("statement_vs_solution", "(notation-fixed) statement vs its solution", "activity on steps - on statement"),
    ("calc_vs_expl", "calculation vs explanation", "calculation-heavy steps - explanation-heavy steps"),
)
ANSWER = (("drop_logp_answer", "ablation hurts reasoning more than matched controls: final answer",
           "log p(answer) clean - ablated, nats"),
          ("drop_logp_key", "ablation hurts reasoning more than matched controls: key tokens of the steps",
           "mean log p(key token) clean - ablated, nats"))


def _rows(r: dict):
    for key, claim, measure in CLAIMS:
        if key in r.get("claims", {}):
            yield key, claim, measure, r["claims"][key]
    for key, claim, measure in ANSWER:
        if key in r.get("answer", {}):
            yield key, claim, measure, r["answer"][key]


def plot_claims(saes: list[dict], labels: list[str], path: Path, cols: int | None = None) -> bool:
    """One panel per claim present in `saes` (results["saes"] entries): each SAE's estimate and CI
    (red) over the 2.5-97.5% range of its matched controls (grey), `labels` on the x axis; panels in
    rows of `cols` (default: one row). Returns False (and writes nothing) when no claim is present."""
    keyed = [(k, m) for k, _, m in CLAIMS + ANSWER
             if any(k in {**s.get("claims", {}), **s.get("answer", {})} for s in saes)]
    if not keyed:
        return False
    cols = cols or len(keyed)
    rows = -(-len(keyed) // cols)
    fig, axes = figure(3.5 * cols, 3.1 * rows, rows=rows, cols=cols)
    axes = list(axes.ravel()) if hasattr(axes, "ravel") else [axes]
    for ax, (k, measure) in zip(axes, keyed):
        for i, s in enumerate(saes):
            c = {**s.get("claims", {}), **s.get("answer", {})}.get(k)
            if c is None:
                continue
            ctl = c["control"]
            ax.plot([i, i], [ctl["control_low"], ctl["control_high"]], color="grey", lw=6, alpha=0.4)
            ax.errorbar([i], [c["estimate"]], yerr=[[c["estimate"] - c["low"]], [c["high"] - c["estimate"]]],
                        fmt="o", color="C3", capsize=3)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(range(len(saes)), labels, fontsize=7)
        ax.set_title(f"{k}\n{measure}", fontsize=7)
    axes[0].set_ylabel("chosen set (red, 95% CI)\nmatched controls (grey, 2.5-97.5%)", fontsize=7)
    save(fig, path)
    return True


def short_labels(paths: list[str]) -> list[str]:
    """What tells the SAE paths apart: the path parts left after the parts every path shares at the
    start and at the end are dropped (['runs/L9_s0/sae_best', 'runs/L15_s0/sae_best'] -> ['L9_s0', 'L15_s0']);
    a lone path keeps its last part."""
    parts = [Path(p).parts or (p,) for p in paths]
    if len(parts) < 2 or len(set(paths)) < len(paths):
        return [p[-1] if p else "" for p in parts]
    n = min(len(p) for p in parts)
    head = next((i for i in range(n) if len({p[i] for p in parts}) > 1), n)
    tail = next((i for i in range(n - head) if len({p[-1 - i] for p in parts}) > 1), n - head)
    return ["/".join(p[head:len(p) - tail]) or p[-1] for p in parts]


def write_plots(results: dict, out: Path) -> dict[str, str]:
    """claims.png: each claim's estimate and CI per SAE, with the 95% range of its matched controls."""
    plots: dict[str, str] = {}
    saes = results["saes"]
    labels = short_labels([s["path"] for s in saes])
    if plot_claims(saes, labels, out / "claims.png"):
        plots["claims"] = "claims.png"
    plots["report"] = str(out / "report.md")
    return plots


def _f(x: float) -> str:
    return f"{x:+.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.2e}"


def write_report(results: dict, path: Path) -> None:
    """report.md: the split, then per SAE the chosen features and every claim with CI, percentile, verdict."""
    r, cfg = results, results["config"]
    L = [f"# Reasoning features: {r['model']['name']}", "",
         ("**Dry run** (tiny random model, generated problems).\n" if r["dry_run"] else "")
         + f"Problems split by id (seed {cfg['seed']}): {len(r['split']['select_problems'])} select, "
         f"{len(r['split']['test_problems'])} test; prose documents {r['split']['select_prose_docs']} select, "
         f"{r['split']['test_prose_docs']} test. Units read: "
         + ", ".join(f"{k} {v}" for k, v in r["units"].items()) + f". {r['timings']['tokens_read']:,} tokens, "
         f"{r['timings']['total_s']:.0f} s in all.", "",
         f"Controls: {cfg['n_controls']} random feature sets matched feature by feature on firing frequency and "
         f"activation mass over the test units ({cfg['neighbours']} nearest neighbours); 'percentile' = where the "
         "chosen set's figure falls among them. CIs: 95%, bootstrap over problems (reasoning) and documents (prose).", ""]
    for i, s in enumerate(r["saes"]):
        L += [f"## SAE {i}: `{s['path']}` @ {s['hook']} ({s['architecture']}, {s['d_sae']} features, {s['seconds']:.0f} s)", "",
              f"Selection on {s['select_tokens']['reasoning']:,} reply / {s['select_tokens']['prose']:,} prose tokens: "
              f"{s['n_reasoning_enriched']} features enriched on reasoning, {s['n_prose_enriched']} on prose (BH q <= "
              f"{cfg['alpha']}). Chosen: " + ", ".join(f"{c['feature']} ({c['freq_reasoning']:.3f} vs "
                                                      f"{c['freq_prose']:.4f})" for c in s["chosen"]), ""]
        if "match" in s:
            L.append("Match quality (mean log10 over the set): " + "; ".join(
                f"{k} chosen {v['chosen']:.2f}, controls {v['controls_mean']:.2f} +- {v['controls_std']:.2f}"
                for k, v in s["match"].items()))
            L.append("")
        L += ["| claim | measure | figure (95% CI) | control percentile (n) | p vs controls (two-sided) | verdict |",
              "|---|---|---|---|---|---|"]
        for _, claim, measure, c in _rows(s):
            ct = c["control"]
            L.append(f"| {claim} | {measure} | {_f(c['estimate'])} [{_f(c['low'])}, {_f(c['high'])}] | "
                     f"{ct['percentile']:.1f} ({ct['n']}) | {p_two_sided(ct):.3f} | {c['verdict']} |")
        a = s.get("answer")
        if a:
            L += ["", f"Answer level on {a['n_problems']} test problems: clean log p(answer) {a['clean']['logp_answer']:.2f}, "
                  f"key tokens {a['clean']['logp_key']:.2f} nats; greedy exact answer clean {a['clean']['exact']:.2f}, "
                  f"ablated {a['exact_ablated']:.2f}, controls {a['exact_controls_mean']:.2f}."]
        cl = s.get("claims", {})
        if "complexity" in cl:
            c = cl["complexity"]
            L += ["", f"Complexity: plain Spearman {c['plain_spearman']['r']:+.3f}, partial {c['estimate']:+.3f} "
                  f"(n {c['n_problems']}, {c['truncated_problems']} problems cut at {cfg['problem_max_length']} tokens)."]
        L.append("")
    if "claims" in r.get("plots", {}):
        L += ["![claims](claims.png)", ""]
    path.write_text("\n".join(L) + "\n")
