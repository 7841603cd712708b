"""Evaluate trained SAEs: reconstruction, sparsity, dictionary geometry and downstream loss.

Owns the wiring: it reads activations from a store, runs each SAE over them, feeds the sums of
`metrics.py` (where every equation lives), splices SAEs into the language model through
`models.splice` for the downstream numbers, and writes `eval.json`, `eval.md` and PNGs.
It computes no metric itself and draws nothing itself (`plots.py`).

Shapes: B tokens in a batch, S sequence, D d_in, F d_sae, V vocab.

Reconstruction and sparsity: one pass over the store's `split` per hook point; every SAE on that hook
sees the same batches. Inputs and reconstructions are compared in raw activation space (a saved SAE
has its input normalisation folded into its weights).

Downstream (when a model and a corpus are given): sequences are packed exactly as the store packed
them (its max_length, BOS/EOS/pad ids and keep_special), and for each batch

    keep_BS     = positions the store would keep (BOS and pad excluded unless keep_special)
    x'_BSD      = where(keep_BS, g(x_BSD), x_BSD)       g = SAE reconstruction | 0 | mean_D (store)
    valid_t     = keep_BS[t] and target t+1 is not padding
    CE_*        = mean over valid t of -log softmax(logits'_t)[token_{t+1}]
    KL          = mean over valid t of KL(softmax(logits_clean_t) || softmax(logits'_t))
    ce_recovered      = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    ce_recovered_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean)

Positions outside keep_BS are left untouched, because the SAE never saw them in training.
A `lora:` hook (docs/lora.md) is the concatenation of adapter activations computed at different
depths, so it is replaced in two passes: capture x_BSD in a clean pass, then rerun the model inside
`lora_patch(model, hook, x'_BSD)` (zero-ablation: x' = 0 on kept rows; mean-ablation: the store mean).
Deliberately left out: the choice of evaluation text (pass a held-out corpus), sampling-based metrics.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab import metrics as M
from saelab.errors import UsageError

log = logging.getLogger(__name__)

MIN_TOKENS = 2


@dataclass
class EvalResult:
    """Every number `saelab evaluate` reports for one SAE (also the rows of eval.json)."""

    name: str
    """Short label: the SAE directory name (made unique among the evaluated SAEs)."""
    path: str
    """Where the SAE was loaded from ('' for an in-memory SAE)."""
    architecture: str
    """relu, topk, batchtopk or jumprelu."""
    hook: str
    """Hook point the SAE reads and is spliced into."""
    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents."""
    split: str
    """Store split the reconstruction metrics were measured on."""
    n_tokens: int
    """Tokens the reconstruction and sparsity metrics average over."""
    mse: float
    """Mean over tokens and dimensions of (x - x_hat)^2, raw space."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the set."""
    explained_variance: float
    """1 - fvu."""
    cosine: float
    """Cosine similarity of x and x_hat per token, averaged over tokens."""
    rel_norm: float
    """||x_hat|| / ||x|| per token, averaged over tokens."""
    l0: float
    """Mean number of active latents per token."""
    dead: int
    """Latents never active on the evaluated tokens."""
    dead_frac: float
    """dead / d_sae."""
    dense: int
    """Latents active on more than 10% of the evaluated tokens."""
    dense_frac: float
    """dense / d_sae."""
    l0_hist: list[int]
    """l0_hist[k] = tokens with exactly k active latents (trailing zeros trimmed)."""
    density_hist: dict
    """Histogram of log10 firing frequency of live latents: edges, counts, dead."""
    decoder_norm_mean: float
    """Mean norm of the decoder directions (rows of W_dec_FD)."""
    decoder_norm_min: float
    """Smallest decoder-direction norm."""
    decoder_norm_max: float
    """Largest decoder-direction norm."""
    max_cos_mean: float
    """Mean over latents of the largest cosine similarity to any other decoder direction."""
    max_cos_max: float
    """Largest cosine similarity between two different decoder directions."""
    max_cos_hist: dict
    """Histogram of each latent's max cosine to the others: edges, counts."""
    ce_clean: float | None = None
    """Model's next-token cross-entropy without any splice (nats/token)."""
    ce_sae: float | None = None
    """Cross-entropy with the SAE reconstruction spliced in at `hook`."""
    ce_zero: float | None = None
    """Cross-entropy with `hook` zero-ablated."""
    ce_mean: float | None = None
    """Cross-entropy with `hook` replaced by the store's mean activation."""
    ce_recovered: float | None = None
    """(ce_zero - ce_sae) / (ce_zero - ce_clean): 1 = as good as the clean model."""
    ce_recovered_mean: float | None = None
    """(ce_mean - ce_sae) / (ce_mean - ce_clean): the same against mean-ablation."""
    kl: float | None = None
    """KL(clean || spliced) of next-token distributions, mean over tokens (nats)."""
    downstream_tokens: int | None = None
    """Token predictions the downstream numbers average over."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------ streaming pass


class _Acc:
    """Running sums for one SAE."""

    def __init__(self):
        self.recon: M.ReconSums | None = None
        self.sparsity: M.SparsitySums | None = None


def _take(batches: Iterable[torch.Tensor], max_tokens: int | None) -> Iterator[torch.Tensor]:
    seen = 0
    for x_BD in batches:
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            x_BD = x_BD[: max_tokens - seen]
        seen += x_BD.shape[0]
        yield x_BD


def accumulate(saes: Sequence[torch.nn.Module], batches: Iterable[torch.Tensor], max_tokens: int | None = None,
               device: str = "cpu", quiet: bool = True, desc: str = "evaluate") -> list[tuple[M.ReconSums, M.SparsitySums]]:
    """Run every SAE over the same batches and sum the reconstruction and sparsity statistics.

    Args:
        saes: SAEs with `forward(x_BD) -> (x_hat_BD, f_BF)`, all of the same d_in.
        batches: float tensors x_BD (raw activations).
        max_tokens: stop after this many tokens (None: all).
    Returns:
        One (ReconSums, SparsitySums) per SAE; n = 0 when no batch came.
    """
    accs = [_Acc() for _ in saes]
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for x_BD in _take(batches, max_tokens):
            x_BD = x_BD.to(device=device, dtype=torch.float32)
            for sae, acc in zip(saes, accs):
                x_hat_BD, f_BF = sae(x_BD)
                acc.recon = M.add_recon(acc.recon, M.recon_sums(x_BD, x_hat_BD))
                acc.sparsity = M.add_sparsity(acc.sparsity, M.sparsity_sums(f_BF))
            bar.update(x_BD.shape[0])
    bar.close()
    out = []
    for sae, acc in zip(saes, accs):
        if acc.recon is None:
            d_in, d_sae = sae.W_dec_FD.shape[1], sae.W_dec_FD.shape[0]
            z = torch.zeros((), dtype=torch.float64)
            acc.recon = M.ReconSums(0, torch.zeros(d_in, dtype=torch.float64), z, z, z, z)
            acc.sparsity = M.SparsitySums(0, torch.zeros(d_sae, dtype=torch.int64),
                                          torch.zeros(d_sae + 1, dtype=torch.int64))
        out.append((acc.recon, acc.sparsity))
    return out


def dictionary_geometry(W_dec_FD: torch.Tensor) -> dict[str, Any]:
    """Decoder norms and max-cosine-to-others summary of one SAE (fields of EvalResult)."""
    norms_F = M.decoder_norms(W_dec_FD.detach())
    if W_dec_FD.shape[0] < 2:  # a single direction has no other to compare with
        return {"decoder_norm_mean": float(norms_F.mean()), "decoder_norm_min": float(norms_F.min()),
                "decoder_norm_max": float(norms_F.max()), "max_cos_mean": math.nan, "max_cos_max": math.nan,
                "max_cos_hist": M.histogram(torch.zeros(0), bins=50, lo=0.0, hi=1.0)}
    max_cos_F = M.max_cos_to_others(W_dec_FD.detach())
    return {
        "decoder_norm_mean": float(norms_F.mean()), "decoder_norm_min": float(norms_F.min()),
        "decoder_norm_max": float(norms_F.max()),
        "max_cos_mean": float(max_cos_F.mean()), "max_cos_max": float(max_cos_F.max()),
        "max_cos_hist": M.histogram(max_cos_F, bins=50, lo=0.0, hi=1.0),
    }


def summarise(name: str, path: str, sae, hook: str, split: str, recon: M.ReconSums,
              sparsity: M.SparsitySums) -> EvalResult:
    """Turn one SAE's sums into an EvalResult (no downstream numbers yet).

    Raises:
        UsageError: too few tokens, or activations that do not vary.
    """
    if recon.n < MIN_TOKENS:
        raise UsageError(
            f"only {recon.n} token(s) to evaluate {name} on (split {split!r}, hook {hook!r}); evaluation "
            f"needs at least {MIN_TOKENS}. Collect more tokens, or pass --split all to use the whole store."
        )
    try:
        r = M.reconstruction_metrics(recon)
    except ValueError as e:
        raise UsageError(f"cannot evaluate {name} on split {split!r} of hook {hook!r}: {e}. "
                         "Check that the store holds real activations (saelab verify STORE).") from None
    s = M.sparsity_metrics(sparsity)
    hist = sparsity.l0_hist.tolist()
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    return EvalResult(
        name=name, path=path, architecture=str(getattr(sae.cfg, "architecture", type(sae).__name__)),
        hook=hook, d_in=int(sae.W_dec_FD.shape[1]), d_sae=int(sae.W_dec_FD.shape[0]), split=split,
        n_tokens=recon.n, mse=r.mse, fvu=r.fvu, explained_variance=r.explained_variance,
        cosine=r.cosine, rel_norm=r.rel_norm, l0=s.l0, dead=s.dead, dead_frac=s.dead_frac,
        dense=s.dense, dense_frac=s.dense_frac, l0_hist=hist,
        density_hist=M.log10_density_histogram(s.freq_F), **dictionary_geometry(sae.W_dec_FD),
    )


# ------------------------------------------------------------------------------------ downstream


def _replace_kept(keep_BS: torch.Tensor, g) -> Any:
    """fn for models.splice: x -> where(keep, g(x), x), computed only on kept rows."""
    def fn(x_BSD: torch.Tensor) -> torch.Tensor:
        out = x_BSD.clone()
        rows = keep_BS.to(x_BSD.device)
        out[rows] = g(x_BSD[rows].float()).to(x_BSD.dtype)
        return out
    return fn


def _patched(model, hp, keep_BS: torch.Tensor, g, x_BSD: torch.Tensor | None = None):
    """Context manager: x -> where(keep, g(x), x) at `hp`. An ordinary hook is spliced in one pass; a
    LoRA hook point (it has `parts`) is patched with that function of its clean activation x_BSD."""
    from saelab.models import splice
    from saelab.models.lora import lora_patch

    if hasattr(hp, "parts"):
        return lora_patch(model, hp, _replace_kept(keep_BS, g)(x_BSD))
    return splice(model, hp, _replace_kept(keep_BS, g))


@dataclass
class _LossSums:
    ce: float = 0.0
    kl: float = 0.0


def downstream(model, sequences: Iterable, hook_saes: dict[str, list], means: dict[str, torch.Tensor],
               max_tokens: int, seq_batch: int = 4, quiet: bool = True) -> dict[str, Any]:
    """Cross-entropy clean / spliced / ablated and KL, averaged over the same token predictions.

    Args:
        model: the causal LM.
        sequences: packed sequences with `input_ids`, `attention_mask`, `keep_mask` (corpus.pack_sequences).
        hook_saes: {hook name: [SAE, ...]} to splice in one at a time.
        means: {hook name: mean activation [D]} for mean-ablation.
        max_tokens: stop after the batch that reaches this many token predictions.
    Returns:
        {"n": tokens, "clean": ce, "zero": {hook: ce}, "mean": {hook: ce},
         "sae": {hook: [(ce, kl), ...]}} (means over tokens, nats).
    """
    from saelab.models import capture, resolve_hooks

    hps = dict(zip(hook_saes, resolve_hooks(model, list(hook_saes))))
    device = next(model.parameters()).device
    n, clean = 0, 0.0
    zero = {h: 0.0 for h in hook_saes}
    mean = {h: 0.0 for h in hook_saes}
    sae_sums = {h: [_LossSums() for _ in saes] for h, saes in hook_saes.items()}
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="downstream", disable=quiet, dynamic_ncols=True)
    from saelab.corpus import batch_sequences

    batches = batch_sequences(sequences, seq_batch)
    with torch.inference_mode():
        for ids_BS, mask_BS, keep_BS, _ in batches:
            valid_BS = torch.zeros_like(keep_BS)
            valid_BS[:, :-1] = keep_BS[:, :-1] & mask_BS[:, 1:].bool()
            if not valid_BS.any():
                continue
            targets_T = ids_BS[:, 1:][valid_BS[:, :-1]].to(device)

            def logits_T(ids=ids_BS, mask=mask_BS, valid=valid_BS):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                return out.logits[valid.to(device)].float()

            clean_TV = logits_T()
            clean += float(M.token_ce(clean_TV, targets_T).double().sum())
            for h, saes in hook_saes.items():
                hp, mean_D = hps[h], means[h].to(device)
                x_BSD = capture(model, [hp], ids_BS, mask_BS)[hp.name] if hasattr(hp, "parts") else None
                with _patched(model, hp, keep_BS, lambda x_BD: torch.zeros_like(x_BD), x_BSD):
                    zero[h] += float(M.token_ce(logits_T(), targets_T).double().sum())
                with _patched(model, hp, keep_BS, lambda x_BD, m=mean_D: m.expand_as(x_BD), x_BSD):
                    mean[h] += float(M.token_ce(logits_T(), targets_T).double().sum())
                for sae, acc in zip(saes, sae_sums[h]):
                    with _patched(model, hp, keep_BS, lambda x_BD, s=sae: s(x_BD)[0], x_BSD):
                        spliced_TV = logits_T()
                    acc.ce += float(M.token_ce(spliced_TV, targets_T).double().sum())
                    acc.kl += float(M.token_kl(clean_TV, spliced_TV).double().sum())
            n += len(targets_T)
            bar.update(len(targets_T))
            if n >= max_tokens:
                break
    bar.close()
    if n == 0:
        raise UsageError("the evaluation corpus gave no token to predict (every position is BOS, EOS or "
                         "padding). Pass a corpus with text in it to --corpus.")
    return {"n": n, "clean": clean / n, "zero": {h: v / n for h, v in zero.items()},
            "mean": {h: v / n for h, v in mean.items()},
            "sae": {h: [(a.ce / n, a.kl / n) for a in accs] for h, accs in sae_sums.items()}}


# ------------------------------------------------------------------------------------ the whole run


@dataclass
class EvalConfig:
    """Options of `saelab evaluate` (field = flag = YAML key)."""

    data: str = ""
    """Activation store to measure reconstruction and sparsity on."""
    split: Literal["val", "train", "all"] = "val"
    """Store split (val: the chunks each SAE's training held out, by its val_fraction and seed)."""
    tokens: int | None = None
    """Tokens to evaluate per hook point (default: the whole split)."""
    batch_size: int = 4096
    """Tokens per batch read from the store."""
    out: str | None = None
    """Directory for eval.json, eval.md and the PNGs (default: no files)."""
    model: str | None = None
    """Language model for the downstream loss (same as the store's; needs --corpus)."""
    adapter: str | None = None
    """peft LoRA adapter directory to load on top of --model (the store's, for a store collected with one)."""
    corpus: str | None = None
    """Text to measure the downstream loss on (best held out from training; needs --model)."""
    eval_tokens: int = 8192
    """Token predictions to average the downstream loss over."""
    seq_batch: int = 4
    """Sequences per forward pass in the downstream evaluation."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        from saelab.errors import raise_all

        problems = []
        if self.split not in ("val", "train", "all"):
            problems.append(f"split must be val, train or all, got {self.split!r}")
        for name in ("batch_size", "eval_tokens", "seq_batch"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens < MIN_TOKENS:
            problems.append(f"tokens must be >= {MIN_TOKENS}, got {self.tokens}")
        if self.adapter is not None and self.model is None:
            problems.append("--adapter is loaded on top of --model; pass --model (and --corpus) too")
        if (self.model is None) != (self.corpus is None):
            problems.append("the downstream loss needs both --model and --corpus (got only "
                            f"--{'model' if self.model else 'corpus'})")
        raise_all(problems, "invalid evaluate options")


def _names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = "/".join(Path(p).parts[-2:])
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _sha(info: dict | None) -> str | None:
    return (info or {}).get("sha256")


def _describe(info: dict | None) -> str:
    info = info or {}
    sha = str(info.get("sha256") or "?")
    return f"{info.get('name') or info.get('spec') or '?'} (sha256 {sha[:12]})"


def _hook_of(sae, name: str, store_hooks: dict[str, int]) -> str | None:
    hook = (getattr(sae, "metadata", None) or {}).get("hook")
    if hook is None and len(store_hooks) == 1:
        hook = next(iter(store_hooks))
        log.warning("%s has no hook in its metadata; assuming the store's only hook %r", name, hook)
    return hook


def check_compatible(saes: Sequence, names: Sequence[str], store_meta: dict, store_path: str,
                     model_info: dict | None = None) -> list[str]:
    """Hooks of the SAEs, after checking each SAE against the store (and the model, when given).

    Raises:
        UsageError: one message listing every mismatch, naming both sides.
    """
    store_hooks = {h["name"]: int(h["width"]) for h in store_meta.get("hooks", [])}
    store_model = store_meta.get("model")
    problems, hooks = [], []
    for sae, name in zip(saes, names):
        hook = _hook_of(sae, name, store_hooks)
        hooks.append(hook)
        d_in = int(sae.W_dec_FD.shape[1])
        if hook is None:
            problems.append(f"{name} records no hook point in its metadata.json and the store holds "
                            f"several ({', '.join(store_hooks)}); re-save it with metadata {{'hook': NAME}}")
        elif hook not in store_hooks:
            problems.append(f"{name} was trained on hook {hook!r}, but store {store_path} holds "
                            f"{', '.join(map(repr, store_hooks))}; evaluate it on a store of that hook")
        elif store_hooks[hook] != d_in:
            problems.append(f"{name} has d_in {d_in}, but hook {hook!r} of store {store_path} has width "
                            f"{store_hooks[hook]}")
        sae_model = (getattr(sae, "metadata", None) or {}).get("model")
        if _sha(sae_model) and _sha(store_model) and _sha(sae_model) != _sha(store_model):
            problems.append(f"{name} was trained on activations of model {_describe(sae_model)}, but store "
                            f"{store_path} was collected from {_describe(store_model)}")
        if model_info is not None and _sha(sae_model) and _sha(sae_model) != _sha(model_info):
            problems.append(f"{name} was trained on activations of model {_describe(sae_model)}, but --model "
                            f"is {_describe(model_info)}; pass the model the SAE was trained on")
    if model_info is not None and _sha(store_model) and _sha(store_model) != _sha(model_info):
        problems.append(f"store {store_path} was collected from model {_describe(store_model)}, but --model "
                        f"is {_describe(model_info)}")
    store_ad, model_ad = store_meta.get("adapter"), (model_info or {}).get("adapter")
    if model_info is not None and _sha(store_ad) != _sha(model_ad):
        problems.append(f"store {store_path} was collected with adapter {(store_ad or {}).get('path', 'none')}, but "
                        f"the model has {'adapter ' + str(model_ad.get('path')) if model_ad else 'none'}; pass the "
                        f"store's adapter with --adapter{' ' + str(store_ad.get('path')) if store_ad else ''}"
                        f"{'' if store_ad else ' (none: drop --adapter)'}")
    raise_all_problems(problems)
    return hooks  # type: ignore[return-value]


def raise_all_problems(problems: list[str]) -> None:
    from saelab.errors import raise_all

    raise_all(problems, "these SAEs do not match the data they are evaluated on")


def _load_saes(saes: Sequence, device: str) -> tuple[list, list[str], list[str]]:
    from saelab.saes import load_sae

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


def evaluate(saes: Sequence, store, split: str = "val", tokens: int | None = None, batch_size: int = 4096,
             model=None, corpus=None, eval_tokens: int = 8192, seq_batch: int = 4, out: str | Path | None = None,
             device: str = "cpu", quiet: bool = False, adapter: str | Path | None = None) -> list[EvalResult]:
    """Evaluate SAEs on a store and, with a model and corpus, on the model's next-token loss.

    Args:
        saes: SAE directories (or SAE objects).
        store: store directory or an opened store (`saelab.load_store`).
        split: val, train or all.
        tokens: tokens per hook point (None: the whole split).
        model: a model spec for `load_model`, or a LoadedModel; None skips the downstream loss.
        adapter: peft LoRA adapter directory loaded on top of a model spec (`load_model(adapter=)`).
        corpus: a corpus spec for `resolve_corpus`, or an object with `.documents()`.
        out: write eval.json, eval.md and PNGs here.
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
        loaded = _load_model(model, device, quiet, adapter)
    hooks = check_compatible(objs, names, st.meta, store_path, loaded.info if loaded is not None else None)

    # SAEs on the same hook and the same train/val split share one pass over the store.
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(hooks):
        groups.setdefault((h, *_split_of(objs[i], split)), []).append(i)
    by_hook: dict[str, list[int]] = {}
    results: list[EvalResult | None] = [None] * len(objs)
    means: dict[str, torch.Tensor] = {}
    for (hook, val_fraction, seed), idx in groups.items():
        log.info("evaluating %d SAE(s) on %s, split %s", len(idx), hook, split)
        batches = store_batches(st, hook, split, batch_size, val_fraction=val_fraction, seed=seed)
        sums = accumulate([objs[i] for i in idx], batches, tokens, device=device, quiet=quiet,
                          desc=f"evaluate {hook}")
        for i, (recon, sparsity) in zip(idx, sums):
            results[i] = summarise(names[i], paths[i], objs[i], hook, split, recon, sparsity)
        by_hook.setdefault(hook, []).extend(idx)
        means.setdefault(hook, M.mean_activation(sums[0][0]))

    if loaded is not None:
        seqs = _eval_sequences(corpus, loaded.tokenizer, st.meta)
        d = downstream(loaded.model, seqs, {h: [objs[i] for i in idx] for h, idx in by_hook.items()}, means,
                       max_tokens=eval_tokens, seq_batch=seq_batch, quiet=quiet)
        for hook, idx in by_hook.items():
            for i, (ce_sae, kl) in zip(idx, d["sae"][hook]):
                r = results[i]
                r.ce_clean, r.ce_sae, r.ce_zero, r.ce_mean = d["clean"], ce_sae, d["zero"][hook], d["mean"][hook]
                r.ce_recovered = M.ce_loss_recovered(d["clean"], ce_sae, d["zero"][hook])
                r.ce_recovered_mean = M.ce_loss_recovered(d["clean"], ce_sae, d["mean"][hook])
                r.kl, r.downstream_tokens = kl, d["n"]
    final = [r for r in results if r is not None]
    if out is not None:
        from saelab.evaluate_report import write_outputs

        write_outputs(final, out, context={"store": store_path, "split": split,
                                           "model": (loaded.info if loaded is not None else None),
                                           "corpus": str(getattr(corpus, "name", corpus)) if corpus is not None else None})
    return final


def _open_store(store):
    if hasattr(store, "meta") and hasattr(store, "read_activations"):
        return store
    from saelab.store import load_store

    return load_store(store)


def _split_of(sae, split: str) -> tuple[float, int]:
    """(val_fraction, seed) the SAE was trained with, so "val" means the chunks it never saw."""
    train_cfg = (getattr(sae, "metadata", None) or {}).get("training") or {}
    if split == "all":
        return 0.05, 0
    return float(train_cfg.get("val_fraction", 0.05)), int(train_cfg.get("seed", 0))


def store_batches(st, hook: str, split: str, batch_size: int, val_fraction: float = 0.05,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """float32 batches x_BD of one hook over the chunks of `split`, in store order (no shuffling:
    the metrics are sums, so order does not matter, and a fixed order makes --tokens reproducible)."""
    for chunk in st.select(split, val_fraction, seed):
        a_ND = st.read_activations(chunk, hook)
        for i in range(0, a_ND.shape[0], batch_size):
            yield torch.from_numpy(np.asarray(a_ND[i:i + batch_size], dtype=np.float32))


def _load_model(model, device: str, quiet: bool, adapter=None):
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "info"):
        if adapter is not None:
            raise UsageError("evaluate: adapter= applies to a model spec; a LoadedModel is used as it is. "
                             "Load it with load_model(spec, adapter=DIR) instead.")
        return model
    from saelab.models import load_model

    return load_model(str(model), device=device, quiet=quiet, adapter=None if adapter is None else str(adapter))


def _eval_sequences(corpus, tokenizer, store_meta: dict) -> Iterator:
    """Pack the corpus as the store was packed (max_length, special ids, keep_special)."""
    from saelab.corpus import pack_sequences, resolve_corpus

    c = resolve_corpus(corpus) if isinstance(corpus, (str, Path)) else corpus
    tokz = store_meta.get("tokenizer", {})
    return pack_sequences(c.documents(), tokenizer, int(store_meta.get("max_length", 256)),
                          bos_id=tokz.get("bos_id"), eos_id=tokz.get("eos_id"), pad_id=tokz.get("pad_id"),
                          keep_special=bool(store_meta.get("keep_special", False)))
