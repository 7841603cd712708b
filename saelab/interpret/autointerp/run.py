"""One autointerp run: contexts -> explanations -> detection and fuzzing scores -> shuffled baseline -> summary.

Steps (each feature's record is saved after each step, so a killed run resumes where it stopped):

    1. contexts      `sampling.sample_contexts` (deterministic: same store, settings, seed -> same rows)
    2. explain       explainer.generate(explain_prompt(explain contexts)) -> parse_explanation
    3. score         scorer.classify on
                       detection: held-out active (label 1) and silent (label 0) excerpts, unmarked
                       fuzzing:   held-out active excerpts with their own marks (1) and with the
                                  marks moved to silent tokens (0)
    4. shuffled      step 3 again with the explanation of feature π(f) (`scoring.derangement`)
    5. summary       `scoring.summarize` -> OUT/autointerp.json

Run key = sha256(SAE weights sha256, store id, hook, AutointerpConfig.identity())[:20]; records of
another key are recomputed. Transport settings (concurrency, timeout, retries, key variable,
batch size) may change between a run and its resumption.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from saelab.errors import UsageError
from saelab.interpret.autointerp.backends import make_backend
from saelab.interpret.autointerp.cache import load_record, save_record, write_json
from saelab.interpret.autointerp.config import AutointerpConfig
from saelab.interpret.autointerp.prompts import Prompt, detect_prompt, explain_prompt, fuzz_prompt, parse_explanation
from saelab.interpret.autointerp.sampling import FeatureContexts, misplace_marks, sample_contexts
from saelab.interpret.autointerp.scoring import binary_scores, derangement, summarize
from saelab.interpret.data import sae_identity, store_identity
from saelab.interpret.examples import load_store_tokenizer

log = logging.getLogger(__name__)

PLACEHOLDER = "<the explainer's explanation>"


@dataclass
class AutointerpResult:
    """What a run produced."""

    out: Path
    """Output directory (autointerp.json + features/)."""
    records: dict[int, dict]
    """feature -> its record (explanation, scores, shuffled)."""
    summary: dict
    """Means over features with bootstrap CIs (`scoring.summarize`)."""
    skipped: list[int] = field(default_factory=list)
    """Features without activating examples (dead on this store): not explained."""
    prompts: list[Prompt] = field(default_factory=list)
    """With dry_run: the prompts a run would send (nothing else is computed)."""


def run_key(sae, store, hook: str, cfg: AutointerpConfig, sae_dir=None) -> str:
    ident = [sae_identity(sae, sae_dir), store_identity(store, hook), hook, cfg.identity()]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def judged_items(ctx: FeatureContexts, seed: int) -> dict[str, list]:
    """task -> [(Context, label)] for detection and fuzzing (see module doc)."""
    rng = np.random.default_rng((seed, ctx.feature, 1))
    fuzz_wrong = [w for w in (misplace_marks(c, rng) for c in ctx.active) if w is not None]
    return {"detection": [(c, True) for c in ctx.active] + [(c, False) for c in ctx.inactive],
            "fuzzing": [(c, True) for c in ctx.active] + [(c, False) for c in fuzz_wrong]}


def _prompts(items: dict[str, list], explanation: str) -> list[Prompt]:
    make = {"detection": detect_prompt, "fuzzing": fuzz_prompt}
    return [make[task](explanation, c) for task in ("detection", "fuzzing") for c, _ in items[task]]


def _score(scorer, items: dict[str, list], explanation: str) -> tuple[dict, dict]:
    """(per-task judged items, per-task scores) of one explanation."""
    judged = scorer.classify(_prompts(items, explanation))
    out_items, scores, i = {}, {}, 0
    for task in ("detection", "fuzzing"):
        n = len(items[task])
        part, i = judged[i:i + n], i + n
        labels = [lab for _, lab in items[task]]
        out_items[task] = {"rows": [c.index for c, _ in items[task]], "labels": labels,
                           "answers": [j.answer for j in part], "p_yes": [j.p_yes for j in part]}
        scores[task] = binary_scores(labels, [j.answer for j in part], [j.p_yes for j in part])
    return out_items, scores


class _Backends:
    """Explainer and scorer, created on first use; one local model is loaded once for both roles."""

    def __init__(self, cfg: AutointerpConfig, quiet: bool, explainer=None, scorer=None):
        self.cfg, self.quiet, self._made = cfg, quiet, {}
        self._used = {"explainer": explainer, "scorer": scorer}

    def get(self, role: str):
        if self._used[role] is None:
            c = self.cfg
            spec, model = (c.explainer, c.explainer_model) if role == "explainer" else (c.scorer, c.scorer_model)
            if (spec, model) not in self._made:
                log.info("%s: %s", role, spec)
                self._made[(spec, model)] = make_backend(spec, model, c.api_key_env, c.concurrency, c.timeout,
                                                         c.retries, c.batch_size, quiet=self.quiet)
            self._used[role] = self._made[(spec, model)]
        return self._used[role]

    def name(self, role: str) -> str:
        b = self._used[role]
        return b.name if b is not None else (self.cfg.explainer if role == "explainer" else self.cfg.scorer)


def run_autointerp(sae, store, hook: str, stats, feature_ids: list[int], cfg: AutointerpConfig, out: str | Path,
                   sae_dir=None, tokenizer=None, quiet: bool = False, dry_run: bool = False,
                   explainer=None, scorer=None) -> AutointerpResult:
    """Explain and score `feature_ids`; resume from the records already in `out`.

    Args:
        stats: FeatureStats of this SAE on this store (`load_or_compute_stats(...).stats`).
        tokenizer: for token text; default: the store's model's tokenizer.
        dry_run: only build the prompts (first feature's explain prompt and one detection and one
            fuzzing prompt with a placeholder explanation); no model is loaded, nothing is written.
        explainer, scorer: backend objects to use instead of those named in `cfg`.
    """
    out = Path(out)
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else load_store_tokenizer(store)
    live = [f for f in feature_ids if int(stats.count_F[f]) > 0]
    skipped = [f for f in feature_ids if f not in live]
    if skipped:
        log.warning("%d feature(s) never fired on this store and are skipped: %s", len(skipped), skipped[:10])
    if not live:
        raise UsageError("none of the requested features fired on this store: nothing to explain. Pick live "
                         "features (`saelab interpret stats` lists them).")
    chosen = live[:1] if dry_run else live
    ctxs = sample_contexts(sae, store, hook, stats, chosen, tok, cfg.n_top, cfg.bands, cfg.n_test, cfg.context,
                           cfg.mark_threshold, cfg.seed)
    if dry_run:
        f = chosen[0]
        items = judged_items(ctxs[f], cfg.seed)
        prompts = [explain_prompt(ctxs[f].explain)]
        prompts += [detect_prompt(PLACEHOLDER, c) for c, _ in items["detection"][:1]]
        prompts += [fuzz_prompt(PLACEHOLDER, c) for c, _ in items["fuzzing"][:1]]
        return AutointerpResult(out, {}, {}, skipped, prompts)

    key = run_key(sae, store, hook, cfg, sae_dir)
    recs = {f: load_record(out, f, key) or {"key": key, "feature": f} for f in live}
    reused = {"explanations": sum("explanation" in r for r in recs.values()),
              "scores": sum("scores" in r for r in recs.values())}
    backends = _Backends(cfg, quiet, explainer, scorer)
    timings = {}

    todo = [f for f in live if "explanation" not in recs[f]]
    t = time.perf_counter()
    if todo:
        ex = backends.get("explainer")
        step = max(1, cfg.concurrency) if cfg.explainer.startswith("http") else 1
        with tqdm(total=len(todo), desc="explain", unit="feature", disable=quiet) as bar:
            for s in range(0, len(todo), step):
                part = todo[s:s + step]
                replies = ex.generate([explain_prompt(ctxs[f].explain) for f in part], cfg.max_new_tokens)
                for f, reply in zip(part, replies):
                    recs[f].update(explanation=parse_explanation(reply), explainer_reply=reply,
                                   contexts={k: [c.index for c in getattr(ctxs[f], k)]
                                             for k in ("explain", "active", "inactive")})
                    save_record(out, recs[f])
                bar.update(len(part))
    timings["explain_s"] = time.perf_counter() - t

    items = {f: judged_items(ctxs[f], cfg.seed) for f in live}
    t = time.perf_counter()
    todo = [f for f in live if "scores" not in recs[f]]
    for f in tqdm(todo, desc="score", unit="feature", disable=quiet):
        recs[f]["items"], recs[f]["scores"] = _score(backends.get("scorer"), items[f], recs[f]["explanation"])
        save_record(out, recs[f])
    timings["score_s"] = time.perf_counter() - t

    t = time.perf_counter()
    perm = derangement(live, cfg.seed)
    todo = [f for f in perm if (recs[f].get("shuffled") or {}).get("source") != perm[f]]
    for f in tqdm(todo, desc="shuffled baseline", unit="feature", disable=quiet):
        g = perm[f]
        expl = recs[g]["explanation"]
        judged, scores = _score(backends.get("scorer"), items[f], expl)
        recs[f]["shuffled"] = {"source": g, "explanation": expl, "items": judged, "scores": scores}
        save_record(out, recs[f])
    timings["shuffled_s"] = time.perf_counter() - t
    if not perm:
        log.warning("one feature only: the shuffled baseline needs at least two; it is left out")

    records = [recs[f] for f in live]
    summary = summarize([{"scores": r["scores"], "shuffled": (r.get("shuffled") or {}).get("scores")}
                         for r in records], seed=cfg.seed)
    timings["total_s"] = time.perf_counter() - t0
    run = {"key": key, "hook": hook, "features": live, "skipped": skipped,
           "config": {k: v for k, v in asdict(cfg).items()},  # api_key_env is a variable name, never the key
           "explainer": backends.name("explainer"), "scorer": backends.name("scorer"),
           "reused": reused, "timings": timings, "summary": summary,
           "per_feature": [{"feature": r["feature"], "explanation": r["explanation"],
                            **{f"{task}_{m}": r["scores"][task][m] for task in ("detection", "fuzzing")
                               for m in ("balanced_accuracy", "auroc")},
                            **{f"shuffled_{task}_{m}": ((r.get("shuffled") or {}).get("scores") or {})
                               .get(task, {}).get(m) for task in ("detection", "fuzzing")
                               for m in ("balanced_accuracy", "auroc")}} for r in records]}
    write_json(out / "autointerp.json", run)
    log.info("autointerp results in %s (%.0f s)", out, timings["total_s"])
    return AutointerpResult(out, {f: recs[f] for f in live}, summary, skipped)
