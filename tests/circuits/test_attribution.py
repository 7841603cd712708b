"""Attribution patching and integrated gradients on tiny random Llamas with hand-made SAEs.

Known answers: where the logits are linear in a hook's activation, the linear estimate of patching
one node is the exact effect; integrated gradients converge to the exact effect of patching a whole
site (their completeness), and attribution patching does not.
"""
import pytest
import torch

from saelab.circuits.attribution import attribute, site_scores, spliced
from saelab.circuits.faithfulness import node_ablation_effects, node_estimates
from saelab.circuits.prompts import metric_forward, tokenize
from saelab.circuits.sites import ERROR, NodeKey
from tests.circuits import builders

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR_HOOKS = ["model.layers.1.mlp.down_proj:input", "model.layers.1"]


def _all_nodes(attr, sites, j, limit=40):
    """Every error node of site j and (up to `limit`, spread over positions) latents with a score."""
    lat_BSF, err_BS = site_scores(attr, sites, j)
    S = err_BS.shape[1]
    nodes = [NodeKey(j, t, ERROR) for t in range(1, S)]
    active = (lat_BSF != 0).any(0).nonzero().tolist()
    return nodes + [NodeKey(j, t, i) for t, i in active[::max(1, len(active) // limit)]]


@pytest.mark.parametrize("baseline", ["mean", "zero", "corrupted"])
def test_atp_equals_exact_effect_when_linear_after_the_hook(baseline):
    model, tok = builders.model_and_tokenizer(num_layers=2, linear_tail=True)
    batch = tokenize(tok, builders.prompts(4, corrupted=True), "logit_diff", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, LINEAR_HOOKS)
    attr = attribute(model, sites, batch, "atp", baseline=baseline)
    for j in range(len(sites)):
        nodes = _all_nodes(attr, sites, j)
        assert len(nodes) > 20
        est_BN = node_estimates(attr, sites, nodes)
        eff_BN = node_ablation_effects(model, sites, batch, attr, nodes)
        assert eff_BN.abs().max() > 1e-5  # the patches do something
        torch.testing.assert_close(est_BN, eff_BN, rtol=1e-7, atol=1e-12)


def test_atp_is_not_exact_for_a_nonlinear_tail():
    model, tok = builders.model_and_tokenizer(num_layers=2, linear_tail=False)
    batch = tokenize(tok, builders.prompts(4), "logit_diff", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, ["model.layers.0"])
    attr = attribute(model, sites, batch, "atp", baseline="zero")
    nodes = _all_nodes(attr, sites, 0)
    gap = (node_estimates(attr, sites, nodes) - node_ablation_effects(model, sites, batch, attr, nodes)).abs().max()
    assert gap > 1e-4  # the control: the linear-tail test would not pass by accident


def _whole_site_effect(model, sites, batch, attr, j):
    st, s = attr.states[j], sites[j]
    dx = s.decode(st.delta_f_BSF) - s.decode(torch.zeros_like(st.delta_f_BSF)) + st.delta_e_BSD
    with torch.no_grad(), spliced(model, [(s.hook, lambda x: x + dx.to(x))]):
        return metric_forward(model, batch) - attr.metric_B


@pytest.mark.parametrize("metric", ["logprob", "logit_diff"])
def test_integrated_gradients_converge_to_the_exact_effect(metric):
    model, tok = builders.model_and_tokenizer(num_layers=3)
    batch = tokenize(tok, builders.prompts(3), metric, bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, ["model.layers.0", "model.layers.1"])
    errors = {}
    for steps in (1, 4, 32):
        attr = attribute(model, sites, batch, "ig", ig_steps=steps, baseline="zero")
        for j in range(len(sites)):
            lat, err = site_scores(attr, sites, j)
            total_B = lat.sum((1, 2)) + err.sum(1)
            exact_B = _whole_site_effect(model, sites, batch, attr, j)
            assert exact_B.abs().min() > 1e-2
            errors[steps, j] = float(((total_B - exact_B).abs() / exact_B.abs()).max())
    atp = attribute(model, sites, batch, "atp", baseline="zero")
    for j in range(len(sites)):
        lat, err = site_scores(atp, sites, j)
        atp_err = float(((lat.sum((1, 2)) + err.sum(1) - _whole_site_effect(model, sites, batch, atp, j)).abs()).max())
        assert atp_err > 1e-3
        assert errors[32, j] < 1e-3, errors
        assert errors[32, j] < errors[4, j] < errors[1, j], errors


def test_summing_over_positions_matches_the_per_position_scores():
    model, tok = builders.model_and_tokenizer(num_layers=2)
    batch = tokenize(tok, builders.prompts(3), "logprob", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, ["model.layers.0"])
    attr = attribute(model, sites, batch, "atp")
    lat, err = site_scores(attr, sites, 0)
    assert (lat[:, 0] == 0).all() and (err[:, 0] == 0).all()  # BOS carries no node
    pad_BS = batch.attention_mask_BS == 0
    assert (err[pad_BS] == 0).all()
    nodes = [NodeKey(0, -1, 5), NodeKey(0, -1, ERROR)]
    est = node_estimates(attr, sites, nodes)
    torch.testing.assert_close(est[:, 0], lat[:, :, 5].sum(1))
    torch.testing.assert_close(est[:, 1], err.sum(1))
