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
    epochs: int = 3
    """Passes of SAE training over the collected activations."""
    dashboard_features: int = 256
    """Features shown in the dashboard (the most frequent ones)."""


def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict[str, Path]:
    """Run every pipeline stage that saelab has, in order; return {name: path}."""
    from saelab.collect import CollectConfig, collect

    out = Path(cfg.out)
    outputs: dict[str, Path] = {}
    store = out / "store"
    log.info("[1/4] collect: %s tokens of layer %d from %s", f"{cfg.tokens:,}", cfg.layer, cfg.corpus)
    collect(CollectConfig(out=str(store), model="default", layer=[cfg.layer], corpus=cfg.corpus,
                          tokens=cfg.tokens, chunk_tokens=16_384, max_length=256, batch_size=8,
                          verify=True), quiet=quiet)
    outputs["store"] = store

    from saelab.train import TrainConfig, train

    log.info("[2/4] train: TopK SAE, expansion 8, k 32")
    result = train(TrainConfig(data=str(store), out=str(out / "sae"), architecture="topk", expansion_factor=[8],
                               k=[32], batch_size=2048, epochs=cfg.epochs, lr=1e-3, warmup_steps=20,
                               eval_every=50, checkpoint_every=100, device="cpu", overwrite=True), quiet=quiet)
    outputs["sae"] = Path(result.best_dir)

    from saelab.evaluate import EvalConfig, evaluate

    log.info("[3/4] evaluate: reconstruction, sparsity and the downstream loss with the SAE spliced in")
    evaluate(EvalConfig(sae=[str(result.best_dir)], data=str(store), split="val", model="default",
                        corpus=cfg.corpus, eval_tokens=4096, out=str(out / "eval")), quiet=quiet)
    outputs["evaluation"] = out / "eval" / "eval.md"

    from saelab.interpret import check_pair, load_or_compute_stats
    from saelab.interpret.build import build_dashboard
    from saelab.saes import load_sae
    from saelab.store import load_store

    log.info("[4/4] interpret: feature statistics and the dashboard of the %d most frequent features",
             cfg.dashboard_features)
    sae, st = load_sae(result.best_dir), load_store(store)
    hook = check_pair(sae, st)
    res = load_or_compute_stats(sae, st, hook, sae_dir=result.best_dir, quiet=quiet)
    alive = (res.stats.count_F > 0).nonzero().flatten()
    order = res.stats.frequency_F[alive].argsort(descending=True)
    feats = sorted(alive[order][: cfg.dashboard_features].tolist())
    # built before autointerp (minutes with the embedded explainer) so that an interrupted demo still
    # leaves a page; demo_autointerp rewrites it with the explanations
    outputs["dashboard"] = build_dashboard(sae, st, hook, res, feats, out / "dashboard.html",
                                           sae_name="demo TopK SAE")
    from saelab.interpret.autointerp import demo_autointerp  # explain 6 of them; the dashboard shows it

    outputs.update(demo_autointerp(sae, st, hook, res, feats, out, sae_dir=result.best_dir, quiet=quiet))
    return outputs
