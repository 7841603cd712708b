"""Downstream loss: splice SAEs into the language model and compare next-token predictions.

Sequences are packed exactly as the store packed them (its max_length, BOS/EOS/pad ids and
keep_special), and for each batch

    keep_BS     = positions the store would keep (BOS and pad excluded unless keep_special)
    x'_BSD      = where(keep_BS, g(x_BSD), x_BSD)       g = SAE reconstruction | 0 | mean_D (store)
    valid_t     = keep_BS[t] and target t+1 is not padding
    CE_*        = mean over valid t of -log softmax(logits'_t)[token_{t+1}]
    KL          = mean over valid t of KL(softmax(logits_clean_t) || softmax(logits'_t))

Positions outside keep_BS are left untouched, because the SAE never saw them in training; so are
positions whose norm marks them as massive activations (||x|| > outlier_ratio x the store's median
row norm, the rule collect flags rows by), unless --keep-outliers.
A `lora:` hook (docs/lora.md) is the concatenation of adapter activations computed at different
depths, so it is replaced in two passes: capture x_BSD in a clean pass, then rerun the model inside
`lora_patch(model, hook, x'_BSD)`. Shapes: B batch, S sequence, D width, T predictions, V vocab.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab import metrics as M
from saelab.corpus import batch_sequences
from saelab.errors import UsageError
from saelab.models import capture, resolve_hooks, splice
from saelab.models.lora import lora_patch


def edit_mask(keep_BS: torch.Tensor, x_BSD: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Positions a splice replaces: kept by the store's rule (not BOS, not padding) and, with a
    limit, not massive activations (||x|| <= limit, as collect flags rows)."""
    rows = keep_BS.to(x_BSD.device)
    if limit is not None:
        rows = rows & (x_BSD.float().norm(dim=-1) <= limit)
    return rows


def _replace_kept(keep_BS: torch.Tensor, g, limit: float | None = None, left: list | None = None) -> Any:
    """fn for models.splice: x -> where(edit_mask, g(x), x), computed only on the edited rows; adds
    the positions it left for their norm to `left[0]`."""
    def fn(x_BSD: torch.Tensor) -> torch.Tensor:
        out = x_BSD.clone()
        rows = edit_mask(keep_BS, x_BSD, limit)
        if left is not None:
            left[0] += int(keep_BS.to(rows.device).sum() - rows.sum())
        out[rows] = g(x_BSD[rows].float()).to(x_BSD.dtype)
        return out
    return fn


def _patched(model, hp, keep_BS: torch.Tensor, g, x_BSD: torch.Tensor | None = None, limit: float | None = None,
             left: list | None = None):
    """Context manager: x -> where(edit_mask, g(x), x) at `hp`. An ordinary hook is spliced in one pass;
    a LoRA hook point (it has `parts`) is patched with that function of its clean activation x_BSD."""
    fn = _replace_kept(keep_BS, g, limit, left)
    if hasattr(hp, "parts"):
        return lora_patch(model, hp, fn(x_BSD))
    return splice(model, hp, fn)


@dataclass
class _LossSums:
    ce: float = 0.0
    kl: float = 0.0


def downstream(model, sequences: Iterable, hook_saes: dict[str, list], means: dict[str, torch.Tensor],
               max_tokens: int, seq_batch: int = 4, quiet: bool = True,
               limits: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Cross-entropy clean / spliced / ablated and KL, averaged over the same token predictions.

    Args:
        model: the causal LM.
        sequences: packed sequences with `input_ids`, `attention_mask`, `keep_mask` (corpus.pack_sequences).
        hook_saes: {hook name: [SAE, ...]} to splice in one at a time.
        means: {hook name: mean activation [D]} for mean-ablation.
        max_tokens: stop after the batch that reaches this many token predictions.
        limits: {hook name: norm above which a position is a massive activation and left unedited}.
    Returns:
        {"n": tokens, "clean": ce, "zero": {hook: ce}, "mean": {hook: ce},
         "sae": {hook: [(ce, kl), ...]}, "left": {hook: positions left unedited}} (means over tokens, nats).
    """
    hps = dict(zip(hook_saes, resolve_hooks(model, list(hook_saes))))
    device = next(model.parameters()).device
    n, clean = 0, 0.0
    zero = {h: 0.0 for h in hook_saes}
    mean = {h: 0.0 for h in hook_saes}
    sae_sums = {h: [_LossSums() for _ in saes] for h, saes in hook_saes.items()}
    limits = limits or {}
    left = {h: [0] for h in hook_saes}
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="downstream", disable=quiet, dynamic_ncols=True)
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
                lim = limits.get(h)
                with _patched(model, hp, keep_BS, lambda x_BD: torch.zeros_like(x_BD), x_BSD, lim, left[h]):
                    zero[h] += float(M.token_ce(logits_T(), targets_T).double().sum())
                with _patched(model, hp, keep_BS, lambda x_BD, m=mean_D: m.expand_as(x_BD), x_BSD, lim):
                    mean[h] += float(M.token_ce(logits_T(), targets_T).double().sum())
                for sae, acc in zip(saes, sae_sums[h]):
                    with _patched(model, hp, keep_BS, lambda x_BD, s=sae: s(x_BD)[0], x_BSD, lim):
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
            "sae": {h: [(a.ce / n, a.kl / n) for a in accs] for h, accs in sae_sums.items()},
            "left": {h: v[0] for h, v in left.items()}}
