"""Render feature statistics and examples into one self-contained HTML file (rendering only).

Owns the page data layout and its safe embedding; computing lives in stats.py / examples.py.

The page (templates/dashboard.html: inline CSS + JS, no network, a Content-Security-Policy that
forbids every fetch) reads JSON from `<script type="application/json">` blocks:

    saelab-meta       title, subtitle, num_tokens, hist = [log10 lo, log10 hi, bins]
    saelab-features   columnar summary of every listed feature: id, freq, max, mean, count, nex
                      (+ expl, det, fuzz when autointerp results are given: explanation text and the
                      detection / fuzzing balanced accuracy, null where a feature has none)
    saelab-vocab      token id -> text for every token shown
    fd-<id>           one feature's detail, parsed only when the feature is opened (lazy):
                      hist = [first bin, counts...], top = [example...], quant = [{band, lo, hi,
                      examples}], lens = {pos, neg: [[token id, logit]...]}, panels = [panel...],
                      ai = {explanation, scores: {task: {ba, auroc, from, n}}, shuffled: {source,
                      explanation, scores}} (autointerp)
    example           [value, global token index, center position, token ids, activations]

Safety (token text and model-written explanations alike): JSON is written with `<`, `>`, `&`,
U+2028 and U+2029 as \\u escapes (`safe_json`), so no text can close the script element or open a
comment (`</script>`, `<!--<script>`); the page puts text into the DOM only through `textContent` /
`title`, never `innerHTML`.

Extra per-feature panels (e.g. a decoder-weight heatmap over layer × adapter type) are plain
dicts `{"kind": "heatmap", "title", "rows", "cols", "values"}` (`HeatmapPanel.to_json()`), drawn by
the page's generic renderer; pass them as `panels={feature_id: [panel, ...]}`.
"""
from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from saelab.interpret.examples import Example, LogitLens
from saelab.interpret.stats import FeatureStats, QuantileBands

log = logging.getLogger(__name__)

_DATA_MARK = "<!--__SAELAB_DATA__-->"
_TITLE_MARK = "__SAELAB_TITLE__"
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def safe_json(obj: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no raw <, >, &, U+2028, U+2029.

    Non-finite floats become null (JSON has no NaN).
    """
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in _ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _r(v: float) -> float | None:
    """4 significant digits: enough to read, small in the file."""
    v = float(v)
    return float(f"{v:.4g}") if math.isfinite(v) else None


@dataclass
class HeatmapPanel:
    """An extra per-feature panel: a heatmap of `values` [rows][cols] (None = empty cell)."""

    title: str
    rows: list[str]
    cols: list[str]
    values: list[list[float | None]]

    def to_json(self) -> dict:
        return {"kind": "heatmap", "title": self.title, "rows": list(map(str, self.rows)),
                "cols": list(map(str, self.cols)),
                "values": [[None if v is None else _r(v) for v in row] for row in self.values]}


def _example_json(ex: Example) -> list:
    return [_r(ex.value), ex.index, ex.center, ex.context_ids, [_r(a) for a in ex.context_acts]]


def _hist_json(counts: list[int]) -> list[int]:
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return [0]
    return [nz[0]] + counts[nz[0]:nz[-1] + 1]


@dataclass
class DashboardData:
    """Everything the page shows; build it with `dashboard_data`."""

    meta: dict
    features: dict
    vocab: dict
    details: dict[int, dict]


def dashboard_data(stats: FeatureStats, feature_ids: list[int], examples: dict[int, dict[str, list]],
                   texts: dict[int, str], lens: LogitLens | None = None, lens_rows: dict[int, int] | None = None,
                   bands: QuantileBands | None = None, panels: dict[int, list] | None = None,
                   title: str = "saelab dashboard", subtitle: str = "", hist_range=(-3.0, 3.0),
                   autointerp: dict[int, dict] | None = None) -> DashboardData:
    """Assemble the page data.

    Args:
        examples: feature -> {"top": [Example...], "quant": [[Example...] per band]}.
        texts: token id -> text for every token id in the examples and the logit lens.
        lens: logit-lens rows; `lens_rows[feature]` is the feature's row in it.
        bands: quantile band edges (`quantile_examples`), for the band labels.
        panels: feature -> extra panels (HeatmapPanel or its dict).
        autointerp: feature -> autointerp record (`saelab.interpret.autointerp.load_results`).
    """
    freq, mean = stats.frequency_F, stats.mean_F
    cols = {"id": [], "freq": [], "max": [], "mean": [], "count": [], "nex": []}
    details = {}
    for f in feature_ids:
        ex = examples.get(f, {})
        top, quant = ex.get("top", []), ex.get("quant", [])
        cols["id"].append(f)
        cols["freq"].append(_r(freq[f]))
        cols["max"].append(_r(stats.max_F[f]))
        cols["mean"].append(_r(mean[f]))
        cols["count"].append(int(stats.count_F[f]))
        cols["nex"].append(len(top) + sum(len(b) for b in quant))
        d: dict[str, Any] = {"hist": _hist_json(stats.hist_FH[f].tolist()), "top": [_example_json(e) for e in top]}
        qd = []
        for b, band in enumerate(quant):
            if not band:
                continue
            lo, hi = (bands.edges_FQ2[f, b].tolist() if bands is not None else
                      (min(e.value for e in band), max(e.value for e in band)))
            qd.append({"band": b + 1, "lo": _r(lo), "hi": _r(hi), "examples": [_example_json(e) for e in band]})
        d["quant"] = qd
        if lens is not None and lens_rows is not None and f in lens_rows:
            r = lens_rows[f]
            d["lens"] = {"pos": [[int(i), _r(v)] for i, v in zip(lens.top_ids_FK[r].tolist(), lens.top_values_FK[r].tolist())],
                         "neg": [[int(i), _r(v)] for i, v in zip(lens.bottom_ids_FK[r].tolist(), lens.bottom_values_FK[r].tolist())]}
        if panels and f in panels:
            d["panels"] = [p.to_json() if hasattr(p, "to_json") else p for p in panels[f]]
        if autointerp:
            rec = autointerp.get(f) or {}
            for col, task in (("det", "detection"), ("fuzz", "fuzzing")):
                cols.setdefault(col, []).append(_r(((rec.get("scores") or {}).get(task) or {})
                                                   .get("balanced_accuracy", math.nan)))
            cols.setdefault("expl", []).append(rec.get("explanation"))
            if rec:
                d["ai"] = _autointerp_json(rec)
        details[f] = d
    meta = {"title": title, "subtitle": subtitle, "num_tokens": stats.num_tokens,
            "hist": [hist_range[0], hist_range[1], int(stats.hist_FH.shape[1])]}
    return DashboardData(meta=meta, features=cols, vocab={int(k): v for k, v in texts.items()}, details=details)


def _task_scores(scores: dict | None) -> dict:
    return {task: {"ba": _r(s.get("balanced_accuracy", math.nan)), "auroc": _r(s.get("auroc", math.nan)),
                   "from": s.get("auroc_from"), "n": s.get("n")}
            for task, s in (scores or {}).items()}


def _autointerp_json(rec: dict) -> dict:
    """A feature's explanation and scores, as the page shows them."""
    sh = rec.get("shuffled") or {}
    return {"explanation": rec.get("explanation", ""), "scores": _task_scores(rec.get("scores")),
            "shuffled": {"source": sh.get("source"), "explanation": sh.get("explanation"),
                         "scores": _task_scores(sh.get("scores"))} if sh else None}


_COMMON_MARK = "  /*__SAELAB_COMMON_JS__*/\n"


def _template() -> str:
    return resources.files("saelab.interpret").joinpath("templates/dashboard.html").read_text(encoding="utf-8")


def fill_page(template: str, title: str, parts: list[str], name: str = "page") -> str:
    """A page template with its shared script helpers (templates/common.js), its escaped title and
    its data blocks `parts` put in at their markers (each marker must be there exactly once)."""
    for mark in (_COMMON_MARK, _DATA_MARK):
        assert template.count(mark) == 1, f"{name} template must hold {mark.strip()!r} exactly once"
    common = resources.files("saelab.interpret").joinpath("templates/common.js").read_text(encoding="utf-8")
    page = template.replace(_COMMON_MARK, common, 1).replace(_TITLE_MARK, html.escape(title), 1)
    head, tail = page.split(_DATA_MARK)
    return head + "\n".join(parts) + tail


def render_html(data: DashboardData) -> str:
    """The complete page: template + JSON blocks (one per feature detail, parsed lazily)."""
    parts = [f'<script type="application/json" id="saelab-meta">{safe_json(data.meta)}</script>',
             f'<script type="application/json" id="saelab-features">{safe_json(data.features)}</script>',
             f'<script type="application/json" id="saelab-vocab">{safe_json(data.vocab)}</script>']
    parts += [f'<script type="application/json" id="fd-{int(f)}">{safe_json(d)}</script>'
              for f, d in data.details.items()]
    return fill_page(_template(), data.meta["title"], parts, "dashboard")


def write_html(path: str | Path, page: str) -> Path:
    """Write the page (tmp + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(p)
    log.info("dashboard written to %s (%.1f MB)", p, p.stat().st_size / 1e6)
    return p
