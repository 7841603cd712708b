"""`evaluate(cfg)`: the whole evaluation of one or more SAEs, and its checks.

Checks each SAE against the store (and the model), runs the reconstruction pass per hook and
split (reconstruction.py), the downstream pass when a model and a corpus are given
(downstream.py), and writes eval.json, eval.md and PNGs (report.py). It computes no metric itself.

    ce_recovered      = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    ce_recovered_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean)

Deliberately left out: the choice of evaluation text (pass a held-out corpus), sampling-based metrics.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from saelab import metrics as M
from saelab.corpus import open_corpus, pack_sequences, resolve_corpus
from saelab.errors import UsageError, raise_all
from saelab.evaluate.config import EvalConfig
from saelab.evaluate.downstream import downstream
from saelab.evaluate.reconstruction import EvalResult, accumulate, mean_of_rows, store_batches, summarise
from saelab.evaluate.report import write_outputs
from saelab.models import load_model
from saelab.provenance import (model_problems, resolve_sae_hook, sae_meta, store_model_problems, store_problems,
                               trained_split)
from saelab.saes import load_sae
from saelab.store import load_store

log = logging.getLogger(__name__)


def _names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = "/".join(Path(p).parts[-2:])
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def check_compatible(saes: Sequence, names: Sequence[str], store_meta: dict, store_path: str,
                     model_info: dict | None = None) -> list[str]:
    """Hooks of the SAEs, after checking each SAE against the store (and the model, when given);
    the rules are saelab.provenance's.

    Raises:
        UsageError: one message listing every mismatch, naming both sides.
    """
    store_hooks = [h["name"] for h in store_meta.get("hooks", [])]
    problems, hooks = [], []
    for sae, name in zip(saes, names):
        meta = sae_meta(sae)
        try:
            hook = resolve_sae_hook(meta, store_hooks, name=name)
        except UsageError as e:
            problems.append(str(e))
            hooks.append(None)
            continue
        hooks.append(hook)
        problems += store_problems(name, meta, int(sae.W_dec_FD.shape[1]), hook, store_meta, store_path)
        if model_info is not None:
            problems += model_problems(name, meta, model_info)
    if model_info is not None:
        problems += store_model_problems(store_meta, store_path, model_info)
    raise_all_problems(problems)
    return hooks  # type: ignore[return-value]


def raise_all_problems(problems: list[str]) -> None:
    raise_all(problems, "these SAEs do not match the data they are evaluated on")


def _load_saes(saes: Sequence, device: str) -> tuple[list, list[str], list[str]]:
    objs, paths = [], []
    for s in saes:
        if isinstance(s, (str, Path)):
            objs.append(load_sae(s, device=device))
            paths.append(str(s))
        else:
            objs.append(s.to(device).eval())
            paths.append("")
    names = _names([p or f"sae{i}" for i, p in enumerate(paths)])
    return objs, paths, names


def evaluate_saes(saes: Sequence, store, split: str = "val", tokens: int | None = None, batch_size: int = 4096,
             model=None, corpus=None, eval_tokens: int = 8192, seq_batch: int = 4, out: str | Path | None = None,
             device: str = "cpu", quiet: bool = False, adapter: str | Path | None = None,
             dtype: str = "float32", keep_outliers: bool = False, shuffle_seed: int | None = None) -> list[EvalResult]:
    """Evaluate SAEs (directories or objects) on a store and, with a model and corpus, on the model's
    next-token loss. `evaluate(cfg)` is the same from an EvalConfig.

    Args:
        saes: SAE directories (or SAE objects).
        store: store directory or an opened store (`saelab.load_store`).
        split: val, train or all.
        tokens: tokens per hook point (None: the whole split).
        model: a model spec for `load_model`, or a LoadedModel; None skips the downstream loss.
        adapter: peft LoRA adapter directory loaded on top of a model spec (`load_model(adapter=)`).
        corpus: a corpus spec for `resolve_corpus`, or an object with `.documents()`.
        out: write eval.json, eval.md and PNGs here.
        keep_outliers: also use the rows (and splice the positions) flagged as massive activations.
        shuffle_seed: read the corpus's documents in this seeded order (None: file order).
    Returns:
        One EvalResult per SAE, in the order given.
    Raises:
        UsageError: SAEs that do not match the store or model, a split too small to evaluate.
    """
    EvalConfig(split=split, tokens=tokens, batch_size=batch_size, eval_tokens=eval_tokens, seq_batch=seq_batch,
               model="m" if model is not None else None, corpus="c" if corpus is not None else None)
    if not saes:
        raise UsageError("no SAE to evaluate: pass one or more SAE directories.")
    st = _open_store(store)
    store_path = str(getattr(st, "root", getattr(st, "path", store)))
    objs, paths, names = _load_saes(saes, device)
    loaded = None
    if model is not None:
        loaded = _load_model(model, device, quiet, adapter, dtype)
    hooks = check_compatible(objs, names, st.meta, store_path, loaded.info if loaded is not None else None)

    # SAEs on the same hook and the same train/val split share one pass over the store.
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(hooks):
        groups.setdefault((h, *((0.05, 0) if split == "all" else trained_split(sae_meta(objs[i])))), []).append(i)
    by_hook: dict[str, list[int]] = {}
    results: list[EvalResult | None] = [None] * len(objs)
    means: dict[str, torch.Tensor] = {}
    for (hook, val_fraction, seed), idx in groups.items():
        log.info("evaluating %d SAE(s) on %s, split %s", len(idx), hook, split)
        mean_D = mean_of_rows(store_batches(st, hook, split, batch_size, val_fraction, seed), tokens, keep_outliers)
        batches = store_batches(st, hook, split, batch_size, val_fraction, seed, positions=True)
        sums, rows = accumulate([objs[i] for i in idx], batches, tokens, device=device, quiet=quiet,
                                desc=f"evaluate {hook}", keep_outliers=keep_outliers, mean_D=mean_D)
        _report_rows(hook, split, rows, keep_outliers)
        for i, s in zip(idx, sums):
            results[i] = summarise(names[i], paths[i], objs[i], hook, split, s, rows)
        by_hook.setdefault(hook, []).extend(idx)
        means.setdefault(hook, M.mean_activation(sums[0].recon))

    if loaded is not None:
        seqs = _eval_sequences(corpus, loaded.tokenizer, st.meta, shuffle_seed)
        limits = {h: None if keep_outliers else outlier_limit(st, h) for h in by_hook}
        d = downstream(loaded.model, seqs, {h: [objs[i] for i in idx] for h, idx in by_hook.items()}, means,
                       max_tokens=eval_tokens, seq_batch=seq_batch, quiet=quiet, limits=limits)
        for hook, idx in by_hook.items():
            for i, (ce_sae, kl) in zip(idx, d["sae"][hook]):
                r = results[i]
                r.ce_clean, r.ce_sae, r.ce_zero, r.ce_mean = d["clean"], ce_sae, d["zero"][hook], d["mean"][hook]
                r.ce_recovered = M.ce_loss_recovered(d["clean"], ce_sae, d["zero"][hook])
                r.ce_recovered_mean = M.ce_loss_recovered(d["clean"], ce_sae, d["mean"][hook])
                r.kl, r.downstream_tokens, r.downstream_left = kl, d["n"], d["left"][hook]
    final = [r for r in results if r is not None]
    if out is not None:
        write_outputs(final, out, context={"store": store_path, "split": split,
                                           "model": (loaded.info if loaded is not None else None),
                                           "corpus": str(getattr(corpus, "name", corpus)) if corpus is not None else None})
    return final


def evaluate(cfg: EvalConfig, quiet: bool = False) -> list[EvalResult]:
    """Evaluate the SAE directories `cfg.sae` as `cfg` says (the stage entry, as `train(cfg)`)."""
    if not cfg.data:
        raise UsageError("no store given: pass --data STORE (the activation store the SAEs were trained on).")
    return evaluate_saes(cfg.sae, cfg.data, split=cfg.split, tokens=cfg.tokens, batch_size=cfg.batch_size,
                         model=cfg.lm.model, corpus=open_corpus(cfg.text) if cfg.text.corpus else None,
                         eval_tokens=cfg.eval_tokens, seq_batch=cfg.seq_batch, out=cfg.out, device=cfg.lm.device,
                         quiet=quiet, adapter=cfg.lm.adapter, dtype=cfg.lm.dtype, keep_outliers=cfg.keep_outliers,
                         shuffle_seed=cfg.text.document_seed if cfg.text.shuffle_documents else None)


def _open_store(store):
    if hasattr(store, "meta") and hasattr(store, "read_activations"):
        return store
    return load_store(store)


def _load_model(model, device: str, quiet: bool, adapter=None, dtype: str = "float32"):
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "info"):
        if adapter is not None:
            raise UsageError("evaluate: adapter= applies to a model spec; a LoadedModel is used as it is. "
                             "Load it with load_model(spec, adapter=DIR) instead.")
        return model
    return load_model(str(model), dtype=dtype, device=device, quiet=quiet,
                      adapter=None if adapter is None else str(adapter))


def outlier_limit(st, hook: str) -> float | None:
    """The norm above which a position counts as a massive activation: the store's outlier ratio times
    its median row norm (None for a store that records neither)."""
    med, ratio = st.norm_median(hook), st.meta.get("outlier_ratio")
    return None if med is None or ratio is None else float(ratio) * med


CONCENTRATION = 0.5
"""Warn when the top 1% of rows hold more than this share of the variance."""


def _report_rows(hook: str, split: str, rows, keep_outliers: bool) -> None:
    if rows.flagged:
        log.info("%s, split %s: %d row(s) flagged as massive activations %s", hook, split, rows.flagged,
                 "kept (--keep-outliers)" if keep_outliers else "left out (--keep-outliers keeps them)")
    share = M.variance_share_of_top(rows.dev_N, 0.01)
    if share > CONCENTRATION:
        log.warning("%s, split %s: the top 1%% of rows hold %.0f%% of the variance, so FVU and MSE measure "
                    "little but those rows; read the per-token relative error and the downstream numbers. "
                    "(A store collected with an older saelab packed windows without BOS: collect it again.)",
                    hook, split, 100 * share)


def _eval_sequences(corpus, tokenizer, store_meta: dict, shuffle_seed: int | None = None) -> Iterator:
    """Pack the corpus as the store was packed (max_length, special ids, keep_special)."""
    c = resolve_corpus(corpus) if isinstance(corpus, (str, Path)) else corpus
    tokz = store_meta.get("tokenizer", {})
    return pack_sequences(c.documents(shuffle_seed), tokenizer, int(store_meta.get("max_length", 256)),
                          bos_id=tokz.get("bos_id"), eos_id=tokz.get("eos_id"), pad_id=tokz.get("pad_id"),
                          keep_special=bool(store_meta.get("keep_special", False)))
