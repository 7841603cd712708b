"""Assemble a dashboard: statistics pass -> examples -> token text -> logit lens -> one HTML file.

The one place that wires `stats`, `examples` and `dashboard` together, used by `saelab dashboard`,
`saelab demo` and the LoRA demo. Stores of LoRA adapter activations (their manifest carries
`slices`) get each feature's decoder-norm heatmap over layer x adapter type as an extra panel.
"""
from __future__ import annotations

from pathlib import Path

from saelab.interpret.dashboard import dashboard_data, render_html, write_html
from saelab.interpret.data import StatsResult
from saelab.interpret.examples import feature_examples, load_store_tokenizer, model_logit_lens, token_texts
from saelab.interpret.stats import quantile_examples


def build_dashboard(sae, store, hook: str, res: StatsResult, feature_ids: list[int], out: str | Path,
                    top_k: int = 10, context: int = 10, bands: int = 4, per_band: int = 2, tokenizer=None,
                    model=None, title: str = "saelab dashboard", sae_name: str = "",
                    autointerp: dict[int, dict] | None = None) -> Path:
    """Write the dashboard of `feature_ids` to `out` and return its path.

    Args:
        res: the cached statistics pass (`load_or_compute_stats`).
        tokenizer: for token text; default: the store's model's tokenizer.
        model: a causal LM for logit-lens tokens; None leaves them out.
        autointerp: feature -> autointerp record (explanation and scores) to show.
    """
    stats = res.stats
    qb = quantile_examples(stats, bands, per_band)
    ex = feature_examples(sae, store, hook, stats, feature_ids, top_k, qb, context)
    tok = tokenizer if tokenizer is not None else load_store_tokenizer(store)
    ids = {i for d in ex.values() for e in d["top"] + [e for b in d["quant"] for e in b] for i in e.context_ids}
    lens = rows = None
    if model is not None:
        lens = model_logit_lens(model, sae.W_dec_FD[feature_ids], k=10)
        rows = {f: r for r, f in enumerate(feature_ids)}
        ids |= set(lens.top_ids_FK.flatten().tolist()) | set(lens.bottom_ids_FK.flatten().tolist())
    texts = token_texts(tok, ids)
    panels = _lora_panels(sae, store, hook, feature_ids)
    model_name = (store.meta.get("model") or {}).get("name", "?")
    subtitle = (f"{sae_name} · {hook} · {model_name} · {stats.num_tokens:,} tokens · "
                f"{len(feature_ids)} of {stats.d_sae} features")
    if res.meta.get("outlier_rows_left_out"):
        subtitle += f" · {res.meta['outlier_rows_left_out']:,} massive-activation rows left out"
    pc = res.meta.get("pass", {})
    data = dashboard_data(stats, feature_ids, ex, texts, lens, rows, qb, panels=panels, title=title,
                          subtitle=subtitle, hist_range=(pc.get("hist_log_min", -3.0), pc.get("hist_log_max", 3.0)),
                          autointerp=autointerp)
    return write_html(out, render_html(data))


def _lora_panels(sae, store, hook, feature_ids):
    """Layer x adapter-type heatmaps of decoder norms, for stores of LoRA adapter activations."""
    if not store.meta.get("slices"):
        return None
    from saelab.interpret.adapters import lora_panels, store_slices

    slices = store_slices(store.meta, hook)
    return lora_panels(sae.W_dec_FD.detach().cpu(), slices, feature_ids) if slices else None
