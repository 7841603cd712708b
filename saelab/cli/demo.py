"""`saelab demo`: the whole pipeline on the embedded model (collect, train, evaluate, dashboard).

Flags come from `DemoConfig` (saelab/recipes/demo.py); `--lora` runs the LoRA adapter recipe
instead (saelab/recipes/lora_demo.py).
"""
from __future__ import annotations

import argparse

from saelab.cli.common import config_command
from saelab.recipes.demo import DemoConfig, run_demo
from saelab.recipes.lora_demo import run_lora_demo


def register(sub) -> None:
    """Add `demo` to the `saelab` parser."""
    p = config_command(
        sub, "demo", DemoConfig, run,
        help="the whole pipeline on the embedded model: collect, train, evaluate, dashboard",
        description="Run saelab end to end on the embedded SmolLM2-135M-Instruct and a built-in corpus.",
    )
    p.add_argument("--lora", action="store_true",
                   help="instead: LoRA adapter SAEs (finetune -> collect lora:gate,up,down,q,k,v,o -> train -> "
                        "dashboard with adapter heatmaps); output in runs/demo-lora unless --out is given")


def run(cfg: DemoConfig, args: argparse.Namespace) -> int:
    if args.lora:
        outputs = run_lora_demo(cfg.out if cfg.out != DemoConfig.out else "runs/demo-lora", quiet=args.quiet)
        title = "saelab demo --lora"
    else:
        outputs = run_demo(cfg, quiet=args.quiet)
        title = "saelab demo"
    print(f"\n{title} finished. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:<12} {path}")
    return 0
