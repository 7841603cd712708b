"""`saelab experiment rkcnn-arms`: baseline vs data-driven SAE inits on a store, paired by seed.

A plan is a list of arms (`arms_of`); every arm of a seed trains on the same store, batches,
validation chunks and steps, and starts from the same random rows outside its data-driven latents:

    factorial  TopK and ReLU (architecture defaults), x4, short runs; baseline, and rkcnn with
               encoder {random, tied} x dedup {none, cos_cap 0.5} x fraction {10%, 50%} (h = 2 d_sae)
    dead       ReLU + L1 with a high coefficient, x8, no AuxK and no resampling (a regime with many
               dead latents); baseline, rkcnn {5, 10, 25}% x dedup {none, cos_cap}, the variant
               rkcnn-tied-cos_cap-{10, 25} (tied encoder, rows signed towards the heavy tail,
               |cos| cap), and the 10% controls data_rows, kmeans, pca (random encoder, as the
               method) and data_rows-tied, kmeans-tied, pca-tied (tied and signed, as the
               variant). `--dead-architecture topk`: the same arms with TopK
               (k, AuxK off), where latents die at a high --lr (6e-3 at x8 kills a third of them
               in 400 steps on SmolLM2 layer 15; docs/rkcnn.md) or in long wide runs
    faithful   the RkCNN seed's phase 2: ReLU + L1 with the seed's λ = 1e-3 in its units, unit-norm
               decoder, unweighted L1, untied random encoder, b_dec = 0, Adam 1e-3 without warm-up or
               decay, x8, batch 256, 10k steps; baseline and rkcnn (fraction 0.5 capped at h = 600,
               m = 24 = √576, coordinate-mean kurtosis, no dedup, random encoder), and its control
               data_rows-seed (as many random centred data rows, 600, with the same random encoder)

The seed's loss is mean_elements (x − x̂)² + λ mean_elements f on raw x; saelab normalises x_n = s x
(s = √(D / E‖x‖²)) and minimises mean_b ‖x_n − x̂_n‖² + c mean_b Σ_f f_n, the same objective up to a
factor when c = λ (D / F) s, which the faithful plan uses.

Measured per run (`measure`; with --steps 0 the step-0 SAE is also the final one): at step 0 (`initial_sae`, the SAE exactly as `train` builds it) and at
the end, on the first eval_tokens validation tokens, FVU, L0; over the first `dead_tokens` tokens of
the whole store (as the seed counted on its training tokens) the dead latents (never fired), L0 and
the seed's explained variance EV = 1 − Var(x − x̂) / Var(x) (variances over all entries); dead
fraction of the data-driven latents and of the others; `redundancy` of the data-driven rows.
Across seeds: mean ± std per arm and the paired difference arm − baseline (same architecture, same
seed) with a t interval. Each run's row is saved in out/runs/ARM_sSEED/row.json and reused, so the
same command continues an interrupted experiment. Runs of 2,000 steps or more write a step
checkpoint every 1,000 steps and continue from it (exactly, as `train --resume`), so a killed
faithful run loses at most 1,000 steps. Processes sharing an --out split the jobs between them: each
claims a run with out/runs/ARM_sSEED.claim (created exclusively; holding host and pid) and skips runs
another live process holds, so two processes over the same seeds keep both cores busy to the end.
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

import numpy as np
import torch
from tqdm import tqdm

from saelab import train as tr
from saelab.atomic import claim_file
from saelab.train import checkpoint as ck
from saelab.train import sources as td
from saelab.config import to_dict
from saelab.errors import UsageError, raise_all
from saelab.experiments import rkcnn_compare as rc
from saelab.experiments.rkcnn_plots import plot_arms
from saelab.saes import load_sae, make_sae
from saelab.store import load_store
from saelab.statistics import mean_std, t_quantile

log = logging.getLogger(__name__)

HELP = "baseline vs RkCNN/data-driven inits on a store: factorial ablation, dead-latent regime, the seed's phase 2"
RESULT_KEYS = ("experiment", "dry_run", "config", "store", "hook", "arms", "per_run", "summary", "plots", "seconds")
PLOTS = {"arms": "arms.png"}
CHECKPOINT_EVERY = 1000
"""Step checkpoints of runs with at least twice this many steps (the faithful plan's 10k)."""
PLAN_DEFAULTS = {"factorial": dict(steps=200, expansion=4, l1_coeff=None),
                 "dead": dict(steps=400, expansion=8, l1_coeff=40.0),
                 "faithful": dict(steps=10_000, expansion=8, l1_coeff=None)}
SEED_LAMBDA = 1e-3
"""The RkCNN seed's L1 coefficient, in its units (mean over entries of raw activations)."""


@dataclass
class Config:
    """Settings of rkcnn-arms (None: the plan's default)."""

    data: str = ""
    """Activation store (saelab collect); required unless --dry-run."""
    hook: str = "model.layers.15.mlp"
    """Hook point to train on."""
    plan: Literal["factorial", "dead", "faithful"] = "factorial"
    """Which arms (module docstring)."""
    dead_architecture: Literal["relu", "topk"] = "relu"
    """Architecture of the dead plan's arms: ReLU + L1, or TopK with AuxK off."""
    arms: str = ""
    """Comma-separated arm names to run (default: all of the plan's; baselines always run)."""
    seeds: int = 5
    """Seeds first_seed .. first_seed + seeds - 1."""
    first_seed: int = 0
    """First seed: processes given disjoint seed ranges and the same --out can run side by side; a
    last run over all seeds then reuses every saved row and summarises them together."""
    steps: int | None = None
    """Optimizer steps per SAE (plan default: factorial 200, dead 400, faithful 10000); 0: measure at step 0 only."""
    batch_size: int = 256
    """Tokens per step."""
    expansion: int | None = None
    """d_sae = expansion * d_in (plan default: factorial 4, dead and faithful 8)."""
    l1_coeff: float | None = None
    """ReLU L1 coefficient in saelab units (dead default 40; faithful: the seed's lambda converted)."""
    lr: float = 1e-3
    """Adam learning rate."""
    subsets: int | None = None
    """RkCNN h (default: 2 * d_sae, enough to mine 50%; faithful: 600)."""
    k: int = 32
    """TopK k."""
    eval_tokens: int = 16_384
    """Validation tokens for FVU and L0 (step 0 and final)."""
    dead_tokens: int = 1_000_000
    """Tokens of the whole store over which dead latents, L0 and EV are counted (all, if fewer)."""
    init_tokens: int = 16_384
    """Init sample: input scale, b_dec and the probe."""
    val_fraction: float = 0.05
    """Store chunks held out for validation."""
    level: float = 0.95
    """Confidence level of the paired intervals."""
    saved_only: bool = False
    """Train nothing: summarise the rows saved so far (while other processes are still training)."""

    def __post_init__(self):
        p = []
        if self.seeds < 2:
            p.append(f"seeds={self.seeds}: need at least 2 for an interval")
        if self.first_seed < 0:
            p.append(f"first_seed must be >= 0, got {self.first_seed}")
        for name in ("batch_size", "eval_tokens", "dead_tokens", "init_tokens", "k"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.level < 1:
            p.append(f"level must be in (0, 1), got {self.level}")
        raise_all(p, "rkcnn-arms config")

    def resolved(self) -> "Config":
        """A copy with the plan's defaults filled in."""
        return dataclasses.replace(self, **{k: v for k, v in PLAN_DEFAULTS[self.plan].items()
                                            if getattr(self, k) is None and v is not None})


def arms_of(plan: str, dead_architecture: str = "relu") -> dict[str, dict]:
    """Arm name -> {architecture, init, fraction, options}; baselines are "baseline-ARCH"."""
    arms: dict[str, dict] = {}
    if plan == "factorial":
        for arch in ("topk", "relu"):
            arms[f"baseline-{arch}"] = dict(architecture=arch, init="random")
            for enc in ("random", "tied"):
                for dedup in ("none", "cos_cap"):
                    for frac in (0.1, 0.5):
                        arms[f"{arch}-{enc}-{dedup}-{int(100 * frac)}"] = dict(
                            architecture=arch, init="rkcnn", fraction=frac,
                            options={"init_encoder": enc, "dedup": dedup, "orient": "heavy_tail" if enc == "tied" else "none"})
    elif plan == "dead":
        a = dead_architecture
        arms[f"baseline-{a}"] = dict(architecture=a, init="random")
        for frac in (0.05, 0.1, 0.25):
            for dedup in ("none", "cos_cap"):
                arms[f"rkcnn-{dedup}-{int(100 * frac)}"] = dict(architecture=a, init="rkcnn", fraction=frac,
                                                                options={"dedup": dedup})
        for frac in (0.1, 0.25):  # the variant: tied encoder, heavy-tail sign, |cos| cap
            arms[f"rkcnn-tied-cos_cap-{int(100 * frac)}"] = dict(
                architecture=a, init="rkcnn", fraction=frac,
                options={"init_encoder": "tied", "dedup": "cos_cap", "orient": "heavy_tail"})
        for kind in ("data_rows", "kmeans", "pca"):
            arms[f"{kind}-10"] = dict(architecture=a, init=kind, fraction=0.1, options={})
            arms[f"{kind}-tied-10"] = dict(architecture=a, init=kind, fraction=0.1,  # the variant's controls
                                           options={"init_encoder": "tied", "orient": "heavy_tail"})
    else:
        arms["baseline-relu"] = dict(architecture="relu", init="random")
        arms["rkcnn-seed"] = dict(architecture="relu", init="rkcnn", fraction=0.5, options={})
        # its control: as many random data rows as the method mines (min(0.5 F, h)), random encoder
        arms["data_rows-seed"] = dict(architecture="relu", init="data_rows", fraction="as_mined", options={})
    return arms


def baseline_of(arm: dict) -> str:
    return f"baseline-{arm['architecture']}"


# ---------------------------------------------------------------------------------------------
# one run


def train_config(cfg: Config, store: str, d_in: int, arm: dict, seed: int, out: Path, input_scale: float,
                 resume: bool = False):
    """The TrainConfig of one arm and seed (identical across arms but for the init fields); `resume`
    continues from the newest intact checkpoint in `out` (else whatever is there is replaced)."""
    d_sae = cfg.expansion * d_in
    sae_options, l1 = {}, cfg.l1_coeff
    if arm["architecture"] == "relu" and cfg.plan in ("dead", "faithful"):
        sae_options = {"normalize_decoder": True, "l1_weighted": False}
    if arm["architecture"] == "topk" and cfg.plan == "dead":
        sae_options = {"aux_k": 0}  # no AuxK: nothing revives a dead latent
    if cfg.plan == "faithful":
        sae_options.update(init_enc_from_dec=False, b_dec_init="zeros")
        l1 = SEED_LAMBDA * d_in / d_sae * input_scale
    steps = cfg.steps
    h = cfg.subsets or (600 if cfg.plan == "faithful" else 2 * d_sae)
    fraction = arm.get("fraction", 0.5)
    if fraction == "as_mined":  # as many rows as rkcnn at fraction 0.5 mines: min(0.5 F, h)
        fraction = min(round(0.5 * d_sae), h) / d_sae
    return tr.TrainConfig(
        data=store, hook=cfg.hook, out=str(out), architecture=arm["architecture"], d_sae=d_sae,
        k=[cfg.k] if arm["architecture"] == "topk" else None, l1_coeff=l1 if arm["architecture"] == "relu" else None,
        lr=cfg.lr, batch_size=cfg.batch_size, tokens=max(1, steps) * cfg.batch_size,
        warmup_steps=0 if cfg.plan == "faithful" else max(1, min(100, steps // 10)),
        decay_fraction=0.0 if cfg.plan == "faithful" else 0.2, eval_every=0, eval_tokens=cfg.eval_tokens,
        checkpoint_every=CHECKPOINT_EVERY if steps >= 2 * CHECKPOINT_EVERY else 0, val_fraction=cfg.val_fraction,
        seed=seed, init_tokens=cfg.init_tokens,
        init=arm["init"], rkcnn_fraction=fraction, rkcnn_subsets=h,
        **{"rkcnn_" + k: v for k, v in arm.get("options", {}).items()}, sae_options=sae_options,
        dead_window=max(1, min(1000, steps // 4)), log_every=max(1, steps // 100), shuffle_chunks=4,
        resume=resume, overwrite=not resume)


def initial_sae(tcfg):
    """The SAE of `tcfg` at step 0, built exactly as `train` builds it (seed, init sample, init dirs)."""
    src = td.StoreSource(tcfg)
    (_, sae_cfg), = tr.sae_configs(tcfg, src.d_in)
    torch.manual_seed(tcfg.seed)
    x_init_ND = src.init_sample(tcfg)
    sae = make_sae(sae_cfg, init_dirs_FD=tr.init_dirs(tcfg, sae_cfg.d_sae, x_init_ND))
    tr.init_encoder_(sae, tcfg)
    sae.init_from_data_(x_init_ND)
    return sae, src


@torch.no_grad()
def store_pass(sae, store, hook: str, n_tokens: int, batch: int = 4096) -> dict:
    """Dead latents, L0 and the seed's EV over the first n_tokens of every chunk in store order."""
    count_F = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    n, l0 = 0, 0.0
    s = torch.zeros(4, dtype=torch.float64)  # Σx, Σx², Σ(x−x̂), Σ(x−x̂)² over all entries
    sae.eval()
    for chunk in store.select("all"):
        X = torch.from_numpy(np.array(store.read_activations(chunk, hook)))
        for i in range(0, X.shape[0], batch):
            x = X[i:i + batch].float()[: n_tokens - n]
            x_hat, f = sae(x)
            fired = f > 0
            count_F += fired.sum(0)
            l0 += float(fired.sum())
            d = (x - x_hat).double()
            xd = x.double()
            s += torch.stack([xd.sum(), (xd * xd).sum(), d.sum(), (d * d).sum()])
            n += x.shape[0]
            if n >= n_tokens:
                break
        if n >= n_tokens:
            break
    E = n * sae.cfg.d_in
    var = lambda a, b: b / E - (a / E) ** 2  # noqa: E731
    return {"count_F": count_F, "tokens": n, "l0_store": l0 / max(n, 1),
            "ev_seed": float(1 - var(s[2], s[3]) / var(s[0], s[1]))}


def measure(cfg: Config, tcfg, store, arm_name: str, seed: int) -> dict:
    """Train one arm and seed; the row of metrics (module docstring)."""
    t0 = time.time()
    sae0, src = initial_sae(tcfg)
    m0 = tr.evaluate_sae(sae0, src.val_batches(tcfg, 0, 1), torch.device("cpu"))
    if cfg.steps:
        res = tr.train(tcfg, quiet=True)
        sae, fin = load_sae(res.final_dir), res.runs[0].final_metrics
    else:  # step 0 only: the initial SAE is the final one
        sae, fin = sae0, m0
    mined_F = sae.init_from_dirs_F.bool()
    sp = store_pass(sae, store, tcfg.hook, cfg.dead_tokens)
    dead_F = sp["count_F"] == 0
    return {"arm": arm_name, "seed": seed, "n_mined": int(mined_F.sum()),
            "fvu_step0": m0["val_fvu"], "l0_step0": m0["val_l0"], "fvu": fin["val_fvu"], "l0": fin["val_l0"],
            "mse": fin["val_mse"], "dead_frac": float(dead_F.double().mean()), "dead_count": int(dead_F.sum()),
            "dead_tokens": sp["tokens"], "l0_store": sp["l0_store"], "ev_seed": sp["ev_seed"],
            "mined_dead_frac": float(dead_F[mined_F].double().mean()) if mined_F.any() else math.nan,
            "other_dead_frac": float(dead_F[~mined_F].double().mean()) if (~mined_F).any() else math.nan,
            "redundancy_step0": rc.redundancy(sae0.W_dec_FD.detach(), sae0.init_from_dirs_F.bool()),
            "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# the experiment

METRICS = ("dead_frac", "dead_count", "fvu", "fvu_step0", "l0", "l0_store", "ev_seed", "mse", "mined_dead_frac",
           "other_dead_frac", "redundancy_step0", "n_mined", "seconds")


def paired(a: list[float], b: list[float], level: float) -> dict | None:
    """mean of a_i − b_i with a t interval (pairs with a NaN dropped); None for < 2 pairs."""
    d = [x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(d) < 2:
        return None
    ms = mean_std(d)
    half = t_quantile(0.5 + level / 2, ms.n - 1) * ms.sem
    return {"estimate": ms.mean, "low": ms.mean - half, "high": ms.mean + half, "n": ms.n}


def summarise(rows: list[dict], arms: dict[str, dict], level: float) -> dict:
    """Per arm and metric: mean ± std, and the paired difference to its baseline."""
    by = {name: {r["seed"]: r for r in rows if r["arm"] == name} for name in arms}
    out = {}
    for name, arm in arms.items():
        base = by.get(baseline_of(arm), {})
        seeds = sorted(set(by[name]) & set(base)) if name != baseline_of(arm) else sorted(by[name])
        entry = {}
        for metric in METRICS:
            vals = [by[name][s][metric] for s in sorted(by[name])]
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            entry[metric] = {**(mean_std(finite)._asdict() if finite else {"mean": math.nan, "n": 0}),
                             "diff": paired([by[name][s][metric] for s in seeds], [base[s][metric] for s in seeds], level)
                             if name != baseline_of(arm) else None}
        out[name] = entry
    return out


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Train every arm for every seed (reusing saved rows), summarise, plot; results.json in `out`."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.resolved()
    if dry_run:
        cfg = dataclasses.replace(cfg, steps=20 if cfg.steps else 0, expansion=2, seeds=2, eval_tokens=1024, dead_tokens=4096,
                                  init_tokens=1024, batch_size=128, subsets=None)
        store_path = rc.synthetic_store(out / "store", cfg.hook)
    elif not cfg.data:
        raise UsageError("rkcnn-arms needs --data STORE (collect one with `saelab collect --hook HOOK`).")
    else:
        store_path = cfg.data
    d_in = rc.check_hook(store_path, cfg.hook)
    store = load_store(store_path)
    arms = arms_of(cfg.plan, cfg.dead_architecture)
    if cfg.arms:
        wanted = {a.strip() for a in cfg.arms.split(",") if a.strip()}
        unknown = sorted(wanted - set(arms))
        if unknown:
            raise UsageError(f"unknown arm(s) {', '.join(unknown)} for plan {cfg.plan}; the arms are: {', '.join(arms)}")
        keep = wanted | {baseline_of(arms[a]) for a in wanted}
        arms = {k: v for k, v in arms.items() if k in keep}
    sample_cfg = _sample_tcfg(store_path, cfg)
    x_ND = td.StoreSource(sample_cfg).init_sample(sample_cfg)
    input_scale = math.sqrt(d_in / float(x_ND.float().pow(2).sum(1).mean()))
    rows, elsewhere, missing = [], [], []
    jobs = [(seed, name) for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds) for name in arms]
    (out / "runs").mkdir(exist_ok=True)
    with rc.threads(1 if dry_run else None):
        for seed, name in tqdm(jobs, desc="rkcnn-arms", unit="run", disable=quiet):
            run_dir = out / "runs" / f"{name}_s{seed}"
            saved = run_dir / "row.json"
            if saved.is_file():  # JSON has no NaN: null back to nan
                rows.append(_read_row(saved))
                continue
            claim_path = out / "runs" / f"{name}_s{seed}.claim"
            if cfg.saved_only:
                missing.append(f"{name} seed {seed}")
                continue
            if not claim_file(claim_path):
                elsewhere.append((name, seed, run_dir))
                continue
            try:
                if saved.is_file():  # finished by another process between the two checks
                    rows.append(_read_row(saved))
                    continue
                resume = ck.intact_checkpoint(run_dir) is not None
                tcfg = train_config(cfg, store_path, d_in, arms[name], seed, run_dir, input_scale, resume=resume)
                row = measure(cfg, tcfg, store, name, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "row.json.tmp").write_text(json.dumps(rc._clean(row)) + "\n")
                (run_dir / "row.json.tmp").replace(saved)
                rows.append(row)
            finally:
                claim_path.unlink(missing_ok=True)
            log.info("%s seed %d: dead %.2f%%, FVU %.4f (step 0: %.3g), %.0f s", name, seed, 100 * row["dead_frac"],
                     row["fvu"], row["fvu_step0"], row["seconds"])
    for name, seed, run_dir in elsewhere:  # held by another process when this one passed them
        if (run_dir / "row.json").is_file():
            rows.append(_read_row(run_dir / "row.json"))
        else:
            log.warning("%s seed %d is being trained by another process: left out of this summary (run the "
                        "same command again once it has finished)", name, seed)
    if missing:
        log.warning("--saved-only: %d run(s) not saved yet, left out of this summary: %s", len(missing), ", ".join(missing))
    results = {"experiment": "rkcnn-arms", "dry_run": dry_run, "config": to_dict(cfg), "store": store_path,
               "hook": cfg.hook, "arms": arms, "per_run": rows, "summary": summarise(rows, arms, cfg.level),
               "plots": dict(PLOTS), "seconds": round(time.time() - t0, 1)}
    plot_arms(out / PLOTS["arms"], results)
    rc.write_results(out, results)
    return results


def _read_row(path: Path) -> dict:
    """A saved row (JSON has no NaN: null back to nan)."""
    return {k: math.nan if v is None else v for k, v in json.loads(path.read_text()).items()}


def _sample_tcfg(store: str, cfg: Config):
    return tr.TrainConfig(data=store, hook=cfg.hook, init_tokens=cfg.init_tokens, val_fraction=cfg.val_fraction,
                       batch_size=cfg.batch_size)


def summary(results: dict) -> str:
    """One line per arm: dead %, FVU, FVU at step 0, L0, EV, each with the paired difference to baseline."""
    cfg = results["config"]
    lines = [f"rkcnn-arms ({cfg['plan']}): {results['hook']}, x{cfg['expansion']}, {cfg['steps']} steps x "
             f"{cfg['batch_size']}, {cfg['seeds']} seeds" + ("  [dry run]" if results["dry_run"] else "")]
    for name, e in results["summary"].items():
        parts = []
        for metric, fmt in (("dead_frac", "{:.2%}"), ("fvu", "{:.4f}"), ("fvu_step0", "{:.3g}"), ("l0", "{:.1f}"),
                            ("ev_seed", "{:.3f}")):
            v, d = e[metric], e[metric]["diff"]
            txt = f"{metric} {fmt.format(v['mean'])}" if v.get("n") else f"{metric} n/a"
            if d:
                txt += f" ({fmt.format(d['estimate'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}])"
            parts.append(txt)
        lines.append(f"  {name:<26} " + "; ".join(parts))
    return "\n".join(lines)
