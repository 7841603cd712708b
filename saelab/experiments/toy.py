"""`saelab experiment toy`: does RkCNN probing find the features of a toy model, better than chance?

For each seed s = 0 .. seeds−1 (the seed sets the toy model, the sample and the probe):

    model_s   "seed":    W_FD random unit rows, untrained (the RkCNN seed's toy), h = x W
              "sparse":  the same with each row on `support` coordinates (a privileged basis)
              "elhage":  the trained ReLU-output model of superposition (saelab.toy.ToyModel)
    x_BF, h_BD = n_samples draws                        rows with no active feature: kept with
                                                        label −1 ("label", the seed) or dropped
    label_b  = argmax_i x_bi                            the dominant feature (knn labels)
    probe    = rkcnn.probe(h_BD, m, h, r, score, labels, k, all rows, dedup)
    t_FD     = unit true directions
    recovery(dirs) = mean_i [ max_r |cos(dirs_r, t_i)| ≥ match_threshold ]
    arms     rkcnn     the probe's kept directions
             random    principal directions of r subsets drawn at random from the same h
             bottom    principal directions of the r lowest-scoring subsets
             unit      r random unit vectors
    cv_subsets = std_H(scores_H) / mean_H(scores_H)     (the seed's "CV": one run, over its h subsets)
    ceiling  = mean_i [ √(sum of the m largest t_ij²) ≥ match_threshold ]   (best any m-sparse vector does)

Summary over seeds: mean ± std and a 95% t interval for the top score, each arm's recovery, the
paired differences rkcnn − control (per seed), the seed's CV (mean over seeds) and the top score's
CV across seeds. PASS when mean top score > min_top_score, mean rkcnn recovery > min_recovery and
the mean cv_subsets < max_cv (the seed's three criteria). `--faithful` sets every toy and probe
setting left at its default to the seed's (docs/rkcnn.md); `--informative` sets the sparse-basis
toy (d_hidden 36, 108 features, support 2, m = 6 = √d, h 2000, r 108).

Writes into `out`: results.json (keys `RESULT_KEYS`) and four PNGs of seed 0 (rkcnn_plots.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from saelab.config import to_dict
from saelab.errors import raise_all
from saelab.experiments.rkcnn_plots import plot_toy
from saelab.rkcnn import probe, random_unit_rows
from saelab.statistics import mean_std, t_quantile
from saelab.toy import ToyConfig, dominant_labels, random_linear_toy, train_toy_model

log = logging.getLogger(__name__)

HELP = "RkCNN probing on a toy model: top score, feature recovery vs three controls, the seed's CV"

RESULT_KEYS = ("experiment", "dry_run", "config", "thresholds", "per_seed", "summary", "checks", "passed", "plots",
               "seconds")
ARMS = ("rkcnn", "random", "bottom", "unit")
PLOTS = {"score_distribution": "score_distribution.png", "top10_scores": "top10_scores.png",
         "cos_mined_vs_true": "cos_mined_vs_true.png", "feature_overlap": "feature_overlap.png"}
FAITHFUL = dict(model="seed", n_features=10, d_hidden=5, feature_probability=0.1, n_samples=5000, m=2, h=100, r=10,
                score="knn", k_neighbors=5, knn_rows=None, dedup="none", empty_rows="label", match_threshold=0.7,
                seeds=30)
INFORMATIVE = dict(model="sparse", n_features=108, d_hidden=36, support=2, feature_probability=0.02, n_samples=5000,
                   m=6, h=2000, r=108, score="kurtosis", kurtosis="coordinate_mean", knn_rows=2000, dedup="none",
                   empty_rows="label", match_threshold=0.7, seeds=30)


@dataclass
class Config:
    """Settings of the toy experiment (defaults: the RkCNN seed's toy and probe)."""

    faithful: bool = False
    """Preset: every toy and probe setting of the RkCNN seed (docs/rkcnn.md), 30 seeds; other flags still apply."""
    informative: bool = False
    """Preset: the sparse-basis toy (d_hidden 36, 108 features on 2 coordinates each, m 6, h 2000, r 108)."""
    model: Literal["seed", "sparse", "elhage"] = "seed"
    """Toy: random unit rows (the seed's), rows on `support` coordinates, or the trained Elhage model."""
    n_features: int = 10
    """Sparse input features."""
    d_hidden: int = 5
    """Hidden width (the activations that are probed)."""
    support: int = 2
    """model sparse: coordinates each feature row lives on."""
    feature_probability: float = 0.1
    """Probability that each feature is active in a sample."""
    train_steps: int = 3000
    """model elhage: Adam steps to train each toy model."""
    n_samples: int = 5000
    """Samples drawn per seed."""
    empty_rows: Literal["label", "drop"] = "label"
    """Rows with no active feature: keep them with label -1 (the seed) or drop them."""
    m: int = 2
    """Dims per RkCNN subset."""
    h: int = 100
    """Random subsets sampled."""
    r: int = 10
    """Directions kept."""
    score: Literal["knn", "kurtosis", "variance_ratio"] = "knn"
    """Subset score; knn uses the dominant feature as label."""
    kurtosis: Literal["coordinate_mean", "principal"] = "coordinate_mean"
    """Kurtosis score: per-coordinate mean (the method) or of the principal projection."""
    k_neighbors: int = 5
    """k of the knn score."""
    knn_rows: int | None = None
    """Rows used by the knn score (None: all, as the seed)."""
    dedup: Literal["none", "subsets", "cos_cap", "dominant", "deflation"] = "none"
    """Selection of the kept directions (saelab/rkcnn/select.py); none = the method."""
    seeds: int = 30
    """Independent repetitions."""
    match_threshold: float = 0.7
    """A true feature counts as recovered when a kept direction has |cos| >= this."""
    min_top_score: float = 0.6
    """PASS needs the mean top score above this (the seed's criterion 1)."""
    min_recovery: float = 0.25
    """PASS needs the mean recovery at least this (criterion 2)."""
    max_cv: float = 0.10
    """PASS needs the mean CV of the h subset scores below this (criterion 3)."""

    def __post_init__(self):
        preset = FAITHFUL if self.faithful else INFORMATIVE if self.informative else {}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k, v in preset.items():  # a preset fills the fields left at their defaults; flags still win
            if getattr(self, k) == defaults[k]:
                setattr(self, k, v)
        p = []
        if self.faithful and self.informative:
            p.append("--faithful and --informative are two different toys; choose one")
        if self.seeds < 2:
            p.append(f"seeds={self.seeds}: need at least 2 to measure consistency")
        if not 1 <= self.m <= self.d_hidden:
            p.append(f"m={self.m} must be between 1 and d_hidden={self.d_hidden}")
        if self.model == "sparse" and not 1 <= self.support <= self.d_hidden:
            p.append(f"support={self.support} must be between 1 and d_hidden={self.d_hidden}")
        if self.n_samples < 10:
            p.append(f"n_samples={self.n_samples} is too small (need at least 10)")
        if not 0 < self.match_threshold <= 1:
            p.append(f"match_threshold={self.match_threshold} must be in (0, 1]")
        raise_all(p, "toy experiment config")


def dry_run_config(cfg: Config) -> Config:
    """The same experiment, shrunk to run in seconds."""
    return dataclasses.replace(cfg, faithful=False, informative=False, train_steps=min(cfg.train_steps, 200),
                               n_samples=min(cfg.n_samples, 800), seeds=2, h=min(cfg.h, 30),
                               knn_rows=min(cfg.knn_rows or 500, 500))


def subset_ceiling(t_FD: torch.Tensor, m: int) -> torch.Tensor:
    """Best |cos| between each unit row of t_FD and any unit vector supported on m coordinates: [F].

        ceiling_i = √( sum of the m largest t_ij² )
    """
    return (t_FD ** 2).topk(m, dim=1).values.sum(1).sqrt()


def recovery(dirs_RD: torch.Tensor, t_FD: torch.Tensor, threshold: float) -> tuple[float, torch.Tensor]:
    """(share of true features with max_r |cos| >= threshold, that max per feature [F])."""
    best_F = (dirs_RD @ t_FD.T).abs().max(0).values if dirs_RD.shape[0] else torch.zeros(t_FD.shape[0])
    return float((best_F >= threshold).float().mean()), best_F


def toy_data(cfg: Config, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_BF, h_BD, t_FD unit true directions) of one seed."""
    if cfg.model == "elhage":
        model = train_toy_model(ToyConfig(n_features=cfg.n_features, d_hidden=cfg.d_hidden,
                                          feature_probability=cfg.feature_probability, steps=cfg.train_steps), seed)
        x_BF, h_BD = model.sample(cfg.n_samples, seed=seed + 10_000)
        t_FD = model.feature_dirs_FD
    else:
        toy = random_linear_toy(cfg.n_features, cfg.d_hidden, cfg.feature_probability, seed,
                                support=cfg.support if cfg.model == "sparse" else None)
        x_BF, h_BD = toy.sample(cfg.n_samples, seed=seed + 10_000)
        t_FD = toy.W_FD
    return x_BF, h_BD, t_FD / t_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def run_seed(cfg: Config, seed: int) -> dict:
    """One repetition: data, probe, the three controls, recovery. Plain numbers plus tensors for plots."""
    x_BF, h_BD, t_FD = toy_data(cfg, seed)
    if cfg.empty_rows == "drop":
        keep_B = x_BF.amax(1) > 0
        x_BF, h_BD = x_BF[keep_B], h_BD[keep_B]
    labels_B = dominant_labels(x_BF)
    res = probe(h_BD, m=cfg.m, h=cfg.h, r=cfg.r, score=cfg.score, labels=labels_B, seed=seed, kurtosis=cfg.kurtosis,
                k_neighbors=cfg.k_neighbors, knn_rows=cfg.knn_rows, dedup=cfg.dedup)
    # controls: same h subsets (principal directions of all of them), chosen without the score
    every = probe(h_BD, m=cfg.m, h=cfg.h, r=cfg.h, score="variance_ratio", seed=seed)  # same subsets, all H kept
    dirs_HD = torch.zeros(cfg.h, cfg.d_hidden)
    dirs_HD[every.top_idx_R] = every.directions_RD
    g = torch.Generator().manual_seed(seed + 5)
    arms = {"rkcnn": res.directions_RD,
            "random": dirs_HD[torch.randperm(cfg.h, generator=g)[:cfg.r]],
            "bottom": dirs_HD[torch.sort(res.scores_H.double(), stable=True).indices[:cfg.r]],
            "unit": random_unit_rows(cfg.r, cfg.d_hidden, seed + 11)}
    rec, best = {}, {}
    for name, dirs in arms.items():
        rec[name], best[name] = recovery(dirs, t_FD, cfg.match_threshold)
    scores = res.scores_H.double()
    return {
        "seed": seed, "rows_probed": int(h_BD.shape[0]), "top_score": float(scores.max()),
        "cv_subsets": float(scores.std(unbiased=False) / scores.mean()) if float(scores.mean()) != 0 else math.inf,
        "recovery": rec, "recovery_ceiling": float((subset_ceiling(t_FD, cfg.m) >= cfg.match_threshold).float().mean()),
        "best_abs_cos": [round(float(c), 4) for c in best["rkcnn"]],
        "kept_subsets": res.subsets_HM[res.top_idx_R].tolist()[:20],
        "distinct_kept": len({tuple(s) for s in res.subsets_HM[res.top_idx_R].tolist()}),
        "_plot": {"scores_H": res.scores_H, "kept_scores": res.scores_H[res.top_idx_R],
                  "cos_RF": (res.directions_RD @ t_FD.T).abs(), "overlap_FF": t_FD @ t_FD.T},
    }


def _ci(values: list[float], level: float = 0.95) -> dict:
    ms = mean_std(values)
    half = t_quantile(0.5 + level / 2, ms.n - 1) * ms.sem if ms.n > 1 else math.nan
    return {"mean": ms.mean, "std": ms.std, "n": ms.n, "low": ms.mean - half, "high": ms.mean + half}


def summarise(per_seed: list[dict]) -> dict:
    """Mean ± std and 95% t intervals over seeds; paired rkcnn − control differences."""
    top = _ci([p["top_score"] for p in per_seed])
    out = {"top_score": top, "top_score_cv_across_seeds": top["std"] / top["mean"] if top["mean"] else math.inf,
           "cv_subsets": _ci([p["cv_subsets"] for p in per_seed]),
           "recovery": {a: _ci([p["recovery"][a] for p in per_seed]) for a in ARMS},
           "rkcnn_minus": {a: _ci([p["recovery"]["rkcnn"] - p["recovery"][a] for p in per_seed]) for a in ARMS[1:]},
           "recovery_ceiling": _ci([p["recovery_ceiling"] for p in per_seed])}
    return out


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Run the toy experiment; write results.json and the PNGs into `out`; return the results."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        cfg = dry_run_config(cfg)
    per_seed = [run_seed(cfg, s) for s in tqdm(range(cfg.seeds), desc="toy seeds", unit="seed", disable=quiet)]
    s = summarise(per_seed)
    checks = {"top_score": s["top_score"]["mean"] > cfg.min_top_score,
              "recovery": s["recovery"]["rkcnn"]["mean"] >= cfg.min_recovery,
              "cv": s["cv_subsets"]["mean"] < cfg.max_cv}
    results = {
        "experiment": "toy", "dry_run": dry_run, "config": to_dict(cfg),
        "thresholds": {"min_top_score": cfg.min_top_score, "min_recovery": cfg.min_recovery, "max_cv": cfg.max_cv,
                       "match_threshold": cfg.match_threshold},
        "per_seed": [{k: v for k, v in p.items() if not k.startswith("_")} for p in per_seed],
        "summary": s, "checks": checks, "passed": all(checks.values()),
        "plots": plot_toy(out, cfg, per_seed[0]["_plot"], PLOTS), "seconds": round(time.time() - t0, 1),
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    log.info("wrote %s", out / "results.json")
    return results


def summary(results: dict) -> str:
    """Human-readable lines for the CLI."""
    s, t, c, cfg = results["summary"], results["thresholds"], results["checks"], results["config"]
    mark = lambda ok: "ok  " if ok else "FAIL"  # noqa: E731
    ci = lambda d, f="{:.3f}": f"{f.format(d['mean'])} [{f.format(d['low'])}, {f.format(d['high'])}]"  # noqa: E731
    lines = [
        f"toy ({cfg['model']}): {cfg['n_features']} features in {cfg['d_hidden']} dims, p={cfg['feature_probability']}; "
        f"probe: score={cfg['score']}, m={cfg['m']}, h={cfg['h']}, r={cfg['r']}, dedup={cfg['dedup']}, {cfg['seeds']} seeds"
        + ("  [dry run]" if results["dry_run"] else ""),
        f"  {mark(c['top_score'])} top score {ci(s['top_score'])}   (need > {t['min_top_score']}; "
        f"CV across seeds {s['top_score_cv_across_seeds']:.3f})",
        f"  {mark(c['cv'])} CV of the h subset scores {ci(s['cv_subsets'])}   (need < {t['max_cv']})",
        f"  {mark(c['recovery'])} recovery (|cos| >= {t['match_threshold']}): "
        + ", ".join(f"{a} {ci(s['recovery'][a], '{:.1%}')}" for a in ARMS)
        + f"   (need >= {t['min_recovery']:.0%}; ceiling {s['recovery_ceiling']['mean']:.1%})",
        "  rkcnn - control (paired): " + ", ".join(f"{a} {ci(s['rkcnn_minus'][a], '{:+.1%}')}" for a in ARMS[1:]),
        f"  {'PASS' if results['passed'] else 'FAIL'}",
    ]
    return "\n".join(lines)
