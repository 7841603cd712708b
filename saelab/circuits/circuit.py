"""The `Circuit` result: nodes, edges, metric values, faithfulness curve and validation, as JSON.

circuit.json (format_version 1):

    sites        [{name, hook, d_sae, d_in, architecture, path}]        index = NodeKey.site
    nodes        [{id, site, position, index, kind: latent|error, score, activation, delta, rank,
                   in_circuit}]                        ranked by |score|; the circuit plus context
    edges        [{source, target, weight}]            target = a node id or "metric"
    metric       {kind, full: m(M), empty: m(empty), circuit: m(C), complement: m(M \\ C),
                  patched (counterfactual prompts only), per_prompt: [m_b]}
    faithfulness {circuit, complement, curve: [{n_features, n_errors, threshold, metric, faithfulness}]}
    validation   {n_nodes, spearman, low, high, level, n_boot, nodes: [{id, estimate, effect}]}
    positions    labels of the positions (the first prompt's tokens; `same_length` says whether every
                 prompt has that length, i.e. whether positions line up across prompts)
    prompts      {n, examples}, config, model, timings (seconds per stage), saelab_version

Scores are mean over prompts of the linear estimate of m(patched) - m(clean) (attribution.py);
`activation` is the node's mean clean value (for an error node, the mean norm of e) and `delta` the
mean size of its patch: |patched - clean| (for an error node, the norm of its delta).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saelab.circuits.sites import METRIC, NodeKey
from saelab.errors import UsageError

FORMAT_VERSION = 1


@dataclass
class Circuit:
    """What `find_circuit` returns (see the module docstring for each field)."""

    sites: list[dict]
    nodes: list[dict]
    edges: list[dict]
    metric: dict
    faithfulness: dict
    validation: dict
    positions: dict
    prompts: dict
    config: dict
    model: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def circuit_nodes(self) -> list[dict]:
        """The nodes in the circuit, by rank."""
        return [n for n in self.nodes if n["in_circuit"]]

    def node_keys(self, in_circuit: bool = True) -> list[NodeKey]:
        return [NodeKey.parse(n["id"]) for n in self.nodes if n["in_circuit"] or not in_circuit]

    def to_json(self) -> dict[str, Any]:
        from saelab import __version__

        return {"format_version": FORMAT_VERSION, "saelab_version": __version__, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write circuit.json (tmp + rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n", encoding="utf-8")
        tmp.replace(p)
        return p

    @staticmethod
    def load(path: str | Path) -> "Circuit":
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p} does not exist; pass a circuit.json written by `saelab circuit`.")
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise UsageError(f"{p} has format_version {data['format_version']}, newer than this saelab reads "
                             f"({FORMAT_VERSION}); upgrade saelab.")
        data.pop("format_version", None)
        data.pop("saelab_version", None)
        return Circuit(**data)

    def summary(self) -> str:
        """A few lines for the terminal."""
        m, fa, v = self.metric, self.faithfulness, self.validation
        nodes = self.circuit_nodes()
        n_err = sum(n["kind"] == "error" for n in nodes)
        lines = [
            f"metric {m['kind']}: model {m['full']:.4f}, empty circuit {m['empty']:.4f}, "
            f"circuit {m['circuit']:.4f}, complement {m['complement']:.4f}",
            f"circuit: {len(nodes) - n_err} feature nodes + {n_err} error nodes, "
            f"{sum(e['target'] != METRIC for e in self.edges)} edges between them",
            f"faithfulness {fa['circuit']:.3f}, completeness (complement) {fa['complement']:.3f}",
        ]
        if v.get("n_nodes"):
            lines.append(f"attribution vs single-node ablation, top {v['n_nodes']} nodes: Spearman "
                         f"{v['spearman']:.3f} [{v['low']:.3f}, {v['high']:.3f}] ({int(100 * v['level'])}% "
                         "bootstrap over prompts)")
        for n in nodes[:10]:
            pos = "all" if n["position"] is None else n["position"]
            lines.append(f"  {n['id']:>14}  {self.sites[n['site']]['name']:<28} pos {pos:>3} "
                         f"{n['kind']:<6} score {n['score']:+.4f}")
        return "\n".join(lines)
