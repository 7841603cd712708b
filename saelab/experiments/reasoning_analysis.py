"""Claims of `saelab experiment reasoning`, computed from per-unit feature sums (no model needed).

For a feature set K and a unit u (reply, prose window, statement, solution step; see
reasoning_passes), the set's activity is its summed activation per token:

    a_K(u) = sum_{f in K} sum_UF[u, f] / n_U[u]

Every claim is a statistic T(K) of these activities on the *test* problems and documents. It is
reported for the chosen set with a cluster-bootstrap CI (clusters: problems for reasoning text,
documents for prose) and as a percentile of T over `n_controls` random sets matched feature by
feature on firing frequency and activation mass over the test units (statistics.matched_feature_sets,
statistics.control_percentile):

    reasoning_vs_prose    mean a_K over reply units - over prose units
    statement_vs_solution per problem, a_K(steps) - a_K(statement), averaged over problems
    calc_vs_expl          mean a_K over calculation-heavy steps - over explanation-heavy steps
                          (steps in the top / bottom third of math_share among test steps)
    math_vs_logic         mean whole-problem a_K over the algebraic categories - over Combinatorics
    math_vs_logic_notation  the same contrast with notation held fixed: partial (Pearson) correlation of
                          whole-problem a_K with the indicator 1[algebraic], given math_share and the
                          length in tokens (linear adjustment: ranks would leave a linear confound in)
    complexity            partial Spearman of whole-problem a_K with the number of steps, given the
                          notation density (math_share) and the length in tokens

    math_share(text) = characters that are digits, operators or inside $..$ / \\(..\\) / \\[..\\]
                       divided by non-space characters
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from saelab import statistics as S

_MATH_SPAN = re.compile(r"\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.S)
_OPS = set("0123456789+-*/^=<>|!%_\\{}()[]")
LOGIC_CATEGORIES = ("Combinatorics",)
"""champ has no logic category; Combinatorics (counting arguments, mostly in words) stands in for it."""


class Enrichment(NamedTuple):
    """Per-feature comparison of firing frequencies, corpus a vs corpus b."""

    freq_a: np.ndarray
    freq_b: np.ndarray
    log2_ratio: np.ndarray
    """log2 of the smoothed frequency ratio a / b: ((k_a + 0.5)/(n_a + 1)) / ((k_b + 0.5)/(n_b + 1))."""
    z: np.ndarray
    p: np.ndarray
    q: np.ndarray
    """Benjamini-Hochberg q-values."""


def enrichment(k_a, n_a: int, k_b, n_b: int) -> Enrichment:
    """Firing-frequency ratio with a two-proportion test and BH correction (selection step)."""
    k_a, k_b = np.asarray(k_a, np.float64), np.asarray(k_b, np.float64)
    ratio = ((k_a + 0.5) / (n_a + 1)) / ((k_b + 0.5) / (n_b + 1))
    zt = S.two_proportion_ztest(k_a, n_a, k_b, n_b)
    return Enrichment(k_a / n_a, k_b / n_b, np.log2(ratio), zt.z, zt.p, S.benjamini_hochberg(zt.p).q)


def top_enriched(e: Enrichment, n: int, alpha: float = 0.05, min_freq: float = 0.0) -> list[int]:
    """Features with q <= alpha, z > 0 and freq_a >= min_freq, highest ratio first (at most n)."""
    ok = np.nonzero((e.q <= alpha) & (e.z > 0) & (e.freq_a >= min_freq))[0]
    return [int(i) for i in ok[np.argsort(-e.log2_ratio[ok], kind="stable")][:n]]


def math_share(text: str) -> float:
    """Share of non-space characters that are notation (module docstring)."""
    inside = sum(len(m.group(0)) - len(re.findall(r"\s", m.group(0))) for m in _MATH_SPAN.finditer(text))
    rest = _MATH_SPAN.sub(" ", text)
    ops = sum(c in _OPS for c in rest)
    total = sum(not c.isspace() for c in text)
    return (inside + ops) / total if total else 0.0


def activity(sums, units, sets) -> np.ndarray:
    """[len(units), n_sets] a_K(u) for each set (rows of `sets`, [n_sets, k])."""
    sets = np.atleast_2d(np.asarray(sets))
    s = sums.sum_UF[np.asarray(units)][:, sets].sum(-1)
    return s / np.maximum(sums.n_U[np.asarray(units)], 1)[:, None]


def pooled_activity(sums, groups: list[list[int]], sets) -> np.ndarray:
    """[len(groups), n_sets]: activity of several units read as one (token-weighted)."""
    sets = np.atleast_2d(np.asarray(sets))
    out = np.zeros((len(groups), len(sets)))
    for i, g in enumerate(groups):
        g = np.asarray(g)
        out[i] = sums.sum_UF[g][:, sets].sum(-1).sum(0) / max(sums.n_U[g].sum(), 1)
    return out


def category_given_notation(whole_PS: np.ndarray, is_math_P: np.ndarray, cov_PK: np.ndarray):
    """Partial (Pearson) correlation of whole-problem activity with 1[algebraic category] given the
    covariates (notation share, length): ([n_sets] r per set, the chosen set's Correlation with its CI)."""
    ind = np.asarray(is_math_P, float)
    rs = np.array([S.partial_correlation(whole_PS[:, j], ind, cov_PK).r for j in range(whole_PS.shape[1])])
    return rs, S.partial_correlation(whole_PS[:, 0], ind, cov_PK)


def _claim(stat_S: np.ndarray, ci: S.CI, extra: dict | None = None) -> dict:
    rank = S.control_percentile(float(stat_S[0]), stat_S[1:])
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "control": rank._asdict(), **(extra or {})}


def claims(sums, meta: dict, sets: np.ndarray, n_boot: int, seed: int) -> dict:
    """Every claim for set 0 of `sets` (the chosen one), against sets 1.. (the matched controls).

    meta: unit lists built by the experiment: reply / prose (unit ids of the test text) with
    reply_cluster / prose_cluster, problems (list of {statement: u, steps: [u..], category, n_steps,
    math_share, tokens}), steps (list of (u, problem index, math_share)).
    """
    out = {}
    R, P = meta["reply"], meta["prose"]
    if R and P:
        aR, aP = activity(sums, R, sets), activity(sums, P, sets)
        stat = aR.mean(0) - aP.mean(0)
        ci = S.cluster_bootstrap_diff_ci(aR[:, 0], meta["reply_cluster"], aP[:, 0], meta["prose_cluster"],
                                         n_boot=n_boot, seed=seed)
        out["reasoning_vs_prose"] = _claim(stat, ci, {"n_reply_units": len(R), "n_prose_units": len(P),
                                                      "mean_reasoning": float(aR[:, 0].mean()),
                                                      "mean_prose": float(aP[:, 0].mean())})
    probs = [p for p in meta["problems"] if p["steps"]]
    if probs:
        st = activity(sums, [p["statement"] for p in probs], sets)
        so = pooled_activity(sums, [p["steps"] for p in probs], sets)
        d = so - st
        ci = S.bootstrap_mean_ci(d[:, 0], n_boot=n_boot, seed=seed)
        out["statement_vs_solution"] = _claim(d.mean(0), ci, {
            "n_problems": len(probs), "math_share_statement": float(np.mean([p["statement_share"] for p in probs])),
            "math_share_solution": float(np.mean([p["solution_share"] for p in probs]))})
    steps = meta["steps"]
    if len(steps) >= 6:
        share = np.array([s[2] for s in steps])
        lo, hi = np.quantile(share, [1 / 3, 2 / 3])
        calc = [i for i, v in enumerate(share) if v > hi]
        expl = [i for i, v in enumerate(share) if v <= lo]
        if calc and expl:
            a = activity(sums, [s[0] for s in steps], sets)
            cl = np.array([s[1] for s in steps])
            stat = a[calc].mean(0) - a[expl].mean(0)
            ci = S.cluster_bootstrap_diff_ci(a[calc, 0], cl[calc], a[expl, 0], cl[expl], n_boot=n_boot, seed=seed)
            out["calc_vs_expl"] = _claim(stat, ci, {"n_calc_steps": len(calc), "n_expl_steps": len(expl),
                                                    "math_share_threshold_calc": float(hi),
                                                    "math_share_threshold_expl": float(lo)})
    allp = meta["problems"]
    if len(allp) >= 8:
        whole = pooled_activity(sums, [[p["statement"], *p["steps"]] for p in allp], sets)
        logic = np.array([p["category"] in LOGIC_CATEGORIES for p in allp])
        if logic.any() and (~logic).any():
            stat = whole[~logic].mean(0) - whole[logic].mean(0)
            ids = np.arange(len(allp))
            ci = S.cluster_bootstrap_diff_ci(whole[~logic, 0], ids[~logic], whole[logic, 0], ids[logic],
                                             n_boot=n_boot, seed=seed)
            out["math_vs_logic"] = _claim(stat, ci, {
                "n_math": int((~logic).sum()), "n_logic": int(logic.sum()), "logic_categories": list(LOGIC_CATEGORIES),
                "math_share_math": float(np.mean([p["share"] for p, m in zip(allp, logic) if not m])),
                "math_share_logic": float(np.mean([p["share"] for p, m in zip(allp, logic) if m]))})
        steps_n = np.array([p["n_steps"] for p in allp], float)
        cov = np.column_stack([[p["share"] for p in allp], [p["tokens"] for p in allp]])
        if logic.any() and (~logic).any():
            rs, pc = category_given_notation(whole, ~logic, cov)
            out["math_vs_logic_notation"] = _claim(rs, S.CI(pc.r, pc.low, pc.high), {
                "p": pc.p, "n_problems": pc.n, "covariates": ["math_share", "tokens"]})
        rs = np.array([S.partial_correlation(whole[:, j], steps_n, cov, rank=True).r for j in range(len(sets))])
        pc = S.partial_correlation(whole[:, 0], steps_n, cov, rank=True)
        plain = S.spearman_ci(whole[:, 0], steps_n)
        out["complexity"] = _claim(rs, S.CI(pc.r, pc.low, pc.high), {
            "p": pc.p, "n_problems": pc.n, "plain_spearman": plain._asdict(),
            "covariates": ["math_share", "tokens"],
            "truncated_problems": int(sum(p["truncated"] for p in allp))})
    return out


def p_two_sided(control: dict) -> float:
    """Two-sided permutation p of a claim against its matched controls (`control` = ControlRank as dict)."""
    return min(1.0, 2 * min(control["p_greater"], control["p_less"]))


def verdict(claim: dict, alpha: float = 0.05) -> str:
    """'supported' when the CI excludes 0 and the chosen set beats its matched controls (two-sided
    permutation p <= alpha); 'specific to notation-like features, not to this set' when only the
    CI excludes 0; 'not supported' otherwise."""
    ci_ok = (claim["low"] > 0 or claim["high"] < 0)
    if ci_ok and p_two_sided(claim["control"]) <= alpha:
        return "supported (CI excludes 0; beyond matched controls)"
    if ci_ok:
        return "effect present, but matched random features show it too"
    return "not supported (CI includes 0)"
