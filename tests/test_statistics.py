"""saelab.statistics against scipy on fixed inputs, plus the bootstrap fast path against its reference."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from saelab import statistics as S


def test_two_proportion_ztest_matches_chi2_without_correction():
    k1, n1 = np.array([30, 5, 0, 120, 7]), np.array([1000, 400, 500, 300, 50])
    k2, n2 = np.array([10, 5, 3, 100, 7]), np.array([900, 800, 500, 300, 60])
    res = S.two_proportion_ztest(k1, n1, k2, n2)
    for i in range(len(k1)):
        table = [[k1[i], n1[i] - k1[i]], [k2[i], n2[i] - k2[i]]]
        chi2, p, _, _ = sps.chi2_contingency(table, correction=False)
        assert res.z[i] ** 2 == pytest.approx(chi2, rel=1e-9)
        assert res.p[i] == pytest.approx(p, rel=1e-9)
    assert res.z[0] > 0 and res.z[2] < 0  # sign: corpus 1 fires more often -> positive


def test_two_proportion_ztest_degenerate_gives_p_one():
    res = S.two_proportion_ztest([0, 10], [10, 10], [0, 20], [20, 20])  # never / always fired
    np.testing.assert_array_equal(res.z, [0.0, 0.0])
    np.testing.assert_array_equal(res.p, [1.0, 1.0])


def test_benjamini_hochberg_matches_scipy():
    p = np.array([0.001, 0.2, 0.03, 0.04, 0.5, 0.0001, 0.049, 0.9, 0.03])
    res = S.benjamini_hochberg(p, alpha=0.05)
    np.testing.assert_allclose(res.q, sps.false_discovery_control(p, method="bh"), rtol=1e-12)
    np.testing.assert_array_equal(res.reject, res.q <= 0.05)
    # hand check: sorted p 1e-4, 1e-3 -> q = 9e-4, 4.5e-3
    assert res.q[5] == pytest.approx(9e-4) and res.q[0] == pytest.approx(4.5e-3)


def test_bootstrap_fast_path_equals_reference():
    x = np.random.default_rng(3).normal(size=57)
    fast = S.bootstrap_means(x, n_boot=300, seed=7, block=1000)  # several blocks
    ref = S.bootstrap_means_reference(x, n_boot=300, seed=7)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


def test_bootstrap_ci_close_to_scipy_percentile():
    x = np.random.default_rng(0).exponential(size=200)
    ci = S.bootstrap_mean_ci(x, level=0.95, n_boot=20000, seed=1)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                        random_state=np.random.default_rng(2)).confidence_interval
    assert ci.estimate == pytest.approx(x.mean())
    # different random streams: agree within Monte-Carlo error (~1% of the width)
    width = ref.high - ref.low
    assert abs(ci.low - ref.low) < 0.05 * width and abs(ci.high - ref.high) < 0.05 * width
    assert S.bootstrap_mean_ci(x, seed=1) == S.bootstrap_mean_ci(x, seed=1)  # seeded


def test_pearson_matches_scipy_with_fisher_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    res = S.pearson_ci(x, y, level=0.9)
    ref = sps.pearsonr(x, y)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert res.r == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-7)
    assert (res.low, res.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_spearman_matches_scipy_with_ties():
    x = np.array([1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8], dtype=float)
    y = np.array([2, 1, 4, 3, 6, 5, 5, 8, 7, 9, 12, 10], dtype=float)
    res = S.spearman_ci(x, y)
    ref = sps.spearmanr(x, y)
    assert res.r == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-7)
    ci = sps.pearsonr(sps.rankdata(x), sps.rankdata(y)).confidence_interval()
    assert (res.low, res.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    np.testing.assert_array_equal(S.rankdata(x), sps.rankdata(x))


@pytest.mark.parametrize("t,df", [(0.3, 3), (2.1, 10), (-4.0, 7.5), (1.0, 200)])
def test_t_distribution_matches_scipy(t, df):
    assert S.t_two_sided_p(t, df) == pytest.approx(2 * sps.t.sf(abs(t), df), rel=1e-9)
    assert S.t_quantile(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-8)


def test_mean_std_and_welch_ci_match_scipy():
    a = np.array([2.1, 3.4, 1.9, 5.6, 4.4, 3.3, 2.8])
    b = np.array([1.0, 1.4, 2.2, 0.7, 1.9])
    ms = S.mean_std(a)
    assert ms.mean == pytest.approx(a.mean()) and ms.std == pytest.approx(np.std(a, ddof=1))
    assert ms.sem == pytest.approx(sps.sem(a))
    ci = S.diff_means_ci(a, b, level=0.95)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ci.estimate == pytest.approx(a.mean() - b.mean())
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), rel=1e-8)
    assert math.isnan(S.mean_std([1.0]).std)


# ------------------------------------------------------------------------------------ clustered data


def _clustered(rng, n_clusters=40, rows=10, mu=1.0, icc=0.5):
    """Rows that share a cluster effect: var(cluster) = icc, var(row noise) = 1 - icc, true mean mu."""
    u = rng.normal(0, math.sqrt(icc), n_clusters)
    x = mu + np.repeat(u, rows) + rng.normal(0, math.sqrt(1 - icc), n_clusters * rows)
    return x, np.repeat(np.arange(n_clusters), rows)


def test_cluster_bootstrap_covers_and_row_bootstrap_undercovers():
    """200 synthetic clustered data sets (40 clusters x 10 rows, intra-cluster correlation 0.5): the
    cluster bootstrap's 95% interval covers the true mean about 95% of the time; resampling rows as
    if independent gives intervals ~2.3x too narrow (design effect 1 + 9 * 0.5 = 5.5) and covers
    far less often."""
    rng = np.random.default_rng(0)
    hit_c = hit_r = 0
    for i in range(200):
        x, cl = _clustered(rng)
        c = S.cluster_bootstrap_mean_ci(x, cl, n_boot=400, seed=i)
        r = S.bootstrap_mean_ci(x, n_boot=400, seed=i)
        hit_c += c.low <= 1.0 <= c.high
        hit_r += r.low <= 1.0 <= r.high
    assert 0.89 <= hit_c / 200 <= 0.99, hit_c
    assert hit_r / 200 < 0.75, hit_r


def test_cluster_bootstrap_known_answers():
    # one row per cluster: the same as the plain bootstrap's spread
    x = np.random.default_rng(1).normal(size=300)
    c = S.cluster_bootstrap_mean_ci(x, np.arange(300), n_boot=4000, seed=0)
    r = S.bootstrap_mean_ci(x, n_boot=4000, seed=0)
    assert c.estimate == pytest.approx(x.mean())
    assert (c.high - c.low) == pytest.approx(r.high - r.low, rel=0.1)
    # identical rows inside each cluster: the interval is that of the cluster values (rows do not add information)
    v = np.random.default_rng(2).normal(size=30)
    many = S.cluster_bootstrap_mean_ci(np.repeat(v, 50), np.repeat(np.arange(30), 50), n_boot=2000, seed=3)
    one = S.cluster_bootstrap_mean_ci(v, np.arange(30), n_boot=2000, seed=3)
    assert (many.low, many.high) == pytest.approx((one.low, one.high))
    # labels may be strings; the mean is over rows (clusters of unequal size weigh by their rows)
    y = np.array([1.0, 1.0, 1.0, 4.0])
    assert S.cluster_bootstrap_mean_ci(y, ["a", "a", "a", "b"], n_boot=50).estimate == pytest.approx(1.75)
    assert math.isnan(S.cluster_bootstrap_mean_ci([], []).estimate)
    with pytest.raises(ValueError, match="one cluster label per value"):
        S.cluster_bootstrap_mean_ci([1.0, 2.0], [0])


def test_cluster_bootstrap_diff_covers():
    rng = np.random.default_rng(4)
    hits = 0
    for i in range(200):
        a, ca = _clustered(rng, mu=1.0)
        b, cb = _clustered(rng, n_clusters=30, rows=6, mu=0.5)
        d = S.cluster_bootstrap_diff_ci(a, ca, b, cb, n_boot=400, seed=i)
        hits += d.low <= 0.5 <= d.high
    assert 0.88 <= hits / 200 <= 0.99, hits


# ------------------------------------------------------------------------------------ matched controls


def _planted_features(rng, F=3000):
    """Features whose effect on a set grows with log frequency AND log mass (correlated, not identical)."""
    logf = rng.uniform(-4.5, -0.5, F)
    logm = 0.5 * logf + rng.normal(0, 0.8, F)
    eff = 0.3 * (logf + 4.5) + 0.6 * (logm + 3) + rng.normal(0, 0.1, F)
    return 10 ** logf, 10 ** logm, eff


def test_control_percentile_hand_computed():
    r = S.control_percentile(2.0, [1, 2, 3, 0, 0.5, np.nan, 5, 2.5, -1, 1.5, 0.2])
    # 10 finite controls: 6 below, 1 tie -> percentile 65; p_greater = (1 + 4) / 11; p_less = (1 + 7) / 11
    assert r.n == 10 and r.percentile == pytest.approx(65.0)
    assert r.p_greater == pytest.approx(5 / 11) and r.p_less == pytest.approx(8 / 11)
    top = S.control_percentile(10.0, -np.arange(199.0))
    assert top.percentile == 100.0 and top.p_greater == pytest.approx(1 / 200)  # the smallest possible p


def test_matched_sets_match_frequency_and_mass():
    rng = np.random.default_rng(5)
    freq, mass, _ = _planted_features(rng)
    freq[:40] = 0.0  # dead features are never drawn
    chosen = list(np.argsort(-freq)[:10]) + list(rng.choice(np.argsort(-mass)[:300], 10, replace=False))
    sets = S.matched_feature_sets(freq, chosen, 200, mass_F=mass, seed=0)
    assert sets.shape == (200, 20)
    assert all(len(set(row)) == 20 and not set(row) & set(chosen) for row in sets.tolist())
    assert np.all(freq[sets] > 0)
    q = S.match_quality(freq, chosen, sets, mass)
    for k in ("log10_freq", "log10_mass"):
        assert abs(q[k]["controls_mean"] - q[k]["chosen"]) < 0.1, q
    # matching on frequency alone leaves the mass of these high-mass features far off
    q1 = S.match_quality(freq, chosen, S.matched_feature_sets(freq, chosen, 200, seed=0), mass)
    assert abs(q1["log10_mass"]["controls_mean"] - q1["log10_mass"]["chosen"]) > 0.3, q1
    assert not np.array_equal(sets[0], sets[1]) and len(np.unique(sets)) > 100
    np.testing.assert_array_equal(sets, S.matched_feature_sets(freq, chosen, 200, mass_F=mass, seed=0))


def test_control_percentile_finds_planted_effect_and_is_calibrated_under_the_null():
    """The effect of a feature set = sum of per-feature effects that grow with frequency and mass.
    Null: the chosen set is drawn from frequent, heavy features with no extra effect; matched
    controls (frequency x mass) give roughly uniform p-values, while controls matched on frequency
    alone, or not matched, call the null set significant. Planted: +0.5 per chosen feature."""
    rng = np.random.default_rng(6)
    freq, mass, eff = _planted_features(rng)
    lf, lm = np.log10(freq), np.log10(mass)
    high = np.nonzero((lf > -1.5) & (lm > 0.5 * lf))[0]  # frequent, and heavier than their frequency predicts
    p_both, p_freq, p_none = [], [], []
    for i in range(40):
        chosen = rng.choice(high, 10, replace=False)
        e = eff[chosen].sum()
        both = S.matched_feature_sets(freq, chosen, 200, mass_F=mass, seed=i)
        fonly = S.matched_feature_sets(freq, chosen, 200, seed=i)
        rand = np.stack([rng.choice(len(freq), 10, replace=False) for _ in range(200)])
        p_both.append(S.control_percentile(e, eff[both].sum(1)).p_greater)
        p_freq.append(S.control_percentile(e, eff[fonly].sum(1)).p_greater)
        p_none.append(S.control_percentile(e, eff[rand].sum(1)).p_greater)
    p_both, p_freq, p_none = map(np.array, (p_both, p_freq, p_none))
    assert (p_both < 0.05).mean() <= 0.15 and 0.3 < np.median(p_both) < 0.7
    assert (p_none < 0.05).mean() > 0.9
    assert (p_freq < 0.05).mean() > 0.5  # matching on frequency alone: the heavy null set looks significant
    # planted: the same kind of set with +0.5 per feature sits above every matched control
    chosen = rng.choice(high, 10, replace=False)
    ctrl = S.matched_feature_sets(freq, chosen, 200, mass_F=mass, seed=99)
    r = S.control_percentile(eff[chosen].sum() + 5.0, eff[ctrl].sum(1))
    assert r.percentile > 99 and r.p_greater <= 2 / 201


def test_partial_correlation_removes_a_shared_cause():
    """x and y both follow z: their plain correlation is large, the partial one (given z) is near 0;
    a real x-y link survives. Compared with scipy's Pearson on residuals."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=400)
    x, y = z + 0.3 * rng.normal(size=400), z + 0.3 * rng.normal(size=400)
    assert S.pearson_ci(x, y).r > 0.8
    pc = S.partial_correlation(x, y, z[:, None])
    assert abs(pc.r) < 0.12 and pc.low < 0 < pc.high
    y2 = y + 0.5 * (x - z)
    pc2 = S.partial_correlation(x, y2, z[:, None])
    A = np.column_stack([np.ones(400), z])
    rx = x - A @ np.linalg.lstsq(A, x, rcond=None)[0]
    ry = y2 - A @ np.linalg.lstsq(A, y2, rcond=None)[0]
    assert pc2.r == pytest.approx(sps.pearsonr(rx, ry).statistic, rel=1e-9) and pc2.low > 0.25
    assert S.partial_correlation(x, y2, z[:, None], rank=True).r > 0.3
