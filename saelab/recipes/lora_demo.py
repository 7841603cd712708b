"""`saelab demo --lora`: LoRA adapter SAEs end to end on the embedded model, a few minutes on a CPU.

Steps (each one the library call the matching CLI command makes):
    1. lora-finetune  rank-1 LoRA on gate,up,down,q,k,v,o of SmolLM2-135M-Instruct over champ-cot
    2. collect        the 210-wide A->B vector (`lora:gate,up,down,q,k,v,o`) over the same corpus
    3. train          a BatchTopK SAE with the LoRA defaults (LORA_SAE_DEFAULTS: expansion 16, k 50,
                      batch 1024) on that store
    4. dashboard      examples with context for every feature, beside a heatmap of its decoder norms
                      over layer x adapter type (saelab.interpret.adapters.lora_panels)
Each step is skipped when its output is already complete, so a re-run only finishes what is missing.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

ALL_TYPES = "lora:gate,up,down,q,k,v,o"


def _corpus() -> str:
    """champ-cot (math reasoning) when fetched, else the first fetched built-in corpus."""
    from saelab.corpus import BUILTINS, builtin_path
    from saelab.errors import UsageError

    for name in ("champ-cot", "champ", "sotu", "shakespeare"):
        if name in BUILTINS and builtin_path(name).exists():
            return name
    raise UsageError("the LoRA demo needs a built-in corpus: run `saelab corpora fetch champ-cot` first.")


def run_lora_demo(out: str | Path = "runs/demo-lora", quiet: bool = False, steps: int = 30,
                  tokens: int = 20_000, train_tokens: int = 300_000) -> dict[str, Path]:
    """finetune -> collect -> train -> dashboard under `out`; returns {name: path} of the outputs."""
    from saelab.collect import CollectConfig, collect
    from saelab.finetune import FinetuneConfig, finetune
    from saelab.train.config import LORA_SAE_DEFAULTS
    from saelab.train import TrainConfig, train

    out = Path(out)
    corpus = _corpus()
    adapter, store, sae_run = out / "adapter", out / "store", out / "sae"
    outputs: dict[str, Path] = {}
    log.info("[1/4] lora-finetune: rank 1 on gate,up,down,q,k,v,o, %d steps on %s", steps, corpus)
    if not (adapter / "adapter_model.safetensors").is_file():
        finetune(FinetuneConfig(out=str(adapter), corpus=corpus, rank=1, steps=steps, batch_size=2,
                                max_length=128, lr=2e-3, overwrite=True), quiet=quiet)
    outputs["adapter"] = adapter
    log.info("[2/4] collect: %s tokens of %s", f"{tokens:,}", ALL_TYPES)
    collect(CollectConfig(out=str(store), adapter=str(adapter), hook=[ALL_TYPES], corpus=corpus, tokens=tokens,
                          chunk_tokens=4096, max_length=256, batch_size=8), quiet=quiet)
    outputs["store"] = store
    log.info("[3/4] train: BatchTopK %s", LORA_SAE_DEFAULTS)
    d = LORA_SAE_DEFAULTS
    res = train(TrainConfig(data=str(store), out=str(sae_run), architecture=d["architecture"],
                            expansion_factor=list(d["expansion_factor"]), k=list(d["k"]),
                            batch_size=d["batch_size"], tokens=train_tokens, eval_every=100, eval_tokens=2048,
                            checkpoint_every=0, warmup_steps=20, init_tokens=4096, device="cpu", overwrite=True,
                            val_fraction=0.2), quiet=quiet)
    outputs["sae"] = res.best_dir
    log.info("[4/4] dashboard with adapter heatmaps")
    outputs["dashboard"] = lora_dashboard(res.best_dir, store, out / "dashboard.html", quiet=quiet)
    return outputs


def lora_dashboard(sae_dir: str | Path, store_dir: str | Path, path: str | Path, top_k: int = 10,
                   context: int = 10, max_features: int | None = None, quiet: bool = True) -> Path:
    """The interpretation dashboard of a LoRA SAE (with each feature's layer x adapter heatmap, which
    `build_dashboard` adds for LoRA stores): every live feature, or the `max_features` most frequent."""
    from saelab.interpret import PassConfig, check_pair, load_or_compute_stats
    from saelab.interpret.build import build_dashboard
    from saelab.saes import load_sae
    from saelab.store import load_store

    sae, store = load_sae(sae_dir), load_store(store_dir)
    hook = check_pair(sae, store)
    res = load_or_compute_stats(sae, store, hook, PassConfig(top_k=max(top_k, 20)), sae_dir=sae_dir, quiet=quiet)
    stats = res.stats
    alive = [f for f in range(stats.d_sae) if int(stats.count_F[f]) > 0]
    feats = sorted(alive, key=lambda f: -float(stats.frequency_F[f]))[:max_features] if max_features else alive
    return build_dashboard(sae, store, hook, res, sorted(feats), path, top_k=top_k, context=context,
                           title="saelab LoRA dashboard", sae_name=Path(sae_dir).name)
