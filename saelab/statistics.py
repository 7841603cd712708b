"""Statistics helpers for experiments: tests, multiple-comparison control, confidence intervals.

Pure functions on numpy arrays (torch tensors are accepted and converted); no scipy at run time
(scipy is a dev dependency the tests compare against). Every interval is two-sided at `level`.

Two proportions (per feature: k1 of n1 tokens fired in corpus 1, k2 of n2 in corpus 2):

    p_pool = (k1 + k2) / (n1 + n2)
    z      = (k1/n1 - k2/n2) / sqrt(p_pool (1 - p_pool) (1/n1 + 1/n2))
    p      = 2 (1 - Phi(|z|)) = erfc(|z| / sqrt 2)                (z = 0, p = 1 when p_pool is 0 or 1)

Benjamini-Hochberg (m p-values sorted ascending p_(1) <= ... <= p_(m)):

    q_(i)  = min_{j >= i} min(1, m p_(j) / j)          reject_i = q_i <= alpha

Bootstrap of a mean (percentile method, seeded): draw idx_RN uniformly from 0..N-1,
    means_R = mean_n x[idx_RN],  CI = (quantile(means_R, a/2), quantile(means_R, 1 - a/2)),  a = 1 - level

Correlation with a Fisher-z interval (Pearson on values, Spearman on average ranks):

    z = atanh(r),  se = 1 / sqrt(n - 3),  CI = tanh(z -+ Phi^-1(1 - a/2) se)
    p = 2 P(T_{n-2} > |t|),  t = r sqrt((n - 2) / (1 - r^2))

Difference of means (Welch):

    d = mean(a) - mean(b),  se = sqrt(s_a^2/n_a + s_b^2/n_b)
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)),  CI = d -+ t_{df}^-1(1 - a/2) se

The Student-t tail uses the regularised incomplete beta function (continued fraction, Numerical
Recipes 6.4), I_x(a, b), with P(|T_df| > |t|) = I_{df/(df+t^2)}(df/2, 1/2).

Cluster bootstrap of a mean (rows grouped in clusters c = 1..C, e.g. the tokens or sequences of one
problem or document): with cluster sums s_c and row counts n_c, draw C clusters with replacement,
    mean_r = sum_{c in draw r} s_c / sum_{c in draw r} n_c,   CI = percentiles of mean_r
(rows inside a cluster are not independent, so resampling rows understates the spread).

Matched controls (a chosen feature set K against random sets matched feature by feature): every
firing feature is a point u_f = (log10 frequency, log10 activation mass), each coordinate
standardised over firing features (mass = mean activation per token). Each control set draws, for
every chosen feature k, one unchosen feature uniformly from the `neighbours` nearest to u_k (an
adaptive bin, finest where features are dense). With the effects e_1..e_n of n control sets and the
chosen set's effect e:
    percentile = 100 (#{e_i < e} + #{e_i = e} / 2) / n
    p_greater  = (1 + #{e_i >= e}) / (n + 1)       (permutation p-value, one-sided)

Partial correlation of x and y given covariates Z (K columns): residuals of x and y after least
squares on [1, Z], then Pearson r of the residuals; t test with n - 2 - K degrees of freedom and a
Fisher-z interval with se = 1 / sqrt(n - 3 - K). On ranks of x, y and Z: partial Spearman.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np


def _arr(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _z_crit(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


# ------------------------------------------------------------------------------------ proportions


class ZTest(NamedTuple):
    """Two-proportion z-test, element-wise."""

    z: np.ndarray
    """z statistic; positive when corpus 1 fires more often."""
    p: np.ndarray
    """Two-sided p-value."""


def two_proportion_ztest(k1, n1, k2, n2) -> ZTest:
    """Pooled two-proportion z-test, vectorised over arrays of counts (see module docstring).

    Args:
        k1, k2: successes (e.g. tokens on which a feature fired) [F] or scalars.
        n1, n2: trials (tokens seen), broadcastable to k1/k2.
    """
    k1, n1, k2, n2 = (_arr(v) for v in (k1, n1, k2, n2))
    if np.any(n1 <= 0) or np.any(n2 <= 0):
        raise ValueError("two_proportion_ztest needs n1 > 0 and n2 > 0")
    p_pool = (k1 + k2) / (n1 + n2)
    se = np.sqrt(p_pool * (1 - p_pool) * (1 / n1 + 1 / n2))
    diff = k1 / n1 - k2 / n2
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), 0.0)
    p = np.vectorize(math.erfc, otypes=[np.float64])(np.abs(z) / math.sqrt(2.0))
    return ZTest(z, p)


class BH(NamedTuple):
    """Benjamini-Hochberg result, in the order of the input p-values."""

    q: np.ndarray
    """Adjusted p-values (q-values)."""
    reject: np.ndarray
    """bool: q <= alpha (discoveries at false discovery rate alpha)."""


def benjamini_hochberg(p, alpha: float = 0.05) -> BH:
    """Benjamini-Hochberg step-up adjustment of a 1-D array of p-values (module docstring)."""
    p = _arr(p).ravel()
    m = p.size
    if m == 0:
        return BH(np.zeros(0), np.zeros(0, dtype=bool))
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    q = np.empty(m)
    q[order] = q_sorted
    return BH(q, q <= alpha)


# ------------------------------------------------------------------------------------ bootstrap


class CI(NamedTuple):
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    """The statistic on the full sample."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""


def bootstrap_means(x, n_boot: int = 2000, seed: int = 0, block: int = 1 << 22) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of a 1-D sample, vectorised in blocks.

    Resample r uses the r-th row of indices drawn from `np.random.default_rng(seed)` in one
    `integers(0, N, (R, N))` stream, drawn block by block (so the result does not depend on `block`).
    """
    x = _arr(x).ravel()
    n = x.size
    rng = np.random.default_rng(seed)
    rows = max(1, block // max(n, 1))
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        r = min(rows, n_boot - start)
        out[start:start + r] = x[rng.integers(0, n, (r, n))].mean(axis=1)
    return out


def bootstrap_means_reference(x, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """One resample at a time; same random stream as `bootstrap_means` (the parity test's reference)."""
    x = _arr(x).ravel()
    rng = np.random.default_rng(seed)
    return np.array([x[rng.integers(0, x.size, (1, x.size))][0].mean() for _ in range(n_boot)])


def bootstrap_mean_ci(x, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> CI:
    """Mean of a 1-D sample with a percentile bootstrap interval (seeded: same input, same CI).

    One value gives a zero-width interval; an empty sample gives NaNs.
    """
    x = _arr(x).ravel()
    if x.size == 0:
        return CI(math.nan, math.nan, math.nan)
    a = 1.0 - level
    means = bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [a / 2, 1 - a / 2])
    return CI(float(x.mean()), float(lo), float(hi))


# ------------------------------------------------------------------------------------ Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T_df| >= |t|) for Student's t with df degrees of freedom."""
    if not math.isfinite(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (0.5 < q < 1) of Student's t, by bisection on `t_two_sided_p`."""
    target = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------ correlation


class Correlation(NamedTuple):
    """A correlation coefficient with its test and Fisher-z interval."""

    r: float
    """Pearson r (Spearman rho for `spearman_ci`)."""
    p: float
    """Two-sided p-value of r = 0 (t test with n - 2 degrees of freedom)."""
    low: float
    """Lower end of the Fisher-z interval (NaN when n <= 3)."""
    high: float
    """Upper end of the Fisher-z interval."""
    n: int
    """Number of pairs."""


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (as scipy's 'average')."""
    x = _arr(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pearson_ci(x, y, level: float = 0.95) -> Correlation:
    """Pearson correlation of two 1-D samples with a Fisher-z interval (module docstring)."""
    x, y = _arr(x).ravel(), _arr(y).ravel()
    if x.size != y.size:
        raise ValueError(f"pearson_ci needs samples of equal length, got {x.size} and {y.size}")
    n = x.size
    if n < 3:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if denom == 0.0:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    r = float(np.clip((xc * yc).sum() / denom, -1.0, 1.0))
    if abs(r) == 1.0:
        p = 0.0
    else:
        p = t_two_sided_p(r * math.sqrt((n - 2) / (1.0 - r * r)), n - 2)
    if n <= 3:
        return Correlation(r, p, math.nan, math.nan, n)
    z, se = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15)), 1.0 / math.sqrt(n - 3)
    zc = _z_crit(level)
    return Correlation(r, p, math.tanh(z - zc * se), math.tanh(z + zc * se), n)


def spearman_ci(x, y, level: float = 0.95) -> Correlation:
    """Spearman rank correlation: `pearson_ci` on average ranks (Fisher-z interval, se 1/sqrt(n-3))."""
    return pearson_ci(rankdata(x), rankdata(y), level)


# ------------------------------------------------------------------------------------ means


class MeanStd(NamedTuple):
    """Mean, sample standard deviation (ddof=1) and standard error of a 1-D sample."""

    mean: float
    std: float
    """ddof=1; NaN for one value."""
    sem: float
    """std / sqrt(n)."""
    n: int


def mean_std(x) -> MeanStd:
    """Mean +- std of a sample (NaN std and sem for fewer than two values)."""
    x = _arr(x).ravel()
    n = x.size
    if n == 0:
        return MeanStd(math.nan, math.nan, math.nan, 0)
    if n == 1:
        return MeanStd(float(x[0]), math.nan, math.nan, 1)
    s = float(x.std(ddof=1))
    return MeanStd(float(x.mean()), s, s / math.sqrt(n), n)


def diff_means_ci(a, b, level: float = 0.95) -> CI:
    """mean(a) - mean(b) with a Welch t interval (unequal variances; module docstring)."""
    a, b = _arr(a).ravel(), _arr(b).ravel()
    if a.size < 2 or b.size < 2:
        raise ValueError(f"diff_means_ci needs at least two values per sample, got {a.size} and {b.size}")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    d = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:
        return CI(d, d, d)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return CI(d, d - half, d + half)


# ------------------------------------------------------------------------------------ clustered data


def _cluster_sums(x, clusters) -> tuple[np.ndarray, np.ndarray]:
    x = _arr(x).ravel()
    clusters = np.asarray(clusters).ravel()
    if clusters.size != x.size:
        raise ValueError(f"need one cluster label per value, got {clusters.size} labels for {x.size} values")
    _, inv = np.unique(clusters, return_inverse=True)
    return np.bincount(inv, weights=x), np.bincount(inv).astype(np.float64)


def cluster_bootstrap_means(x, clusters, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Row means of `n_boot` resamples that draw whole clusters with replacement (module docstring)."""
    s_C, n_C = _cluster_sums(x, clusters)
    C = s_C.size
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    rows = max(1, (1 << 22) // max(C, 1))
    for start in range(0, n_boot, rows):
        r = min(rows, n_boot - start)
        idx = rng.integers(0, C, (r, C))
        out[start:start + r] = s_C[idx].sum(1) / n_C[idx].sum(1)
    return out


def cluster_bootstrap_mean_ci(x, clusters, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> CI:
    """Mean over rows with a percentile interval from resampling clusters (problems, documents), not rows.

    Args:
        x: one value per row (a sequence's loss change, a token's activation, ...).
        clusters: the cluster of each row (any hashable labels, same length as x).
    """
    x = _arr(x).ravel()
    if x.size == 0:
        return CI(math.nan, math.nan, math.nan)
    a = 1.0 - level
    lo, hi = np.quantile(cluster_bootstrap_means(x, clusters, n_boot, seed), [a / 2, 1 - a / 2])
    return CI(float(x.mean()), float(lo), float(hi))


def cluster_bootstrap_diff_ci(a, clusters_a, b, clusters_b, level: float = 0.95, n_boot: int = 2000,
                              seed: int = 0) -> CI:
    """mean(a) - mean(b) for two independent samples, each resampled by its own clusters."""
    a, b = _arr(a).ravel(), _arr(b).ravel()
    if a.size == 0 or b.size == 0:
        return CI(math.nan, math.nan, math.nan)
    d = cluster_bootstrap_means(a, clusters_a, n_boot, seed) - cluster_bootstrap_means(b, clusters_b, n_boot, seed + 1)
    al = 1.0 - level
    lo, hi = np.quantile(d, [al / 2, 1 - al / 2])
    return CI(float(a.mean() - b.mean()), float(lo), float(hi))


# ------------------------------------------------------------------------------------ matched controls


def matching_distances(freq_F, mass_F=None) -> tuple[np.ndarray, np.ndarray]:
    """([F, 2] standardised (log10 frequency, log10 mass) of each feature, alive mask); dead rows are NaN."""
    freq_F = _arr(freq_F).ravel()
    use_mass = mass_F is not None
    mass_F = _arr(mass_F).ravel() if use_mass else np.ones_like(freq_F)
    alive = (freq_F > 0) & (mass_F > 0)
    pts = np.full((freq_F.size, 2), np.nan)
    if alive.any():
        for j, v in enumerate((freq_F, mass_F)):
            lv = np.log10(v[alive])
            sd = lv.std()
            pts[alive, j] = (lv - lv.mean()) / (sd if sd > 0 else 1.0)
        if not use_mass:
            pts[alive, 1] = 0.0
    return pts, alive


def matched_feature_sets(freq_F, chosen, n_sets: int, mass_F=None, neighbours: int = 25, seed: int = 0) -> np.ndarray:
    """[n_sets, len(chosen)] random feature sets matched to `chosen` feature by feature (module docstring).

    Each chosen feature's candidates are its `neighbours` nearest unchosen firing features in
    standardised (log10 frequency, log10 mass) (an adaptive bin: narrow where features are dense,
    as narrow as the data allow at the extremes). Within one set features are distinct.
    """
    pts, alive = matching_distances(freq_F, mass_F)
    chosen = [int(f) for f in chosen]
    pool = alive.copy()
    pool[chosen] = False
    free_ids = np.nonzero(pool)[0]
    if free_ids.size < len(chosen) + neighbours:
        raise ValueError(f"only {free_ids.size} unchosen firing features to match {len(chosen)} chosen ones "
                         f"with {neighbours} neighbours each")
    cand = []
    for f in chosen:
        c = pts[f] if alive[f] else np.nanmin(pts, axis=0)  # a dead chosen feature matches the rarest
        d = np.sqrt(((pts[free_ids] - c) ** 2).sum(1))
        cand.append(free_ids[np.argsort(d, kind="stable")[: neighbours + len(chosen)]])
    rng = np.random.default_rng(seed)
    out = np.empty((n_sets, len(chosen)), dtype=np.int64)
    for s in range(n_sets):
        used: list[int] = []
        for j, cs in enumerate(cand):
            free = cs[~np.isin(cs, used)][:neighbours]  # nearest `neighbours` not yet in this set
            pick = int(rng.choice(free))
            used.append(pick)
            out[s, j] = pick
    return out


def match_quality(freq_F, chosen, sets, mass_F=None) -> dict:
    """Mean log10 frequency (and mass) of the chosen set and of the control sets, for the report."""
    out = {}
    for name, v in (("log10_freq", freq_F), ("log10_mass", mass_F)):
        if v is None:
            continue
        lv = np.log10(np.maximum(_arr(v).ravel(), 1e-30))
        sets_lv = lv[np.asarray(sets)].mean(1)
        out[name] = {"chosen": float(lv[list(chosen)].mean()), "controls_mean": float(sets_lv.mean()),
                     "controls_std": float(sets_lv.std())}
    return out


class ControlRank(NamedTuple):
    """Where a chosen set's effect falls in the distribution of its matched controls' effects."""

    effect: float
    percentile: float
    """100 (#{controls below} + #{ties}/2) / n."""
    p_greater: float
    """(1 + #{controls >= effect}) / (n + 1): one-sided permutation p-value for 'larger than controls'."""
    p_less: float
    """(1 + #{controls <= effect}) / (n + 1)."""
    n: int
    control_median: float
    control_low: float
    """2.5th percentile of the control effects."""
    control_high: float
    """97.5th percentile."""


def control_percentile(effect: float, controls) -> ControlRank:
    """Rank of `effect` among control effects (module docstring); NaN controls are dropped."""
    c = _arr(controls).ravel()
    c = c[np.isfinite(c)]
    n = c.size
    if n == 0:
        return ControlRank(float(effect), math.nan, math.nan, math.nan, 0, math.nan, math.nan, math.nan)
    below, ties = float((c < effect).sum()), float((c == effect).sum())
    lo, med, hi = np.quantile(c, [0.025, 0.5, 0.975])
    return ControlRank(float(effect), 100.0 * (below + ties / 2) / n, (1 + n - below) / (n + 1),
                       (1 + below + ties) / (n + 1), n, float(med), float(lo), float(hi))


def partial_correlation(x, y, covariates, level: float = 0.95, rank: bool = False) -> Correlation:
    """Correlation of x and y after regressing both on `covariates` ([N, K], with an intercept).

    Fisher-z interval with se = 1 / sqrt(n - 3 - K); `rank=True` works on ranks (partial Spearman).
    """
    x, y = _arr(x).ravel(), _arr(y).ravel()
    Z = _arr(covariates).reshape(x.size, -1)
    if rank:
        x, y = rankdata(x), rankdata(y)
        Z = np.column_stack([rankdata(z) for z in Z.T]) if Z.size else Z
    K = Z.shape[1]
    n = x.size
    if n - K < 4:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    A = np.column_stack([np.ones(n), Z])
    rx = x - A @ np.linalg.lstsq(A, x, rcond=None)[0]
    ry = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0.0:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n)
    r = float(np.clip((rx * ry).sum() / denom, -1.0, 1.0))
    df = n - 2 - K
    p = 0.0 if abs(r) == 1.0 else t_two_sided_p(r * math.sqrt(df / (1.0 - r * r)), df)
    if n - 3 - K <= 0:
        return Correlation(r, p, math.nan, math.nan, n)
    z, se = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15)), 1.0 / math.sqrt(n - 3 - K)
    zc = _z_crit(level)
    return Correlation(r, p, math.tanh(z - zc * se), math.tanh(z + zc * se), n)


__all__ = [
    "ZTest", "two_proportion_ztest", "BH", "benjamini_hochberg", "CI", "bootstrap_means",
    "bootstrap_means_reference", "bootstrap_mean_ci", "betainc", "t_two_sided_p", "t_quantile",
    "Correlation", "rankdata", "pearson_ci", "spearman_ci", "MeanStd", "mean_std", "diff_means_ci",
    "cluster_bootstrap_means", "cluster_bootstrap_mean_ci", "cluster_bootstrap_diff_ci", "matching_distances",
    "matched_feature_sets", "match_quality", "ControlRank", "control_percentile", "partial_correlation",
]
