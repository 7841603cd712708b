"""Text reports of an autointerp run, and the step `saelab demo` runs (explain a handful of features)."""
from __future__ import annotations

import logging
from pathlib import Path

from saelab.interpret.autointerp.config import AutointerpConfig
from saelab.interpret.autointerp.prompts import Prompt
from saelab.interpret.autointerp.run import AutointerpResult, run_autointerp
from saelab.interpret.build import build_dashboard

log = logging.getLogger(__name__)


def _fmt(v) -> str:
    return "  –  " if v is None or v != v else f"{v:.3f}"


def format_summary(res: AutointerpResult, rows: int = 30) -> str:
    """Per-feature explanations and scores, then means over features with 95% bootstrap CIs."""
    lines = [f"{'feature':>7}  {'det BA':>6} {'(shuf)':>6}  {'fuzz BA':>7} {'(shuf)':>6}  explanation"]
    for f, r in list(res.records.items())[:rows]:
        s, sh = r.get("scores", {}), ((r.get("shuffled") or {}).get("scores") or {})
        lines.append(f"{f:>7}  {_fmt(s.get('detection', {}).get('balanced_accuracy'))} "
                     f"{_fmt(sh.get('detection', {}).get('balanced_accuracy'))}  "
                     f"{_fmt(s.get('fuzzing', {}).get('balanced_accuracy')):>7} "
                     f"{_fmt(sh.get('fuzzing', {}).get('balanced_accuracy'))}  {r.get('explanation', '')!r}")
    if len(res.records) > rows:
        lines.append(f"... {len(res.records) - rows} more in {res.out / 'autointerp.json'}")
    lines.append("\nmean over features [95% bootstrap CI over features]:")
    for task, metrics in res.summary.items():
        for m, d in metrics.items():
            parts = [f"{k} {_fmt(v['mean'])} [{_fmt(v['low'])}, {_fmt(v['high'])}]"
                     for k, v in d.items()]
            lines.append(f"  {task:<9} {m:<17} " + "   ".join(parts) + f"   (n={d['real']['n']})")
    return "\n".join(lines)


def format_prompts(prompts: list[Prompt]) -> str:
    """The chat messages of each prompt, as a person reads them (for --dry-run)."""
    out = []
    for p in prompts:
        out.append(f"===== {p.kind} prompt =====")
        for m in p.messages:
            out.append(f"--- {m['role']} ---\n{m['content']}")
    return "\n".join(out)


def demo_autointerp(sae, store, hook: str, res, feature_ids: list[int], out: str | Path, sae_dir=None,
                    n_features: int = 6, cfg: AutointerpConfig | None = None, tokenizer=None,
                    quiet: bool = False) -> dict[str, Path]:
    """Explain and score `n_features` of `feature_ids` (evenly spread; default: with the embedded model,
    6 held-out excerpts of each kind) and rewrite OUT/dashboard.html with their explanations.
    Returns {name: path} of what it wrote."""
    out = Path(out)
    step = max(1, len(feature_ids) // n_features)
    feats = feature_ids[::step][:n_features]
    cfg = cfg or AutointerpConfig(n_test=6)
    log.info("autointerp: explaining and scoring %d features (explainer %s, scorer %s)", len(feats),
             cfg.explainer, cfg.scorer)
    ai = run_autointerp(sae, store, hook, res.stats, feats, cfg, out / "autointerp", sae_dir=sae_dir,
                        tokenizer=tokenizer, quiet=quiet)
    log.info("%s", format_summary(ai))
    page = build_dashboard(sae, store, hook, res, feature_ids, out / "dashboard.html", tokenizer=tokenizer,
                           sae_name="demo TopK SAE", autointerp=ai.records)
    return {"autointerp": ai.out / "autointerp.json", "dashboard": page}
