"""Interpretation: per-feature statistics, examples with context, and the HTML dashboard.

    stats.py      the one streaming pass's maths: counts, histograms, running top-k, reservoir (tensors only)
    data.py       SAE/store checks, the pass over a store, the on-disk cache
    examples.py   contexts, token text, logit lens (computing only)
    dashboard.py  one self-contained HTML page (rendering only; templates/dashboard.html)

Typical use (what the CLI does):

    res = load_or_compute_stats(sae, store, check_pair(sae, store))
    bands = quantile_examples(res.stats)
    ex = feature_examples(sae, store, hook, res.stats, [12, 40], top_k=10, bands=bands)
"""
from saelab.interpret.dashboard import HeatmapPanel, dashboard_data, render_html, safe_json, write_html
from saelab.interpret.data import (
    StatsResult, check_feature_ids, check_pair, feature_pass, load_or_compute_stats,
)
from saelab.interpret.examples import (
    Example, LogitLens, build_examples, feature_examples, load_store_tokenizer, logit_lens, model_logit_lens,
    token_texts,
)
from saelab.interpret.stats import (
    FeatureAccumulator, FeatureStats, PassConfig, QuantileBands, load_stats, quantile_examples, save_stats,
)

__all__ = [
    "HeatmapPanel", "dashboard_data", "render_html", "safe_json", "write_html",
    "StatsResult", "check_feature_ids", "check_pair", "feature_pass", "load_or_compute_stats",
    "Example", "LogitLens", "build_examples", "feature_examples", "load_store_tokenizer", "logit_lens",
    "model_logit_lens", "token_texts",
    "FeatureAccumulator", "FeatureStats", "PassConfig", "QuantileBands", "load_stats", "quantile_examples",
    "save_stats",
]
