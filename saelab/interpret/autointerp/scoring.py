"""Scores of an explanation, the shuffled-explanation baseline, and summaries over features (pure functions).

For one feature and one task (detection or fuzzing) the scorer judges n items with true labels
y_i (1 = the feature fires in the excerpt / the marks are the right ones) and returns an answer
a_i (yes / no / unparsed = no) and, when it can, p_i = P(yes) / (P(yes) + P(no)):

    balanced accuracy  BA    = ½ (TPR + TNR),  TPR = #{a=1, y=1} / #{y=1},  TNR = #{a=0, y=0} / #{y=0}
    AUROC              AUROC = P(p_i > p_j) + ½ P(p_i = p_j)  for i with y=1, j with y=0
                               (Mann-Whitney U / (n1 n0), average ranks for ties; from the answers
                               when the backend gives no probabilities, where it equals BA)

Both are 0.5 for a scorer that ignores the explanation, whatever the class balance.

Shuffled baseline: each feature is scored again on the same items with another feature's
explanation, given by a derangement π of the features (π(f) != f, seeded). Its scores are what an
explanation that does not belong to the feature earns on these items with this scorer; the gap
real − shuffled is the information the explanation carries.

Summaries over features: mean and a percentile-bootstrap CI (`saelab.statistics.bootstrap_mean_ci`)
of each score, of its shuffled baseline and of the per-feature paired difference. Features are the
independent units (the items of one feature share its explanation), so the bootstrap resamples
features, not items.
"""
from __future__ import annotations

import math

import numpy as np

from saelab.statistics import bootstrap_mean_ci, rankdata


def binary_scores(labels: list[bool], answers: list[bool | None], p_yes: list[float | None]) -> dict:
    """n, n_pos, balanced_accuracy, auroc, auroc_from ("probabilities" | "answers"), unparsed."""
    y = np.asarray(labels, dtype=bool)
    a = np.asarray([bool(v) for v in answers], dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out = {"n": int(y.size), "n_pos": n_pos, "unparsed": sum(v is None for v in answers)}
    if n_pos == 0 or n_neg == 0:
        return dict(out, balanced_accuracy=math.nan, auroc=math.nan, auroc_from=None)
    out["balanced_accuracy"] = 0.5 * (float(a[y].mean()) + float((~a[~y]).mean()))
    probs = all(p is not None for p in p_yes)
    s = np.asarray(p_yes, dtype=float) if probs else a.astype(float)
    out["auroc"] = auroc(s, y)
    out["auroc_from"] = "probabilities" if probs else "answers"
    return out


def auroc(scores, labels) -> float:
    """Mann-Whitney AUROC with average ranks for ties (NaN when a class is empty)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def derangement(features: list[int], seed: int = 0) -> dict[int, int]:
    """feature -> the feature whose explanation it gets in the shuffled baseline (never itself; {} for < 2)."""
    n = len(features)
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return {features[i]: features[int(perm[i])] for i in range(n)}


def summarize(records: list[dict], level: float = 0.95, seed: int = 0) -> dict:
    """Mean over features with bootstrap CIs: {task: {metric: {real, shuffled, difference}}}.

    records: per-feature dicts with `scores[task][metric]` and `shuffled[task][metric]`.
    Each entry is {mean, low, high, n} over the features where the value is finite.
    """
    out: dict = {}
    for task in ("detection", "fuzzing"):
        out[task] = {}
        for metric in ("balanced_accuracy", "auroc"):
            real, shuf = [], []
            for r in records:
                a = (r.get("scores") or {}).get(task, {}).get(metric, math.nan)
                b = (r.get("shuffled") or {}).get(task, {}).get(metric, math.nan)
                real.append(a if a is not None else math.nan)
                shuf.append(b if b is not None else math.nan)
            real_a, shuf_a = np.asarray(real, float), np.asarray(shuf, float)
            both = np.isfinite(real_a) & np.isfinite(shuf_a)
            out[task][metric] = {
                "real": _ci(real_a[np.isfinite(real_a)], level, seed),
                "shuffled": _ci(shuf_a[np.isfinite(shuf_a)], level, seed),
                "difference": _ci(real_a[both] - shuf_a[both], level, seed),
            }
    return out


def _ci(x: np.ndarray, level: float, seed: int) -> dict:
    ci = bootstrap_mean_ci(x, level=level, seed=seed)
    return {"mean": ci.estimate, "low": ci.low, "high": ci.high, "n": int(x.size)}
