"""What an edit does: loss change with a bootstrap CI over sequences, KL, moved tokens, generations.

Effect of an edit on a batch of packed sequences, over valid target positions t (target not
padding, position kept):

    dloss_s = mean_t [ CE(edited_t) - CE(clean_t) ]       per sequence s; CI: bootstrap over s
    KL      = mean_t KL(softmax(clean_t) || softmax(edited_t))
    dprob_v = mean_t [ softmax(edited_t)_v - softmax(clean_t)_v ]     per token id v

`generate_pair` prints clean vs edited greedy generations. Shapes: B batch, S sequence, V vocab,
T token predictions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.corpus import batch_sequences
from saelab.errors import UsageError
from saelab.intervene.edits import Edit, intervene
from saelab.statistics import CI, bootstrap_mean_ci

log = logging.getLogger(__name__)



class TokenChange(NamedTuple):
    """How the probability of one vocabulary token moved, averaged over predictions."""

    token_id: int
    text: str
    """The token decoded on its own (repr-safe for tables)."""
    delta_prob: float
    """mean_t (p_edited - p_clean)."""
    clean_prob: float
    """mean_t p_clean."""
    edited_prob: float
    """mean_t p_edited."""


@dataclass
class Effect:
    """What an edit does to next-token predictions on a set of sequences."""

    n_sequences: int
    """Sequences with at least one valid prediction (the bootstrap's units)."""
    n_tokens: int
    """Valid token predictions."""
    loss_clean: float
    """Mean CE of the clean model over the valid predictions (nats)."""
    loss_edited: float
    """Mean CE with the edits spliced in."""
    delta_loss: CI
    """mean over sequences of the per-sequence mean CE change, with a bootstrap CI over sequences."""
    kl: float
    """mean_t KL(clean || edited), nats."""
    increased: list[TokenChange]
    """Tokens whose mean probability rose most."""
    decreased: list[TokenChange]
    """Tokens whose mean probability fell most."""
    per_sequence_delta: list[float] = field(repr=False, default_factory=list)
    """dloss_s of each sequence (what the bootstrap resamples)."""
    left_outliers: int = 0
    """Kept positions left unedited because their norm marks them as massive activations."""
    """dloss_s for each sequence (for pooling across runs)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["delta_loss"] = self.delta_loss._asdict()
        d["increased"] = [t._asdict() for t in self.increased]
        d["decreased"] = [t._asdict() for t in self.decreased]
        return d


def _token_text(tokenizer, i: int) -> str:
    if tokenizer is None:
        return f"<{i}>"
    try:
        return tokenizer.decode([i])
    except Exception:  # a tokenizer that cannot decode a lone id: show the id
        return f"<{i}>"


def measure_effect(model, edits: Edit | Sequence[Edit], sequences: Iterable, keep_error: bool = True,
                   max_tokens: int | None = None, batch_size: int = 8, tokenizer=None, top_tokens: int = 10,
                   level: float = 0.95, n_boot: int = 2000, seed: int = 0, quiet: bool = True,
                   keep_outliers: bool = False) -> Effect:
    """Compare the edited model with the clean one on packed sequences (module docstring).

    Args:
        model: the causal LM.
        edits: the feature edits (see `intervene`); applied at kept positions only.
        sequences: `corpus.PackedSequence`s (anything with input_ids, attention_mask, keep_mask).
        max_tokens: stop after the batch that reaches this many valid predictions (None: all).
        tokenizer: to show token texts (None: ids only).
        top_tokens: how many tokens to list per direction.
        keep_outliers: also edit positions that are massive activations (see `intervene`).
    Raises:
        UsageError: no valid prediction in the sequences.
    """
    return measure_effects(model, [edits], sequences, keep_error, max_tokens, batch_size, tokenizer,
                           top_tokens, level, n_boot, seed, quiet, keep_outliers)[0]


class _Sums:
    def __init__(self):
        self.ce, self.kl, self.per_seq, self.dprob_V = 0.0, 0.0, [], None
        self.left = {"bos": 0, "outliers": 0}


def measure_effects(model, edit_sets: Sequence, sequences: Iterable, keep_error: bool = True,
                    max_tokens: int | None = None, batch_size: int = 8, tokenizer=None, top_tokens: int = 10,
                    level: float = 0.95, n_boot: int = 2000, seed: int = 0, quiet: bool = True,
                    keep_outliers: bool = False) -> list[Effect]:
    """`measure_effect` for several edit sets on the same sequences, sharing one clean pass per batch."""
    device = next(model.parameters()).device
    n_tok, ce_clean = 0, 0.0
    p_clean_V = None
    sums = [_Sums() for _ in edit_sets]
    bar = tqdm(total=max_tokens, unit="tok", desc="effect", disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for ids_BS, mask_BS, keep_BS, _ in batch_sequences(sequences, batch_size):
            valid_BS = torch.zeros_like(keep_BS)
            valid_BS[:, :-1] = keep_BS[:, :-1] & mask_BS[:, 1:].bool()
            if not valid_BS.any():
                continue
            fwd = dict(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device), use_cache=False)
            clean_BSV = model(**fwd).logits.float()
            rows = [b for b in range(ids_BS.shape[0]) if valid_BS[b].any()]
            clean_rows = []
            for b in rows:
                v_S = valid_BS[b].to(device)
                tgt_T = ids_BS[b, 1:].to(device)[v_S[:-1]]
                lc_TV = F.log_softmax(clean_BSV[b][v_S], -1)
                cc_T = -lc_TV.gather(1, tgt_T[:, None])[:, 0]
                clean_rows.append((v_S, tgt_T, lc_TV, cc_T))
                ce_clean += float(cc_T.double().sum())
                c_V = lc_TV.exp().double().sum(0).cpu()
                p_clean_V = c_V if p_clean_V is None else p_clean_V + c_V
                n_tok += int(v_S.sum())
                bar.update(int(v_S.sum()))
            del clean_BSV
            for edits, acc in zip(edit_sets, sums):
                with intervene(model, edits, keep_error=keep_error, mask_BS=keep_BS, keep_outliers=keep_outliers,
                               left=acc.left):
                    edit_BSV = model(**fwd).logits.float()
                for b, (v_S, tgt_T, lc_TV, cc_T) in zip(rows, clean_rows):
                    le_TV = F.log_softmax(edit_BSV[b][v_S], -1)
                    ce_T = -le_TV.gather(1, tgt_T[:, None])[:, 0]
                    acc.ce += float(ce_T.double().sum())
                    pc_TV = lc_TV.exp()
                    acc.kl += float((pc_TV * (lc_TV - le_TV)).sum(-1).double().sum())
                    acc.per_seq.append(float((ce_T - cc_T).double().mean()))
                    d_V = (le_TV.exp() - pc_TV).double().sum(0).cpu()
                    acc.dprob_V = d_V if acc.dprob_V is None else acc.dprob_V + d_V
            if max_tokens is not None and n_tok >= max_tokens:
                break
    bar.close()
    if n_tok == 0:
        raise UsageError("the corpus gave no token to predict (every position is BOS, EOS or padding). "
                         "Pass a corpus with text in it.")
    p_clean_V = p_clean_V / n_tok
    out = []
    for acc in sums:
        dprob_V = acc.dprob_V / n_tok
        k = min(top_tokens, dprob_V.numel())

        def changes(order, d=dprob_V) -> list[TokenChange]:
            return [TokenChange(int(i), _token_text(tokenizer, int(i)), float(d[i]), float(p_clean_V[i]),
                                float(p_clean_V[i] + d[i])) for i in order]

        out.append(Effect(
            n_sequences=len(acc.per_seq), n_tokens=n_tok, loss_clean=ce_clean / n_tok, loss_edited=acc.ce / n_tok,
            delta_loss=bootstrap_mean_ci(acc.per_seq, level=level, n_boot=n_boot, seed=seed), kl=acc.kl / n_tok,
            increased=changes(torch.topk(dprob_V, k).indices.tolist()),
            decreased=changes(torch.topk(-dprob_V, k).indices.tolist()), per_sequence_delta=acc.per_seq,
            left_outliers=acc.left["outliers"],
        ))
    return out


# ------------------------------------------------------------------------------------ generation


class Generations(NamedTuple):
    """Greedy continuations of one prompt."""

    prompt: str
    clean: str
    edited: str


def generate_pair(model, tokenizer, prompt: str, edits: Edit | Sequence[Edit], max_new_tokens: int = 40,
                  keep_error: bool = True, chat: bool = False) -> Generations:
    """Greedy generations without and with the edits (the edits apply to the prompt and every new token).

    Args:
        chat: wrap the prompt in the tokenizer's chat template as one user turn.
    """
    device = next(model.parameters()).device
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat needs a tokenizer with a chat template; this model's has none. "
                             "Drop --chat to use the prompt as plain text.")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    ids = enc["input_ids"].to(device)
    mask = enc.get("attention_mask", torch.ones_like(ids)).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen(use_cache: bool = True) -> str:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, use_cache=use_cache)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    clean = gen()
    with intervene(model, edits, keep_error=keep_error) as hps:
        edited = gen(use_cache=not any(hasattr(hp, "parts") for hp in hps))  # lora: hooks need two passes
    return Generations(prompt, clean, edited)
