"""`saelab circuit --sae DIR [DIR ...] --prompts FILE.jsonl | --task NAME`: find and check a feature circuit.

Writes into --out: circuit.json (nodes, edges, metric values, faithfulness curve, validation),
circuit.png (the graph), faithfulness.png (the curve), validation.png (estimates against single-node
ablations), circuit.html (the interactive graph; with --store, a node's top examples) and
prompts.jsonl (the prompts used). Settings come from `CircuitConfig` (saelab/circuits/find.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from saelab.circuits.find import CircuitConfig, find_circuit
from saelab.circuits.html import node_examples, write_page
from saelab.circuits.plots import save_curve, save_graph, save_validation
from saelab.circuits.prompts import read_prompts, write_prompts
from saelab.circuits.tasks import TASKS, build_task
from saelab.cli.common import config_command
from saelab.models import load_model
from saelab.saes import load_sae


def register(sub) -> None:
    """Add `circuit` to the `saelab` parser."""
    p = config_command(
        sub, "circuit", CircuitConfig, run,
        help="find the SAE features (and SAE errors) that carry a behaviour, with edges and faithfulness",
        description="Attribute a metric on a set of prompts to SAE latents and SAE error terms at several hook "
                    "points (attribution patching or integrated gradients), connect them with edges, and measure "
                    "how faithful the circuit is by mean-ablating everything outside it.")
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--sae", nargs="+", required=True, metavar="DIR", help="SAE directories, one per hook point")
    g.add_argument("--model", default="default", help="the model the SAEs were trained on (default: %(default)s)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                     help='one {"prompt", "answer"[, "wrong_answer"][, "corrupted"]} object per line')
    src.add_argument("--task", choices=sorted(TASKS), help="a built-in prompt set: " +
                     "; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    g.add_argument("--n-prompts", type=int, default=64, help="prompts of a built-in task (default: %(default)s)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of a built-in task's prompts (default: %(default)s)")
    g.add_argument("--store", help="activation store of the SAEs (a directory or an s3:// ... URL): the page shows "
                                   "each node's top examples")
    g.add_argument("--out", type=Path, default=Path("runs") / "circuit", help="output directory (default: %(default)s)")


def run(cfg: CircuitConfig, args: argparse.Namespace) -> int:
    saes = [load_sae(d) for d in args.sae]
    for d, sae in zip(args.sae, saes):
        sae.metadata.setdefault("path", str(d))
    lm = load_model(args.model, quiet=args.quiet)
    prompts = (read_prompts(args.prompts) if args.prompts else
               build_task(args.task, args.n_prompts, args.task_seed, lm.tokenizer))
    circuit = find_circuit(lm, saes, prompts, cfg, quiet=args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_prompts(out / "prompts.jsonl", list(prompts))
    circuit.save(out / "circuit.json")
    save_graph(out / "circuit.png", circuit)
    save_curve(out / "faithfulness.png", [circuit], [args.task or Path(args.prompts).stem])
    save_validation(out / "validation.png", circuit)
    examples = node_examples(circuit, saes, args.store, quiet=args.quiet) if args.store else None
    write_page(out / "circuit.html", circuit, lm.tokenizer, examples)
    print(circuit.summary())
    print(f"wrote {out}/circuit.json, circuit.png, faithfulness.png, validation.png, circuit.html")
    return 0
