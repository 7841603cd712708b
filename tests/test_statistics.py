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
