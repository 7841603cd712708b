"""De-duplication rules, data-driven inits and RkcnnConfig: known answers and the invariants they promise."""
import logging

import pytest
import torch

from saelab.errors import UsageError
from saelab.rkcnn import (RkcnnConfig, data_init, orient_heavy_tail, probe, random_encoder_columns_, rkcnn_init,
                          select)


def heavy_coordinate_data(N=3000, D=24, seed=0):
    """Noise plus one heavy-tailed coordinate (dim 3): every subset containing dim 3 scores high."""
    g = torch.Generator().manual_seed(seed)
    X_ND = torch.randn(N, D, generator=g)
    X_ND[:, 3] += (torch.rand(N, generator=g) < 0.02) * 15.0
    return X_ND


def test_method_mines_near_copies_and_cos_cap_leaves_no_pair_above_the_cap():
    X_ND = heavy_coordinate_data()
    method = probe(X_ND, m=5, h=300, r=20, seed=0, kurtosis="principal")
    cos_RR = (method.directions_RD @ method.directions_RD.T).abs().fill_diagonal_(0)
    assert cos_RR.max() > 0.9  # the top 20 hold several copies of the dim-3 axis
    for cap in (0.2, 0.5):
        res = probe(X_ND, m=5, h=300, r=20, seed=0, kurtosis="principal", dedup="cos_cap", cos_cap=cap)
        cos_RR = (res.directions_RD @ res.directions_RD.T).abs().fill_diagonal_(0)
        assert len(res.top_idx_R) > 1 and cos_RR.max() <= cap + 1e-6


def test_dominant_rule_keeps_one_direction_per_dominant_coordinate():
    X_ND = heavy_coordinate_data()
    res = probe(X_ND, m=5, h=300, r=20, seed=0, kurtosis="principal", dedup="dominant")
    dom = res.directions_RD.abs().argmax(1)
    assert dom.unique().numel() == len(dom) == 20
    assert dom[0] == 3  # the best subset is still the heavy coordinate's


def test_select_known_answer_on_hand_set_directions():
    dirs_HD = torch.tensor([[1.0, 0, 0], [0.96, 0.28, 0], [0, 1.0, 0], [0.6, 0.8, 0], [0, 0, 1.0]])
    scores_H = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    subsets_HM = torch.tensor([[0, 1], [0, 1], [1, 2], [0, 1], [0, 2]])
    assert select(scores_H, subsets_HM, dirs_HD, 5, "none").tolist() == [0, 1, 2, 3, 4]
    assert select(scores_H, subsets_HM, dirs_HD, 5, "subsets").tolist() == [0, 2, 4]
    assert select(scores_H, subsets_HM, dirs_HD, 5, "cos_cap", cos_cap=0.9).tolist() == [0, 2, 3, 4]
    assert select(scores_H, subsets_HM, dirs_HD, 5, "cos_cap", cos_cap=0.5).tolist() == [0, 2, 4]
    assert select(scores_H, subsets_HM, dirs_HD, 5, "dominant").tolist() == [0, 2, 4]  # 1 and 3 are dim 0/1


def test_rkcnn_init_mines_min_of_fraction_and_h_and_fills_the_rest(caplog):
    X_ND = heavy_coordinate_data(D=16)
    init = rkcnn_init(X_ND, d_sae=32, fraction=0.25, h=50, m=4, seed=0)
    assert init.dirs_FD.shape == (32, 16) and init.mined_mask_F.sum() == 8
    assert init.mined_mask_F[:8].all() and not init.mined_mask_F[8:].any()
    torch.testing.assert_close(init.dirs_FD.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(init.dirs_FD[:8], init.probe.directions_RD)
    assert (init.dirs_FD[8:] != 0).all()  # random rows are dense
    capped = rkcnn_init(X_ND, d_sae=32, fraction=1.0, h=5, m=4, seed=0)  # the method: min(F·fraction, h)
    assert capped.mined_mask_F.sum() == 5
    with caplog.at_level(logging.WARNING, logger="saelab.rkcnn"):
        few = rkcnn_init(X_ND, d_sae=32, fraction=1.0, h=5, m=4, seed=0, dedup="subsets")
    assert few.mined_mask_F.sum() == len({tuple(S) for S in few.probe.subsets_HM.tolist()}) and "Raise h" in caplog.text
    assert rkcnn_init(X_ND, d_sae=8, fraction=0.0, h=5, m=4).mined_mask_F.sum() == 0


def test_other_data_driven_inits():
    g = torch.Generator().manual_seed(0)
    centres_3D = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, -10.0, 0]])
    X_ND = centres_3D[torch.arange(300) % 3] + 0.1 * torch.randn(300, 4, generator=g) + 5.0
    mean_D = X_ND.mean(0)
    rows = data_init(X_ND, 8, "data_rows", RkcnnConfig(rkcnn_fraction=0.5), seed=0)
    xc_ND = (X_ND - mean_D) / (X_ND - mean_D).norm(dim=1, keepdim=True)
    for d_D in rows.dirs_FD[:4]:  # each is a centred, normalised row of the data
        assert (xc_ND @ d_D).max() == pytest.approx(1.0, abs=1e-5)
    km = data_init(X_ND, 6, "kmeans", RkcnnConfig(rkcnn_fraction=0.5), seed=0)
    want = (centres_3D - centres_3D.mean(0))
    want = want / want.norm(dim=1, keepdim=True)
    assert ((km.dirs_FD[:3] @ want.T).max(1).values > 0.999).all()
    pca = data_init(X_ND, 8, "pca", RkcnnConfig(rkcnn_fraction=0.5), seed=0)
    torch.testing.assert_close(pca.dirs_FD[:4] @ pca.dirs_FD[:4].T, torch.eye(4), atol=1e-5, rtol=0)
    assert pca.dirs_FD[3].abs().argmax() == 3  # the noise-only dim has the least variance
    assert pca.mined_mask_F.tolist() == [True] * 4 + [False] * 4


def test_orient_heavy_tail_points_at_the_sparse_side():
    g = torch.Generator().manual_seed(0)
    x_ND = 0.1 * torch.randn(4000, 3, generator=g)
    x_ND[:, 0] += (torch.rand(4000, generator=g) < 0.02) * 5.0   # positive spikes on dim 0
    x_ND[:, 1] -= (torch.rand(4000, generator=g) < 0.02) * 5.0   # negative spikes on dim 1
    dirs = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(orient_heavy_tail(x_ND, dirs), torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    init = data_init(x_ND, 4, "pca", RkcnnConfig(rkcnn_fraction=0.5, rkcnn_orient="heavy_tail"))
    torch.testing.assert_close(init.dirs_FD[:2], orient_heavy_tail(x_ND, init.dirs_FD[:2]))


def test_random_encoder_columns_touch_only_the_masked_latents():
    W_DF = torch.zeros(16, 6)
    mask_F = torch.tensor([True, False, True, False, False, False])
    random_encoder_columns_(W_DF, mask_F, seed=0)
    assert (W_DF[:, ~mask_F] == 0).all() and (W_DF[:, mask_F] != 0).all()
    assert W_DF.abs().max() <= 1 / 4  # U(-1, 1) / sqrt(16)
    again = random_encoder_columns_(torch.zeros(16, 6), mask_F, seed=0)
    assert torch.equal(again, W_DF)


def test_config_errors_list_every_problem():
    with pytest.raises(UsageError) as e:
        RkcnnConfig(rkcnn_fraction=1.5, rkcnn_dedup="often", rkcnn_cos_cap=0.0, rkcnn_knn_k=0)
    msg = str(e.value)
    assert all(s in msg for s in ("rkcnn_fraction=1.5", "rkcnn_dedup='often'", "rkcnn_cos_cap=0.0", "rkcnn_knn_k=0"))
    with pytest.raises(UsageError, match="not one of"):
        data_init(torch.randn(20, 4), 4, "ica")
