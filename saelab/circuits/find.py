"""`find_circuit`: attribute, select, connect, evaluate and validate, in one call.

    circuit = find_circuit(model, saes, prompts)            # model: a LoadedModel (or nn.Module + tokenizer)

Steps (each timed in `circuit.timings`):
  1. node attributions (attribution.py): atp, or ig with `ig_steps` per site;
  2. ranking: every node with a non-zero score, by |score| (mean over prompts; summed over positions
     with `aggregate=positions`); the circuit is the shortest prefix holding `max_features` latent
     nodes, cut further at |score| >= node_threshold; error nodes ranked above its last latent are in;
  3. edges (edges.py) between the circuit's nodes and to the metric, the `max_edges` largest kept;
  4. faithfulness (faithfulness.py): m(empty), m(circuit), m(complement) and the curve over `curve_sizes`;
  5. validation: the top `validate` nodes' estimates against single-node ablations, Spearman with a
     bootstrap CI over prompts.

Leaves out: loading models and SAEs (the CLI does), drawing (plots.py, html.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from saelab.circuits.attribution import attribute, site_scores
from saelab.circuits.circuit import Circuit
from saelab.circuits.edges import compute_edges
from saelab.circuits.faithfulness import (
    circuit_metric, faithfulness, faithfulness_curve, keep_masks, node_ablation_effects, node_estimates,
    prefix_for_features, spearman_bootstrap,
)
from saelab.circuits.prompts import Prompt, tokenize
from saelab.circuits.sites import ALL, ERROR, METRIC, NodeKey, Site, make_sites
from saelab.config import to_dict
from saelab.errors import UsageError, raise_all
from saelab.models import capture, tokenizer_info

log = logging.getLogger(__name__)


@dataclass
class CircuitConfig:
    """How a circuit is found and checked (the CLI's flags)."""

    metric: Literal["auto", "logprob", "logit_diff"] = "auto"
    """logprob of the answer tokens, or the logit difference answer - wrong_answer (auto: logit_diff
    when every prompt has a wrong_answer)."""
    method: Literal["atp", "ig"] = "atp"
    """Node attribution: attribution patching (one forward + backward) or integrated gradients."""
    ig_steps: int = 10
    """Points on the path for --method ig (forward + backward passes per SAE)."""
    baseline: Literal["mean", "zero", "corrupted"] = "mean"
    """What a node is patched to: its mean over the prompts at that position, zero, or its value on
    the `corrupted` counterfactual prompt."""
    aggregate: Literal["none", "positions"] = "none"
    """`positions`: one node per latent, summed over positions (else one per position)."""
    max_features: int = 100
    """Latent nodes in the circuit (count threshold)."""
    node_threshold: float = 0.0
    """Keep only nodes with |score| >= this (score threshold)."""
    edges: bool = True
    """Compute edges between the circuit's nodes (one backward pass per downstream node)."""
    max_edges: int = 300
    """Largest edges kept (by |weight|)."""
    edge_threshold: float = 0.0
    """Keep only edges with |weight| >= this."""
    validate: int = 50
    """Top nodes whose estimate is compared with a real single-node ablation (0: skip)."""
    curve_sizes: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
    """Latent-node counts on the faithfulness curve."""
    include_bos: bool = False
    """Treat position 0 (BOS, identical in every prompt) as a node position too."""
    context_nodes: int = 100
    """Nodes beyond the circuit written to circuit.json (for the curve and the page)."""
    n_boot: int = 1000
    """Bootstrap resamples of prompts for the Spearman interval."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("ig_steps", "max_features", "max_edges"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("validate", "context_nodes", "n_boot"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(n < 0 for n in self.curve_sizes):
            problems.append(f"curve_sizes must be >= 0, got {self.curve_sizes}")
        raise_all(problems, "invalid circuit settings")


def check_sites(model, info: dict | None, sites: Sequence[Site], batch) -> None:
    """Every SAE must match its hook's width and (when both record one) the model's sha256."""
    acts = capture(model, [s.hook for s in sites], batch.input_ids_BS[:1, :2], batch.attention_mask_BS[:1, :2])
    problems = []
    for s in sites:
        width = int(acts[s.hook].shape[-1])
        if width != s.d_in:
            problems.append(f"SAE {s.name!r} has d_in {s.d_in} but hook {s.hook!r} is {width} wide")
        meta = (getattr(s.sae, "metadata", None) or {}).get("model") or {}
        a, b = meta.get("sha256"), (info or {}).get("sha256")
        if a and b and a != b:
            problems.append(f"SAE {s.name!r} was trained on model {meta.get('name', '?')} (sha256 {a[:12]}), "
                            f"not on the loaded {(info or {}).get('name', '?')} (sha256 {b[:12]}); pass the "
                            "--model it was trained on")
    raise_all(problems, "the SAEs do not match the model")


def rank_nodes(attr, sites, aggregate: str, include_errors: bool = True) -> tuple[list[NodeKey], dict[NodeKey, float]]:
    """Every node with a non-zero mean score, by |score| descending."""
    keys, vals = [], []
    for j in range(len(sites)):
        lat_BSF, err_BS = site_scores(attr, sites, j)
        lat_SF, err_S = lat_BSF.mean(0), err_BS.mean(0)
        if aggregate == "positions":
            lat_SF, err_S = lat_SF.sum(0, keepdim=True), err_S.sum(0, keepdim=True)
        nz = lat_SF.nonzero()
        pos = [ALL] * len(nz) if aggregate == "positions" else nz[:, 0].tolist()
        keys += [NodeKey(j, p, i) for p, i in zip(pos, nz[:, 1].tolist())]
        vals.append(lat_SF[nz[:, 0], nz[:, 1]].double().cpu())
        if include_errors:
            nze = err_S.nonzero()[:, 0]
            keys += [NodeKey(j, ALL if aggregate == "positions" else int(t), ERROR) for t in nze.tolist()]
            vals.append(err_S[nze].double().cpu())
    v = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
    order = torch.argsort(v.abs(), descending=True, stable=True).tolist()
    return [keys[i] for i in order], {keys[i]: float(v[i]) for i in order}


def _node_record(attr, sites, n: NodeKey, score: float, rank: int, in_circuit: bool) -> dict:
    st = attr.states[n.site]
    pos = slice(None) if n.position == ALL else n.position
    if n.index == ERROR:
        act = st.e_BSD[:, pos].norm(dim=-1)
        delta = st.delta_e_BSD[:, pos].norm(dim=-1)
    else:
        act, delta = st.f_BSF[:, pos, n.index], st.delta_f_BSF[:, pos, n.index].abs()
    if n.position == ALL:
        act, delta = act.sum(1), delta.sum(1)
    return {"id": n.id(), "site": n.site, "position": None if n.position == ALL else n.position,
            "index": None if n.index == ERROR else n.index, "kind": "error" if n.index == ERROR else "latent",
            "score": score, "activation": float(act.mean()), "delta": float(delta.mean()), "rank": rank,
            "in_circuit": in_circuit}


def _site_record(s: Site) -> dict:
    cfg = getattr(s.sae, "cfg", None)
    return {"name": s.name, "hook": s.hook, "d_sae": s.d_sae, "d_in": s.d_in,
            "architecture": getattr(cfg, "architecture", type(s.sae).__name__),
            "path": (getattr(s.sae, "metadata", None) or {}).get("path")}


def find_circuit(model, saes, prompts: Sequence[Prompt], cfg: CircuitConfig | None = None, tokenizer=None,
                 hooks: Sequence[str] | None = None, quiet: bool = True, **overrides) -> Circuit:
    """Find the circuit of SAE latents and error nodes behind `prompts`' metric.

    Args:
        model: a `LoadedModel` (`.model`, `.tokenizer`, `.info`) or a causal LM (then pass tokenizer).
        saes: SAEs (hook from each one's metadata.json, or `hooks`), or `Site`s.
        prompts: `Prompt`s (prompts.read_prompts reads JSONL; tasks.py builds the built-in ones).
        cfg: settings; keyword overrides (e.g. method="ig") are applied on top.
    """
    cfg = CircuitConfig(**{**(to_dict(cfg) if cfg else {}), **overrides})
    lm, info = (model.model, getattr(model, "info", {})) if hasattr(model, "tokenizer") else (model, {})
    tok = tokenizer or getattr(model, "tokenizer", None)
    if tok is None:
        raise UsageError("find_circuit needs a tokenizer: pass a LoadedModel or tokenizer=...")
    if not prompts:
        raise UsageError("no prompts given.")
    saes = list(saes)
    sites = saes if all(isinstance(s, Site) for s in saes) else make_sites(saes, hooks)
    ti = tokenizer_info(tok)
    batch = tokenize(tok, list(prompts), cfg.metric, ti["bos_id"], ti["pad_id"], cfg.baseline == "corrupted")
    if cfg.baseline == "corrupted" and batch.corrupted_ids_BS is None:
        raise UsageError("--baseline corrupted needs a `corrupted` prompt in every JSONL line.")
    check_sites(lm, info, sites, batch)
    t, times = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 3)
        t = now

    attr = attribute(lm, sites, batch, cfg.method, cfg.ig_steps, cfg.baseline, cfg.include_bos, quiet)
    lap("attribution")
    ranked, scores = rank_nodes(attr, sites, cfg.aggregate)
    circuit = [n for n in prefix_for_features(ranked, cfg.max_features) if abs(scores[n]) >= cfg.node_threshold]
    in_c = set(circuit)
    edges = []
    if cfg.edges and circuit:
        weights = compute_edges(lm, sites, batch, attr, circuit, quiet)
        kept = sorted(((k, w) for k, w in weights.items() if abs(w) >= cfg.edge_threshold and w != 0),
                      key=lambda kw: -abs(kw[1]))[:cfg.max_edges]
        edges = [{"source": u.id(), "target": d if d == METRIC else d.id(), "weight": w} for (u, d), w in kept]
    lap("edges")
    m_full = float(attr.metric_B.mean())
    m_empty = float(circuit_metric(lm, sites, batch, attr, keep_masks(attr, sites, [])).mean())
    m_circ = float(circuit_metric(lm, sites, batch, attr, keep_masks(attr, sites, circuit)).mean())
    complement = _complement(attr, sites, circuit)
    m_comp = float(circuit_metric(lm, sites, batch, attr, complement).mean())
    n_lat = sum(not n.is_error for n in ranked)
    sizes = sorted({min(s, n_lat) for s in cfg.curve_sizes})
    curve = faithfulness_curve(lm, sites, batch, attr, ranked, scores, sizes, m_full, m_empty, quiet)
    lap("faithfulness")
    validation = {"n_nodes": 0}
    top = ranked[:cfg.validate]
    if top:
        est_BN = node_estimates(attr, sites, top).cpu()
        eff_BN = node_ablation_effects(lm, sites, batch, attr, top, quiet)
        ci = spearman_bootstrap(est_BN, eff_BN, n_boot=cfg.n_boot, seed=cfg.seed)
        validation = {"n_nodes": len(top), "spearman": ci.estimate, "low": ci.low, "high": ci.high, "level": 0.95,
                      "n_boot": cfg.n_boot, "nodes": [{"id": n.id(), "estimate": float(e), "effect": float(f)}
                                                      for n, e, f in zip(top, est_BN.mean(0), eff_BN.mean(0))]}
    lap("validation")
    shown = circuit + [n for n in ranked[:len(circuit) + cfg.context_nodes] if n not in in_c]
    rank_of = {n: r for r, n in enumerate(ranked)}
    nodes = [_node_record(attr, sites, n, scores[n], rank_of[n], n in in_c) for n in shown]
    lengths = batch.lengths
    first = batch.tokens[0]
    labels = [tok.decode([i]) for i in first]
    metric = {"kind": batch.metric, "full": m_full, "empty": m_empty, "circuit": m_circ, "complement": m_comp,
              "per_prompt": attr.metric_B.tolist()}
    if attr.patched_metric_B is not None:
        metric["patched"] = float(attr.patched_metric_B.mean())
    return Circuit(
        sites=[_site_record(s) for s in sites], nodes=nodes, edges=edges, metric=metric,
        faithfulness={"circuit": faithfulness(m_circ, m_full, m_empty),
                      "complement": faithfulness(m_comp, m_full, m_empty),
                      "curve": [c._asdict() for c in curve]},
        validation=validation,
        positions={"labels": labels, "same_length": len(set(lengths)) == 1, "lengths": lengths},
        prompts={"n": len(prompts), "examples": [p.to_json() for p in list(prompts)[:5]]},
        config=to_dict(cfg), model={k: v for k, v in (info or {}).items() if k != "adapter"}, timings=times)


def _complement(attr, sites, circuit: list[NodeKey]):
    """Keep masks of every node except the circuit's."""
    masks = keep_masks(attr, sites, [])
    for lat, err in masks:
        lat.fill_(True)
        err.fill_(True)
    for n in circuit:
        lat, err = masks[n.site]
        pos = slice(None) if n.position == ALL else n.position
        if n.index == ERROR:
            err[pos] = False
        else:
            lat[pos, n.index] = False
    return masks
