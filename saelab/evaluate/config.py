"""Options of `saelab evaluate` (field = flag = YAML key), checked all at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saelab.config import group, grouped
from saelab.corpus import CorpusConfig
from saelab.errors import raise_all
from saelab.models import ModelConfig

MIN_TOKENS = 2
"""Fewest tokens an evaluation accepts (a variance needs two)."""


@grouped
@dataclass
class EvalConfig:
    """Options of `saelab evaluate` (field = flag = YAML key)."""

    lm: ModelConfig = group(ModelConfig, model=None)
    """--model for the downstream loss (the store's model; needs --corpus), with its --adapter if the
    store was collected with one; --device also holds the SAEs."""
    text: CorpusConfig = group(CorpusConfig, exclude=("max_length", "keep_special"))
    """--corpus to measure the downstream loss on (best held out from training; needs --model). It is
    packed as the store was (its max_length and keep_special)."""

    sae: list[str] = field(default_factory=list)
    """SAE directories to evaluate (e.g. runs/NAME/sae_best); positional on the command line."""
    data: str = ""
    """Activation store to measure reconstruction and sparsity on (a directory or an s3://... URL)."""
    split: Literal["val", "train", "all"] = "val"
    """Store split (val: the chunks each SAE's training held out, by its val_fraction and seed)."""
    tokens: int | None = None
    """Tokens to evaluate per hook point (default: the whole split)."""
    batch_size: int = 4096
    """Tokens (store rows) per batch read from the store."""
    out: str | None = None
    """Directory for eval.json, eval.md and the PNGs (default: no files)."""
    eval_tokens: int = 8192
    """Token predictions to average the downstream loss over."""
    keep_outliers: bool = False
    """Also measure rows collect flagged as massive activations, and splice at such positions."""
    seq_batch: int = 4
    """Sequences (not tokens, unlike --batch-size) per forward pass in the downstream evaluation."""

    def __post_init__(self) -> None:
        problems = []
        if self.split not in ("val", "train", "all"):
            problems.append(f"split must be val, train or all, got {self.split!r}")
        for name in ("batch_size", "eval_tokens", "seq_batch"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens < MIN_TOKENS:
            problems.append(f"tokens must be >= {MIN_TOKENS}, got {self.tokens}")
        if self.lm.adapter is not None and self.lm.model is None:
            problems.append("--adapter is loaded on top of --model; pass --model (and --corpus) too")
        if (self.lm.model is None) != (self.text.corpus is None):
            problems.append("the downstream loss needs both --model and --corpus (got only "
                            f"--{'model' if self.lm.model else 'corpus'})")
        raise_all(problems, "invalid evaluate options")
