"""`saelab lora-finetune`: train a small LoRA adapter (peft format) to study with LoRA SAEs.

    saelab lora-finetune --model default --corpus champ-cot --rank 1 --targets gate,up,down,q,k,v,o \
        --steps 200 --out adapters/math-r1

Flags come from `FinetuneConfig` (saelab/lora.py); `--config file.yaml` sets the same keys.
"""
from __future__ import annotations

import argparse

from saelab.cli import add_common_flags
from saelab.config import add_dataclass_args, build_config, load_yaml


def register(sub) -> None:
    """Add `lora-finetune` to the `saelab` parser."""
    from saelab.lora import FinetuneConfig

    p = sub.add_parser(
        "lora-finetune", help="train a LoRA adapter with peft on a corpus (CPU, minutes)",
        description="Fine-tune a LoRA adapter (causal-LM loss on packed sequences) and save it in peft format "
                    "with training.json and loss.png. Collect its A->B activations with "
                    "`saelab collect --adapter DIR --hook lora:gate,up,down,q,k,v,o`.",
        epilog="example: saelab lora-finetune --corpus champ-cot --rank 1 --steps 200 --out adapters/math-r1",
    )
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_dataclass_args(p, FinetuneConfig, title="lora-finetune")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saelab.lora import FinetuneConfig, finetune

    cfg = build_config(FinetuneConfig, args, load_yaml(args.config) if args.config else None,
                       source=args.config or "lora-finetune flags")
    res = finetune(cfg, quiet=args.quiet)
    print(f"adapter saved to {res.out} ({res.trainable_params:,} LoRA parameters, {len(res.losses)} steps, "
          f"{res.seconds:.0f} s); held-out loss {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f}")
    print(f"next: saelab collect --adapter {res.out} --hook lora:{','.join(cfg.targets)} --corpus {cfg.corpus}")
    return 0
