"""find_circuit from Python: integrated gradients, nodes summed over positions, a counterfactual baseline."""
import pytest

from saelab.circuits import METRIC, find_circuit
from saelab.circuits.prompts import tokenize
from tests.circuits import builders

pytestmark = pytest.mark.usefixtures("one_thread")


def test_find_circuit_ig_positions_corrupted():
    model, tok = builders.model_and_tokenizer(num_layers=2)
    prompts = builders.prompts(5, length=4, corrupted=True)
    batch = tokenize(tok, prompts, "auto", 1, 0)
    sites = builders.sites(model, batch, ["model.layers.0", "model.layers.1"])
    c = find_circuit(model, sites, prompts, tokenizer=tok, method="ig", ig_steps=4, baseline="corrupted",
                     aggregate="positions", max_features=6, validate=8, curve_sizes=[2, 6])
    nodes = c.circuit_nodes()
    assert sum(n["kind"] == "latent" for n in nodes) == 6
    assert all(n["position"] is None and n["id"].split(":")[1] == "*" for n in nodes)
    scores = [abs(n["score"]) for n in nodes]
    assert scores == sorted(scores, reverse=True) and c.nodes[:len(nodes)] == nodes
    assert "patched" in c.metric and c.metric["kind"] == "logit_diff"
    assert [p["n_features"] for p in c.faithfulness["curve"]] == [2, 6]
    assert c.faithfulness["curve"][-1]["faithfulness"] == pytest.approx(c.faithfulness["circuit"])
    assert any(e["target"] == METRIC for e in c.edges) and any(e["target"] != METRIC for e in c.edges)
    assert c.config["method"] == "ig" and c.timings["attribution"] >= 0
