"""Metric functions against hand-computed values, and the fast paths against their references."""
import math

import pytest
import torch
from torch.testing import assert_close

from saelab import metrics as M


def _recon(x, x_hat, batch=None):
    s = None
    batch = batch or x.shape[0]
    for i in range(0, x.shape[0], batch):
        s = M.add_recon(s, M.recon_sums(x[i:i + batch], x_hat[i:i + batch]))
    return M.reconstruction_metrics(s)


def test_reconstruction_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0); total variance 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # errors: 1 and 9
    r = _recon(x, x_hat)
    assert r.mse == pytest.approx(10 / 4)
    assert r.fvu == pytest.approx(10 / 2)
    assert r.explained_variance == pytest.approx(1 - 5)
    # cos: token 0 = 1/sqrt(2), token 1: x_hat = 0 -> 0
    assert r.cosine == pytest.approx((1 / math.sqrt(2)) / 2)
    # rel norm: sqrt(2)/1 and 0/3
    assert r.rel_norm == pytest.approx(math.sqrt(2) / 2)


def test_fvu_is_about_the_mean_not_zero():
    x = torch.randn(100, 8) + 5.0
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert _recon(x, mean).fvu == pytest.approx(1.0, abs=1e-6)  # mean rounded to float32
    assert _recon(x, x.clone()).fvu == 0.0
    # x_hat = 0 on uncentred data: sum||x||^2 / sum||x - mean||^2, far above 1
    xd = x.double()
    expect = float(xd.pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert _recon(x, torch.zeros_like(x)).fvu == pytest.approx(expect, rel=1e-6)
    assert expect > 10
    xc = x - x.mean(0)
    assert _recon(xc, torch.zeros_like(xc)).fvu == pytest.approx(1.0, abs=1e-5)


def test_metrics_do_not_depend_on_batch_size():
    x = torch.randn(1000, 16) * 3 + 1
    x_hat = x + 0.5 * torch.randn_like(x)
    ref = _recon(x, x_hat)
    for batch in (1, 7, 128, 999):
        r = _recon(x, x_hat, batch)
        for a, b in zip(r, ref):
            assert a == pytest.approx(b, rel=1e-6)
    assert ref.fvu == pytest.approx(float(M.fvu(x.double(), x_hat.double())), rel=1e-9)


def test_streaming_fvu_is_accurate_with_a_large_mean():
    # Residual streams have outlier dimensions with big means; float64 sums keep FVU exact enough.
    x = torch.randn(4096, 8)
    x[:, 0] += 3000.0
    x_hat = x + 0.1 * torch.randn_like(x)
    assert _recon(x, x_hat, 100).fvu == pytest.approx(float(M.fvu(x.double(), x_hat.double())), rel=1e-4)


def test_reconstruction_refuses_empty_and_constant_sets():
    with pytest.raises(ValueError, match="empty"):
        M.reconstruction_metrics(M.empty_recon(2))
    x = torch.ones(5, 3)
    with pytest.raises(ValueError, match="do not vary"):
        _recon(x, x)


def test_sparsity_crafted_dead_and_dense():
    # 20 tokens, 5 latents: latent 0 fires on all, 1 on 2 tokens (10%: not dense), 2 on 3 (15%), 3 and 4 never.
    f = torch.zeros(20, 5)
    f[:, 0] = 1.0
    f[:2, 1] = 0.5
    f[5:8, 2] = 2.0
    s = None
    for i in range(0, 20, 6):
        s = M.add_sparsity(s, M.sparsity_sums(f[i:i + 6]))
    m = M.sparsity_metrics(s)
    assert m.dead == 2 and m.dead_frac == pytest.approx(0.4)
    assert m.dense == 2  # latents 0 and 2; exactly 10% is not dense
    assert m.l0 == pytest.approx((20 + 2 + 3) / 20)
    assert s.l0_hist.tolist() == [0, 15, 5, 0, 0, 0]
    assert_close(m.freq_F, torch.tensor([1.0, 0.1, 0.15, 0.0, 0.0], dtype=torch.float64))


def test_negative_activations_count_as_active():
    f = torch.tensor([[-1.0, 0.0], [0.0, 0.0]])
    m = M.sparsity_metrics(M.sparsity_sums(f))
    assert m.dead == 1 and m.l0 == 0.5


def test_log10_density_histogram():
    freq = torch.tensor([0.0, 1e-3, 1e-3, 0.5, 1.0], dtype=torch.float64)
    h = M.log10_density_histogram(freq, bins=8, lo=-8.0)
    assert h["dead"] == 1
    assert sum(h["counts"]) == 4
    assert h["counts"][5] == 2  # log10(1e-3) = -3 lies in bin [-3, -2)
    assert h["counts"][-1] == 2  # log10 0.5 and log10 1 in [-1, 0]


def test_max_cos_blocked_matches_reference():
    W = torch.randn(300, 16)
    W[7] = 0.0
    W[11] = -2.0 * W[3]
    W[12] = 3.0 * W[4]
    fast = M.max_cos_to_others(W, block=64)
    assert_close(fast, M.max_cos_to_others_reference(W), atol=1e-5, rtol=0)
    assert fast[4].item() == pytest.approx(1.0, abs=1e-5)
    assert fast[7].item() == 0.0


def test_max_cos_hand_computed():
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    c = 1 / math.sqrt(2)
    assert_close(M.max_cos_to_others(W, block=2), torch.tensor([c, c, 0.0]))
    assert_close(M.decoder_norms(W), torch.tensor([1.0, math.sqrt(2), 1.0]))


def test_kl_ce_and_recovered():
    logits = torch.randn(6, 10)
    assert_close(M.token_kl(logits, logits), torch.zeros(6), atol=1e-6, rtol=0)
    assert_close(M.token_kl(logits, logits + 3.0), torch.zeros(6), atol=1e-5, rtol=0)  # shift-invariant
    p = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    q = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    expect = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert M.token_kl(p, q).item() == pytest.approx(expect, rel=1e-5)
    assert M.token_ce(q, torch.tensor([1])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert M.ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert M.ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert M.ce_loss_recovered(2.0, 3.0, 5.0) == pytest.approx(2 / 3)
    assert math.isnan(M.ce_loss_recovered(2.0, 3.0, 2.0))


def test_sparsity_fast_path_matches_reference():
    f = torch.relu(torch.randn(257, 300) - 1.5)
    f[:, 7] = 0.0
    f[3] = 0.0
    fast, ref = M.sparsity_sums(f), M.sparsity_sums_reference(f)
    assert fast.n == ref.n
    assert torch.equal(fast.fired_F, ref.fired_F) and torch.equal(fast.l0_hist, ref.l0_hist)
    assert fast.fired_F.dtype == fast.l0_hist.dtype == torch.int64
