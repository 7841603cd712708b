"""`saelab collect` (model + corpus -> activation store) and `saelab demo` (the pipeline end to end)."""
from __future__ import annotations

import argparse
import logging
import os

from saelab.cli import add_common_flags
from saelab.config import add_dataclass_args, build_config, load_yaml

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add `collect` and `demo` to the `saelab` parser."""
    from saelab.collect import CollectConfig

    p = sub.add_parser(
        "collect",
        help="run a model over a corpus and store hook-point activations",
        description="Run a model over a corpus and write the activations of one or more hook points to "
        "a sharded, checksummed store. Re-running the same command resumes after a crash.",
        epilog="example: saelab collect --model default --layer 15 --corpus sotu --out data/run --tokens 10M",
    )
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_dataclass_args(p, CollectConfig, title="collect")
    add_common_flags(p)
    p.set_defaults(func=run_collect)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded model: collect, train, evaluate, dashboard",
        description="Run saelab end to end on the embedded SmolLM2-135M-Instruct and a built-in corpus.",
    )
    d.add_argument("--out", default="runs/demo", help="directory for every output (default: runs/demo)")
    d.add_argument("--corpus", default="sotu", help="corpus to read (default: sotu)")
    d.add_argument("--tokens", default="200k", help="activations to collect (default: 200k)")
    d.add_argument("--layer", type=int, default=15, help="residual stream after this layer (default: 15)")
    d.add_argument("--lora", action="store_true",
                   help="instead: LoRA adapter SAEs (finetune -> collect lora:gate,up,down,q,k,v,o -> train -> "
                        "dashboard with adapter heatmaps); output in runs/demo-lora unless --out is given")
    add_common_flags(d)
    d.set_defaults(func=run_demo)


def _apply_thread_env() -> None:
    threads = os.environ.get("SAELAB_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def run_collect(args: argparse.Namespace) -> int:
    from saelab.collect import CollectConfig, collect

    _apply_thread_env()
    yaml_data = load_yaml(args.config) if args.config else None
    cfg = build_config(CollectConfig, args, yaml_data, source=args.config or "collect flags")
    res = collect(cfg, quiet=args.quiet)
    if not args.quiet:
        print(f"stored {res.tokens:,} tokens in {res.out} "
              f"({res.tokens_per_second:,.0f} tok/s this run)")
        if res.overflow:
            print(f"warning: {res.overflow:,} activations were beyond the fp16 range and were clamped")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from saelab.demo import DemoConfig, run_demo as demo
    from saelab.config import parse_int

    if args.lora:
        from saelab.lora_demo import run_lora_demo

        outputs = run_lora_demo(args.out if args.out != "runs/demo" else "runs/demo-lora", quiet=args.quiet)
        print("\nsaelab demo --lora finished. Outputs:")
        for name, path in outputs.items():
            print(f"  {name:<12} {path}")
        return 0
    cfg = DemoConfig(out=args.out, corpus=args.corpus, tokens=parse_int(args.tokens), layer=args.layer)
    outputs = demo(cfg, quiet=args.quiet)
    print("\nsaelab demo finished. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:<12} {path}")
    return 0
