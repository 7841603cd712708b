"""Options of `saelab intervene` (field = flag = YAML key; the SAE directories are positional)."""
from __future__ import annotations

from dataclasses import dataclass, field

from saelab.config import group, grouped
from saelab.corpus import CorpusConfig
from saelab.models import ModelConfig


@grouped
@dataclass
class InterveneConfig:
    """Settings of `saelab intervene` (the SAE directories are positional)."""

    lm: ModelConfig = group(ModelConfig)
    """The model the SAEs were trained on (--adapter: needed for SAEs on a lora: hook)."""
    text: CorpusConfig = group(CorpusConfig, max_length=256, exclude=("keep_special",))
    """--corpus to measure the effect on; needed unless --prompt is given."""

    ablate: list[str] = field(default_factory=list)
    """Features set to 0: `12,845`; `I/F` targets the I-th SAE only (0-based), plain F every SAE."""
    steer: list[str] = field(default_factory=list)
    """Add alpha * decoder direction: `77:4.0,5:-2` (feature:alpha; `I/F:alpha` for one SAE)."""
    clamp: list[str] = field(default_factory=list)
    """Set a feature to a value: `5:2.0` (feature:value)."""
    scale: list[str] = field(default_factory=list)
    """Multiply a feature: `9:0.5` (feature:factor)."""
    hook: str | None = None
    """Hook point for every SAE (default: the hook in each SAE's metadata.json)."""
    keep_outliers: bool = False
    """Also edit positions whose norm marks them as massive activations (left alone by default, like BOS)."""
    keep_error: bool = True
    """Add the SAE's reconstruction error back, so only the edited features change the model."""
    tokens: int = 20_000
    """Token predictions to measure the effect on."""
    batch_size: int = 8
    """Sequences (not tokens) per forward pass."""
    top_tokens: int = 10
    """Tokens listed per direction in the probability-change table."""
    n_boot: int = 2000
    """Bootstrap resamples for the loss-change interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    prompt: str | None = None
    """Print clean and edited greedy generations of this prompt."""
    max_new_tokens: int = 40
    """Tokens to generate for --prompt."""
    chat: bool = False
    """Wrap --prompt in the model's chat template."""
