"""`saelab evaluate SAE_DIR [SAE_DIR ...] --data STORE`: measure SAEs and compare them.

Flags come from `EvalConfig` (saelab/evaluate.py); `--config file.yaml` sets the same keys.
Prints a one-screen summary; with `--out DIR` also writes eval.json, eval.md and PNGs.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add `evaluate` to the `saelab` parser."""
    from saelab.cli import add_common_flags
    from saelab.config import add_dataclass_args
    from saelab.evaluate import EvalConfig

    p = sub.add_parser(
        "evaluate", help="reconstruction, sparsity, dictionary geometry and downstream loss of SAEs",
        description="Evaluate one or more SAEs on an activation store; with --model and --corpus also "
                    "splice each SAE into the model and measure the next-token loss.",
    )
    p.add_argument("sae", nargs="+", metavar="SAE_DIR", help="SAE directories (e.g. runs/NAME/sae_best)")
    p.add_argument("--config", metavar="YAML", help="YAML file of the options below (flags win)")
    add_dataclass_args(p, EvalConfig, title="evaluate")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saelab.config import build_config, load_yaml
    from saelab.errors import UsageError
    from saelab.evaluate import EvalConfig, evaluate
    from saelab.evaluate_report import summary_text

    cfg = build_config(EvalConfig, args, load_yaml(args.config) if args.config else None,
                       source=args.config or "flags")
    if not cfg.data:
        raise UsageError("no store given: pass --data STORE (the activation store the SAEs were trained on).")
    results = evaluate(args.sae, cfg.data, split=cfg.split, tokens=cfg.tokens, batch_size=cfg.batch_size,
                       model=cfg.model, corpus=cfg.corpus, eval_tokens=cfg.eval_tokens, seq_batch=cfg.seq_batch,
                       out=cfg.out, device=cfg.device, quiet=args.quiet, adapter=cfg.adapter)
    print(summary_text(results))
    if cfg.out:
        print(f"wrote {cfg.out}/eval.json, eval.md and PNGs")
    return 0
