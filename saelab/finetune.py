"""Fine-tune a small LoRA adapter to study: `finetune(FinetuneConfig) -> FinetuneResult`.

Trains a peft LoRA (rank r on the chosen adapter types of every layer) with the causal-LM loss on
packed sequences of a corpus, on CPU, and saves it in peft format (adapter_config.json +
adapter_model.safetensors) with `training.json` (config, loss curve) and `loss.png`. For each step,
on a batch of packed sequences (labels = inputs, padding ignored):

    loss = mean over real targets t of  -log p(x_{t+1} | x_{<=t})     with  W' = W + (alpha / r) B A
    A ~ peft's default (Kaiming-uniform), B = 0 at the start, so step 0 is the base model exactly

Leaves out: the LoRA hook itself (saelab.models.lora), SAE training (saelab.train), where SAE
features live across adapters (saelab.interpret.adapters).
Shapes: B batch, S sequence, N sequences.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from saelab import plots
from saelab.config import group, grouped, to_dict
from saelab.corpus import CorpusConfig, batch_sequences, open_corpus, pack_corpus
from saelab.errors import UsageError
from saelab.models import ModelConfig, layers_of, load_model, tokenizer_info
from saelab.models.lora import LORA_TYPES

log = logging.getLogger(__name__)


@grouped
@dataclass
class FinetuneConfig:
    """Everything `saelab lora-finetune` needs; field name = flag = YAML key."""

    lm: ModelConfig = group(ModelConfig, exclude=("dtype", "device", "adapter"))
    """--model: the base model (trained on CPU in float32)."""
    text: CorpusConfig = group(CorpusConfig, corpus="champ-cot", max_length=256, exclude=("keep_special",))
    """--corpus to fine-tune on, and its packing."""

    out: str = "adapters/lora"
    """Directory for the adapter (peft format), training.json and loss.png."""
    rank: int = 1
    """LoRA rank r of every adapter."""
    alpha: float | None = None
    """LoRA alpha (the update is scaled by alpha / r); default: equal to the rank."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TYPES))
    """Adapter types to train, comma-separated subset of gate,up,down,q,k,v,o."""
    steps: int = 100
    """Optimizer steps."""
    lr: float = 1e-3
    """AdamW learning rate (after a linear warmup over the first tenth of the steps)."""
    batch_size: int = 4
    """Packed sequences per step."""
    eval_sequences: int = 8
    """Held-out sequences (after the training ones) whose loss is measured before and after training."""
    seed: int = 0
    """Seed for the adapter's initialisation."""
    overwrite: bool = False
    """Replace an existing --out directory."""

    def __post_init__(self):
        problems = []
        for name in ("rank", "steps", "batch_size", "eval_sequences"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        bad = [t for t in self.targets if t not in LORA_TYPES]
        if bad or not self.targets:
            problems.append(f"--targets {','.join(self.targets)}: expected a subset of {','.join(LORA_TYPES)}")
        if problems:
            raise UsageError("lora-finetune settings have problems:\n" + "\n".join(f"  - {p}" for p in problems))
        self.targets = [t for t in LORA_TYPES if t in self.targets]


class FinetuneResult(NamedTuple):
    """What a fine-tuning run did."""

    out: Path
    """The adapter directory."""
    losses: list[float]
    """Training loss of each step."""
    eval_loss_before: float
    """Held-out loss of the base model (the adapter starts at B = 0)."""
    eval_loss_after: float
    """Held-out loss with the trained adapter."""
    trainable_params: int
    """LoRA parameters trained."""
    seconds: float
    """Wall time of the training loop."""


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    warmup = max(1, cfg.steps // 10)
    return cfg.lr * min(1.0, (step + 1) / warmup)


def _batch_tensors(seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids_BS, mask_BS, _, _ = next(batch_sequences(seqs, len(seqs)))
    labels_BS = ids_BS.masked_fill(mask_BS == 0, -100)
    return ids_BS, mask_BS, labels_BS


@torch.no_grad()
def _mean_loss(model, seqs, batch_size: int) -> float:
    """Token-weighted mean next-token loss over `seqs`."""
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids_BS, mask_BS, labels_BS = _batch_tensors(seqs[i:i + batch_size])
        k = int((labels_BS[:, 1:] != -100).sum())
        if k:
            total += float(model(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS).loss) * k
            n += k
    return total / max(n, 1)


def _check_targets(model, targets: list[str], spec: str) -> None:
    layer0 = dict(layers_of(model)[0].named_modules())
    missing = [t for t in targets if LORA_TYPES[t] not in layer0]
    if missing:
        have = [t for t, p in LORA_TYPES.items() if p in layer0]
        raise UsageError(f"model {spec!r} has no {', '.join(LORA_TYPES[t] for t in missing)} in its layers, so "
                         f"--targets {','.join(missing)} cannot be adapted; it has {','.join(have) or 'none of them'}.")


def finetune(cfg: FinetuneConfig, quiet: bool = False) -> FinetuneResult:
    """Train a LoRA adapter with peft and save it to `cfg.out` (see the module docstring).

    Raises:
        UsageError: --out exists (without --overwrite), a target type the model lacks, an empty corpus.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--out {out} already exists and is not empty. Choose another --out or pass --overwrite.")
    corpus = open_corpus(cfg.text)
    loaded = load_model(cfg.lm.model, quiet=quiet)
    _check_targets(loaded.model, cfg.targets, cfg.lm.model)
    tk = tokenizer_info(loaded.tokenizer)
    n_train, n_eval = cfg.steps * cfg.batch_size, cfg.eval_sequences
    seqs = list(itertools.islice(pack_corpus(corpus, loaded.tokenizer, tk, cfg.text), n_train + n_eval))
    if len(seqs) > n_eval:
        train_seqs, eval_seqs = seqs[:-n_eval], seqs[-n_eval:]
    else:
        log.warning("corpus %s holds only %d sequences of %d tokens: measuring the loss on training data",
                    corpus.name, len(seqs), cfg.text.max_length)
        train_seqs, eval_seqs = seqs, seqs
    if len(train_seqs) < n_train:
        log.info("corpus %s gives %d sequences for %d steps x %d: cycling over them", corpus.name,
                 len(train_seqs), cfg.steps, cfg.batch_size)

    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=0.0,
                      target_modules=[LORA_TYPES[t].rsplit(".", 1)[-1] for t in cfg.targets], task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lcfg)
    model.peft_config["default"].base_model_name_or_path = cfg.lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    model.eval()  # no dropout anywhere; gradients still flow to the LoRA parameters
    before = _mean_loss(model, eval_seqs, cfg.batch_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    stream = itertools.cycle(train_seqs)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="lora-finetune", unit="step", disable=quiet, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        ids_BS, mask_BS, labels_BS = _batch_tensors([next(stream) for _ in range(cfg.batch_size)])
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS).loss
        if not torch.isfinite(loss.detach()):
            raise UsageError(f"the loss became {loss.item()} at step {step}; nothing was saved. "
                             f"Lower --lr (now {cfg.lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    after = _mean_loss(model, eval_seqs, cfg.batch_size)
    log.info("lora-finetune: held-out loss %.4f -> %.4f in %d steps (%.0f s, %s trainable parameters)",
             before, after, cfg.steps, seconds, f"{n_params:,}")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    record = {"config": to_dict(cfg), "model": loaded.info, "corpus": {"spec": corpus.name, "fingerprint": corpus.fingerprint},
              "trainable_params": n_params, "train_sequences": len(train_seqs), "eval_sequences": len(eval_seqs),
              "eval_loss_before": before, "eval_loss_after": after, "losses": losses, "seconds": seconds}
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    save_loss_plot(tmp / "loss.png", losses, before, after)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return FinetuneResult(out, losses, before, after, n_params, seconds)


def save_loss_plot(path: str | Path, losses: list[float], before: float, after: float) -> Path:
    """The training loss per step, with the held-out loss before and after as dashed lines (PNG)."""
    fig, ax = plots.figure(6, 3.5)
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="training loss")
    ax.axhline(before, ls="--", c="grey", lw=1, label=f"held-out before {before:.3f}")
    ax.axhline(after, ls="--", c="C1", lw=1, label=f"held-out after {after:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.legend(fontsize=8)
    return plots.save(fig, path)
