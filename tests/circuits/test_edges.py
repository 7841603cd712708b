"""Edges on a tiny random Llama: causality (no edge from a later position to an earlier one, none
inside a site) and the chain rule (a node's outgoing edges add up to its attribution)."""
import pytest
import torch

from saelab.circuits.attribution import attribute, site_scores
from saelab.circuits.edges import compute_edges
from saelab.circuits.prompts import tokenize
from saelab.circuits.sites import ALL, ERROR, METRIC, NodeKey
from tests.circuits import builders

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["model.layers.0", "model.layers.1.self_attn", "model.layers.1"]


def _every_node(attr, sites):
    nodes = []
    for j in range(len(sites)):
        f = attr.states[j].f_BSF  # every latent that fires somewhere, whatever its own score
        nodes += [NodeKey(j, t, ERROR) for t in range(1, f.shape[1])]
        nodes += [NodeKey(j, t + 1, i) for t, i in (f[:, 1:] != 0).any(0).nonzero().tolist()]
    return nodes


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = builders.model_and_tokenizer(num_layers=2)
    batch = tokenize(tok, builders.prompts(2, length=3), "logprob", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, HOOKS)
    attr = attribute(model, sites, batch, "atp", baseline="mean")
    nodes = _every_node(attr, sites)
    edges = compute_edges(model, sites, batch, attr, nodes)
    torch.set_num_threads(threads)
    return sites, attr, nodes, edges


def test_no_edge_runs_backwards_in_position_or_within_a_site(graph):
    sites, attr, nodes, edges = graph
    later = [(u, d) for (u, d) in edges if d != METRIC and u.position > d.position]
    assert len(later) > 100
    assert all(edges[e] == 0.0 for e in later)
    assert all(u.site != d.site for (u, d) in edges if d != METRIC)
    assert attr.order == [0, 1, 2]
    assert all(u.site < d.site for (u, d) in edges if d != METRIC)
    same_or_earlier = [edges[(u, d)] for (u, d) in edges if d != METRIC and u.position <= d.position]
    assert sum(w != 0 for w in same_or_earlier) > 100


def test_outgoing_edges_add_up_to_the_attribution(graph):
    sites, attr, nodes, edges = graph
    out = {}
    for (u, d), w in edges.items():
        out[u] = out.get(u, 0.0) + w
    checked = 0
    for u in nodes:
        lat, err = site_scores(attr, sites, u.site)
        ie = float((err if u.index == ERROR else lat[..., u.index])[:, u.position].mean())
        assert out[u] == pytest.approx(ie, rel=1e-6, abs=1e-10), u
        checked += abs(ie) > 1e-6
    assert checked > 50


def test_residual_sites_connect_only_through_the_next_site():
    model, tok = builders.model_and_tokenizer(num_layers=3)
    batch = tokenize(tok, builders.prompts(2, length=3), "logit_diff", bos_id=1, pad_id=0)
    sites = builders.sites(model, batch, ["model.layers.0", "model.layers.1", "model.layers.2"])
    attr = attribute(model, sites, batch, "atp")
    nodes = [NodeKey(j, ALL, ERROR) for j in range(3)] + [NodeKey(j, ALL, i) for j in range(3) for i in range(4)]
    edges = compute_edges(model, sites, batch, attr, nodes)
    skip = [w for (u, d), w in edges.items() if d != METRIC and d.site - u.site == 2]
    near = [w for (u, d), w in edges.items() if d != METRIC and d.site - u.site == 1]
    assert skip and all(w == 0.0 for w in skip)  # layer 0 reaches layer 2 only through layer 1's nodes
    assert any(w != 0.0 for w in near)
    to_metric = {u.site for (u, d), w in edges.items() if d == METRIC and w != 0.0}
    assert to_metric == {2}
