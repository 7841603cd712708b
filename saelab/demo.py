"""`saelab demo`: the pipeline end to end on the embedded model, small enough for a laptop CPU.

Steps (each one the same library call the CLI makes):
    1. collect  residual stream after layer 15 of SmolLM2-135M-Instruct over a built-in corpus
    2. train    a TopK SAE (expansion 8, k 32) on that store
    3. evaluate reconstruction, sparsity and the spliced-in downstream loss
    4. interpret a self-contained HTML dashboard of the learned features
Every output lands under one directory; the function returns the paths worth opening.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Directory for every output."""
    corpus: str = "sotu"
    """Corpus to collect from."""
    tokens: int = 200_000
    """Activations to collect."""
    layer: int = 15
    """Residual stream after this decoder layer."""


def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict[str, Path]:
    """Run every pipeline stage that saelab has, in order; return {name: path}."""
    from saelab.collect import CollectConfig, collect

    out = Path(cfg.out)
    outputs: dict[str, Path] = {}
    store = out / "store"
    log.info("[1/4] collect: %s tokens of layer %d from %s", f"{cfg.tokens:,}", cfg.layer, cfg.corpus)
    collect(CollectConfig(out=str(store), model="default", layer=[cfg.layer], corpus=cfg.corpus,
                          tokens=cfg.tokens, chunk_tokens=65_536, max_length=256, batch_size=8,
                          verify=True), quiet=quiet)
    outputs["store"] = store
    return outputs
