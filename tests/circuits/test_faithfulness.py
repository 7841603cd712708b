"""Circuit evaluation by mean ablation on a tiny random Llama.

Known answers: keeping every node (latents and error nodes) reproduces the model's metric exactly;
dropping only the error nodes does not; the empty circuit equals every node set to its mean by hand;
the faithfulness curve runs from 0 (empty) to 1 (everything).
"""
import pytest
import torch

from saelab.circuits.attribution import attribute, spliced
from saelab.circuits.faithfulness import (
    circuit_metric, faithfulness, faithfulness_curve, keep_masks, spearman_bootstrap,
)
from saelab.circuits.prompts import metric_forward, tokenize
from saelab.circuits.sites import ALL, ERROR, NodeKey
from tests.circuits import builders

pytestmark = pytest.mark.usefixtures("one_thread")
HOOKS = ["model.layers.0", "model.layers.1.self_attn", "model.layers.1"]


@pytest.fixture
def setup():
    model, tok = builders.model_and_tokenizer(num_layers=2)
    batch = tokenize(tok, builders.prompts(4), "logprob", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, HOOKS)
    return model, sites, batch, attribute(model, sites, batch, "atp")


def _everything(sites, errors=True):
    nodes = [NodeKey(j, ALL, i) for j, s in enumerate(sites) for i in range(s.d_sae)]
    return nodes + ([NodeKey(j, ALL, ERROR) for j in range(len(sites))] if errors else [])


def test_every_node_kept_gives_the_exact_metric(setup):
    model, sites, batch, attr = setup
    m_all = circuit_metric(model, sites, batch, attr, keep_masks(attr, sites, _everything(sites)))
    torch.testing.assert_close(m_all, attr.metric_B, rtol=1e-10, atol=1e-10)
    m_no_err = circuit_metric(model, sites, batch, attr, keep_masks(attr, sites, _everything(sites, errors=False)))
    assert (m_no_err - attr.metric_B).abs().max() > 1e-3  # the error nodes carry real signal


def test_empty_circuit_is_every_node_at_its_mean(setup):
    model, sites, batch, attr = setup
    m_empty = circuit_metric(model, sites, batch, attr, keep_masks(attr, sites, []))
    node_BS = attr.node_mask_BS

    def by_hand(j):  # the site's activation becomes decode(mean f) + mean e at node positions
        st, s = attr.states[j], sites[j]
        x_mean_SD = s.decode(st.mean_f_SF[None])[0] + st.mean_e_SD
        return lambda x: torch.where(node_BS[..., None], x_mean_SD[None].to(x), x)

    with torch.no_grad(), spliced(model, [(s.hook, by_hand(j)) for j, s in enumerate(sites)]):
        expected = metric_forward(model, batch)
    torch.testing.assert_close(m_empty, expected, rtol=1e-9, atol=1e-9)
    assert (m_empty - attr.metric_B).abs().max() > 1e-2


def test_curve_runs_from_empty_to_everything(setup):
    model, sites, batch, attr = setup
    everything = _everything(sites)
    ranked = everything[-len(sites):] + everything[:-len(sites)]  # error nodes ranked first
    scores = {n: 1.0 for n in ranked}
    m_full = float(attr.metric_B.mean())
    m_empty = float(circuit_metric(model, sites, batch, attr, keep_masks(attr, sites, [])).mean())
    n_lat = sum(not n.is_error for n in ranked)
    curve = faithfulness_curve(model, sites, batch, attr, ranked, scores, [0, 10, n_lat], m_full, m_empty)
    assert curve[0].n_features == 0 and curve[0].faithfulness == pytest.approx(0.0, abs=1e-9)
    assert curve[-1].n_features == n_lat and curve[-1].n_errors == len(sites)
    assert curve[-1].faithfulness == pytest.approx(1.0, abs=1e-8)
    assert faithfulness(2.0, 3.0, 1.0) == 0.5


def test_spearman_bootstrap_known_answers():
    g = torch.Generator().manual_seed(0)
    est = torch.randn(30, 20, generator=g)
    same = spearman_bootstrap(est, 3 * est + 1)
    assert same.estimate == pytest.approx(1.0) and same.low == pytest.approx(1.0)
    flipped = spearman_bootstrap(est, -est)
    assert flipped.estimate == pytest.approx(-1.0)
    noise = spearman_bootstrap(est, torch.randn(30, 20, generator=g))
    assert noise.low < noise.estimate < noise.high and noise.low < 0.3
