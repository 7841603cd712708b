"""The training loop: `train(cfg) -> TrainResult`, one `step` per SAE and batch, sweeps, resume, DDP.

The SAE maths lives in `saelab.saes` (the loop only calls `training_loss`, the optimizer hooks
and `save`); the config and its auto-defaults in config.py; data in sources.py; validation in
validation.py; the on-disk resume state in checkpoint.py; schedules in schedule.py; metric sinks
in sinks.py. Deliberately left out: gradient accumulation, mixed optimizers,
multi-node launch logic beyond what torchrun's environment variables give.

One step, for every SAE r of the sweep on the same batch x_BD (one read per batch, shared):

    out_r   = sae_r.training_loss(x_BD, sparsity_scale = s(step))     loss = mse + coeff * sparsity + aux
    grad    = d out_r.loss / d theta_r          (DDP: all-reduce mean over ranks)
    check   x_BD, out_r.loss and every grad are finite   -> else stop before the optimizer step
    Adam(lr(step), betas) step, with sae_r.before_/after_optimizer_step_() around it

Schedules lr(step) and s(step): see `saelab.train.schedule`. Shape legend: see `saelab/saes/base.py`
(B tokens in a batch, D d_in, F d_sae).

Output layout (a single SAE writes its files straight into OUT; a sweep gives each SAE OUT/<name>/):

    OUT/config.json              the resolved TrainConfig
    OUT/[<name>/]sae_best/       best validation loss so far       OUT/[<name>/]final/   last step
    OUT/[<name>/]metrics.jsonl   one object per log/eval step      OUT/[<name>/]tb/      TensorBoard
    OUT/[<name>/]training_curves.png
    OUT/step_000500/             resumable checkpoint of the whole sweep (see saelab.train.checkpoint)
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saelab.config import to_dict
from saelab.errors import DivergedError, UsageError
from saelab.models import check_device
from saelab.saes import TrainOutput, make_sae
from saelab.train import checkpoint as ck
from saelab.train.checkpoint import RunState
from saelab.train.config import TrainConfig, lora_train_defaults, quick_test_config, resolve_auto, sae_configs
from saelab.train.init import init_dirs, init_encoder_
from saelab.train.memory import check_memory
from saelab.train.outdir import check_out_dir, clear_previous_run
from saelab.train.schedule import DeadTracker, lr_at, resample_dead_, sparsity_scale_at
from saelab.train.sinks import JsonlSink, MultiSink, NullSink, PrefixSink, TensorBoardSink, WandbSink, plot_curves
from saelab.train.sources import StoreSource, StreamSource
from saelab.train.validation import evaluate_sae

log = logging.getLogger(__name__)


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
    resumed_from: int = 0
    """The step this invocation resumed at (0: started from scratch); it ran steps - resumed_from steps."""

    @property
    def best_dir(self) -> Path:
        """best_dir of the first (for a single SAE: the only) run."""
        return self.runs[0].best_dir

    @property
    def final_dir(self) -> Path:
        return self.runs[0].final_dir


# ---------------------------------------------------------------------------------------------------
# Safety checks: name the step and the tensor, say which checkpoint is kept


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _maybe_nonfinite(tensors: list[torch.Tensor]) -> bool:
    """A one-sync screen: False proves every tensor is finite (a NaN or inf anywhere makes its sum
    NaN or inf); True only means "look": finite values can overflow the sum. One read pass, no bool
    temporaries (torch.isfinite(t).all() costs far more on a busy CPU)."""
    if not tensors:
        return False
    return not bool(torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors]).isfinite().all())


def _check_grads(run: RunState, step: int, kept: str) -> None:
    if not _maybe_nonfinite([p.grad for p in run.sae.parameters() if p.grad is not None]):
        return
    for name, p in run.sae.named_parameters():
        if p.grad is not None and (n := _nonfinite(p.grad)):
            raise DivergedError(f"step {step}: the gradient of {name} in SAE {run.name} has {n} NaN/inf "
                               f"values; stopped before the optimizer step. {kept}")


def _check_weights(run: RunState, step: int, kept: str) -> None:
    params = list(run.sae.named_parameters())
    if not _maybe_nonfinite([p for _, p in params]):
        return
    for name, p in params:
        if n := _nonfinite(p.detach()):
            raise DivergedError(f"step {step}: weight {name} of SAE {run.name} has {n} NaN/inf values after "
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
    check_device(cfg.lm.device)
    if cfg.lm.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(cfg.lm.device)


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


def _all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """[W, *t.shape]: every rank's t (same shape on every rank), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _broadcast_state_(sae: torch.nn.Module) -> None:
    for t in list(sae.parameters()) + list(sae.buffers()):
        dist.broadcast(t.data, src=0)


def _agree(flags: list[float], world: int) -> list[float]:
    """Element-wise max of small flags over ranks (so every rank stops at the same step)."""
    if world == 1:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, quiet: bool = False) -> TrainResult:
    """Train every SAE of `cfg`'s sweep in one pass over the data; see the module docstring.

    Raises:
        UsageError: bad config or data, including NaN/inf activations in the store.
        DivergedError: the loss, a gradient or a weight became NaN/inf (the last checkpoint is kept).
    """
    if cfg.quick_test:
        cfg = quick_test_config(cfg)
    if cfg.num_workers > 0:
        torch.set_num_threads(cfg.num_workers)
    rank, world = _dist_info()
    device = _device(cfg, rank)
    src = StoreSource(cfg) if cfg.data is not None or cfg.lm.model is None else StreamSource(cfg)
    hook, d_in = src.hook, src.d_in
    cfg = resolve_auto(cfg, lora_train_defaults(src.meta, hook), run_tokens=src.run_tokens(cfg))
    out = Path(cfg.out)
    specs = sae_configs(cfg, d_in)
    check_memory([c.resolved(d_in) for _, c in specs], cfg.batch_size, device)
    resume_ckpt = ck.intact_checkpoint(out) if cfg.resume else None
    old_run = check_out_dir(cfg, has_checkpoint=resume_ckpt is not None)
    if cfg.resume and resume_ckpt is None:
        log.warning("--resume: no checkpoint under %s yet; starting from scratch", out)
    if world > 1:
        dist.barrier()  # every rank has looked at OUT before rank 0 changes it
    if rank == 0:
        clear_previous_run(out, old_run)
        out.mkdir(parents=True, exist_ok=True)
        ck.write_json(out / "config.json", to_dict(cfg))

    torch.manual_seed(cfg.seed)
    x_init_ND = src.init_sample(cfg) if resume_ckpt is None else None
    runs: list[RunState] = []
    for name, sae_cfg in specs:
        sae = make_sae(sae_cfg, init_dirs_FD=init_dirs(cfg, sae_cfg.d_sae, x_init_ND) if x_init_ND is not None else None)
        init_encoder_(sae, cfg)
        if x_init_ND is not None:
            sae.init_from_data_(x_init_ND)
        sae.to(device).train()
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               fused=True)  # one fused kernel: ~4x less optimizer time on CPU
        single = len(specs) == 1
        runs.append(RunState(name, sae, opt, DeadTracker(sae_cfg.d_sae, cfg.dead_window),
                         out if single else out / name, "." if single else name))
    _check_val_data(src, cfg, rank, world)
    data_it = src.train_batches(cfg, rank, world)
    step, tokens = ck.restore_training_checkpoint(resume_ckpt, runs, data_it, cfg, rank, world) if resume_ckpt else (0, 0)
    resumed_from = step
    if world > 1:
        for run in runs:
            _broadcast_state_(run.sae)
            distribute_(run.sae, rank, world)
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
    compute = "float32" if cfg.lm.dtype == "auto" else cfg.lm.dtype
    autocast = torch.autocast(device.type, dtype=getattr(torch, compute), enabled=compute != "float32")

    stream = iter(data_it)
    bar = tqdm(total=total, initial=step, unit="step", disable=quiet or rank != 0, dynamic_ncols=True)
    t0, tokens0 = time.time(), tokens
    try:
        while step < total:
            x_BD = next(stream, None)
            bad_batch = x_BD is not None and _maybe_nonfinite([x_BD]) and _nonfinite(x_BD) > 0
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
                o = step_(run, x_BD, lr, s_scale, step, world, autocast, kept)
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
    return TrainResult(out, results, step, tokens, resumed_from)


def distribute_(sae, rank: int, world: int) -> None:
    """Set up what `step_` needs under DDP beyond the gradient all-reduce: BatchTopK's selection over
    the global batch (each rank's top W·B·k, all-gathered). Called once, after the weights agree."""
    if world > 1 and hasattr(sae, "distributed"):
        sae.distributed = (rank, world, _all_gather_stack)


def step_(run: RunState, x_BD: torch.Tensor, lr: float, sparsity_scale: float, step: int, world: int = 1,
          autocast=None, kept: str = "") -> TrainOutput:
    """One optimizer step of one SAE on one batch; updates its weights, Adam state and dead counters.

        out = sae.training_loss(x_BD, sparsity_scale)  (DDP: BatchTopK selects over the global batch, set up in `train`);
        out.loss.backward();  (DDP: grads <- mean over ranks);  check out.loss and the grads finite;
        before_optimizer_step_;  Adam(lr);
        (DDP: reduce_step_state_, e.g. TopK's fired latents over the global batch);
        after_optimizer_step_;  check weights finite;  dead.update_(out.fired_F, max over ranks)

    Raises:
        DivergedError: the loss or a gradient is NaN/inf (raised before the optimizer step, so the
            weights are untouched), or a weight became NaN/inf in the step; `kept` names the
            checkpoint that survives.
    """
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        o = run.sae.training_loss(x_BD, sparsity_scale=sparsity_scale)
    o.loss.backward()  # before the loss check: one host sync screens the loss and the gradients together
    if world > 1:
        _all_reduce_grads_(run.sae, world)
    if _maybe_nonfinite([o.loss] + [p.grad for p in run.sae.parameters() if p.grad is not None]):
        if not bool(torch.isfinite(o.loss)):
            raise DivergedError(f"step {step}: the loss of SAE {run.name} is {float(o.loss)} (mse "
                               f"{float(o.mse):.4g}, sparsity {float(o.sparsity):.4g}, aux {float(o.aux):.4g}); "
                               f"stopped before the optimizer step. {kept}")
        _check_grads(run, step, kept)
    run.sae.before_optimizer_step_()
    run.optimizer.step()
    if world > 1:
        run.sae.reduce_step_state_(_all_reduce_max, _all_reduce_sum)
    run.sae.after_optimizer_step_()
    _check_weights(run, step, kept)
    fired_F = o.fired_F.detach()
    if world > 1:
        fired_F = fired_F.to(torch.int32)
        dist.all_reduce(fired_F, op=dist.ReduceOp.MAX)
    run.dead.update_(fired_F)
    return o


def _check_val_data(src, cfg: TrainConfig, rank: int, world: int) -> None:
    """The validation rows (the same ones every evaluation reads) must be finite, like training batches:
    a NaN there would make every val loss NaN, so no sae_best would ever be written."""
    bad = sum(_nonfinite(x_BD) for x_BD in src.val_batches(cfg, rank, world))
    if _agree([float(bad)], world)[0]:
        where = f"has {bad} NaN/inf values" if bad else "has NaN/inf values on another rank"
        raise UsageError(f"the validation split of {cfg.data or src.path} (hook {src.hook}, first {cfg.eval_tokens:,} "
                         f"tokens) {where}; nothing was trained. Find the chunk with `saelab verify {cfg.data}`, "
                         "or change --seed / --val-fraction to hold out other chunks.")


def _evaluate_and_keep_best(run: RunState, src, cfg: TrainConfig, rank: int, world: int,
                            device: torch.device, step: int) -> dict[str, float]:
    metrics = evaluate_sae(run.sae, src.val_batches(cfg, rank, world), device, world)
    run.last_val = metrics
    if metrics["val_loss"] < run.best_val:
        run.best_val = metrics["val_loss"]
        if rank == 0:
            ck.save_sae(run, run.run_dir / "sae_best", cfg, src, step, metrics)
    return metrics


def _make_sink(run: RunState, rank: int, resume_step: int | None, wandb, sweep: bool):
    """metrics.jsonl + TensorBoard in the run's directory, plus the shared W&B run (keys prefixed by
    the run name in a sweep). Ranks other than 0 log nothing."""
    if rank != 0:
        return NullSink()
    return MultiSink([JsonlSink(run.run_dir / "metrics.jsonl", resume_step), TensorBoardSink(run.run_dir / "tb"),
                      PrefixSink(wandb, f"{run.name}/" if sweep else "")])
