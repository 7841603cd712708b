"""`saelab collect`: run a model over a corpus and write hook-point activations to a store."""
from __future__ import annotations

import argparse

from saelab.cli.common import config_command
from saelab.collect import CollectConfig, collect


def register(sub) -> None:
    """Add `collect` to the `saelab` parser."""
    config_command(
        sub, "collect", CollectConfig, run,
        help="run a model over a corpus and store hook-point activations",
        description="Run a model over a corpus and write the activations of one or more hook points to "
        "a sharded, checksummed store. Re-running the same command resumes after a crash.",
        epilog="example: saelab collect --model default --layer 15 --corpus sotu --out data/run --tokens 10M",
    )


def run(cfg: CollectConfig, args: argparse.Namespace) -> int:
    res = collect(cfg, quiet=args.quiet)
    if not args.quiet:
        print(f"stored {res.tokens:,} tokens in {res.out} "
              f"({res.tokens_per_second:,.0f} tok/s this run)")
        if res.overflow:
            print(f"warning: {res.overflow:,} activations were beyond the fp16 range and were clamped")
    return 0
