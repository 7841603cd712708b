"""Shared SAE maths: geometric median, gradient projection, sparse fast path == dense reference."""
import copy

import pytest
import torch

from saelab.saes import REGISTRY, make_sae
from saelab.saes.ops import (Selection, decode_sparse, geometric_median, remove_parallel_grad_, select_preacts,
                             transpose_selection)


def test_geometric_median_known_answers():
    # Odd number of points on a line: the median is the middle one, whatever the outlier.
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 0.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    # Square corners: the centre. Moving one outlier 100x further leaves the median (not the mean) put.
    sq = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(sq), torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)
    near = geometric_median(torch.cat([sq, torch.tensor([[100.0, 100.0]])]))
    far = geometric_median(torch.cat([sq, torch.tensor([[1e4, 1e4]])]))
    torch.testing.assert_close(near, far, atol=1e-3, rtol=0)


def test_geometric_median_minimises_sum_of_distances():
    x = torch.randn(300, 5) ** 3
    m = geometric_median(x)
    cost = lambda c: (x - c).norm(dim=-1).sum()
    for _ in range(20):
        assert cost(m) <= cost(m + 0.01 * torch.randn(5)) + 1e-4


def test_remove_parallel_grad():
    W = torch.randn(10, 6)
    g = torch.randn(10, 6)
    g2 = g.clone()
    remove_parallel_grad_(g2, W)
    torch.testing.assert_close((g2 * W).sum(-1), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(g - g2, ((g * W).sum(-1) / W.pow(2).sum(-1))[:, None] * W)


def test_sparse_primitives_match_dense():
    B, D, F_ = 7, 5, 13
    x = torch.randn(B, D)
    W_enc = torch.randn(D, F_, requires_grad=True)
    b_enc = torch.randn(F_, requires_grad=True)
    b_dec = torch.randn(D, requires_grad=True)
    W_dec = torch.randn(F_, D, requires_grad=True)
    counts = torch.tensor([3, 0, 2, 5, 1, 4, 2])
    row = torch.repeat_interleave(torch.arange(B), counts)
    feat = torch.cat([torch.randperm(F_)[:c].sort().values for c in counts.tolist()])
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    g_out = torch.randn(B, D)
    with torch.no_grad():
        pre = (x - b_dec) @ W_enc + b_enc
    sel = Selection(feat, row, crow, pre[row, feat])
    grads = []
    for dense in (True, False):
        t = None if dense else transpose_selection(sel, F_)
        v = select_preacts(sel, x, W_enc, b_enc, b_dec, t)
        out = decode_sparse(v * 1.5, sel, W_dec, t)
        (out * g_out).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in (W_enc, b_enc, b_dec, W_dec)])
        for p in (W_enc, b_enc, b_dec, W_dec):
            p.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_dead,aux_k", [(False, 10), (True, 10), (True, 2)])
def test_fast_path_equals_dense_reference(name, tied, with_dead, aux_k):
    """Same loss and gradients for every parameter, with and without AuxK active.

    32 dead latents: aux_k=10 takes AuxK's dense-columns path, aux_k=2 its pair-wise sparse path.
    """
    cfg = REGISTRY[name][1](d_in=24, d_sae=96, k=6, aux_k=aux_k, dead_tokens=5, tied=tied)
    sae_fast = make_sae(cfg)
    x = torch.randn(64, 24) * 2 + 1
    sae_fast.init_from_data_(x)
    if with_dead:
        sae_fast.tokens_since_fired_F[::3] = 100
    sae_dense = copy.deepcopy(sae_fast)
    sae_dense.cfg.dense = True
    outs = []
    for sae in (sae_fast, sae_dense):
        out = sae.training_loss(x)
        out.loss.backward()
        outs.append(out)
    assert (outs[0].aux > 0) == with_dead
    for field in ("loss", "mse", "aux", "l0", "fvu"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0].fired_F, outs[1].fired_F)
    for (n, p), (_, q) in zip(sae_fast.named_parameters(), sae_dense.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")
