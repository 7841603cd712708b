"""`saelab evaluate SAE_DIR [SAE_DIR ...] --data STORE`: measure SAEs and compare them.

Flags come from `EvalConfig` (saelab/evaluate/config.py); `--config file.yaml` sets the same keys.
Prints a one-screen summary; with `--out DIR` also writes eval.json, eval.md and PNGs.
"""
from __future__ import annotations

import argparse

from saelab.cli.common import config_command
from saelab.evaluate import EvalConfig, evaluate, summary_text


def register(sub) -> None:
    """Add `evaluate` to the `saelab` parser."""
    config_command(
        sub, "evaluate", EvalConfig, run, exclude=("sae",),
        help="reconstruction, sparsity, dictionary geometry and downstream loss of SAEs",
        description="Evaluate one or more SAEs on an activation store; with --model and --corpus also "
                    "splice each SAE into the model and measure the next-token loss.",
        positionals=lambda p: p.add_argument("sae", nargs="+", metavar="SAE_DIR",
                                             help="SAE directories (e.g. runs/NAME/sae_best)"),
    )


def run(cfg: EvalConfig, args: argparse.Namespace) -> int:
    results = evaluate(cfg, quiet=args.quiet)
    print(summary_text(results))
    if cfg.out:
        print(f"wrote {cfg.out}/eval.json, eval.md and PNGs")
    return 0
