"""The streaming pass against brute force: top-k, histogram, counts, reservoir, quantile bands, cache."""
import math

import pytest
import torch

from saelab.errors import UsageError
from saelab.interpret.stats import (
    FeatureAccumulator, PassConfig, hist_bin, load_stats, quantile_examples, save_stats, topk_reference_,
)


def sparse_acts(T=600, F=37, density=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(T, F, generator=g) * torch.logspace(-2, 1, F)  # feature scales 0.01 .. 10
    mask = torch.rand(T, F, generator=g) < density
    f = torch.where(mask, vals, torch.zeros_like(vals))
    f[:, 5] = 0.0  # one dead feature
    f[:3, 7] = 0.0
    f[3:, 7] = 0.0
    f[1, 7] = 2.5  # fires once: fewer than K examples
    return f


def run(f_TF, cfg, batch=64):
    acc = FeatureAccumulator(f_TF.shape[1], cfg)
    for s in range(0, f_TF.shape[0], batch):
        acc.update_(f_TF[s:s + batch], s)
    return acc.result()


def test_topk_equals_brute_force_sort():
    f = sparse_acts()
    cfg = PassConfig(top_k=8, reservoir=16)
    st = run(f, cfg, batch=50)
    vals, idx = torch.sort(f, dim=0, descending=True)
    for j in range(f.shape[1]):
        n = int((f[:, j] > 0).sum())
        k = min(n, 8)
        torch.testing.assert_close(st.top_values_FK[j, :k], vals[:k, j])
        assert st.top_index_FK[j, :k].tolist() == idx[:k, j].tolist()
        assert (st.top_index_FK[j, k:] == -1).all() and (st.top_values_FK[j, k:] == 0).all()
    assert st.top_index_FK[5].tolist() == [-1] * 8
    assert st.top_index_FK[7, 0] == 1 and st.top_values_FK[7, 0] == 2.5


def test_fast_path_matches_dense_reference():
    f = sparse_acts(T=500, F=29, seed=3)
    K = 6
    st = run(f, PassConfig(top_k=K, reservoir=0), batch=37)
    v = torch.full((K, 29), -math.inf)
    i = torch.full((K, 29), -1, dtype=torch.int64)
    for s in range(0, 500, 37):
        v, i = topk_reference_(v, i, f[s:s + 37], s)
    active = v > 0
    torch.testing.assert_close(st.top_values_FK, torch.where(active, v, torch.zeros_like(v)).T)
    assert torch.equal(st.top_index_FK, torch.where(active, i, torch.full_like(i, -1)).T)


def test_counts_sum_mean_max_and_histogram():
    f = sparse_acts()
    cfg = PassConfig(top_k=4, reservoir=4, hist_bins=12, hist_log_min=-1.0, hist_log_max=0.5)
    st = run(f, cfg)
    active = f > 0
    assert st.num_tokens == f.shape[0]
    assert torch.equal(st.count_F, active.sum(0))
    torch.testing.assert_close(st.sum_F, f.double().sum(0))
    torch.testing.assert_close(st.max_F, f.max(0).values)
    assert torch.equal(st.hist_FH.sum(1), st.count_F)  # out-of-range values land in the end bins
    torch.testing.assert_close(st.mean_F[st.count_F > 0], (f.double().sum(0) / active.sum(0))[st.count_F > 0])
    assert st.dead_F.tolist() == [j == 5 for j in range(f.shape[1])]
    # hand-computed bins: edges 10^(-1 + h/8); 0.1 -> bin 0, 0.2 -> floor(0.301*8)=2, 1.0 -> 8, 100 -> 11
    got = hist_bin(torch.tensor([0.1, 0.2, 1.0, 100.0, 0.001]), cfg).tolist()
    assert got == [0, 2, 8, 11, 0]
    # each feature's histogram equals a direct bincount of its active values
    j = 20
    direct = torch.bincount(hist_bin(f[active[:, j], j], cfg), minlength=12)
    assert torch.equal(st.hist_FH[j], direct)


def test_reservoir_is_a_sample_of_active_tokens_and_bands_hold():
    T, F = 4000, 3
    f = torch.zeros(T, F)
    f[:, 0] = torch.arange(1, T + 1, dtype=torch.float32)  # value = 1 + token index: uniform 1..T
    f[::2, 1] = 1.0 + torch.rand(T // 2)
    st = run(f, PassConfig(top_k=3, reservoir=200, seed=1), batch=256)
    for j in (0, 1):
        idx = st.sample_index_FR[j]
        assert (idx >= 0).all() and len(set(idx.tolist())) == 200  # distinct tokens
        torch.testing.assert_close(st.sample_values_FR[j], f[idx, j])  # values belong to their tokens
        assert (st.sample_values_FR[j].diff() >= 0).all()
    assert (st.sample_index_FR[1] % 2 == 0).all()
    # a uniform sample of 1..4000: its median lies near 2000 (binomial sd of the rank ~ 7 of 200)
    assert 1400 < st.sample_values_FR[0].median() < 2600
    qb = quantile_examples(st, bands=4, per_band=3)
    for j in (0, 1):
        for b in range(4):
            lo, hi = qb.edges_FQ2[j, b]
            vals = qb.values_FQJ[j, b]
            assert ((vals >= lo) & (vals <= hi)).all(), (j, b, vals, lo, hi)
            torch.testing.assert_close(vals, f[qb.index_FQJ[j, b], j])
        assert (qb.edges_FQ2[j, 1:, 0] >= qb.edges_FQ2[j, :-1, 1]).all()  # bands in order
    assert torch.isnan(qb.values_FQJ[2]).all() and (qb.index_FQJ[2] == -1).all()  # dead feature


def test_quantile_bands_with_few_samples_drop_repeats():
    f = torch.zeros(10, 1)
    f[[2, 5], 0] = torch.tensor([1.0, 3.0])
    st = run(f, PassConfig(top_k=2, reservoir=8))
    qb = quantile_examples(st, bands=4, per_band=2)
    idx = [i for i in qb.index_FQJ[0].flatten().tolist() if i >= 0]
    assert sorted(idx) == [2, 5]


def test_reservoir_is_deterministic_for_a_seed():
    f = sparse_acts(seed=4)
    a = run(f, PassConfig(reservoir=8, seed=3))
    b = run(f, PassConfig(reservoir=8, seed=3))
    assert torch.equal(a.sample_index_FR, b.sample_index_FR)


def test_save_load_round_trip(tmp_path):
    st = run(sparse_acts(), PassConfig(top_k=5, reservoir=6))
    save_stats(st, tmp_path / "c", {"key": "abc"})
    back, meta = load_stats(tmp_path / "c")
    assert meta["key"] == "abc" and back.num_tokens == st.num_tokens
    for k, v in st.tensors().items():
        assert torch.equal(getattr(back, k), v), k
    with pytest.raises(UsageError, match="no feature statistics"):
        load_stats(tmp_path / "missing")


def test_bad_settings_are_listed():
    with pytest.raises(UsageError, match="top_k.*\n.*hist_log_min"):
        PassConfig(top_k=0, hist_log_min=2.0, hist_log_max=1.0)


def test_negative_values_are_not_activations():
    f = torch.tensor([[1.0, -2.0], [-0.5, 3.0], [2.0, 0.0]])
    st = run(f, PassConfig(top_k=3, reservoir=3))
    assert st.count_F.tolist() == [2, 1]
    assert st.top_index_FK.tolist() == [[2, 0, -1], [1, -1, -1]]
    torch.testing.assert_close(st.sum_F, torch.tensor([3.0, 3.0], dtype=torch.float64))
