"""`saelab lora-finetune`: train a small LoRA adapter (peft format) to study with LoRA SAEs.

    saelab lora-finetune --model default --corpus champ-cot --rank 1 --targets gate,up,down,q,k,v,o \\
        --steps 200 --out adapters/math-r1

Flags come from `FinetuneConfig` (saelab/finetune.py); `--config file.yaml` sets the same keys.
"""
from __future__ import annotations

import argparse

from saelab.cli.common import config_command
from saelab.finetune import FinetuneConfig, finetune


def register(sub) -> None:
    """Add `lora-finetune` to the `saelab` parser."""
    config_command(
        sub, "lora-finetune", FinetuneConfig, run,
        help="train a LoRA adapter with peft on a corpus (CPU, minutes)",
        description="Fine-tune a LoRA adapter (causal-LM loss on packed sequences) and save it in peft format "
                    "with training.json and loss.png. Collect its A->B activations with "
                    "`saelab collect --adapter DIR --hook lora:gate,up,down,q,k,v,o`.",
        epilog="example: saelab lora-finetune --corpus champ-cot --rank 1 --steps 200 --out adapters/math-r1",
    )


def run(cfg: FinetuneConfig, args: argparse.Namespace) -> int:
    res = finetune(cfg, quiet=args.quiet)
    print(f"adapter saved to {res.out} ({res.trainable_params:,} LoRA parameters, {len(res.losses)} steps, "
          f"{res.seconds:.0f} s); held-out loss {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f}")
    print(f"next: saelab collect --adapter {res.out} --hook lora:{','.join(cfg.targets)} --corpus {cfg.text.corpus}")
    return 0
