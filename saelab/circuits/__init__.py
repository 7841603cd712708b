"""Feature circuits: which SAE latents (and SAE errors), at which hooks and positions, carry a
model's behaviour on a set of prompts, how they connect, and how well they explain it.

Follows the sparse-feature-circuits method (Marks et al. 2024); docs/circuits.md lists where
saelab differs.

    sites.py         Site (one dictionary at a hook), NodeKey, node ids; x = decode(f) + e
    prompts.py       Prompt, JSONL reading, tokenising, the metric (logprob / logit_diff)
    attribution.py   attribution patching and integrated gradients per node
    edges.py         edge weights through a graph cut at every site
    faithfulness.py  mean-ablation circuit metric, faithfulness curve, single-node ablation check
    find.py          CircuitConfig, find_circuit (the whole pipeline)
    circuit.py       Circuit (circuit.json)
    plots.py         PNGs; html.py: the self-contained page; tasks.py: built-in prompt sets

    from saelab.circuits import find_circuit, read_prompts
    circuit = find_circuit(load_model("default"), [load_sae(d) for d in dirs], read_prompts("p.jsonl"))
    circuit.save("circuit.json")
"""
from saelab.circuits.attribution import Attribution, SiteState, attribute
from saelab.circuits.circuit import Circuit
from saelab.circuits.edges import compute_edges
from saelab.circuits.faithfulness import circuit_metric, faithfulness_curve, keep_masks, spearman_bootstrap
from saelab.circuits.find import CircuitConfig, find_circuit, rank_nodes
from saelab.circuits.prompts import Batch, Prompt, read_prompts, tokenize, write_prompts
from saelab.circuits.sites import ALL, ERROR, METRIC, NodeKey, Site, make_sites

__all__ = [
    "ALL", "ERROR", "METRIC", "Attribution", "Batch", "Circuit", "CircuitConfig", "NodeKey", "Prompt", "Site",
    "SiteState", "attribute", "circuit_metric", "compute_edges", "faithfulness_curve", "find_circuit",
    "keep_masks", "make_sites", "rank_nodes", "read_prompts", "spearman_bootstrap", "tokenize", "write_prompts",
]
