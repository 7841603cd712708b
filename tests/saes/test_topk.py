"""TopK family specifics: exact k, AuxK and dead counters, BatchTopK threshold and selection."""
import torch

from saelab.saes import REGISTRY, make_sae
from saelab.saes.batchtopk import batch_topk_selection


def test_topk_keeps_k_per_token():
    sae = make_sae(REGISTRY["topk"][1](d_in=10, d_sae=50, k=7))
    f = sae.encode(torch.randn(30, 10) + 3)
    assert ((f != 0).sum(-1) <= 7).all() and (f >= 0).all()


def test_auxk_zero_without_dead_latents_and_trains_dead_ones():
    cfg = REGISTRY["topk"][1](d_in=16, d_sae=64, k=4, aux_k=8, dead_tokens=100)
    sae = make_sae(cfg)
    x = torch.randn(64, 16)
    out = sae.training_loss(x)
    assert out.aux == 0  # nothing is dead yet
    sae.tokens_since_fired_F[:32] = 1000  # latents 0..31 dead
    out = sae.training_loss(x)
    assert out.aux > 0
    torch.testing.assert_close(out.loss, out.mse + out.aux)
    out.loss.backward()
    assert sae.W_dec_FD.grad[:32].abs().sum() > 0  # dead latents receive gradient from AuxK


def test_dead_counters_update_once_per_step():
    sae = make_sae(REGISTRY["topk"][1](d_in=16, d_sae=64, k=2, dead_tokens=10**9))
    x = torch.randn(10, 16)
    out = sae.training_loss(x)
    out2 = sae.training_loss(x)  # two micro-batches, one optimiser step
    sae.after_optimizer_step_()
    fired = out.fired_F | out2.fired_F
    assert (sae.tokens_since_fired_F[fired] == 0).all()
    assert (sae.tokens_since_fired_F[~fired] == 20).all()
    assert "tokens_since_fired_F" in sae.state_dict()


def test_batch_topk_selection_exact_against_flat_topk():
    torch.manual_seed(1)
    for pre in (torch.randn(32, 40), torch.cat([torch.randn(31, 40) - 3, torch.randn(1, 40) + 5])):
        sel = batch_topk_selection(pre, 3)  # the second batch forces the exact fallback (one hot row)
        ref = torch.zeros_like(pre).view(-1)
        top = torch.relu(pre).view(-1).topk(32 * 3).indices
        ref[top] = 1
        got = torch.zeros_like(pre)
        got[sel.row_N, sel.feat_N] = 1
        assert torch.equal(got.view(-1), ref)
        assert torch.equal(sel.row_N, sel.row_N.sort().values)


def test_batchtopk_threshold_running_minimum_and_eval_encode():
    cfg = REGISTRY["batchtopk"][1](d_in=16, d_sae=64, k=4, threshold_beta=0.5)
    sae = make_sae(cfg)
    x = torch.randn(128, 16) + 1
    assert float(sae.threshold) < 0
    out = sae.training_loss(x)
    sae.after_optimizer_step_()
    with torch.no_grad():
        pre = sae.pre_acts(x)
        sel = batch_topk_selection(pre, 4)
        first_min = pre[sel.row_N, sel.feat_N].clamp_min(0)
        first_min = first_min[first_min > 0].min()
    torch.testing.assert_close(sae.threshold, first_min)
    sae.training_loss(x * 2)
    sae.after_optimizer_step_()
    assert float(sae.threshold) != float(first_min)
    sae.eval()
    f = sae.encode(x)
    with torch.no_grad():
        assert torch.equal(f, pre * (pre > sae.threshold))
    assert out.l0 == 4.0
