"""RkCNN probe: planted directions found, knn score known answers, embedding, determinism, parity."""
import logging

import pytest
import torch

from saelab.errors import UsageError
from saelab.rkcnn import embed, knn_scores, probe, probe_reference, rkcnn_init, sample_subsets


def planted_pairs(N=4000, D=10, seed=0):
    """Gaussian noise plus three sparse features, each living on a pair of dims: (0,1), (4,5), (7,8)."""
    g = torch.Generator().manual_seed(seed)
    X_ND = torch.randn(N, D, generator=g)
    dirs = []
    for a, b in [(0, 1), (4, 5), (7, 8)]:
        d_D = torch.zeros(D)
        d_D[a], d_D[b] = 0.6, 0.8
        active_N = (torch.rand(N, generator=g) < 0.03) * (4 + 4 * torch.rand(N, generator=g))
        X_ND += active_N[:, None] * d_D
        dirs.append(d_D)
    return X_ND, torch.stack(dirs)


def test_kurtosis_ranks_planted_sparse_directions_first():
    X_ND, true_3D = planted_pairs()
    # 600 draws from the 45 pairs of 10 dims: every pair is drawn (checked below).
    res = probe(X_ND, m=2, h=600, r=3, score="kurtosis", seed=0)
    assert len({tuple(s) for s in res.subsets_HM.tolist()}) == 45
    kept = {tuple(s) for s in res.subsets_HM[res.top_idx_R].tolist()}
    assert kept == {(0, 1), (4, 5), (7, 8)}
    cos_33 = (res.directions_RD @ true_3D.T).abs()
    assert (cos_33.max(dim=1).values > 0.99).all()
    # Pure-noise subsets have excess kurtosis near 0; the planted ones are far above.
    assert res.scores_H[res.top_idx_R].min() > 3.0
    noise = [i for i, s in enumerate(res.subsets_HM.tolist()) if not set(s) & {0, 1, 4, 5, 7, 8}]
    assert res.scores_H[noise].abs().max() < 0.5


def test_variance_ratio_finds_the_high_variance_dim():
    g = torch.Generator().manual_seed(1)
    X_ND = torch.randn(2000, 8, generator=g)
    X_ND[:, 3] *= 10
    res = probe(X_ND, m=3, h=60, r=1, score="variance_ratio", seed=0)
    assert 3 in res.subsets_HM[res.top_idx_R[0]].tolist()
    assert res.directions_RD[0].abs().argmax().item() == 3
    # Known answer: subset with variances (100, 1, 1) has ratio 100 / 34 ≈ 2.94.
    assert res.scores_H.max().item() == pytest.approx(100 / 34, rel=0.1)


def separated_clusters(n_per=100, D=6, seed=0):
    """Three tight clusters whose centres differ in every dim, so every subset separates them."""
    g = torch.Generator().manual_seed(seed)
    centres_3D = torch.tensor([0.0, 10.0, 20.0])[:, None] * torch.ones(3, D)
    labels_N = torch.arange(3).repeat_interleave(n_per)
    X_ND = centres_3D[labels_N] + 0.1 * torch.randn(3 * n_per, D, generator=g)
    return X_ND, labels_N


def test_knn_score_is_one_on_separated_labels_and_chance_on_shuffled():
    X_ND, labels_N = separated_clusters()
    subsets_HM = sample_subsets(6, 2, 20, seed=0)
    torch.testing.assert_close(knn_scores(X_ND, labels_N, subsets_HM, k=10), torch.ones(20, dtype=torch.float64))
    shuffled = labels_N[torch.randperm(len(labels_N), generator=torch.Generator().manual_seed(3))]
    chance = knn_scores(X_ND, shuffled, subsets_HM, k=10)
    # Chance: a neighbour shares the label with probability (100 - 1) / 299 ≈ 0.331.
    assert abs(chance.mean().item() - 99 / 299) < 0.05
    res = probe(X_ND, m=2, h=20, r=3, score="knn", labels=labels_N, seed=0)
    assert (res.scores_H == 1).all()


def test_knn_without_labels_uses_kmeans_clusters():
    X_ND, _ = separated_clusters()
    res = probe(X_ND, m=2, h=10, r=2, score="knn", labels=None, seed=0, n_clusters=3)
    assert (res.scores_H == 1).all()


def test_embed_places_direction_on_subset_dims_with_unit_norm():
    out_1D = embed(torch.tensor([[3.0, 4.0]]), torch.tensor([[1, 3]]), D=5)
    torch.testing.assert_close(out_1D, torch.tensor([[0.0, 0.6, 0.0, 0.8, 0.0]]))
    X_ND, _ = planted_pairs(N=1000, D=12)
    res = probe(X_ND, m=4, h=40, r=10, score="kurtosis", seed=2)
    torch.testing.assert_close(res.directions_RD.norm(dim=1), torch.ones(10))
    for dir_D, S in zip(res.directions_RD, res.subsets_HM[res.top_idx_R]):
        off = torch.ones(12, dtype=torch.bool)
        off[S] = False
        assert (dir_D[off] == 0).all()
        assert (dir_D[S] != 0).any()


def test_deterministic_for_a_seed():
    X_ND, labels_N = separated_clusters(seed=4)
    X_ND = X_ND + torch.randn_like(X_ND)
    for score in ("kurtosis", "knn", "variance_ratio"):
        a = probe(X_ND, m=2, h=30, r=5, score=score, labels=labels_N if score == "knn" else None, seed=7)
        b = probe(X_ND, m=2, h=30, r=5, score=score, labels=labels_N if score == "knn" else None, seed=7)
        assert torch.equal(a.scores_H, b.scores_H) and torch.equal(a.subsets_HM, b.subsets_HM)
        assert torch.equal(a.top_idx_R, b.top_idx_R) and torch.equal(a.directions_RD, b.directions_RD)
    c = probe(X_ND, m=2, h=30, r=5, seed=8)
    assert not torch.equal(c.subsets_HM, a.subsets_HM)


@pytest.mark.parametrize("score", ["kurtosis", "knn", "variance_ratio"])
def test_fast_path_matches_reference(score):
    g = torch.Generator().manual_seed(5)
    X_ND = torch.randn(1500, 16, generator=g) + 3.0  # offset: the mean must be removed
    X_ND[:, 2] += (torch.rand(1500, generator=g) < 0.05) * 6.0
    labels_N = torch.randint(0, 3, (1500,), generator=g)
    kw = dict(m=4, h=40, r=8, score=score, labels=labels_N if score == "knn" else None, seed=0, knn_rows=400)
    fast, ref = probe(X_ND, **kw), probe_reference(X_ND, **kw)
    torch.testing.assert_close(fast.scores_H, ref.scores_H, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.top_idx_R, ref.top_idx_R)
    torch.testing.assert_close(fast.directions_RD, ref.directions_RD, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.variance_R, ref.variance_R, rtol=1e-4, atol=1e-5)


def test_duplicate_subsets_are_kept_once():
    X_ND = torch.randn(500, 3)
    res = probe(X_ND, m=2, h=50, r=10, score="variance_ratio", seed=0)
    assert len(res.top_idx_R) == 3  # only C(3, 2) = 3 distinct subsets exist
    assert len({tuple(s) for s in res.subsets_HM[res.top_idx_R].tolist()}) == 3


def test_rkcnn_init_mines_a_fraction_and_fills_the_rest(caplog):
    X_ND, _ = planted_pairs(N=1000, D=16)
    init = rkcnn_init(X_ND, d_sae=32, fraction=0.25, h=50, m=4, seed=0)
    assert init.dirs_FD.shape == (32, 16) and init.mined_mask_F.sum() == 8
    assert init.mined_mask_F[:8].all() and not init.mined_mask_F[8:].any()
    torch.testing.assert_close(init.dirs_FD.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(init.dirs_FD[:8], init.probe.directions_RD)
    assert (init.dirs_FD[8:] != 0).all()  # random rows are dense
    with caplog.at_level(logging.WARNING, logger="saelab.rkcnn"):
        capped = rkcnn_init(X_ND, d_sae=32, fraction=1.0, h=5, m=4, seed=0)
    n_distinct = len({tuple(S) for S in capped.probe.subsets_HM.tolist()})
    assert capped.mined_mask_F.sum() == n_distinct and n_distinct <= 5 and "Raise h" in caplog.text
    assert rkcnn_init(X_ND, d_sae=8, fraction=0.0, h=5, m=4).mined_mask_F.sum() == 0


def test_usage_errors_say_what_to_fix():
    X_ND = torch.randn(100, 8)
    with pytest.raises(UsageError, match="subset size m=9"):
        probe(X_ND, m=9, h=10, r=2)
    with pytest.raises(UsageError, match="not one of"):
        probe(X_ND, m=2, h=10, r=2, score="entropy")
    with pytest.raises(UsageError, match="labels must be 1-D"):
        probe(X_ND, m=2, h=10, r=2, score="knn", labels=torch.zeros(5))
    with pytest.raises(UsageError, match="between 0 and 1"):
        rkcnn_init(X_ND, d_sae=4, fraction=1.5)
