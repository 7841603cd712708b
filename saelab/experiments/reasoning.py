"""`saelab experiment reasoning`: which SAE features fire on mathematical reasoning, and what breaks without them?

Given an SAE trained on one hook of --model, with reasoning text (`champ-cot`), prose (`sotu`) and
math problems with solution steps (`champ`), all read through `corpus.resolve_corpus`:

1. Enrichment. On N kept tokens of each corpus, k_r[f] / k_p[f] = tokens where f fired (f > 0):
       ratio[f] = ((k_r + 0.5)/(n_r + 1)) / ((k_p + 0.5)/(n_p + 1))       (smoothed: no 0/0)
       z, p     = two-proportion z-test (statistics.two_proportion_ztest); q = Benjamini-Hochberg
   top = features with q <= alpha, z > 0 and freq_r >= min_freq, by ratio; listed with the contexts
   of their 3 strongest activations in the reasoning text.
2. Complexity. Per problem (statement + steps, first max_length tokens): activity = mean over tokens
   of sum_{f in top} f (the top reasoning features), and coverage = fraction of tokens where any of
   them fires. Spearman / Pearson with Fisher-z CIs against the number of solution steps and the
   solution length in tokens; mean activity per category with bootstrap CIs. Categories need the
   champ JSON (--problems-json: the v0.json or the champ-dataset wheel), since the built-in `champ`
   corpus keeps only the text; without it steps = lines - 1 and the category analysis is skipped.
3. Calculation vs explanation, within the reasoning tokens: calc = digits, operators (+-*/^=<>...)
   and anything inside $...$, \\(...\\), \\[...\\]; explanation = alphabetic words (>= 2 letters)
   outside math. Same test and BH correction, calc vs explanation counts.
4. Causal ablation. Ablate the top `ablate_top` features (error term kept) and measure the loss
   change on held-out reasoning and prose sequences (intervene.measure_effects):
       specificity = dloss_reasoning - dloss_prose       (Welch CI over sequences)
   Control: the same number of random features with matched firing frequency (pooled over both
   corpora; log10-frequency quantile bins, one control per chosen feature from the same bin,
   `control_seeds` seeds). paired[s] = dloss_top[s] - mean_seed dloss_control[s], bootstrap CI.

Writes results.json, report.md and PNGs into --out. --dry-run builds a tiny random Llama, a tiny
SAE and small local text corpora and runs every step in seconds.
Leaves out: training the SAE (use `saelab train`), choosing the hook (the SAE's metadata says).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saelab import statistics as S
from saelab.config import to_dict
from saelab.errors import UsageError

log = logging.getLogger(__name__)

HELP = "features enriched on math reasoning vs prose, their complexity profile, and their ablation vs a matched control"

OTHER, CALC, EXPL = 0, 1, 2


@dataclass
class Config:
    sae: str = ""
    """SAE directory (trained on one hook of --model); required unless --dry-run."""
    model: str = "default"
    """The model the SAE was trained on."""
    reasoning_corpus: str = "champ-cot"
    """Reasoning text (path or built-in name)."""
    prose_corpus: str = "sotu"
    """Prose to compare against."""
    problems_corpus: str = "champ"
    """Math problems, one document per problem: the statement, then one solution step per line."""
    problems_json: str | None = None
    """champ v0.json or the champ-dataset wheel: adds problem categories (optional)."""
    tokens: int = 50_000
    """Kept tokens per corpus for the firing frequencies (steps 1 and 3)."""
    eval_tokens: int = 10_000
    """Held-out token predictions per corpus for the ablation (step 4)."""
    problems: int = 100
    """Problems for the complexity analysis (step 2)."""
    max_length: int = 256
    """Tokens per sequence."""
    batch_size: int = 8
    """Sequences per forward pass."""
    top: int = 20
    """Enriched features listed with examples."""
    min_freq: float = 1e-3
    """Minimum firing frequency on reasoning text for a feature to be ranked."""
    alpha: float = 0.05
    """False discovery rate for Benjamini-Hochberg."""
    ablate_top: int = 20
    """Top reasoning features ablated together in step 4."""
    control_seeds: int = 5
    """Random frequency-matched control sets."""
    freq_bins: int = 10
    """log10-frequency quantile bins for matching the control."""
    n_boot: int = 1000
    """Bootstrap resamples for every CI."""
    seed: int = 0
    """Seed of the control draws, the bootstrap and the document shuffle."""
    shuffle_documents: bool = True
    """Read each corpus's documents in a seeded random order, so a token budget samples the whole
    corpus (built-in corpora are grouped: champ-cot holds ~90 replies per problem in a row)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N."""


# ------------------------------------------------------------------------------------ pure helpers


_CALC_CHARS = set("0123456789+-*/^=<>()[]{}|!%.,:;_\\$·×÷≤≥≠±√∑∏∫")
_MATH_OPEN = {"$": "$", "\\(": "\\)", "\\[": "\\]"}
_WORD = re.compile(r"^[A-Za-z]{2,}$")


def classify_tokens(texts: list[str]) -> np.ndarray:
    """CALC / EXPL / OTHER for each token text of one sequence, in order (module docstring, step 3).

    Math state carries across tokens: `$` toggles it; `\\(` / `\\[` open and `\\)` / `\\]` close it.
    A token that holds a digit or an operator counts as CALC; a plain word as EXPL (outside math).
    """
    out = np.zeros(len(texts), dtype=np.int8)
    in_math = False
    for i, t in enumerate(texts):
        s = t.strip().lstrip("Ġ▁")
        opened = False
        if "$" in s and s.count("$") % 2 == 1:
            in_math, opened = (not in_math), True
        if "\\(" in s or "\\[" in s:
            in_math, opened = True, True
        closes = "\\)" in s or "\\]" in s
        if in_math or opened or closes:
            out[i] = CALC
        elif s and (any(c.isdigit() for c in s) or all(c in _CALC_CHARS for c in s) and any(
                c in "+-*/^=<>" for c in s)):
            out[i] = CALC
        elif _WORD.match(s):
            out[i] = EXPL
        if closes:
            in_math = False
    return out


class Enrichment(NamedTuple):
    """Per-feature comparison of firing frequencies, corpus a vs corpus b."""

    freq_a: np.ndarray
    freq_b: np.ndarray
    log2_ratio: np.ndarray
    """log2 of the smoothed frequency ratio a / b."""
    z: np.ndarray
    p: np.ndarray
    q: np.ndarray
    """Benjamini-Hochberg q-values."""


def enrichment(k_a, n_a: int, k_b, n_b: int) -> Enrichment:
    """Firing-frequency ratio with a two-proportion test and BH correction (step 1)."""
    k_a, k_b = np.asarray(k_a, np.float64), np.asarray(k_b, np.float64)
    ratio = ((k_a + 0.5) / (n_a + 1)) / ((k_b + 0.5) / (n_b + 1))
    zt = S.two_proportion_ztest(k_a, n_a, k_b, n_b)
    return Enrichment(k_a / n_a, k_b / n_b, np.log2(ratio), zt.z, zt.p, S.benjamini_hochberg(zt.p).q)


def top_enriched(e: Enrichment, n: int, alpha: float = 0.05, min_freq: float = 0.0) -> list[int]:
    """Features with q <= alpha, z > 0 and freq_a >= min_freq, highest ratio first (at most n)."""
    ok = np.nonzero((e.q <= alpha) & (e.z > 0) & (e.freq_a >= min_freq))[0]
    return [int(i) for i in ok[np.argsort(-e.log2_ratio[ok], kind="stable")][:n]]


def frequency_bins(freq_F: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each feature by quantiles of log10 frequency among firing features; -1 = never fired."""
    freq_F = np.asarray(freq_F, np.float64)
    alive = freq_F > 0
    bins = np.full(freq_F.shape, -1, dtype=np.int64)
    if not alive.any():
        return bins
    logf = np.log10(freq_F[alive])
    edges = np.unique(np.quantile(logf, np.linspace(0, 1, n_bins + 1))[1:-1])
    bins[alive] = np.searchsorted(edges, logf, side="right")
    return bins


def matched_control(freq_F: np.ndarray, chosen: list[int], n_bins: int, seed: int) -> np.ndarray:
    """One random feature per chosen feature, from the same log10-frequency bin, none of them chosen.

    Drawn without replacement within the control; a bin with no free feature falls back to the
    nearest bin that has one.
    """
    rng = np.random.default_rng(seed)
    bins = frequency_bins(freq_F, n_bins)
    free = np.ones(len(bins), dtype=bool)
    free[list(chosen)] = False
    free &= bins >= 0
    out = []
    for f in chosen:
        b = bins[f]
        for dist in range(0, n_bins + 1):
            cand = np.nonzero(free & (np.abs(bins - b) == dist))[0]
            if cand.size:
                break
        else:
            raise UsageError(f"no unused firing feature left to match feature {f}; pass a smaller --ablate-top.")
        pick = int(rng.choice(cand))
        free[pick] = False
        out.append(pick)
    return np.array(out, dtype=np.int64)


# ------------------------------------------------------------------------------------ model passes


class Counts(NamedTuple):
    """Firing counts of every feature over kept tokens of one corpus."""

    n: int
    fired_F: np.ndarray
    class_n: dict
    """{CALC: tokens, EXPL: tokens} (reasoning pass only)."""
    class_fired: dict
    """{CALC: fired_F, EXPL: fired_F}."""
    top_vals_KF: np.ndarray
    """The 3 largest activations of each feature..."""
    top_loc_KF2: np.ndarray
    """...and where: (sequence index, position)."""
    sequences: list
    """The sequences the pass read (for example contexts)."""


def _token_texts(tokenizer, ids, cache: dict) -> list[str]:
    out = []
    for i in ids:
        i = int(i)
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        out.append(cache[i])
    return out


def count_features(model, sae, hook: str, sequences, max_tokens: int, batch_size: int, tokenizer=None,
                   classify: bool = False, quiet: bool = True) -> Counts:
    """One pass: encode the hook's activations at kept positions and count firing per feature."""
    from tqdm.auto import tqdm

    from saelab.models import capture

    Fn = int(sae.W_dec_FD.shape[0])
    fired = np.zeros(Fn, np.int64)
    cls_n = {CALC: 0, EXPL: 0}
    cls_fired = {CALC: np.zeros(Fn, np.int64), EXPL: np.zeros(Fn, np.int64)}
    K = 3
    top_v = torch.full((K, Fn), -math.inf)
    top_loc = torch.zeros((K, Fn, 2), dtype=torch.long)
    seen, n, cache = [], 0, {}
    bar = tqdm(total=max_tokens, unit="tok", desc="features", disable=quiet, dynamic_ncols=True)
    device = next(model.parameters()).device
    it = iter(sequences)
    while n < max_tokens:
        batch = [s for _, s in zip(range(batch_size), it)]
        if not batch:
            break
        ids = torch.as_tensor(np.stack([s.input_ids for s in batch]), dtype=torch.long)
        mask = torch.as_tensor(np.stack([s.attention_mask for s in batch]), dtype=torch.long)
        keep = torch.as_tensor(np.stack([s.keep_mask for s in batch]), dtype=torch.bool)
        x_BSD = capture(model, [hook], ids, mask)[hook]
        with torch.inference_mode():
            f_NF = sae.encode(x_BSD[keep.to(x_BSD.device)].float().to(sae.W_dec_FD.device)).cpu()
        on_NF = f_NF > 0
        fired += on_NF.sum(0).numpy()
        b_idx, s_idx = keep.nonzero(as_tuple=True)
        loc_N2 = torch.stack([b_idx + len(seen), s_idx], 1)
        k = min(K, f_NF.shape[0])
        v_KF, i_KF = f_NF.topk(k, dim=0)
        all_v = torch.cat([top_v, v_KF])
        all_loc = torch.cat([top_loc, loc_N2[i_KF]])
        v_best, j = all_v.topk(K, dim=0)
        top_v, top_loc = v_best, torch.gather(all_loc, 0, j[..., None].expand(-1, -1, 2))
        if classify and tokenizer is not None:
            cls_BS = np.zeros(tuple(ids.shape), np.int8)
            for b in range(ids.shape[0]):
                cls_BS[b] = classify_tokens(_token_texts(tokenizer, ids[b].tolist(), cache))
            cls_N = cls_BS[keep.numpy()]
            for c in (CALC, EXPL):
                rows = cls_N == c
                cls_n[c] += int(rows.sum())
                cls_fired[c] += on_NF[torch.from_numpy(rows)].sum(0).numpy()
        seen.extend(batch)
        n += int(keep.sum())
        bar.update(int(keep.sum()))
    bar.close()
    if n == 0:
        raise UsageError("the corpus gave no token to read (every position is BOS or padding).")
    return Counts(n, fired, cls_n, cls_fired, top_v.numpy(), top_loc.numpy(), seen)


def _context(tokenizer, seq, pos: int, width: int = 12) -> str:
    ids = [int(i) for i in seq.input_ids]
    left = tokenizer.decode(ids[max(0, pos - width):pos])
    tok = tokenizer.decode([ids[pos]])
    right = tokenizer.decode(ids[pos + 1:pos + 4])
    return (left + "[[" + tok + "]]" + right).replace("\n", " ")


class Problem(NamedTuple):
    text: str
    category: str
    n_steps: int
    solution: str


def load_problems(cfg: Config) -> list[Problem]:
    """Problems from --problems-json (v0.json or the champ-dataset wheel) or the --problems-corpus text."""
    if cfg.problems_json:
        import zipfile

        p = Path(cfg.problems_json).expanduser()
        if not p.is_file():
            raise UsageError(f"--problems-json {p} does not exist. Pass champ's v0.json or the champ-dataset "
                             "wheel (`pip download --no-deps champ-dataset==1.0.0`).")
        if p.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(p) as z:
                name = next((n for n in z.namelist() if n.endswith("dataset_files/v0.json")), None)
                if name is None:
                    raise UsageError(f"{p} holds no dataset_files/v0.json; is it the champ-dataset wheel?")
                data = json.loads(z.read(name))
        else:
            data = json.loads(p.read_text())
        probs = data.get("problems")
        probs = list(probs.values()) if isinstance(probs, dict) else list(probs or [])
        out = []
        for r in probs:
            steps = [s["_text"] for s in r.get("solution", {}).get("steps", [])]
            out.append(Problem("\n".join([r["_text"], *steps]), str(r.get("category", "unknown")), len(steps),
                               "\n".join(steps)))
        return out[: cfg.problems]
    from saelab.corpus import resolve_corpus

    out = []
    for doc in resolve_corpus(cfg.problems_corpus).documents():
        lines = doc.split("\n")
        out.append(Problem(doc, "unknown", max(len(lines) - 1, 0), "\n".join(lines[1:])))
        if len(out) >= cfg.problems:
            break
    return out


def problem_activity(model, sae, hook: str, tokenizer, problems: list[Problem], features: list[int],
                     max_length: int, batch_size: int, bos_id) -> tuple[np.ndarray, np.ndarray]:
    """(activity, coverage) per problem over its first max_length tokens (module docstring, step 2)."""
    from saelab.models import capture

    idx = torch.tensor(features, dtype=torch.long)
    act, cov = [], []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rows = [([bos_id] if bos_id is not None else []) + tokenizer(p.text, add_special_tokens=False)["input_ids"]
                for p in chunk]
        rows = [r[:max_length] for r in rows]
        S_ = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), S_, dtype=torch.long)
        mask = torch.zeros(len(rows), S_, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        x_BSD = capture(model, [hook], ids, mask)[hook]
        with torch.inference_mode():
            for b, r in enumerate(rows):
                lo = 1 if bos_id is not None else 0
                f_TF = sae.encode(x_BSD[b, lo:len(r)].float())[:, idx]
                act.append(float(f_TF.sum(1).mean()) if len(f_TF) else math.nan)
                cov.append(float((f_TF > 0).any(1).float().mean()) if len(f_TF) else math.nan)
    return np.array(act), np.array(cov)


# ------------------------------------------------------------------------------------ the run


def _sequences(spec: str, tokenizer, max_length: int, shuffle_seed: int | None = None):
    """Packed sequences of a corpus; with `shuffle_seed`, its documents in a seeded random order."""
    import random

    from saelab.corpus import pack_sequences, resolve_corpus
    from saelab.models import tokenizer_info

    tk = tokenizer_info(tokenizer)
    docs = resolve_corpus(spec).documents()
    if shuffle_seed is not None:
        docs = list(docs)
        random.Random(shuffle_seed).shuffle(docs)
    return pack_sequences(docs, tokenizer, max_length, bos_id=tk["bos_id"], eos_id=tk["eos_id"],
                          pad_id=tk["pad_id"])


def _corr(name: str, x, y, level: float = 0.95) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    sp, pe = S.spearman_ci(x[ok], y[ok], level), S.pearson_ci(x[ok], y[ok], level)
    return {"against": name, "spearman": sp._asdict(), "pearson": pe._asdict()}


def _effect_dict(e) -> dict:
    return {"delta_loss": e.delta_loss._asdict(), "kl": e.kl, "loss_clean": e.loss_clean,
            "loss_edited": e.loss_edited, "n_tokens": e.n_tokens, "n_sequences": e.n_sequences,
            "increased": [t._asdict() for t in e.increased[:5]], "decreased": [t._asdict() for t in e.decreased[:5]]}


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Run the four steps (module docstring); write results.json, report.md and PNGs into `out`."""
    from saelab.experiments.reasoning_report import write_plots, write_report
    from saelab.intervene import Edit, check_sae_model, measure_effects
    from saelab.models import load_model, resolve_hooks, tokenizer_info
    from saelab.saes import load_sae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        from saelab.experiments.reasoning_dry import dry_run_setup

        cfg = dry_run_setup(cfg, out / "dry-run-inputs")
    if not cfg.sae:
        raise UsageError("no SAE given: pass --sae DIR (an SAE trained on one hook of --model, e.g. "
                         "runs/demo/sae_best), or --dry-run for a smoke test on a tiny model.")
    from saelab.corpus import resolve_corpus

    for spec in (cfg.reasoning_corpus, cfg.prose_corpus, *([] if cfg.problems_json else [cfg.problems_corpus])):
        resolve_corpus(spec)  # a missing corpus fails (with the fetch command) before any slow work
    sae = load_sae(cfg.sae, device=cfg.device)
    hook = (sae.metadata or {}).get("hook")
    if not hook:
        raise UsageError(f"{cfg.sae} records no hook point in metadata.json; re-save it with metadata {{'hook': NAME}}.")
    lm = load_model(cfg.model, device=cfg.device, quiet=quiet)
    from saelab.errors import raise_all

    raise_all(check_sae_model(sae, lm.info, cfg.sae), "the SAE does not match the model")
    resolve_hooks(lm.model, [hook])
    tok = lm.tokenizer
    shuffle = cfg.seed if cfg.shuffle_documents else None
    reasoning_seqs = _sequences(cfg.reasoning_corpus, tok, cfg.max_length, shuffle)
    prose_seqs = _sequences(cfg.prose_corpus, tok, cfg.max_length, shuffle)
    problems = load_problems(cfg)

    # 1. enrichment, with the calc / explanation split counted in the same reasoning pass
    log.info("[1/4] firing frequencies on %s tokens of reasoning and of prose", f"{cfg.tokens:,}")
    cr = count_features(lm.model, sae, hook, reasoning_seqs, cfg.tokens, cfg.batch_size, tok, classify=True, quiet=quiet)
    cp = count_features(lm.model, sae, hook, prose_seqs, cfg.tokens, cfg.batch_size, quiet=quiet)
    enr = enrichment(cr.fired_F, cr.n, cp.fired_F, cp.n)
    top = top_enriched(enr, max(cfg.top, cfg.ablate_top), cfg.alpha, cfg.min_freq)
    listed = []
    for f in top[: cfg.top]:
        ex = [_context(tok, cr.sequences[int(cr.top_loc_KF2[k, f, 0])], int(cr.top_loc_KF2[k, f, 1]))
              for k in range(cr.top_vals_KF.shape[0]) if np.isfinite(cr.top_vals_KF[k, f]) and cr.top_vals_KF[k, f] > 0]
        listed.append({"feature": f, "freq_reasoning": float(enr.freq_a[f]), "freq_prose": float(enr.freq_b[f]),
                       "log2_ratio": float(enr.log2_ratio[f]), "z": float(enr.z[f]), "q": float(enr.q[f]),
                       "examples": ex})
    n_sig = int(((enr.q <= cfg.alpha) & (enr.z > 0)).sum())
    n_sig_prose = int(((enr.q <= cfg.alpha) & (enr.z < 0)).sum())

    # 3. calculation vs explanation (same reasoning pass)
    calc_vs_expl: dict = {"n_calc": cr.class_n[CALC], "n_expl": cr.class_n[EXPL]}
    if cr.class_n[CALC] and cr.class_n[EXPL]:
        ce = enrichment(cr.class_fired[CALC], cr.class_n[CALC], cr.class_fired[EXPL], cr.class_n[EXPL])
        ec = enrichment(cr.class_fired[EXPL], cr.class_n[EXPL], cr.class_fired[CALC], cr.class_n[CALC])
        row = lambda e, f: {"feature": f, "freq_in": float(e.freq_a[f]), "freq_out": float(e.freq_b[f]),  # noqa: E731
                            "log2_ratio": float(e.log2_ratio[f]), "q": float(e.q[f])}
        calc_vs_expl.update({
            "calc_features": [row(ce, f) for f in top_enriched(ce, 10, cfg.alpha, cfg.min_freq)],
            "expl_features": [row(ec, f) for f in top_enriched(ec, 10, cfg.alpha, cfg.min_freq)],
            "n_calc_specific": int(((ce.q <= cfg.alpha) & (ce.z > 0)).sum()),
            "n_expl_specific": int(((ce.q <= cfg.alpha) & (ce.z < 0)).sum()),
            "top_reasoning_features_calc_share": float(np.mean([ce.z[f] > 0 for f in top])) if top else math.nan,
        })

    # 2. complexity
    log.info("[2/4] complexity profile on %d problems", len(problems))
    tk = tokenizer_info(tok)
    feats = top[: cfg.top]
    complexity: dict = {"n_problems": len(problems), "features": feats}
    if feats and len(problems) >= 4:
        act, cov = problem_activity(lm.model, sae, hook, tok, problems, feats, cfg.max_length, cfg.batch_size, tk["bos_id"])
        steps = np.array([p.n_steps for p in problems], float)
        sol_len = np.array([len(tok(p.solution, add_special_tokens=False)["input_ids"]) for p in problems], float)
        complexity.update({
            "activity": act.tolist(), "coverage": cov.tolist(), "n_steps": steps.tolist(),
            "solution_tokens": sol_len.tolist(), "categories": [p.category for p in problems],
            "correlations": {"activity": [_corr("n_steps", act, steps), _corr("solution_tokens", act, sol_len)],
                             "coverage": [_corr("n_steps", cov, steps), _corr("solution_tokens", cov, sol_len)]},
        })
        cats = sorted({p.category for p in problems} - {"unknown"})
        if cats:
            complexity["by_category"] = {
                c: S.bootstrap_mean_ci(act[[p.category == c for p in problems]], n_boot=cfg.n_boot, seed=cfg.seed)._asdict()
                for c in cats}

    # 4. causal ablation vs frequency-matched controls, on held-out sequences
    log.info("[4/4] ablating the top %d reasoning features vs %d matched controls", cfg.ablate_top, cfg.control_seeds)
    chosen = top[: cfg.ablate_top]
    ablation: dict = {"features": chosen}
    if chosen:
        pooled_F = (cr.fired_F + cp.fired_F) / (cr.n + cp.n)
        controls = [matched_control(pooled_F, chosen, cfg.freq_bins, cfg.seed + s) for s in range(cfg.control_seeds)]
        bins = frequency_bins(pooled_F, cfg.freq_bins)
        edit_sets = [[Edit(sae, hook=hook, ablate=chosen)]] + [[Edit(sae, hook=hook, ablate=c.tolist())] for c in controls]
        effects = {}
        for name, seqs in (("reasoning", reasoning_seqs), ("prose", prose_seqs)):
            effects[name] = measure_effects(lm.model, edit_sets, seqs, max_tokens=cfg.eval_tokens,
                                            batch_size=cfg.batch_size, tokenizer=tok, n_boot=cfg.n_boot,
                                            seed=cfg.seed, quiet=quiet)
        top_r, top_p = effects["reasoning"][0], effects["prose"][0]
        ctrl_r, ctrl_p = effects["reasoning"][1:], effects["prose"][1:]

        def spec(er, ep) -> dict:
            return S.diff_means_ci(er.per_sequence_delta, ep.per_sequence_delta)._asdict()

        def paired(top_e, ctrl_es) -> dict:
            c = np.mean([e.per_sequence_delta for e in ctrl_es], axis=0)
            return S.bootstrap_mean_ci(np.array(top_e.per_sequence_delta) - c, n_boot=cfg.n_boot, seed=cfg.seed)._asdict()

        ms = lambda xs: S.mean_std(xs)._asdict()  # noqa: E731
        ablation.update({
            "top": {"reasoning": _effect_dict(top_r), "prose": _effect_dict(top_p), "specificity": spec(top_r, top_p)},
            "controls": [{"features": c.tolist(), "reasoning": _effect_dict(er), "prose": _effect_dict(ep),
                          "specificity": spec(er, ep)} for c, er, ep in zip(controls, ctrl_r, ctrl_p)],
            "control_summary": {
                "reasoning_delta": ms([e.delta_loss.estimate for e in ctrl_r]),
                "prose_delta": ms([e.delta_loss.estimate for e in ctrl_p]),
                "specificity": ms([er.delta_loss.estimate - ep.delta_loss.estimate for er, ep in zip(ctrl_r, ctrl_p)]),
            },
            "top_minus_control": {"reasoning": paired(top_r, ctrl_r), "prose": paired(top_p, ctrl_p)},
            "frequency_match": {
                "chosen_bins": bins[chosen].tolist(), "control_bins": [bins[c].tolist() for c in controls],
                "chosen_log10_freq_mean": float(np.log10(pooled_F[chosen]).mean()),
                "control_log10_freq_mean": [float(np.log10(pooled_F[c]).mean()) for c in controls],
            },
        })

    results = {
        "experiment": "reasoning", "dry_run": dry_run, "config": to_dict(cfg), "hook": hook,
        "model": lm.info, "sae": {"path": cfg.sae, "d_sae": int(sae.W_dec_FD.shape[0]), "architecture": sae.cfg.architecture},
        "tokens": {"reasoning": cr.n, "prose": cp.n},
        "enrichment": {"n_reasoning_enriched": n_sig, "n_prose_enriched": n_sig_prose,
                       "dead_in_both": int(((cr.fired_F + cp.fired_F) == 0).sum()), "top": listed},
        "complexity": complexity, "calc_vs_expl": calc_vs_expl, "ablation": ablation,
    }
    results["plots"] = write_plots(results, enr, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_report(results, out / "report.md")
    return results


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    e, a = results["enrichment"], results["ablation"]
    lines = [f"reasoning experiment on {results['model']['name']} @ {results['hook']} "
             f"({results['tokens']['reasoning']:,} reasoning / {results['tokens']['prose']:,} prose tokens)",
             f"  enriched on reasoning (BH q <= {results['config']['alpha']}): {e['n_reasoning_enriched']} features; "
             f"on prose: {e['n_prose_enriched']}"]
    if a.get("top"):
        t, c = a["top"], a["control_summary"]
        lines.append(f"  ablating top {len(a['features'])}: dloss reasoning {t['reasoning']['delta_loss']['estimate']:+.4f}, "
                     f"prose {t['prose']['delta_loss']['estimate']:+.4f}; matched control reasoning "
                     f"{c['reasoning_delta']['mean']:+.4f} +- {c['reasoning_delta']['std']:.4f}")
        d = a["top_minus_control"]["reasoning"]
        lines.append(f"  top - control on reasoning: {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
    lines.append(f"  report: {results['plots'].get('report', 'report.md')}")
    return "\n".join(lines)
