"""RkCNN probe: planted directions found, scores against hand-computed values, fast path = reference."""
import numpy as np
import pytest
import torch

from saelab.errors import UsageError
from saelab.rkcnn import embed, knn_scores, probe, probe_reference, sample_subsets


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


def test_principal_kurtosis_with_distinct_subsets_ranks_planted_directions_first():
    X_ND, true_3D = planted_pairs()
    # 600 draws from the 45 pairs of 10 dims: every pair is drawn (checked below).
    res = probe(X_ND, m=2, h=600, r=3, score="kurtosis", kurtosis="principal", dedup="subsets", seed=0)
    assert len({tuple(s) for s in res.subsets_HM.tolist()}) == 45
    kept = {tuple(s) for s in res.subsets_HM[res.top_idx_R].tolist()}
    assert kept == {(0, 1), (4, 5), (7, 8)}
    cos_33 = (res.directions_RD @ true_3D.T).abs()
    assert (cos_33.max(dim=1).values > 0.99).all()
    assert res.scores_H[res.top_idx_R].min() > 3.0
    noise = [i for i, s in enumerate(res.subsets_HM.tolist()) if not set(s) & {0, 1, 4, 5, 7, 8}]
    assert res.scores_H[noise].abs().max() < 0.5


def test_coordinate_mean_kurtosis_is_the_mean_of_per_coordinate_excess_kurtosis():
    X_ND, _ = planted_pairs(N=2000, D=10)
    res = probe(X_ND, m=3, h=20, r=2, score="kurtosis", kurtosis="coordinate_mean", seed=1)
    X = X_ND.double().numpy()
    Z = X - X.mean(0)
    kurt = (Z ** 4).mean(0) / (Z ** 2).mean(0) ** 2 - 3.0  # Fisher excess kurtosis, as scipy's default
    want = torch.tensor([kurt[S].mean() for S in res.subsets_HM.numpy()], dtype=torch.float32)
    torch.testing.assert_close(res.scores_H, want, rtol=1e-5, atol=1e-5)


def test_the_method_keeps_repeats_and_subsets_dedup_keeps_each_once():
    X_ND = torch.randn(500, 3)
    method = probe(X_ND, m=2, h=50, r=10, score="variance_ratio", seed=0)  # dedup "none"
    assert len(method.top_idx_R) == 10  # top 10 of 50 draws from only C(3, 2) = 3 subsets
    assert len({tuple(s) for s in method.subsets_HM[method.top_idx_R].tolist()}) <= 3
    order = torch.sort(method.scores_H.double(), descending=True, stable=True).indices[:10]
    assert torch.equal(method.top_idx_R, order)  # exactly argsort(scores)[:r]
    distinct = probe(X_ND, m=2, h=50, r=10, score="variance_ratio", seed=0, dedup="subsets")
    assert len(distinct.top_idx_R) == 3
    assert len({tuple(s) for s in distinct.subsets_HM[distinct.top_idx_R].tolist()}) == 3


def test_deflation_finds_each_planted_direction_once():
    X_ND, true_3D = planted_pairs()
    # Without de-duplication the top 3 are copies of one feature's subsets ...
    plain = probe(X_ND, m=2, h=600, r=3, seed=0)
    assert (plain.directions_RD @ true_3D.T).abs().argmax(1).unique().numel() < 3
    # ... deflation projects each kept direction out before scoring again.
    res = probe(X_ND, m=2, h=600, r=3, seed=0, dedup="deflation", kurtosis="principal")
    cos_33 = (res.directions_RD @ true_3D.T).abs()
    assert sorted(cos_33.argmax(1).tolist()) == [0, 1, 2] and (cos_33.max(1).values > 0.99).all()


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
    res = probe(X_ND, m=2, h=20, r=3, score="knn", labels=labels_N, seed=0)  # all rows, k = 5
    assert (res.scores_H == 1).all()


def test_knn_blocks_give_the_same_answer_as_one_block():
    X_ND, labels_N = separated_clusters(n_per=40, seed=2)
    X_ND = X_ND + 5 * torch.randn_like(X_ND)
    subsets_HM = sample_subsets(6, 3, 7, seed=1)
    whole = knn_scores(X_ND, labels_N, subsets_HM, k=5)
    blocked = knn_scores(X_ND, labels_N, subsets_HM, k=5, max_elems=500)  # many query blocks
    torch.testing.assert_close(blocked, whole)


def test_knn_without_labels_uses_kmeans_clusters():
    X_ND, _ = separated_clusters()
    res = probe(X_ND, m=2, h=10, r=2, score="knn", labels=None, seed=0, n_clusters=3)
    assert (res.scores_H == 1).all()


def test_partition_sampling_cuts_the_dims_into_disjoint_subsets():
    subsets_HM = sample_subsets(D=10, m=3, h=7, seed=0, sampling="partition")
    for block in (subsets_HM[:3], subsets_HM[3:6]):  # ⌊10/3⌋ = 3 disjoint subsets per shuffle
        assert block.flatten().unique().numel() == 9
    assert subsets_HM.shape == (7, 3)


def test_standardized_probe_is_scale_free_and_maps_directions_back():
    X_ND, _ = planted_pairs(N=2000, D=10)
    scale_D = torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 1.0, 50.0, 2.0, 1.0, 0.5])
    a = probe(X_ND, m=3, h=30, r=4, seed=0, standardize=True, kurtosis="principal")
    b = probe(X_ND * scale_D, m=3, h=30, r=4, seed=0, standardize=True, kurtosis="principal")
    torch.testing.assert_close(a.scores_H, b.scores_H, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.top_idx_R, b.top_idx_R)
    want = a.directions_RD * scale_D
    torch.testing.assert_close(b.directions_RD, want / want.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_exclude_massive_keeps_outlier_dims_out_of_every_subset():
    X_ND = torch.randn(1000, 12)
    X_ND[:, 5] *= 100
    res = probe(X_ND, m=3, h=200, r=5, seed=0, exclude_massive=5.0)
    assert 5 not in res.subsets_HM.flatten().tolist()
    assert 5 in probe(X_ND, m=3, h=200, r=5, seed=0).subsets_HM.flatten().tolist()


def test_embed_places_direction_on_subset_dims_with_unit_norm():
    out_1D = embed(torch.tensor([[3.0, 4.0]]), torch.tensor([[1, 3]]), D=5)
    torch.testing.assert_close(out_1D, torch.tensor([[0.0, 0.6, 0.0, 0.8, 0.0]]))
    X_ND, _ = planted_pairs(N=1000, D=12)
    res = probe(X_ND, m=4, h=40, r=10, score="kurtosis", seed=2)
    torch.testing.assert_close(res.directions_RD.norm(dim=1), torch.ones(10))
    for dir_D, S in zip(res.directions_RD, res.subsets_HM[res.top_idx_R]):
        off = torch.ones(12, dtype=torch.bool)
        off[S] = False
        assert (dir_D[off] == 0).all() and (dir_D[S] != 0).any()


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


OPTIONS = [dict(score="kurtosis", kurtosis="coordinate_mean"), dict(score="kurtosis", kurtosis="principal"),
           dict(score="knn", knn_rows=400), dict(score="knn", knn_rows=None, k_neighbors=3),
           dict(score="variance_ratio"), dict(dedup="subsets"), dict(dedup="cos_cap", cos_cap=0.3),
           dict(dedup="dominant"), dict(sampling="partition"), dict(standardize=True, kurtosis="principal"),
           dict(exclude_massive=1.5)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_matches_reference(options):
    g = torch.Generator().manual_seed(5)
    X_ND = torch.randn(600, 16, generator=g) * torch.linspace(0.5, 2.0, 16) + 3.0  # offset: the mean must go
    X_ND[:, 2] += (torch.rand(600, generator=g) < 0.05) * 6.0
    labels_N = torch.randint(0, 3, (600,), generator=g)
    kw = dict(m=4, h=40, r=8, labels=labels_N if options.get("score") == "knn" else None, seed=0, **options)
    fast, ref = probe(X_ND, **kw), probe_reference(X_ND, **kw)
    torch.testing.assert_close(fast.scores_H, ref.scores_H, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.top_idx_R, ref.top_idx_R)
    torch.testing.assert_close(fast.directions_RD, ref.directions_RD, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.variance_R, ref.variance_R, rtol=1e-4, atol=1e-5)


def test_usage_errors_say_what_to_fix():
    X_ND = torch.randn(100, 8)
    with pytest.raises(UsageError, match="subset size m=9"):
        probe(X_ND, m=9, h=10, r=2)
    with pytest.raises(UsageError, match="not one of") as e:
        probe(X_ND, m=2, h=10, r=2, score="entropy", dedup="maybe")
    assert "entropy" in str(e.value) and "maybe" in str(e.value)  # every problem at once
    with pytest.raises(UsageError, match="labels must be 1-D"):
        probe(X_ND, m=2, h=10, r=2, score="knn", labels=torch.zeros(5))
    X_ND[:, 0] *= 1000
    with pytest.raises(UsageError, match="usable dims"):
        probe(X_ND, m=8, h=10, r=2, exclude_massive=2.0)
    assert np.isfinite(probe(X_ND, m=7, h=10, r=2, exclude_massive=2.0).scores_H.numpy()).all()
