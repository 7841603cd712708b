"""Which contexts each feature's explanation is written from and tested on.

Per feature f (rows are global store rows; windows are ±context tokens of the same sequence):

    explain   the top `n_top` activations (stats.top_index_FK) and one example from each of `bands`
              activation-quantile bands of the uniform sample (`quantile_examples`), strongest first
    active    held-out activating windows: `n_test` rows of the uniform sample of active tokens
              (stats.sample_index_FR) not used above, at evenly spaced ranks of the sorted sample,
              so they span the activation distribution rather than its top
    inactive  `n_test` windows centred on uniformly drawn store rows on which the feature is silent
              (f = 0 on every token of the window)

Fuzzing builds its wrongly marked contexts from `active`: the same window with its k marks moved to
k tokens where the feature is silent (`misplace_marks`). Random choices come from
numpy's default_rng((seed, f)), so a run and its resumption pick the same contexts.

Leaves out: prompt text (prompts.py) and model calls (backends.py).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from saelab.interpret.autointerp.prompts import Context, mark_active
from saelab.interpret.examples import build_examples, token_texts
from saelab.interpret.stats import FeatureStats, quantile_examples

log = logging.getLogger(__name__)


class FeatureContexts(NamedTuple):
    """The contexts of one feature."""

    feature: int
    """Feature id."""
    explain: list[Context]
    """Shown to the explainer (marked)."""
    active: list[Context]
    """Held-out windows where the feature fires (marked as it fires)."""
    inactive: list[Context]
    """Windows where the feature is silent (nothing marked)."""


def _random_rows(store, n: int, rng) -> np.ndarray:
    """n distinct uniformly drawn global rows of the store's chunks."""
    chunks = sorted(store.chunks, key=lambda c: c.offset)
    sizes = np.array([c.num_tokens for c in chunks], dtype=np.int64)
    starts = np.array([c.offset for c in chunks], dtype=np.int64)
    total = int(sizes.sum())
    flat = rng.choice(total, size=min(n, total), replace=False)
    cum = np.cumsum(sizes) - sizes
    pos = np.searchsorted(cum, flat, side="right") - 1
    return starts[pos] + (flat - cum[pos])


def sample_contexts(sae, store, hook: str, stats: FeatureStats, feature_ids: list[int], tokenizer,
                    n_top: int = 10, bands: int = 4, n_test: int = 10, context: int = 8,
                    mark_threshold: float = 0.3, seed: int = 0) -> dict[int, FeatureContexts]:
    """Explain / held-out active / silent contexts of every feature (see module doc), one re-encoding pass."""
    qb = quantile_examples(stats, bands, 1)
    requests, where = [], []
    for f in feature_ids:
        top = [g for g in stats.top_index_FK[f, :n_top].tolist() if g >= 0]
        quant = [g for g in qb.index_FQJ[f, :, 0].tolist() if g >= 0 and g not in top]
        explain = top + quant
        used = set(explain)
        sample = [g for g in stats.sample_index_FR[f].tolist() if g >= 0 and g not in used]
        n = min(n_test, len(sample))
        held = [sample[int((j + 0.5) * len(sample) / n)] for j in range(n)] if n else []
        rng = np.random.default_rng((seed, f))
        silent = _random_rows(store, 4 * n_test + 16, rng).tolist()
        for kind, rows in (("explain", explain), ("active", held), ("inactive", silent)):
            requests += [(f, g) for g in rows]
            where += [(f, kind)] * len(rows)
    examples = build_examples(sae, store, hook, requests, context)
    texts = token_texts(tokenizer, {t for e in examples for t in e.context_ids})
    out = {f: FeatureContexts(f, [], [], []) for f in feature_ids}
    values: dict[int, list[float]] = {f: [] for f in feature_ids}
    for (f, kind), ex in zip(where, examples):
        toks = [texts[t] for t in ex.context_ids]
        acts = [float(a) for a in ex.context_acts]
        if kind == "inactive":
            if max(acts, default=0.0) <= 0 and len(out[f].inactive) < n_test:
                out[f].inactive.append(Context(toks, acts, [False] * len(acts), ex.index))
            continue
        ctx = Context(toks, acts, mark_active(acts, mark_threshold), ex.index)
        getattr(out[f], kind).append(ctx)
        if kind == "explain":
            values[f].append(ex.value)
    for f in feature_ids:  # strongest first
        order = np.argsort(-np.asarray(values[f]), kind="stable")
        out[f] = out[f]._replace(explain=[out[f].explain[i] for i in order])
        if len(out[f].inactive) < n_test:
            log.warning("feature %d: only %d of %d sampled windows were silent (a dense feature)",
                        f, len(out[f].inactive), n_test)
    return out


def misplace_marks(ctx: Context, rng) -> Context | None:
    """The window with its k marks moved to k tokens where the feature is silent; None if there are fewer."""
    k = sum(ctx.marked)
    free = [i for i, a in enumerate(ctx.acts) if a <= 0]
    if k == 0 or len(free) < k:
        return None
    pick = set(rng.choice(free, size=k, replace=False).tolist())
    return ctx._replace(marked=[i in pick for i in range(len(ctx.tokens))])
