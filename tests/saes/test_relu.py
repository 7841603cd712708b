"""ReLU-L1 specifics: the fused fast path equals the plain autograd reference; known L1 values."""
import copy

import pytest
import torch

from saelab.saes import REGISTRY, make_sae


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fast_path_equals_dense_reference(tied, weighted):
    """Same loss, statistics and gradients for every parameter."""
    cfg = REGISTRY["relu"][1](d_in=24, d_sae=96, l1_coeff=0.7, l1_weighted=weighted, tied=tied)
    sae_fast = make_sae(cfg)
    x = torch.randn(64, 24) * 2 + 1
    sae_fast.init_from_data_(x)
    with torch.no_grad():  # unequal decoder norms, so the weighted L1's norm gradient matters
        sae_fast.W_dec_FD.mul_(torch.rand(96, 1) + 0.5)
        sae_fast.b_enc_F.normal_(0, 0.5)
    sae_dense = copy.deepcopy(sae_fast)
    sae_dense.cfg.dense = True
    outs = []
    for sae in (sae_fast, sae_dense):
        out = sae.training_loss(x, sparsity_scale=0.6)
        out.loss.backward()
        outs.append(out)
    assert 0 < outs[0].l0 < 96  # some latents on, some off: both branches of the ReLU are exercised
    for field in ("loss", "mse", "sparsity", "l0", "fvu"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0].fired_F, outs[1].fired_F)
    for (n, p), (_, q) in zip(sae_fast.named_parameters(), sae_dense.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_known_l1_and_l0_by_hand():
    """Hand-set 2-latent SAE in d=2: f = ReLU(x W_enc), decoder norms 1 and 2."""
    sae = make_sae(REGISTRY["relu"][1](d_in=2, d_sae=2, l1_coeff=1.0, normalize_input=False))
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(2))
        sae.W_dec_FD.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    out = sae.training_loss(x)
    # f = [[3, 0], [1, 2]]; weighted l1 per token: 3*1 = 3 and 1*1 + 2*2 = 5 -> mean 4
    torch.testing.assert_close(out.sparsity, torch.tensor(4.0))
    assert out.l0 == 1.5 and out.fired_F.tolist() == [True, True]
    # x_hat = [[3, 0], [1, 4]]; squared errors 1 and 4 -> mse 2.5
    torch.testing.assert_close(out.mse, torch.tensor(2.5))
