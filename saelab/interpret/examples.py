"""Examples of a feature with their context, token text, and the feature's logit-lens tokens (computing only).

Owns:
  * `build_examples(sae, store, hook, requests, context)`: for each requested (feature, global token
    index) the ±context rows around it *in the same sequence* (rows of one chunk whose
    seqpos[:, 0] equals the token's sequence index), their token ids, and the feature's activation
    on every context token — obtained by re-encoding each needed row once:

        rows_W   = {g + o : |o| <= context, chunk(g + o) = chunk(g), seq(g + o) = seq(g)}
        acts_W   = encode(x_{rows_W})[:, feature]

  * `token_texts(tokenizer, ids)`: id -> text of that single token (as the tokenizer decodes it).
  * `load_store_tokenizer(store)`: the tokenizer named by store.json, via saelab.models.
  * `logit_lens(W_dec_FD, W_U_VD, gain_D, k)`: tokens a feature's decoder direction promotes and
    suppresses when read directly through the unembedding:

        logits_FV = (W_dec_FD ⊙ gain_D) W_U_VD^T

    gain_D is the final norm's elementwise weight. Why it belongs there: the final RMSNorm computes
    y = gain ⊙ x / rms(x); adding ε·d to the residual changes y by ε·gain ⊙ d / rms(x) plus a term
    along x itself, so the direction-specific change in logits is ∝ (gain ⊙ d) W_U^T (the positive
    1/rms(x) factor does not change the ranking). Gemma-style norms scale by (1 + weight).

Leaves out: the streaming statistics (stats.py, data.py) and rendering (dashboard.py).
Shapes: E examples, W window (2·context + 1), F features, D d_in, V vocab, K tokens kept.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from saelab.errors import UsageError

log = logging.getLogger(__name__)


class Example(NamedTuple):
    """One activation of one feature, with its context."""

    feature: int
    """Feature id."""
    value: float
    """The feature's activation on the token."""
    index: int
    """Global token (row) index in the store."""
    token_id: int
    """Token id at that row."""
    seq: int
    """Global sequence index."""
    pos: int
    """Position in the sequence."""
    context_ids: list[int]
    """Token ids of the window, in order (only rows of the same sequence)."""
    context_acts: list[float]
    """The feature's activation on each window token."""
    center: int
    """Position of the example's own token inside the window."""


def _locate(store, index_E: np.ndarray):
    """(chunk position in `chunks`, row in chunk, valid) for global indices; chunks sorted by offset."""
    chunks = sorted(store.chunks, key=lambda c: c.offset)
    starts = np.array([c.offset for c in chunks], dtype=np.int64)
    sizes = np.array([c.num_tokens for c in chunks], dtype=np.int64)
    pos = np.searchsorted(starts, index_E, side="right") - 1
    ok = pos >= 0
    pos_c = np.clip(pos, 0, max(len(chunks) - 1, 0))
    ok &= index_E - starts[pos_c] < sizes[pos_c] if len(chunks) else np.zeros_like(ok)
    return chunks, pos_c, index_E - starts[pos_c], ok


def _read_tokens(store, chunk) -> np.ndarray:
    try:
        return store.read_tokens(chunk)
    except (KeyError, FileNotFoundError):
        raise UsageError(f"store {store.path} has no token ids for chunk {chunk.name}; contexts need them. "
                         "Collect the store again with this saelab (every chunk stores tokens).") from None


@torch.no_grad()
def build_examples(sae, store, hook: str, requests: list[tuple[int, int]], context: int = 10,
                   batch_size: int = 4096) -> list[Example]:
    """Examples for (feature, global index) pairs, in the order given.

    Raises:
        UsageError: an index that is not a row of this store, or a store without token ids.
    """
    if context < 0:
        raise UsageError(f"--context must be >= 0, got {context}.")
    if not requests:
        return []
    feat_E = np.array([r[0] for r in requests], dtype=np.int64)
    g_E = np.array([r[1] for r in requests], dtype=np.int64)
    chunks, c_E, row_E, ok_E = _locate(store, g_E)
    if not ok_E.all():
        bad = g_E[~ok_E][:5].tolist()
        raise UsageError(f"token index {bad} is not a row of store {store.path} ({store.num_tokens:,} rows "
                         "in its chunks). The statistics were computed on another store or shard subset; "
                         "recompute them (--recompute).")
    W = 2 * context + 1
    off_W = np.arange(-context, context + 1)
    row_EW = row_E[:, None] + off_W[None, :]
    size_E = np.array([chunks[c].num_tokens for c in c_E])
    valid_EW = (row_EW >= 0) & (row_EW < size_E[:, None])
    row_EW = np.where(valid_EW, row_EW, row_E[:, None])
    tok_EW = np.zeros((len(g_E), W), dtype=np.int64)
    seq_E, pos_E = np.zeros(len(g_E), np.int64), np.zeros(len(g_E), np.int64)
    for c in np.unique(c_E):
        sel = c_E == c
        tokens, seqpos = _read_tokens(store, chunks[c]), store.read_seqpos(chunks[c])
        tok_EW[sel] = tokens[row_EW[sel]]
        seq_w = seqpos[row_EW[sel], 0]
        seq_E[sel], pos_E[sel] = seqpos[row_E[sel], 0], seqpos[row_E[sel], 1]
        valid_EW[sel] &= seq_w == seq_E[sel][:, None]
    gl_EW = np.where(valid_EW, row_EW + np.array([chunks[c].offset for c in c_E])[:, None], -1)
    acts_EW = _feature_acts(sae, store, hook, chunks, gl_EW, feat_E, valid_EW, batch_size)
    out = []
    for e in range(len(g_E)):
        v = valid_EW[e]
        out.append(Example(
            feature=int(feat_E[e]), value=float(acts_EW[e, context]), index=int(g_E[e]),
            token_id=int(tok_EW[e, context]), seq=int(seq_E[e]), pos=int(pos_E[e]),
            context_ids=tok_EW[e][v].tolist(), context_acts=acts_EW[e][v].tolist(),
            center=int(v[:context].sum()),
        ))
    return out


def _feature_acts(sae, store, hook, chunks, gl_EW, feat_E, valid_EW, batch_size) -> np.ndarray:
    """acts_EW[e, w] = encode(x_{gl_EW[e, w]})[feat_E[e]], encoding each distinct row once."""
    acts_EW = np.zeros(gl_EW.shape, dtype=np.float32)
    rows_P = gl_EW[valid_EW]
    feat_P = np.broadcast_to(feat_E[:, None], gl_EW.shape)[valid_EW]
    uniq, inv_P = np.unique(rows_P, return_inverse=True)
    vals_P = np.zeros(len(rows_P), dtype=np.float32)
    _, c_U, r_U, _ = _locate(store, uniq)
    device = next(sae.parameters()).device
    for c in np.unique(c_U):
        u_idx = np.nonzero(c_U == c)[0]  # uniq is sorted, so these rows are ascending
        acts = store.read_activations(chunks[c], hook)
        for s in range(0, len(u_idx), batch_size):
            part = u_idx[s:s + batch_size]
            x = torch.from_numpy(np.asarray(acts[r_U[part]], dtype=np.float32)).to(device)
            f_BF = sae.encode(x).float().cpu()
            in_part = (inv_P >= part[0]) & (inv_P <= part[-1])
            vals_P[in_part] = f_BF[torch.from_numpy(inv_P[in_part] - part[0]),
                                   torch.from_numpy(feat_P[in_part])].numpy()
    acts_EW[valid_EW] = vals_P
    return acts_EW


def load_store_tokenizer(store):
    """The tokenizer of the store's model (store.json `model.spec`), via `saelab.models.load_tokenizer`.

    Raises:
        UsageError: the store names no model, or its tokenizer cannot be loaded here (pass --model).
    """
    from saelab.models import load_tokenizer

    spec = (store.meta.get("model") or {}).get("spec")
    if not spec:
        raise UsageError(f"store {store.path} does not name its model (store.json model.spec), so its token "
                         "ids cannot be decoded. Pass --model with the model the store was collected from.")
    return load_tokenizer(spec)


def token_texts(tokenizer, ids) -> dict[int, str]:
    """id -> the text of that single token.

    Raises:
        UsageError: an id outside the tokenizer's vocabulary (store and tokenizer do not match).
    """
    ids = sorted({int(i) for i in ids})
    n = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise UsageError(f"token ids {bad[:5]} are outside the tokenizer's vocabulary (size {n}): the store "
                         "was collected with another tokenizer. Pass --model with the store's model.")
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts))


def final_norm_gain(model) -> torch.Tensor | None:
    """The final norm's elementwise weight as a gain (1 + w for Gemma-style norms), or None."""
    inner = getattr(model, "get_decoder", lambda: None)() or getattr(model, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float().cpu()
    return 1.0 + w if "gemma" in type(norm).__name__.lower() else w


class LogitLens(NamedTuple):
    top_ids_FK: torch.Tensor
    """Token ids most promoted by each feature's decoder direction."""
    top_values_FK: torch.Tensor
    """Their logit contributions."""
    bottom_ids_FK: torch.Tensor
    """Token ids most suppressed (most negative first)."""
    bottom_values_FK: torch.Tensor
    """Their logit contributions."""


@torch.no_grad()
def logit_lens(W_dec_FD: torch.Tensor, W_U_VD: torch.Tensor, gain_D: torch.Tensor | None = None,
               k: int = 10, block: int = 256) -> LogitLens:
    """Top-k promoted / suppressed tokens of logits_FV = (W_dec_FD ⊙ gain_D) W_U_VD^T, in feature blocks."""
    if W_dec_FD.shape[1] != W_U_VD.shape[1]:
        raise UsageError(f"the SAE decodes to width {W_dec_FD.shape[1]} but the model's unembedding reads "
                         f"width {W_U_VD.shape[1]}: the logit lens needs an SAE on the residual stream of "
                         "this model.")
    W_U_VD = W_U_VD.float()
    d_FD = W_dec_FD.float() * (gain_D.float() if gain_D is not None else 1.0)
    k = min(k, W_U_VD.shape[0])
    parts = []
    for s in range(0, d_FD.shape[0], block):
        logits = d_FD[s:s + block] @ W_U_VD.T
        t, b = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((t.indices, t.values, b.indices, b.values))
    return LogitLens(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def model_logit_lens(model, W_dec_FD: torch.Tensor, k: int = 10) -> LogitLens:
    """`logit_lens` with the model's output embedding and final-norm gain."""
    W_U = model.get_output_embeddings().weight.detach()
    return logit_lens(W_dec_FD.detach().cpu(), W_U.cpu(), final_norm_gain(model), k)


def feature_examples(sae, store, hook: str, stats, feature_ids: list[int], top_k: int = 10,
                     bands=None, context: int = 10) -> dict[int, dict[str, list]]:
    """Top-k and quantile-band examples (with context) of each feature, in one re-encoding pass.

    Args:
        stats: FeatureStats of this store (top_k <= its K).
        bands: QuantileBands from `quantile_examples(stats, ...)`, or None for top-k only.
    Returns:
        feature -> {"top": [Example, ...] (descending), "quant": [[Example, ...] per band]}.
    """
    requests, where = [], []
    for f in feature_ids:
        for k, g in enumerate(stats.top_index_FK[f, :top_k].tolist()):
            if g >= 0:
                requests.append((f, g))
                where.append((f, "top", 0))
        if bands is not None:
            for b in range(bands.index_FQJ.shape[1]):
                for g in bands.index_FQJ[f, b].tolist():
                    if g >= 0:
                        requests.append((f, g))
                        where.append((f, "quant", b))
    out = {f: {"top": [], "quant": [[] for _ in range(0 if bands is None else bands.index_FQJ.shape[1])]}
           for f in feature_ids}
    for (f, kind, b), ex in zip(where, build_examples(sae, store, hook, requests, context)):
        (out[f]["top"] if kind == "top" else out[f]["quant"][b]).append(ex)
    return out
