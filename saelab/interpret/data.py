"""Plumbing between an SAE, an activation store and the per-feature statistics: checks, the pass, the cache.

Owns:
  * `check_pair(sae, store, hook)`: the SAE was trained on this store's model and hook (else one
    UsageError listing every mismatch) -> the hook name to read.
  * `feature_pass(sae, store, hook, cfg)`: one streaming pass over the store's chunks in global row
    order, `f_BF = sae.encode(x_BD)` per batch, folded into `stats.FeatureAccumulator`; rows
    collect flagged as massive activations are left out unless `PassConfig.keep_outliers`.
  * `load_or_compute_stats(...)`: the same, cached on disk under
        cache_dir / sha256(SAE weights sha256, store id, hook, PassConfig)[:20] / stats.{safetensors,json}
    where the store id is sha256 of store.json and every used chunk's (shard, index, rows, offset,
    sha256 of its activation file). Default cache_dir: SAELAB_HOME/interpret.

Leaves out: the statistics maths (stats.py), contexts and token text (examples.py), rendering.
Shapes: B batch rows, D d_in, F d_sae.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from saelab.errors import UsageError
from saelab.interpret.stats import FeatureAccumulator, FeatureStats, PassConfig, load_stats, save_stats
from saelab.paths import saelab_home
from saelab.store.batches import rows_in_order
from saelab.provenance import resolve_sae_hook, sae_meta, store_problems

log = logging.getLogger(__name__)


def check_pair(sae, store, hook: str | None = None) -> str:
    """Check that `sae` reads activations of this store; return the hook name to use.

    The hook is `hook`, else the SAE's `metadata["hook"]`, else the store's only hook; the checks
    are saelab.provenance's (hook in the store, width = d_in, same model).

    Raises:
        UsageError: listing every mismatch, with how to fix it.
    """
    meta = sae_meta(sae)
    name = resolve_sae_hook(meta, store.hooks, hook)
    problems = store_problems("the SAE", meta, sae.cfg.d_in, name, store.meta, str(store.path))
    if problems:
        raise UsageError(f"SAE and store {store.path} do not belong together:\n"
                         + "\n".join(f"  - {p}" for p in problems)
                         + "\n  Use the store the SAE was trained on (its metadata.json names it).")
    return name


def check_feature_ids(ids, d_sae: int) -> list[int]:
    """Return ids as ints, or raise a UsageError naming every id outside 0 .. d_sae-1."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise UsageError(f"feature id {shown} out of range: this SAE has d_sae={d_sae} features "
                         f"(ids 0 .. {d_sae - 1}).")
    return ids


@torch.no_grad()
def feature_pass(sae, store, hook: str, cfg: PassConfig | None = None, quiet: bool = True) -> FeatureStats:
    """All-feature statistics in one pass over `store` (see stats.py for what is kept)."""
    cfg = cfg or PassConfig()
    acc = FeatureAccumulator(sae.cfg.d_sae, cfg)
    device = next(sae.parameters()).device
    with tqdm(total=store.num_tokens, unit="tok", disable=quiet, desc="features") as bar:
        for offset, x_BD, flagged_B, _ in rows_in_order(store, hook, cfg.batch_size):
            f_BF = sae.encode(x_BD.to(device))
            acc.update_(f_BF, offset, None if cfg.keep_outliers or not flagged_B.any() else ~flagged_B)
            bar.update(x_BD.shape[0])
    if acc.num_tokens == 0:
        raise UsageError(f"store {store.path} has no complete chunks to read; collect some first.")
    return acc.result()


def sae_identity(sae, sae_dir: str | Path | None = None) -> str:
    """sha256 of the SAE weights (metadata's weights_sha256, else hashed from the file or tensors)."""
    sha = (getattr(sae, "metadata", {}) or {}).get("weights_sha256")
    if sha:
        return str(sha)
    if sae_dir is not None and (Path(sae_dir) / "model.safetensors").is_file():
        h = hashlib.sha256((Path(sae_dir) / "model.safetensors").read_bytes())
        return h.hexdigest()
    h = hashlib.sha256()
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def store_identity(store, hook: str) -> str:
    """sha256 of store.json and each chunk's (shard, index, rows, offset, activation-file sha256)."""
    h = hashlib.sha256(json.dumps(store.meta, sort_keys=True).encode())
    for c in sorted(store.chunks, key=lambda c: c.offset):
        entry = (c.files or {}).get(hook, {})
        h.update(f"{c.shard}:{c.index}:{c.num_tokens}:{c.offset}:{entry.get('sha256', '')};".encode())
    return h.hexdigest()


class StatsResult(NamedTuple):
    stats: FeatureStats
    """Per-feature statistics."""
    meta: dict
    """stats.json: key, sae_sha256, store_id, store path, hook, pass config, num_tokens."""
    cache_dir: Path
    """Where they are cached."""


def load_or_compute_stats(sae, store, hook: str, cfg: PassConfig | None = None, sae_dir=None,
                          cache_dir: str | Path | None = None, recompute: bool = False,
                          quiet: bool = True) -> StatsResult:
    """Per-feature statistics from the cache when the SAE, store, hook and settings match; else compute and save."""
    cfg = cfg or PassConfig()
    sae_sha, store_id = sae_identity(sae, sae_dir), store_identity(store, hook)
    settings = dataclasses.asdict(cfg)
    key = hashlib.sha256(json.dumps([sae_sha, store_id, hook, settings], sort_keys=True).encode()).hexdigest()[:20]
    d = Path(cache_dir) if cache_dir is not None else saelab_home() / "interpret"
    d = d / key
    if not recompute and (d / "stats.json").is_file():
        try:
            stats, meta = load_stats(d)
            if meta.get("key") == key:
                log.info("feature statistics from cache %s", d)
                return StatsResult(stats, meta, d)
        except UsageError as e:
            log.warning("ignoring the feature-statistics cache in %s: %s", d, e)
    stats = feature_pass(sae, store, hook, cfg, quiet=quiet)
    left_out = 0 if cfg.keep_outliers else store.flagged_count(hook)
    if left_out:
        log.info("left out %d row(s) that collect flagged as massive activations at %s (--keep-outliers "
                 "reads them)", left_out, hook)
    meta = {"key": key, "sae_sha256": sae_sha, "store_id": store_id, "store": str(store.path),
            "hook": hook, "pass": settings, "d_sae": stats.d_sae, "outlier_rows_left_out": left_out}
    save_stats(stats, d, meta)
    log.info("feature statistics cached in %s", d)
    return StatsResult(stats, dict(meta, num_tokens=stats.num_tokens), d)
