"""Toy model of superposition and planted dictionaries: ground truth correct by construction."""
import pytest
import torch

from saelab.errors import UsageError
from saelab.toy import (PlantedFeatures, ToyConfig, ToyModel, dominant_labels, importance, planted_dictionary,
                        random_linear_toy, sample_features, toy_loss, train_toy_model)


def test_hidden_is_the_sum_of_feature_directions():
    model = ToyModel(ToyConfig(n_features=6, d_hidden=3), seed=1)
    x_BF, h_BD = model.sample(200, seed=2)
    dirs_FD = model.feature_dirs_FD
    torch.testing.assert_close(h_BD, x_BF @ dirs_FD)
    torch.testing.assert_close(dirs_FD, model.W_DF.detach().T)
    # A single active feature of magnitude 0.7 puts the hidden vector at 0.7 · its direction.
    x_1F = torch.zeros(1, 6)
    x_1F[0, 4] = 0.7
    torch.testing.assert_close(model.hidden(x_1F)[0], 0.7 * dirs_FD[4])


def test_forward_matches_the_equation_on_hand_set_weights():
    model = ToyModel(ToyConfig(n_features=2, d_hidden=1))
    with torch.no_grad():
        model.W_DF.copy_(torch.tensor([[1.0, -1.0]]))  # two antipodal features in one dim
        model.b_F.copy_(torch.tensor([0.0, -0.1]))
    # x = (0.5, 0): h = 0.5; Wᵀh + b = (0.5, -0.6); ReLU -> (0.5, 0)
    torch.testing.assert_close(model(torch.tensor([[0.5, 0.0]])), torch.tensor([[0.5, 0.0]]))


def test_loss_is_importance_weighted_squared_error():
    x = torch.tensor([[1.0, 0.0]])
    x_hat = torch.tensor([[0.5, 1.0]])
    assert toy_loss(x, x_hat, torch.tensor([1.0, 0.9])).item() == pytest.approx(0.25 + 0.9)
    torch.testing.assert_close(importance(ToyConfig(n_features=3, importance_decay=0.5)),
                               torch.tensor([1.0, 0.5, 0.25]))


def test_features_are_sparse_with_uniform_magnitudes():
    g = torch.Generator().manual_seed(0)
    x_BF = sample_features(20000, 10, 0.1, g)
    active = x_BF > 0
    assert abs(active.float().mean().item() - 0.1) < 0.01
    assert x_BF.max() <= 1 and abs(x_BF[active].mean().item() - 0.5) < 0.02
    m = ToyModel(ToyConfig())
    assert torch.equal(m.sample(50, seed=3).x_BF, m.sample(50, seed=3).x_BF)


def test_training_finds_superposition():
    # Elhage et al. 2022 §2: with sparse features (p = 0.1), 10 features share 5 hidden dims.
    cfg = ToyConfig(steps=400, batch_size=256)
    untrained = ToyModel(cfg, seed=0)
    model = train_toy_model(cfg, seed=0)
    x_BF, _ = model.sample(4000, seed=9)
    imp_F = importance(cfg)
    with torch.no_grad():
        assert toy_loss(x_BF, model(x_BF), imp_F) < 0.5 * toy_loss(x_BF, untrained(x_BF), imp_F)
    represented = (model.W_DF.detach().norm(dim=0) > 0.5).sum().item()
    assert represented > cfg.d_hidden
    assert torch.equal(train_toy_model(ToyConfig(steps=20), seed=3).W_DF,
                       train_toy_model(ToyConfig(steps=20), seed=3).W_DF)


def test_planted_dictionary_is_codes_times_dirs():
    data = planted_dictionary(n_dirs=12, d=8, n_samples=300, active_per_sample=3, seed=0)
    torch.testing.assert_close(data.X_ND, data.codes_NF @ data.dirs_FD)
    torch.testing.assert_close(data.dirs_FD.norm(dim=1), torch.ones(12))
    assert ((data.codes_NF > 0).sum(1) == 3).all()
    assert data.codes_NF[data.codes_NF > 0].min() >= 0.5
    noisy = planted_dictionary(12, 8, 300, 3, seed=0, noise=0.1)
    assert 0.05 < (noisy.X_ND - data.X_ND).std() < 0.15
    with pytest.raises(UsageError, match="active=13"):
        planted_dictionary(12, 8, 10, 13)


def test_bad_toy_config_lists_every_problem():
    with pytest.raises(UsageError, match="n_features=0.*\n.*feature_probability=2"):
        ToyConfig(n_features=0, feature_probability=2.0)


def test_planted_features_stream_with_repeats():
    data = PlantedFeatures(n_features=6, d=5, active=4, seed=1)
    a, b = data.draw(200), data.draw(200)
    assert not torch.equal(a.X_ND, b.X_ND)  # a stream: fresh rows each call
    torch.testing.assert_close(a.X_ND, a.codes_NF @ a.dirs_FD)
    assert torch.allclose(a.codes_NF.sum(1), a.codes_NF.sum(1))
    assert (a.codes_NF.sum(1) >= 4 * 0.5).all() and ((a.codes_NF > 0).sum(1) <= 4).all()
    assert ((a.codes_NF > 0).sum(1) < 4).any()  # with 6 features and 4 draws, some draws repeat
    again = PlantedFeatures(n_features=6, d=5, active=4, seed=1)
    assert torch.equal(again.sample(200), a.X_ND)


def test_linear_toy_rows_and_labels():
    toy = random_linear_toy(n_features=30, d_hidden=12, p=0.1, seed=0, support=2)
    torch.testing.assert_close(toy.W_FD.norm(dim=1), torch.ones(30))
    assert ((toy.W_FD != 0).sum(1) == 2).all()  # privileged basis: each feature on 2 coordinates
    x_BF, h_BD = toy.sample(500, seed=1)
    torch.testing.assert_close(h_BD, x_BF @ toy.W_FD)
    labels_B = dominant_labels(x_BF)
    assert ((labels_B == -1) == (x_BF.amax(1) == 0)).all()
    on = labels_B >= 0
    assert torch.equal(x_BF[on].argmax(1), labels_B[on])
    assert (random_linear_toy(10, 5, 0.1, seed=3).W_FD != 0).all()  # the seed's toy: dense rows
