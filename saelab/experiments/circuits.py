"""`saelab experiment circuits`: feature circuits for the built-in tasks on SAEs at several layers.

1. SAEs: the given `--sae` directories, or: collect the residual stream after each of `layers` on
   `corpus` (one store) and train one TopK SAE per layer on it.
2. For each task in `tasks` (circuits.tasks: agreement, arithmetic, champ): find_circuit with
   integrated gradients (`method`; Marks et al. use ig for nodes) or attribution patching, mean baseline, `max_features` latent nodes (champ: nodes summed over
   positions, its prompts differ in length), edges, the faithfulness curve and the validation of
   the top `validate` nodes against single-node ablations (Spearman, bootstrap CI over prompts).
3. Control: `control_draws` random circuits with as many latent nodes (drawn from the nodes with a
   non-zero score) and the same error nodes: their faithfulness against the found circuit's.

Writes per task TASK/circuit.json, circuit.png, faithfulness.png, validation.png, circuit.html and
prompts.jsonl; over all tasks faithfulness.png, results.json and report.md. --dry-run builds a tiny
random Llama, collects a tiny store, trains tiny SAEs and runs every step in about a minute.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from saelab.circuits import CircuitConfig, attribute, find_circuit, make_sites, rank_nodes, tokenize
from saelab.circuits.faithfulness import circuit_metric, faithfulness, keep_masks
from saelab.circuits.html import node_examples, write_page
from saelab.circuits.plots import save_curve, save_graph, save_validation
from saelab.circuits.prompts import write_prompts
from saelab.circuits.tasks import SHOTS, build_task
from saelab.collect import CollectConfig, collect
from saelab.config import to_dict
from saelab.experiments.reasoning_dry import _tokenizer
from saelab.models import load_model, tokenizer_info
from saelab.saes import load_sae
from saelab.train import TrainConfig, train

log = logging.getLogger(__name__)

HELP = "feature circuits for the built-in tasks (agreement, arithmetic, champ) on SAEs at several layers"


@dataclass
class Config:
    model: str = "default"
    """The model (`default`: the embedded SmolLM2-135M-Instruct)."""
    sae: list[str] = field(default_factory=list)
    """Existing SAE directories (one per hook); empty: collect a store and train one SAE per layer."""
    layers: list[int] = field(default_factory=lambda: [3, 7, 11, 15])
    """Residual-stream layers to train SAEs at (when --sae is not given)."""
    corpus: str = "champ-cot"
    """Text the SAEs are trained on."""
    tokens: int = 300_000
    """Activations collected per layer."""
    train_tokens: int = 600_000
    """Tokens each SAE trains on (cycling the store)."""
    train_batch: int = 1024
    """SAE training batch (tokens)."""
    lr: float = 1e-3
    """SAE learning rate."""
    max_length: int = 256
    """Tokens per packed training sequence."""
    k: int = 32
    """TopK latents per token."""
    expansion_factor: int = 8
    """Latents per residual dimension."""
    tasks: list[str] = field(default_factory=lambda: ["agreement", "arithmetic", "champ"])
    """Built-in tasks to find circuits for."""
    n_prompts: int = 32
    """Prompts per task (agreement, arithmetic)."""
    champ_prompts: int = 16
    """Prompts of the champ task (long: a problem and the solution so far)."""
    champ_max_chars: int = 500
    """Longest champ prompt, in characters."""
    method: Literal["atp", "ig"] = "ig"
    """Node attribution (ig, as Marks et al. use for nodes; atp is one pass but misjudges error nodes)."""
    ig_steps: int = 10
    """Integrated-gradient points per SAE."""
    max_features: int = 100
    """Latent nodes per circuit."""
    validate: int = 50
    """Top nodes checked against single-node ablations."""
    control_draws: int = 5
    """Random circuits of the same size per task (control)."""
    store: str | None = None
    """Activation store of the given SAEs (for the pages' examples)."""
    seed: int = 0
    """Seed of the prompts, training and bootstrap."""


def _dry_setup(root: Path, cfg: Config) -> tuple[Config, Path]:
    """A tiny random Llama saved under root, a champ-like file; tiny settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    texts = [f"The {w} near the {v} is here. {a} + {b} = {a + b}." for w, v, a, b in
             ((rng.choice(["author", "pilot", "guards"]), rng.choice(["kings", "king"]), rng.randint(10, 80),
               rng.randint(1, 9)) for _ in range(800))]
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n".join(texts) + "\n" + SHOTS)
    champ = [{"text": f"Find {i} + {2 * i}.\nWe add them: {i} + {2 * i} = {3 * i}.\nSo the answer is {3 * i}."}
             for i in range(1, 30)]
    (root / "champ.jsonl").write_text("".join(json.dumps(c) + "\n" for c in champ))
    tok = _tokenizer(texts + ["0123456789 +-*/=$()"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return dataclasses.replace(cfg, model=str(root / "model"), layers=[0, 1], corpus=str(root / "corpus.txt"),
                               tokens=4000, train_tokens=4000, train_batch=256, max_length=64, k=4, expansion_factor=2,
                               n_prompts=8, champ_prompts=8, max_features=10,
                               validate=10, control_draws=2), root / "champ.jsonl"


def _train_saes(cfg: Config, out: Path, quiet: bool) -> tuple[list[Path], Path]:
    store = out / "store"
    collect(CollectConfig(out=str(store), model=cfg.model, layer=list(cfg.layers), corpus=cfg.corpus,
                          tokens=cfg.tokens, max_length=cfg.max_length, batch_size=8,
                          chunk_tokens=min(65536, cfg.tokens // 8)),  # >= 8 chunks: a validation split
            quiet=quiet)
    dirs = []
    for layer in cfg.layers:
        res = train(TrainConfig(data=str(store), hook=f"model.layers.{layer}", out=str(out / f"sae_L{layer:02d}"),
                                architecture="topk", k=[cfg.k], expansion_factor=[cfg.expansion_factor],
                                tokens=cfg.train_tokens, batch_size=cfg.train_batch, lr=cfg.lr, eval_every=100,
                                eval_tokens=8192, checkpoint_every=100_000, seed=cfg.seed, warmup_steps=20), quiet=quiet)
        dirs.append(Path(res.best_dir))
    return dirs, store


def _control(lm, circuit, saes, prompts, cfg: Config) -> list[float]:
    """Faithfulness of random circuits with the circuit's error nodes and as many random latent nodes."""
    sites = make_sites(saes)
    ti = tokenizer_info(lm.tokenizer)
    batch = tokenize(lm.tokenizer, prompts, "auto", ti["bos_id"], ti["pad_id"], corrupted=False)
    attr = attribute(lm.model, sites, batch, "atp")
    ranked, _ = rank_nodes(attr, sites, circuit.config["aggregate"])
    latents = [n for n in ranked if not n.is_error]
    chosen = circuit.node_keys()
    errors = [n for n in chosen if n.is_error]
    n_lat = len(chosen) - len(errors)
    rng = random.Random(cfg.seed)
    m_full, m_empty = circuit.metric["full"], circuit.metric["empty"]
    out = []
    for _ in range(cfg.control_draws):
        pick = rng.sample(latents, min(n_lat, len(latents)))
        m = float(circuit_metric(lm.model, sites, batch, attr, keep_masks(attr, sites, errors + pick)).mean())
        out.append(faithfulness(m, m_full, m_empty))
    return out


def run(cfg: Config, out, dry_run: bool = False, quiet: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    champ_path = None
    if dry_run:
        cfg, champ_path = _dry_setup(out / "dry", cfg)
    t0 = time.perf_counter()
    if cfg.sae:
        dirs, store = [Path(d) for d in cfg.sae], (cfg.store or None)
    else:
        dirs, store = _train_saes(cfg, out, quiet)
    t_saes = time.perf_counter() - t0
    saes = [load_sae(d) for d in dirs]
    lm = load_model(cfg.model, quiet=True)
    results = {"config": to_dict(cfg), "dry_run": dry_run, "sae_dirs": [str(d) for d in dirs],
               "sae_metrics": [s.metadata.get("metrics", {}) for s in saes], "seconds_saes": round(t_saes, 1),
               "tasks": {}}
    circuits, names = [], []
    for name in cfg.tasks:
        t = time.perf_counter()
        prompts = build_task(name, cfg.champ_prompts if name == "champ" else cfg.n_prompts, cfg.seed,
                             None if dry_run else lm.tokenizer, champ_path=champ_path, max_chars=cfg.champ_max_chars)
        ccfg = CircuitConfig(method=cfg.method, ig_steps=cfg.ig_steps, max_features=cfg.max_features,
                             validate=cfg.validate, seed=cfg.seed,
                             aggregate="positions" if name == "champ" else "none")
        c = find_circuit(lm, saes, prompts, ccfg, quiet=quiet)
        d = out / name
        d.mkdir(exist_ok=True)
        write_prompts(d / "prompts.jsonl", prompts)
        c.save(d / "circuit.json")
        save_graph(d / "circuit.png", c, title=f"{name}: {c.summary().splitlines()[1]}")
        save_curve(d / "faithfulness.png", [c], [name])
        save_validation(d / "validation.png", c)
        write_page(d / "circuit.html", c, lm.tokenizer, node_examples(c, saes, store, quiet=quiet) if store else None,
                   title=f"saelab circuit: {name}")
        control = _control(lm, c, saes, prompts, cfg)
        curve = c.faithfulness["curve"]
        reach = next((p["n_features"] for p in curve if p["faithfulness"] >= 0.6), None)
        results["tasks"][name] = {
            "n_prompts": len(prompts), "metric": {k: v for k, v in c.metric.items() if k != "per_prompt"},
            "faithfulness": c.faithfulness["circuit"], "completeness": c.faithfulness["complement"],
            "n_features": sum(n["kind"] == "latent" for n in c.circuit_nodes()),
            "n_errors": sum(n["kind"] == "error" for n in c.circuit_nodes()), "n_edges": len(c.edges),
            "curve": curve, "features_for_0.6": reach, "control_faithfulness": control,
            "validation": {k: v for k, v in c.validation.items() if k != "nodes"},
            "top_nodes": c.circuit_nodes()[:15], "timings": c.timings, "seconds": round(time.perf_counter() - t, 1)}
        circuits.append(c)
        names.append(name)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")  # after every task
    save_curve(out / "faithfulness.png", circuits, names, title="faithfulness of the circuits (mean ablation)")
    results["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "report.md").write_text(report(results) + "\n")
    return results


def report(results: dict) -> str:
    lines = ["| task | prompts | metric: model / empty / circuit | latents + errors | faithfulness | "
             "completeness (complement) | random circuits (same size) | latents for 0.6 | Spearman top-N [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        m, v = r["metric"], r["validation"]
        ctrl = r["control_faithfulness"]
        ctrl_s = f"{min(ctrl):.2f} .. {max(ctrl):.2f}" if ctrl else "-"
        sp = f"{v['spearman']:.2f} [{v['low']:.2f}, {v['high']:.2f}] (N={v['n_nodes']})" if v.get("n_nodes") else "-"
        lines.append(f"| {name} | {r['n_prompts']} | {m['kind']}: {m['full']:.3f} / {m['empty']:.3f} / {m['circuit']:.3f} "
                     f"| {r['n_features']} + {r['n_errors']} | {r['faithfulness']:.3f} | {r['completeness']:.3f} | "
                     f"{ctrl_s} | {r['features_for_0.6']} | {sp} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    return report(results) + f"\n(total {results['seconds_total']:.0f} s)"
