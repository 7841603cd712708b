"""`saelab experiment rkcnn-vs-baseline`: does RkCNN decoder initialisation reduce dead latents?

For each seed s = 0 .. seeds−1, two SAEs are trained on the same store, hook, batches and steps,
differing only in `--init`:

    baseline_s = train(TrainConfig(..., seed=s, init="random"))
    rkcnn_s    = train(TrainConfig(..., seed=s, init="rkcnn"))     the first n_mined latents start at
                                                                   RkCNN directions; the other rows are
                                                                   the same random rows as baseline_s

Both runs of a seed draw the same data order, validation chunks and random decoder rows (the SAE
draws all F random rows from the seeded global RNG, then overwrites the first n_mined). Each final
SAE is measured on the first eval_tokens of its validation split:

    dead_frac     = mean_i [ count_i = 0 ]             count_i = tokens on which latent i fired (f > 0)
    dead_count    = sum_i  [ count_i = 0 ]
    l0, mse, fvu  = saelab.train.validation.evaluate_sae     (raw units)
    mean_act(G)   = sum_{i∈G} sum_n f_ni / sum_{i∈G} count_i      mean activation when active, over a
                                                                   latent group G
    G_mined       = the rkcnn run's mined latents (for baseline_s: the same indices, a control)
    mined_max_cos = mean_{i∈G} max_{j∈G, j≠i} |cos(W_dec_i, W_dec_j)|   redundancy of the group's
                                                                   final decoder rows

Across seeds: mean ± std (ddof 1) per method, and the difference rkcnn − baseline with a Welch t
interval (`saelab.statistics.diff_means_ci`, level `level`). Inside the rkcnn runs, mined − other
latents likewise. Claims checked: fewer dead latents (upper CI end of the dead_frac difference < 0)
and reconstruction not hurt (lower CI end of the FVU difference <= 0, i.e. no significant increase).

Writes into `out`: results.json (keys `RESULT_KEYS`), training_curves.png (train FVU, L0 and dead
fraction over steps, mean over seeds with a min-max band), dead_latents.png (validation dead
fraction per method and seed, and mined vs other latents). The runs are under out/runs/. Without
`--data` the experiment collects its own store (`saelab.collect`) into out/store (a re-run reuses it).
`rkcnn_layers.py` repeats `compare` for several layers.

Not here: the probe (saelab.rkcnn), the training loop (saelab.train), statistics (saelab.statistics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from saelab.config import group, grouped, to_dict
from saelab.errors import UsageError, raise_all
from saelab.metrics import max_cos_to_others
from saelab.rkcnn import RkcnnConfig
from saelab.statistics import diff_means_ci, mean_std

log = logging.getLogger(__name__)

HELP = "baseline vs RkCNN-initialised SAEs on real activations: dead latents, L0, FVU with CIs over seeds"

METHODS = ("baseline", "rkcnn")
METRICS = ("dead_frac", "dead_count", "l0", "mse", "fvu", "mined_mean_act", "other_mean_act",
           "mined_dead_frac", "other_dead_frac", "mined_max_cos")
RESULT_KEYS = ("experiment", "dry_run", "config", "store", "hook", "d_in", "d_sae", "per_seed", "summary",
               "mined_vs_others", "claims", "plots", "seconds")
PLOTS = {"training_curves": "training_curves.png", "dead_latents": "dead_latents.png"}


@grouped
@dataclass
class CompareConfig:
    """Settings shared by the RkCNN comparison experiments (data, SAE, training, RkCNN init, stats)."""

    data: str | None = None
    """Activation store to use; default: collect one into OUT/store with the settings below."""
    model: str = "default"
    """Model to collect from when --data is not given (default: the embedded SmolLM2-135M)."""
    corpus: str = "sotu"
    """Corpus to collect from when --data is not given."""
    tokens: int = 120_000
    """Tokens to collect when --data is not given."""
    max_length: int = 256
    """Sequence length when collecting."""
    chunk_tokens: int = 4096
    """Rows per store chunk when collecting (train/val split by chunk: keep chunks small)."""
    collect_batch_size: int = 8
    """Sequences per forward pass when collecting."""
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu"] = "topk"
    """SAE architecture (both methods)."""
    d_sae: int = 2304
    """Latents per SAE."""
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    steps: int = 300
    """Optimizer steps per SAE (the store is cycled if needed)."""
    batch_size: int = 512
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    seeds: int = 3
    """Seeds 0 .. seeds-1; each trains one baseline and one RkCNN SAE."""
    val_fraction: float = 0.1
    """Store chunks held out for validation (per seed)."""
    eval_tokens: int = 16_384
    """Validation tokens for the final metrics."""
    eval_every: int = 50
    """Validation points on the training curves every N steps."""
    dead_window: int = 50
    """Training curves: a latent not fired for this many steps counts as dead."""
    init_tokens: int = 16_384
    """Sample for the input scale, b_dec and the RkCNN probe."""
    rkcnn: RkcnnConfig = group(RkcnnConfig, rkcnn_subsets=4608)
    """--rkcnn-* options of the RkCNN init (saelab/rkcnn/init.py)."""
    level: float = 0.95
    """Confidence level of the intervals."""

    def __post_init__(self):
        p = []
        if self.seeds < 2:
            p.append(f"seeds={self.seeds}: need at least 2 for a confidence interval (3 or more recommended)")
        for name in ("tokens", "max_length", "chunk_tokens", "collect_batch_size", "d_sae", "k", "steps",
                     "batch_size", "eval_tokens", "dead_window", "init_tokens"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.level < 1:
            p.append(f"level must be in (0, 1), got {self.level}")
        if self.rkcnn.rkcnn_fraction <= 0:
            p.append(f"rkcnn_fraction must be in (0, 1], got {self.rkcnn.rkcnn_fraction}")
        raise_all(p, "rkcnn comparison config")


@grouped
@dataclass
class Config(CompareConfig):
    """Settings of rkcnn-vs-baseline."""

    hook: str = "model.layers.15.mlp"
    """Hook point (a middle layer's MLP output by default)."""


def dry_run_config(cfg: CompareConfig, **extra) -> CompareConfig:
    """The same experiment shrunk to seconds: tiny SAE, few steps (data: a synthetic store)."""
    return dataclasses.replace(
        cfg, d_sae=128, k=8, steps=30, batch_size=128, seeds=2, eval_tokens=2048, eval_every=15, dead_window=10,
        init_tokens=2048, rkcnn_subsets=256, rkcnn_subset_size=None, lr=1e-3, **extra)


# ---------------------------------------------------------------------------------------------
# measuring one SAE


class LatentActivity(NamedTuple):
    """Per-latent activity of an SAE over some tokens."""

    count_F: torch.Tensor
    """int64 [F]: tokens on which each latent fired (f > 0)."""
    sum_F: torch.Tensor
    """float64 [F]: sum of each latent's activations."""
    tokens: int
    """Tokens seen."""


@torch.no_grad()
def latent_activity(sae, batches) -> LatentActivity:
    """count_F and sum_F of `sae.encode` over `batches` (iterable of raw x_BD)."""
    count_F = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    sum_F = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for x_BD in batches:
        f_BF = sae.encode(x_BD.float())
        count_F += (f_BF > 0).sum(0)
        sum_F += f_BF.double().sum(0)
        n += x_BD.shape[0]
    return LatentActivity(count_F, sum_F, n)


def group_stats(act: LatentActivity, mask_F: torch.Tensor) -> dict[str, float]:
    """Mean activation when active and dead fraction, for the latents in `mask_F` and the others.

    mean_act(G) = sum_{i∈G} sum_F[i] / sum_{i∈G} count_F[i]  (NaN when no latent of G fired);
    dead_frac(G) = mean_{i∈G} [count_F[i] = 0]               (NaN for an empty group).
    """
    out = {}
    for name, m in (("mined", mask_F), ("other", ~mask_F)):
        c = int(act.count_F[m].sum())
        out[f"{name}_mean_act"] = float(act.sum_F[m].sum()) / c if c else math.nan
        out[f"{name}_dead_frac"] = float((act.count_F[m] == 0).double().mean()) if bool(m.any()) else math.nan
    return out


def redundancy(W_dec_FD: torch.Tensor, mask_F: torch.Tensor) -> float:
    """mean_{i∈G} max_{j∈G, j≠i} |cos(W_dec_i, W_dec_j)| over the rows in mask_F (NaN for < 2 rows).

    Unlike `saelab.metrics.max_cos_to_others` (signed cosine, every row against all others, one value
    per row) this is unsigned (W and −W count as duplicates), restricted to a group and averaged. It
    is that helper on the stacked [W_G; −W_G]: a row's own negation (cos −1) is never the maximum.
    """
    W = W_dec_FD[mask_F].float()
    if W.shape[0] < 2:
        return math.nan
    return float(max_cos_to_others(torch.cat([W, -W]))[: W.shape[0]].mean())


max_cos = redundancy  # the old name


def compare_values(a, b, level: float = 0.95) -> dict:
    """mean ± std of both samples and mean(a) − mean(b) with a Welch interval (NaNs dropped).

    Returns {"a": {mean, std, n}, "b": {...}, "diff": {estimate, low, high}}; the diff is None when
    either side has fewer than two finite values.
    """
    a = [float(v) for v in a if v is not None and math.isfinite(v)]
    b = [float(v) for v in b if v is not None and math.isfinite(v)]
    ms = lambda x: mean_std(x)._asdict() if x else {"mean": math.nan, "std": math.nan, "sem": math.nan, "n": 0}  # noqa: E731
    diff = diff_means_ci(a, b, level)._asdict() if len(a) >= 2 and len(b) >= 2 else None
    return {"a": ms(a), "b": ms(b), "diff": diff}


# ---------------------------------------------------------------------------------------------
# the comparison


def train_config(cfg: CompareConfig, store: str, hook: str, out: Path, method: str, seed: int):
    """The TrainConfig of one run: identical for both methods except `init`."""
    from saelab.train import TrainConfig

    return TrainConfig(
        data=store, hook=hook, out=str(out), architecture=cfg.architecture, d_sae=cfg.d_sae, k=[cfg.k],
        lr=cfg.lr, batch_size=cfg.batch_size, tokens=cfg.steps * cfg.batch_size,
        warmup_steps=max(1, min(100, cfg.steps // 10)), eval_every=cfg.eval_every, eval_tokens=cfg.eval_tokens,
        checkpoint_every=0, val_fraction=cfg.val_fraction, seed=seed, init_tokens=cfg.init_tokens,
        init="random" if method == "baseline" else "rkcnn", rkcnn=cfg.rkcnn, dead_window=cfg.dead_window,
        log_every=max(1, min(10, cfg.steps // 30)), shuffle_chunks=4, overwrite=True)


def run_one(cfg: CompareConfig, store: str, hook: str, out: Path, method: str, seed: int,
            mined_F: torch.Tensor | None, quiet: bool) -> tuple[dict, torch.Tensor]:
    """Train one SAE and measure it; returns (per-seed row, the mined mask used for the groups)."""
    from saelab.train import sources as td
    from saelab.saes import load_sae
    from saelab.train import train

    tcfg = train_config(cfg, store, hook, out, method, seed)
    res = train(tcfg, quiet=quiet)
    sae = load_sae(res.final_dir)
    if method == "rkcnn":
        mined_F = torch.zeros(cfg.d_sae, dtype=torch.bool)
        mined_F[sae.metadata["mined_latents"]] = True
    assert mined_F is not None, "the rkcnn run of a seed must come first: it defines the mined latents"
    src = td.StoreSource(tcfg)
    act = latent_activity(sae, src.val_batches(tcfg, 0, 1))
    m = res.runs[0].final_metrics
    row = {"seed": seed, "method": method, "dead_frac": float((act.count_F == 0).double().mean()),
           "dead_count": int((act.count_F == 0).sum()), "l0": m["val_l0"], "mse": m["val_mse"],
           "fvu": m["val_fvu"], **group_stats(act, mined_F), "mined_max_cos": redundancy(sae.W_dec_FD.detach(), mined_F),
           "n_mined": int(mined_F.sum()),
           "eval_tokens": act.tokens, "run_dir": str(out)}
    return row, mined_F


def compare(cfg: CompareConfig, store: str, hook: str, out: Path, quiet: bool = False) -> dict:
    """Train both methods for every seed on (store, hook) and summarise; see the module docstring.

    Returns {"per_seed": [rows], "summary": {metric: {"baseline", "rkcnn", "diff"}},
    "mined_vs_others": {...}, "claims": {...}, "curves": {method: [metrics.jsonl paths]}}.
    """
    rows, curves = [], {m: [] for m in METHODS}
    for seed in range(cfg.seeds):
        mined_F = None
        for method in ("rkcnn", "baseline"):  # rkcnn first: it decides which latents are "mined"
            run_dir = out / "runs" / f"{method}_s{seed}"
            row, mined_F = run_one(cfg, store, hook, run_dir, method, seed, mined_F, quiet)
            rows.append(row)
            curves[method].append(str(run_dir / "metrics.jsonl"))
            log.info("%s seed %d: dead %.2f%%, L0 %.1f, FVU %.4f", method, seed, 100 * row["dead_frac"],
                     row["l0"], row["fvu"])
    return {**summarise(rows, cfg.level), "per_seed": rows, "curves": curves}


def summarise(rows: list[dict], level: float) -> dict:
    """Per-metric mean ± std per method, rkcnn − baseline intervals, mined − others, and the claims."""
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    summary = {}
    for metric in METRICS:
        c = compare_values([r[metric] for r in by["rkcnn"]], [r[metric] for r in by["baseline"]], level)
        summary[metric] = {"baseline": c["b"], "rkcnn": c["a"], "diff": c["diff"]}
    mvo = {}
    for metric in ("mean_act", "dead_frac"):
        c = compare_values([r[f"mined_{metric}"] for r in by["rkcnn"]], [r[f"other_{metric}"] for r in by["rkcnn"]], level)
        mvo[metric] = {"mined": c["a"], "other": c["b"], "diff": c["diff"]}
    dead, fvu = summary["dead_frac"]["diff"], summary["fvu"]["diff"]
    claims = {"fewer_dead": bool(dead is not None and dead["high"] < 0),
              "fvu_not_worse": bool(fvu is not None and fvu["low"] <= 0),
              "level": level,
              "rule": "fewer_dead: upper CI end of dead_frac(rkcnn) - dead_frac(baseline) < 0; "
                      "fvu_not_worse: lower CI end of fvu(rkcnn) - fvu(baseline) <= 0"}
    claims["supported"] = claims["fewer_dead"] and claims["fvu_not_worse"]
    return {"summary": summary, "mined_vs_others": mvo, "claims": claims}


# ---------------------------------------------------------------------------------------------
# data


def collect_store(cfg: CompareConfig, hooks: list[str], out: Path, quiet: bool) -> str:
    """Collect `hooks` (one forward pass per batch) into out/store; a finished store is reused."""
    from saelab.collect import CollectConfig, collect

    cc = CollectConfig(out=str(out / "store"), model=cfg.model, hook=list(hooks), corpus=cfg.corpus,
                       tokens=cfg.tokens, chunk_tokens=cfg.chunk_tokens, max_length=cfg.max_length,
                       batch_size=cfg.collect_batch_size)
    res = collect(cc, quiet=quiet)
    log.info("store %s: %s tokens", res.out, f"{res.tokens:,}")
    return str(res.out)


def synthetic_store(root: Path, hook: str, seed: int = 0) -> str:
    """A small planted-feature store (saelab.store.synthetic.make_synthetic_store) for dry runs."""
    from saelab.store.synthetic import make_synthetic_store

    if not (root / "store.json").is_file():
        make_synthetic_store(root, d_in=32, n_tokens=16_384, chunk_tokens=1024, seed=seed, hook=hook)
    return str(root)


@contextlib.contextmanager
def threads(n: int | None):
    """torch intra-op threads = n inside (None: unchanged). Dry runs use 1: tiny matmuls are faster
    on one thread than with OpenMP threads spinning on a shared machine."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_hook(store: str, hook: str) -> int:
    """Width of `hook` in `store`; UsageError naming the store's hooks when it is missing."""
    from saelab.store import load_store

    s = load_store(store)
    if hook not in s.hooks:
        raise UsageError(f"hook {hook!r} is not in the store {store} (it has: {', '.join(s.hooks)}). "
                         "Pass --hook with one of them, or leave out --data to collect a new store.")
    return int(s.width(hook))


# ---------------------------------------------------------------------------------------------
# the experiment


def write_results(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(_clean(results), indent=2) + "\n")
    tmp.replace(out / "results.json")
    log.info("wrote %s", out / "results.json")


def _clean(x):
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def run(cfg: Config, out: str | Path, dry_run: bool = False, quiet: bool = False) -> dict:
    """Run rkcnn-vs-baseline; write results.json and the PNGs into `out`; return the results."""
    from saelab.experiments.rkcnn_plots import plot_dead_latents, plot_training_curves

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        cfg = dry_run_config(cfg)
        store = synthetic_store(out / "store", cfg.hook)
    else:
        store = cfg.data or collect_store(cfg, [cfg.hook], out, quiet)
    d_in = check_hook(store, cfg.hook)
    with threads(1 if dry_run else None):
        res = compare(cfg, store, cfg.hook, out, quiet)
    plot_training_curves(out / PLOTS["training_curves"], res["curves"], title=f"{cfg.hook}, {cfg.seeds} seeds")
    plot_dead_latents(out / PLOTS["dead_latents"], res["per_seed"], title=cfg.hook)
    results = {"experiment": "rkcnn-vs-baseline", "dry_run": dry_run, "config": to_dict(cfg), "store": store,
               "hook": cfg.hook, "d_in": d_in, "d_sae": cfg.d_sae, "per_seed": res["per_seed"],
               "summary": res["summary"], "mined_vs_others": res["mined_vs_others"], "claims": res["claims"],
               "plots": dict(PLOTS), "seconds": round(time.time() - t0, 1)}
    write_results(out, results)
    return results


def summary_lines(s: dict, level: float) -> list[str]:
    """One line per metric: baseline, rkcnn (mean ± std) and the difference with its interval."""
    fmt = {"dead_frac": "{:.2%}", "other_dead_frac": "{:.2%}", "mined_dead_frac": "{:.2%}", "dead_count": "{:.1f}"}
    lines = [f"  {'metric':<16} {'baseline':>22} {'rkcnn':>22}   rkcnn - baseline [{level:.0%} CI]"]
    for metric, v in s.items():
        f = fmt.get(metric, "{:.4g}")
        pm = lambda d: "n/a" if d["mean"] is None or (isinstance(d["mean"], float) and math.isnan(d["mean"])) else (  # noqa: E731
            f.format(d["mean"]) + " ± " + ("n/a" if d["std"] is None or math.isnan(d["std"]) else f.format(d["std"])))
        d = v["diff"]
        ci = "n/a" if d is None else f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"
        lines.append(f"  {metric:<16} {pm(v['baseline']):>22} {pm(v['rkcnn']):>22}   {ci}")
    return lines


def summary(results: dict) -> str:
    """Human-readable lines for the CLI."""
    cfg, c = results["config"], results["claims"]
    head = (f"rkcnn-vs-baseline: {results['hook']}, {cfg['architecture']} d_sae={results['d_sae']}, {cfg['steps']} "
            f"steps x {cfg['batch_size']} tokens, {cfg['seeds']} seeds" + ("  [dry run]" if results["dry_run"] else ""))
    mvo = results["mined_vs_others"]["mean_act"]
    lines = [head, *summary_lines(results["summary"], cfg["level"])]
    if mvo["diff"] is not None:
        lines.append(f"  rkcnn runs, mean activation when active: mined - other = {mvo['diff']['estimate']:.4g} "
                     f"[{mvo['diff']['low']:.4g}, {mvo['diff']['high']:.4g}]")
    lines.append(f"  fewer dead latents: {'yes' if c['fewer_dead'] else 'no'}; FVU not worse: "
                 f"{'yes' if c['fvu_not_worse'] else 'no'}  -> claim {'SUPPORTED' if c['supported'] else 'NOT supported'}")
    return "\n".join(lines)
