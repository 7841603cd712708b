"""Train sparse autoencoders on an activation store: the loop, its config, sweeps, resume and DDP.

Owns `TrainConfig`, `train(cfg) -> TrainResult` and `evaluate_checkpoint`. The SAE maths lives in
`saelab.saes` (this loop only calls `training_loss`, the optimizer hooks and `save`), reading and
shuffling in `saelab.store`, the on-disk resume state in `saelab.checkpoint`, schedules and metric
sinks in `saelab.train_state`. Deliberately left out: gradient accumulation, mixed optimizers,
multi-node launch logic beyond what torchrun's environment variables give.

One step, for every SAE r of the sweep on the same batch x_BD (one read per batch, shared):

    out_r   = sae_r.training_loss(x_BD, sparsity_scale = s(step))     loss = mse + coeff * sparsity + aux
    grad    = d out_r.loss / d theta_r          (DDP: all-reduce mean over ranks)
    check   x_BD, out_r.loss and every grad are finite   -> else stop before the optimizer step
    Adam(lr(step), betas) step, with sae_r.before_/after_optimizer_step_() around it

Schedules lr(step) and s(step): see `saelab.train_state`. Shape legend: see `saelab/saes/base.py`
(B tokens in a batch, D d_in, F d_sae).

Output layout (a single SAE writes its files straight into OUT; a sweep gives each SAE OUT/<name>/):

    OUT/config.json              the resolved TrainConfig
    OUT/[<name>/]sae_best/       best validation loss so far       OUT/[<name>/]final/   last step
    OUT/[<name>/]metrics.jsonl   one object per log/eval step      OUT/[<name>/]tb/      TensorBoard
    OUT/[<name>/]training_curves.png
    OUT/step_000500/             resumable checkpoint of the whole sweep (see saelab.checkpoint)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saelab import checkpoint as ck
from saelab.config import config_from_dict, to_dict
from saelab.errors import UsageError, raise_all
from saelab import train_data as td
from saelab.train_state import (DeadTracker, JsonlSink, MultiSink, NullSink, PrefixSink, TensorBoardSink,
                                WandbSink, lr_at, plot_curves, resample_dead_, sparsity_scale_at)

log = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """Everything `saelab train` needs; field name = flag = YAML key. SAE-specific options (e.g.
    `aux_k`) come from the architecture's own config class and travel in `sae_options`."""

    data: str | None = None
    """Activation store directory (from `saelab collect`)."""
    hook: str | None = None
    """Hook point to train on; default: the store's only hook."""
    layer: int | None = None
    """Shorthand for --hook model.layers.N (the residual stream after decoder layer N)."""
    out: str = "runs/train"
    """Output directory (checkpoints, sae_best/, final/, metrics)."""
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu"] | None = None
    """SAE architecture; None (unset) = auto: topk, or batchtopk on a LoRA store (see AUTO_DEFAULTS)."""
    expansion_factor: list[int] | None = None
    """d_sae = expansion_factor * d_in; several values (comma-separated) train one SAE each;
    None (unset) = auto: 8, or 16 on a LoRA store."""
    d_sae: int | None = None
    """Number of latents; overrides --expansion-factor."""
    d_in: int | None = None
    """Expected activation width; checked against the store (d_in is always read from the store)."""
    k: list[int] | None = None
    """Active latents per token (topk, batchtopk); several values (comma-separated) sweep in one pass;
    None (unset) = auto: 32, or 50 on a LoRA store."""
    l1_coeff: float | None = None
    """Sparsity coefficient (relu: L1, jumprelu: L0); default: the architecture's own default."""
    lr: float = 3e-4
    """Adam learning rate (peak, after warmup)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    warmup_steps: int = 100
    """Linear learning-rate warmup steps."""
    decay_fraction: float = 0.2
    """Decay the learning rate linearly to 0 over this final fraction of the steps."""
    sparsity_warmup_steps: int = 0
    """Ramp the sparsity coefficient linearly from 0 over this many steps."""
    batch_size: int | None = None
    """Tokens per step and per process (global batch = batch_size * world size); None (unset) = auto:
    4096, or 1024 on a LoRA store."""
    epochs: int = 1
    """Passes over the training split (ignored when --tokens is given)."""
    tokens: int | None = None
    """Train on this many tokens (global), cycling the store if needed; overrides --epochs."""
    eval_every: int = 500
    """Evaluate on the validation split every N steps (0: only at the end)."""
    eval_tokens: int = 262_144
    """Validation tokens per evaluation (the same ones every time)."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint OUT/step_NNNNNN/ every N steps (0: never)."""
    keep_checkpoints: int = 2
    """Keep only the newest N step checkpoints (0: keep all)."""
    val_fraction: float = 0.05
    """Fraction of the store's chunks held out for validation."""
    num_shards: int | None = None
    """Read only the first N shards of the store."""
    num_workers: int = 0
    """Accepted for the Kimi-K2 recipe; saelab reads memory-mapped chunks in-process, so this only
    sets torch's intra-op threads when > 0."""
    seed: int = 0
    """Seed for initialisation and data order."""
    shuffle_chunks: int = 8
    """Chunks mixed in the shuffle buffer (RAM ~ shuffle_chunks * chunk size)."""
    init_tokens: int = 16_384
    """Tokens sampled to estimate the input scale and b_dec (geometric median)."""
    init: Literal["random", "rkcnn"] = "random"
    """Decoder initialisation: random, or rkcnn directions mined from the init sample (saelab.rkcnn)."""
    rkcnn_fraction: float = 0.5
    """--init rkcnn: share of the latents whose decoder rows start at mined directions (at most --rkcnn-subsets)."""
    rkcnn_subsets: int = 600
    """--init rkcnn: random dimension subsets the probe scores (h); it keeps the best fraction * d_sae."""
    rkcnn_subset_size: int | None = None
    """--init rkcnn: dims per subset (m); default round(sqrt(d_in))."""
    rkcnn_score: Literal["kurtosis", "knn", "variance_ratio"] = "kurtosis"
    """--init rkcnn: how subsets are ranked (see saelab/rkcnn.py)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the forward/backward (autocast); weights and optimizer stay float32."""
    dead_window: int = 1000
    """A latent that has not fired for this many steps counts as dead."""
    resample_dead: bool = False
    """relu only: every dead_window steps re-initialise dead latents toward badly reconstructed inputs."""
    log_every: int = 10
    """Write training metrics every N steps."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE or an API key is set)."""
    wandb_project: str = "saelab"
    """W&B project name."""
    resume: bool = False
    """Continue from the newest OUT/step_NNNNNN/ checkpoint."""
    quick_test: bool = False
    """Tiny end-to-end run in seconds (synthetic store if --data is not given)."""
    model: str | None = None
    """Stream activations from this model instead of a store (with --corpus)."""
    corpus: str | None = None
    """Corpus to stream through --model."""
    max_length: int = 256
    """Sequence length when streaming from a model."""
    shuffle_buffer: int = 65_536
    """Tokens in the shuffle buffer when streaming from a model."""
    sae_options: dict = field(default_factory=dict)
    """Extra fields of the architecture's config class (e.g. aux_k); YAML keys or flags."""

    def __post_init__(self):
        p = []
        for name in ("lr", "batch_size", "epochs", "eval_tokens", "init_tokens", "dead_window",
                     "log_every", "shuffle_chunks"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "sparsity_warmup_steps", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.decay_fraction <= 1:
            p.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0 < self.val_fraction < 1:
            p.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            p.append(f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.k is not None and (not self.k or any(k <= 0 for k in self.k)):
            p.append(f"k must be a non-empty list of positive integers, got {self.k}")
        if self.expansion_factor is not None and (not self.expansion_factor or any(e <= 0 for e in self.expansion_factor)):
            p.append(f"expansion_factor must be positive, got {self.expansion_factor}")
        if self.hook is not None and self.layer is not None and self.hook != f"model.layers.{self.layer}":
            p.append(f"--hook {self.hook} and --layer {self.layer} disagree; give one of them")
        if self.resample_dead and self.architecture != "relu":
            p.append(f"resample_dead is for relu SAEs (TopK-family SAEs use AuxK), not "
                     f"{self.architecture or 'the automatic choice (topk/batchtopk); pass --architecture relu'}")
        if self.tokens is not None and self.tokens <= 0:
            p.append(f"tokens must be > 0, got {self.tokens}")
        if not 0 <= self.rkcnn_fraction <= 1:
            p.append(f"rkcnn_fraction must be in [0, 1] (the share of latents to mine), got {self.rkcnn_fraction}")
        if self.rkcnn_subsets < 1:
            p.append(f"rkcnn_subsets must be >= 1, got {self.rkcnn_subsets}")
        if self.rkcnn_subset_size is not None and self.rkcnn_subset_size < 1:
            p.append(f"rkcnn_subset_size must be >= 1 (or unset for sqrt(d_in)), got {self.rkcnn_subset_size}")
        if (self.model is None) != (self.corpus is None):
            p.append("streaming needs both --model and --corpus")
        raise_all(p, "invalid training config")
        if self.layer is not None and self.hook is None:
            self.hook = f"model.layers.{self.layer}"


AUTO_DEFAULTS: dict[str, Any] = {"architecture": "topk", "expansion_factor": [8], "k": [32], "batch_size": 4096}
"""What an unset (None) architecture / expansion_factor / k / batch_size becomes on an ordinary store.
On a LoRA store (`saelab.lora.lora_train_defaults` non-empty) those values are used instead."""


def resolve_auto(cfg: TrainConfig, lora_defaults: dict[str, Any] | None = None) -> TrainConfig:
    """Fill the fields left unset (None) by flags and YAML; the one place "auto" is decided.

        value = user's value  if set,  else lora_defaults[field]  if given,  else AUTO_DEFAULTS[field]

    Args:
        cfg: a TrainConfig; fields already set are kept.
        lora_defaults: `saelab.lora.lora_train_defaults(store.meta, hook)` ({} for an ordinary hook).
    Returns:
        a TrainConfig with no unset AUTO_DEFAULTS field (cfg itself when nothing was unset).
    """
    fill = {**AUTO_DEFAULTS, **{k: v for k, v in (lora_defaults or {}).items() if k in AUTO_DEFAULTS}}
    changes = {k: (list(v) if isinstance(v, list) else v) for k, v in fill.items() if getattr(cfg, k) is None}
    if not changes:
        return cfg
    if lora_defaults:
        log.info("LoRA store: %s (set by neither flag nor YAML)", ", ".join(f"{k}={v}" for k, v in changes.items()))
    return dataclasses.replace(cfg, **changes)


SWEEP_FIELDS = ("d_in", "d_sae", "expansion_factor", "k", "l1_coeff", "l0_coeff")
"""SAE config fields that TrainConfig decides for every architecture (d_in is read from the store)."""


def check_sae_options(architecture: str, sae_options: dict) -> None:
    """Raise a UsageError naming the `sae_options` keys that `architecture`'s config class lacks."""
    from saelab.saes import REGISTRY

    cls = REGISTRY[architecture][1]
    own = {f.name for f in dataclasses.fields(cls)}
    wrong = [k for k in sae_options if k not in own]
    if wrong:
        raise UsageError(f"option(s) {', '.join(wrong)} do not apply to {architecture} SAEs "
                         f"({cls.__name__} has: {', '.join(sorted(own - set(SWEEP_FIELDS)))}). "
                         "Drop them or choose another --architecture.")


@dataclass
class RunResult:
    """One trained SAE of a (possibly one-element) sweep."""

    name: str
    """Run name, e.g. topk_k32_x8."""
    best_dir: Path
    """Checkpoint with the lowest validation loss (`saelab.load_sae` reads it)."""
    final_dir: Path
    """Checkpoint after the last step."""
    best_val_loss: float
    """Validation loss of best_dir."""
    final_metrics: dict[str, float]
    """Validation metrics of final_dir (val_loss, val_mse, val_fvu, val_l0, val_dead_frac, ...)."""


@dataclass
class TrainResult:
    """What `train` returns."""

    out: Path
    """The output directory."""
    runs: list[RunResult]
    """One entry per SAE, in sweep order."""
    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    tokens: int
    """Training tokens seen (global)."""

    @property
    def best_dir(self) -> Path:
        """best_dir of the first (for a single SAE: the only) run."""
        return self.runs[0].best_dir

    @property
    def final_dir(self) -> Path:
        return self.runs[0].final_dir


# ---------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class _Run:
    """One SAE of the sweep and its training state."""

    name: str
    sae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dead: DeadTracker
    run_dir: Path
    rel: str
    """Its place inside a step checkpoint: '.' for a single SAE, else its name."""
    sink: Any = None
    best_val: float = math.inf
    last_val: dict = field(default_factory=dict)


def sae_configs(cfg: TrainConfig, d_in: int) -> list[tuple[str, Any]]:
    """(run name, SAE config) for every SAE of the sweep: expansion factors x k values, in order.

    Raises:
        UsageError: unknown or bad architecture options (all listed), or --l1-coeff for TopK.
    """
    from saelab.saes import REGISTRY

    cfg = resolve_auto(cfg)
    check_sae_options(cfg.architecture, cfg.sae_options)
    _, cfg_cls = REGISTRY[cfg.architecture]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    uses_k = "k" in names
    d_saes = [cfg.d_sae] if cfg.d_sae is not None else [e * d_in for e in cfg.expansion_factor]
    base = dict(cfg.sae_options)
    if cfg.l1_coeff is not None:
        coeff = next((n for n in ("l1_coeff", "sparsity_coeff", "l0_coeff") if n in names), None)
        if coeff is None:
            raise UsageError(f"--l1-coeff does not apply to {cfg.architecture} SAEs (they have no sparsity "
                             "coefficient); drop it or choose --architecture relu or jumprelu.")
        base[coeff] = cfg.l1_coeff
    out = []
    for d_sae in d_saes:
        for k in (cfg.k if uses_k else [None]):
            values = {**base, "d_in": d_in, "d_sae": d_sae, **({"k": k} if k is not None else {})}
            sae_cfg = config_from_dict(cfg_cls, values, f"{cfg.architecture} SAE options")
            x = f"{d_sae // d_in}" if d_sae % d_in == 0 else f"{d_sae / d_in:.3g}"
            out.append((cfg.architecture + (f"_k{k}" if k is not None else "") + f"_x{x}", sae_cfg))
    return out


def init_dirs(cfg: TrainConfig, d_sae: int, x_ND: torch.Tensor) -> torch.Tensor | None:
    """Decoder directions for `cfg.init`, to pass as `make_sae(sae_cfg, init_dirs_FD=...)`.

    Any architecture takes them: the SAE puts the M rows on its first M latents (marking them in
    its `init_from_dirs_F` buffer), draws the other rows at random, and sets W_enc = W_dec^T as for
    a random init.

    Args:
        cfg: its init, seed and rkcnn_* fields are used.
        d_sae: number of latents F.
        x_ND: the initialisation sample (raw activations).
    Returns:
        None for --init random, else float32 [M, D] unit rows, M = min(round(fraction * d_sae),
        distinct subsets kept): the mined directions, best score first, each oriented towards the
        heavy tail of the data (`orient_heavy_tail`).
    """
    if cfg.init == "random":
        return None
    from saelab.rkcnn import rkcnn_init

    init = rkcnn_init(x_ND, d_sae, fraction=cfg.rkcnn_fraction, h=cfg.rkcnn_subsets, m=cfg.rkcnn_subset_size,
                      score=cfg.rkcnn_score, seed=cfg.seed)
    n = int(init.mined_mask_F.sum())
    if n:
        top = init.probe.scores_H[init.probe.top_idx_R]
        log.info("rkcnn init: %d of %d latents start at mined directions (%s score %.3g .. %.3g)",
                 n, d_sae, cfg.rkcnn_score, float(top[0]), float(top[n - 1]))
    # mined rows come first; the SAE draws the rest itself
    return orient_heavy_tail(x_ND, init.dirs_FD[init.mined_mask_F])


def orient_heavy_tail(x_ND: torch.Tensor, dirs_MD: torch.Tensor) -> torch.Tensor:
    """Flip each direction so the third moment of the data's projection on it is >= 0.

        p_nm = (x_n − mean(x)) · dirs_m,   dirs_m <- sign(mean_n p_nm³) dirs_m   (sign(0) = +1)

    A principal direction has no sign, but an SAE latent with W_enc = W_decᵀ only fires on positive
    projections: pointing it at the heavy (sparse-feature) tail lets it fire where the feature is.
    """
    if dirs_MD.shape[0] == 0:
        return dirs_MD
    x = x_ND.float()
    p_NM = (x - x.mean(0)) @ dirs_MD.T
    sign_M = torch.where(p_NM.double().pow(3).mean(0) < 0, -1.0, 1.0).to(dirs_MD.dtype)
    return dirs_MD * sign_M[:, None]


# ---------------------------------------------------------------------------------------------------
# Safety checks: name the step and the tensor, say which checkpoint is kept


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _check_grads(run: _Run, step: int, kept: str) -> None:
    grads = [p.grad for p in run.sae.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return
    for name, p in run.sae.named_parameters():
        if p.grad is not None and (n := _nonfinite(p.grad)):
            raise RuntimeError(f"step {step}: the gradient of {name} in SAE {run.name} has {n} NaN/inf "
                               f"values; stopped before the optimizer step. {kept}")


def _check_weights(run: _Run, step: int, kept: str) -> None:
    params = list(run.sae.named_parameters())
    if bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).all()):
        return
    for name, p in params:
        if n := _nonfinite(p.detach()):
            raise RuntimeError(f"step {step}: weight {name} of SAE {run.name} has {n} NaN/inf values after "
                               f"the optimizer step (try a lower --lr). {kept}")


# ---------------------------------------------------------------------------------------------------
# DDP helpers (torchrun sets WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)


def _dist_info() -> tuple[int, int]:
    """(rank, world_size); initialises the process group (gloo on CPU, NCCL on GPU) if needed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device(cfg: TrainConfig, rank: int) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.device)


def _all_reduce_grads_(sae: torch.nn.Module, world: int) -> None:
    """grad <- mean over ranks (one flat all-reduce per SAE)."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_state_(sae: torch.nn.Module) -> None:
    for t in list(sae.parameters()) + list(sae.buffers()):
        dist.broadcast(t.data, src=0)


def _agree(flags: list[float], world: int) -> list[float]:
    """Element-wise max of small flags over ranks (so every rank stops at the same step)."""
    t = torch.tensor(flags, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, quiet: bool = False) -> TrainResult:
    """Train every SAE of `cfg`'s sweep in one pass over the data; see the module docstring.

    Raises:
        UsageError: bad config or data, including NaN/inf activations in the store.
        RuntimeError: the loss, a gradient or a weight became NaN/inf (the last checkpoint is kept).
    """
    from saelab.lora import lora_train_defaults
    from saelab.saes import make_sae

    if cfg.quick_test:
        cfg = quick_test_config(cfg)
    if cfg.num_workers > 0:
        torch.set_num_threads(cfg.num_workers)
    rank, world = _dist_info()
    device = _device(cfg, rank)
    src = td.StoreSource(cfg) if cfg.data is not None or cfg.model is None else td.StreamSource(cfg)
    hook, d_in = src.hook, src.d_in
    cfg = resolve_auto(cfg, lora_train_defaults(src.meta, hook))
    out = Path(cfg.out)
    specs = sae_configs(cfg, d_in)
    resume_ckpt = ck.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_ckpt is None:
        log.warning("--resume: no checkpoint under %s yet; starting from scratch", out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ck.write_json(out / "config.json", to_dict(cfg))

    torch.manual_seed(cfg.seed)
    x_init_ND = src.init_sample(cfg) if resume_ckpt is None else None
    runs: list[_Run] = []
    for name, sae_cfg in specs:
        sae = make_sae(sae_cfg, init_dirs_FD=init_dirs(cfg, sae_cfg.d_sae, x_init_ND) if x_init_ND is not None else None)
        if x_init_ND is not None:
            sae.init_from_data_(x_init_ND)
        sae.to(device).train()
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               fused=True)  # one fused kernel: ~4x less optimizer time on CPU
        single = len(specs) == 1
        runs.append(_Run(name, sae, opt, DeadTracker(sae_cfg.d_sae, cfg.dead_window),
                         out if single else out / name, "." if single else name))
    data_it = src.train_batches(cfg, rank, world)
    step, tokens = ck.restore_training_checkpoint(resume_ckpt, runs, data_it, cfg, rank, world) if resume_ckpt else (0, 0)
    if world > 1:
        for run in runs:
            _broadcast_state_(run.sae)
    if cfg.tokens is not None or data_it.batches_per_epoch is None:
        total = max(1, math.ceil(cfg.tokens / (cfg.batch_size * world)))
    else:  # ranks may hold different numbers of chunks: the shortest sets the pace
        total = -int(_agree([-float(data_it.batches_per_epoch * cfg.epochs)], world)[0])
    if total <= 0:
        raise UsageError(f"the training split of {cfg.data} has fewer than --batch-size {cfg.batch_size} "
                         "tokens per process; lower --batch-size or collect more tokens.")
    wandb = WandbSink(cfg.wandb_project, out.name, to_dict(cfg), out) if cfg.wandb and rank == 0 else NullSink()
    for run in runs:
        run.sink = _make_sink(run, rank, step if resume_ckpt else None, wandb, len(runs) > 1)
    kept = (f"The last good checkpoint, {resume_ckpt}, is kept." if resume_ckpt else
            "No checkpoint had been written yet.")
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")

    stream = iter(data_it)
    bar = tqdm(total=total, initial=step, unit="step", disable=quiet or rank != 0, dynamic_ncols=True)
    t0, tokens0 = time.time(), tokens
    try:
        while step < total:
            x_BD = next(stream, None)
            bad_batch = x_BD is not None and not bool(torch.isfinite(x_BD).all())
            ran_out, bad_any = _agree([float(x_BD is None), float(bad_batch)], world)
            if ran_out:
                break
            if bad_any:
                where = (f"has {_nonfinite(x_BD)} NaN/inf values" if bad_batch else "has NaN/inf values on another rank")
                raise UsageError(f"step {step}: the training batch from {cfg.data} (hook {hook}) {where}; stopped "
                                 f"before the optimizer step. {kept} Find the chunk with `saelab verify {cfg.data}`.")
            x_BD = x_BD.to(device, non_blocking=True)
            lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.decay_fraction)
            s_scale = sparsity_scale_at(step, cfg.sparsity_warmup_steps)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
            rows: dict[str, dict[str, float]] = {}
            for run in runs:
                for g in run.optimizer.param_groups:
                    g["lr"] = lr
                run.optimizer.zero_grad(set_to_none=True)
                with autocast:
                    o = run.sae.training_loss(x_BD, sparsity_scale=s_scale)
                if not bool(torch.isfinite(o.loss)):
                    raise RuntimeError(f"step {step}: the loss of SAE {run.name} is {float(o.loss)} (mse "
                                       f"{float(o.mse):.4g}, sparsity {float(o.sparsity):.4g}, aux {float(o.aux):.4g}); "
                                       f"stopped before the optimizer step. {kept}")
                o.loss.backward()
                if world > 1:
                    _all_reduce_grads_(run.sae, world)
                _check_grads(run, step, kept)
                run.sae.before_optimizer_step_()
                run.optimizer.step()
                run.sae.after_optimizer_step_()
                _check_weights(run, step, kept)
                fired_F = o.fired_F.detach()
                if world > 1:
                    fired_F = fired_F.to(torch.int32)
                    dist.all_reduce(fired_F, op=dist.ReduceOp.MAX)
                run.dead.update_(fired_F)
                if cfg.resample_dead and (step + 1) % cfg.dead_window == 0:
                    n = resample_dead_(run.sae, run.optimizer, run.dead, x_BD)
                    if world > 1:
                        _broadcast_state_(run.sae)
                    if n:
                        log.info("step %d: resampled %d dead latents of %s", step + 1, n, run.name)
                if log_now:
                    rows[run.name] = {"loss": float(o.loss.detach()), "mse": float(o.mse), "sparsity": float(o.sparsity),
                                      "aux": float(o.aux), "l0": float(o.l0), "fvu": float(o.fvu),
                                      "dead_frac": run.dead.dead_fraction()}
            step += 1
            tokens += x_BD.shape[0] * world
            bar.update(1)
            evaluate_now = cfg.eval_every and step % cfg.eval_every == 0 and step < total
            for run in runs:
                row = rows.get(run.name, {})
                if evaluate_now:
                    row.update(_evaluate_and_keep_best(run, src, cfg, rank, world, device, step))
                if row:
                    rate = (tokens - tokens0) / max(time.time() - t0, 1e-9)
                    run.sink.log(step, {**row, "lr": lr, "sparsity_scale": s_scale, "tokens": tokens,
                                        "tokens_per_s": rate})
            if rows:
                r0 = rows[runs[0].name]
                bar.set_postfix(loss=f"{r0['loss']:.4g}", L0=f"{r0['l0']:.1f}", FVU=f"{r0['fvu']:.3f}",
                                dead=f"{100 * r0['dead_frac']:.1f}%", refresh=False)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                data_states = ck.gather_json(data_it.state_dict(), world)
                if rank == 0:
                    path = ck.write_training_checkpoint(out, runs, step, tokens, data_states, cfg, src)
                    kept = f"The last good checkpoint, {path}, is kept (continue with --resume)."
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()

    results = []
    for run in runs:
        final = _evaluate_and_keep_best(run, src, cfg, rank, world, device, step)
        run.sink.log(step, {**final, "tokens": tokens})
        if rank == 0:
            ck.save_sae(run, run.run_dir / "final", cfg, src, step, final)
        run.sink.close()
        if rank == 0:
            plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "training_curves.png")
        results.append(RunResult(run.name, run.run_dir / "sae_best", run.run_dir / "final", run.best_val, final))
        log.info("%s: step %d, val loss %.4g, FVU %.4f, L0 %.1f, dead %.1f%%", run.name, step,
                 final["val_loss"], final["val_fvu"], final["val_l0"], 100 * final["val_dead_frac"])
    wandb.close()
    if world > 1:
        dist.barrier()
    return TrainResult(out, results, step, tokens)


def _evaluate_and_keep_best(run: _Run, src, cfg: TrainConfig, rank: int, world: int,
                            device: torch.device, step: int) -> dict[str, float]:
    metrics = td.evaluate_sae(run.sae, src.val_batches(cfg, rank, world), device, world)
    run.last_val = metrics
    if metrics["val_loss"] < run.best_val:
        run.best_val = metrics["val_loss"]
        if rank == 0:
            ck.save_sae(run, run.run_dir / "sae_best", cfg, src, step, metrics)
    return metrics


def _make_sink(run: _Run, rank: int, resume_step: int | None, wandb, sweep: bool):
    """metrics.jsonl + TensorBoard in the run's directory, plus the shared W&B run (keys prefixed by
    the run name in a sweep). Ranks other than 0 log nothing."""
    if rank != 0:
        return NullSink()
    return MultiSink([JsonlSink(run.run_dir / "metrics.jsonl", resume_step), TensorBoardSink(run.run_dir / "tb"),
                      PrefixSink(wandb, f"{run.name}/" if sweep else "")])


def quick_test_config(cfg: TrainConfig) -> TrainConfig:
    """A tiny run (seconds): small SAE, 60 steps, and a synthetic store when no --data is given."""
    changes: dict[str, Any] = dict(
        quick_test=False, batch_size=256, tokens=256 * 60, epochs=1, eval_every=20, eval_tokens=2048,
        checkpoint_every=30, warmup_steps=5, init_tokens=2048, log_every=5, expansion_factor=[4], d_sae=None,
        lr=1e-3, k=[k for k in cfg.k or [] if k <= 16] or [8], dead_window=20, shuffle_chunks=2)
    if cfg.data is None:
        root = Path(tempfile.mkdtemp(prefix="saelab_quick_"))
        td.make_synthetic_store(root / "store", d_in=32, n_tokens=32_768, chunk_tokens=2048, seed=cfg.seed)
        changes.update(data=str(root / "store"), hook=None, layer=None, d_in=None, model=None, corpus=None)
        if cfg.out == TrainConfig.out:
            changes["out"] = str(root / "run")
    return dataclasses.replace(cfg, **changes)
