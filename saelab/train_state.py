"""The training loop's small helpers: schedules, dead-latent tracking, metric sinks, the curves plot.

Pure schedule functions (no state: the step is the whole scheduler state, so resuming needs no
scheduler object), a dead-latent counter that lives in checkpoints, and metric sinks behind one
interface so the loop has no `if wandb:` branches. Deliberately left out: anything about SAEs,
stores or checkpoints (train.py, checkpoint.py).

Schedules (step s = 0, 1, ...; T total steps; lr0 = --lr; W = --warmup-steps; d = --decay-fraction):

    lr(s)     = lr0 * min(1, (s + 1) / W) * min(1, (T - s) / (d * T))      (W = 0 or d = 0: factor 1)
    sparsity_scale(s) = min(1, (s + 1) / W_sparsity)                       (W_sparsity = 0: 1)

Dead latents: steps_since_fired_F[i] = 0 if latent i fired in the batch, else + 1;
    dead_F = steps_since_fired_F >= window.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from saelab.errors import UsageError

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, lr: float, warmup: int, decay_fraction: float) -> float:
    """Learning rate at `step`: linear warmup over `warmup` steps, linear decay to 0 over the last
    `decay_fraction` of `total` steps (see module docstring)."""
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_steps = decay_fraction * total
    if decay_steps > 0:
        scale *= max(0.0, min(1.0, (total - step) / decay_steps))
    return lr * scale


def sparsity_scale_at(step: int, warmup: int) -> float:
    """Multiplier of the sparsity penalty: linear ramp from 1/warmup to 1 over `warmup` steps."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


class DeadTracker:
    """Counts, per latent, the steps since it last fired (from `TrainOutput.fired_F`)."""

    def __init__(self, d_sae: int, window: int):
        self.window = window
        self.steps_since_fired_F = torch.zeros(d_sae, dtype=torch.int64)

    def update_(self, fired_F: torch.Tensor) -> None:
        fired_F = fired_F.to(device="cpu", dtype=torch.bool)
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_F] = 0

    def dead_mask_F(self) -> torch.Tensor:
        return self.steps_since_fired_F >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead_mask_F().float().mean())


# ---------------------------------------------------------------------------------------------------
# Metric sinks


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    """Accepts everything, writes nothing (ranks other than 0, disabled loggers)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """`metrics.jsonl`: one JSON object per log step. On resume, lines past `resume_step` (written
    by the killed run after its last checkpoint) are dropped, so the file reads as one clean run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self._fh = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """TensorBoard event files under `log_dir` (the default metrics viewer)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class WandbSink:
    """Weights & Biases; offline unless WANDB_MODE is set or an API key is configured."""

    def __init__(self, project: str, name: str, config: dict[str, Any], out: Path):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package, which is not installed. "
                             "Install it with: pip install 'saelab[wandb]'") from None
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self._run = wandb.init(project=project, name=name, config=config, dir=str(out), mode=mode)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class PrefixSink:
    """Forward to a shared sink with keys prefixed (one W&B run for a whole sweep); closes nothing."""

    def __init__(self, sink: MetricSink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.sink.log(step, {self.prefix + k: v for k, v in metrics.items()})

    def close(self) -> None:
        pass


class MultiSink:
    """Fan out to several sinks; a sink keyed by run name only sees that run's metrics."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training curves (loss, FVU, L0, dead fraction; validation points where present) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    panels = [("loss", "val_loss"), ("fvu", "val_fvu"), ("l0", "val_l0"), ("dead_frac", "val_dead_frac")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for ax, (train_key, val_key) in zip(axes.flat, panels):
        for key, style in ((train_key, "-"), (val_key, "o-")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=key, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(train_key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def resample_dead_(sae, optimizer: torch.optim.Optimizer, dead: DeadTracker, x_BD: torch.Tensor) -> int:
    """ReLU SAEs: point dead latents at badly reconstructed inputs and reset their Adam moments
    (Bricken et al. 2023, "Towards Monosemanticity", neuron resampling appendix; simplified).

        p_n ∝ ||x_n - x_hat_n||^2,  n_i ~ p for each dead latent i,  u_i = (x_{n_i} - x_hat_{n_i}) / ||.||
        W_dec[i] = u_i,   W_enc[:, i] = 0.2 * mean_{alive j} ||W_enc[:, j]|| * u_i,   b_enc[i] = 0

    Directions are scale-free, so raw activations work although the SAE normalises internally.
    Draws from torch's global RNG (saved in checkpoints, so resume stays exact).
    Returns:
        the number of latents resampled.
    """
    dead_F = dead.dead_mask_F().to(x_BD.device)
    n_dead = int(dead_F.sum())
    if n_dead == 0:
        return 0
    x_hat_BD, _ = sae(x_BD)
    err_BD = (x_BD - x_hat_BD).float()
    p_B = err_BD.pow(2).sum(-1)
    if not bool(p_B.sum() > 0):
        return 0
    idx_K = torch.multinomial(p_B / p_B.sum(), n_dead, replacement=True)
    u_KD = err_BD[idx_K] / err_BD[idx_K].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive_F = ~dead_F
    alive_norm = sae.W_enc_DF[:, alive_F].norm(dim=0).mean() if bool(alive_F.any()) else torch.tensor(1.0)
    sae.W_dec_FD[dead_F] = u_KD.to(sae.W_dec_FD.dtype)
    sae.W_enc_DF[:, dead_F] = (0.2 * alive_norm * u_KD.T).to(sae.W_enc_DF.dtype)
    sae.b_enc_F[dead_F] = 0.0
    for p, sl in ((sae.W_dec_FD, (dead_F,)), (sae.W_enc_DF, (slice(None), dead_F)), (sae.b_enc_F, (dead_F,))):
        for key in ("exp_avg", "exp_avg_sq"):
            if key in optimizer.state.get(p, {}):
                optimizer.state[p][key][sl] = 0.0
    dead.steps_since_fired_F[dead_F.cpu()] = 0
    return n_dead
