"""Schedules and dead latents: learning rate and sparsity ramps, dead-latent tracking, resampling.

Pure schedule functions (no state: the step is the whole scheduler state, so resuming needs no
scheduler object) and a dead-latent counter that lives in checkpoints. Deliberately left out:
metric sinks (sinks.py), stores and checkpoints (sources.py, checkpoint.py).

Schedules (step s = 0, 1, ...; T total steps; lr0 = --lr; W = --warmup-steps; d = --decay-fraction):

    lr(s)     = lr0 * min(1, (s + 1) / W') * min(1, (T - s) / (d * T))     (W' = 0 or d = 0: factor 1)
    W'        = min(W, max(1, floor(WARMUP_CAP * T)))     warmup is at most 10% of the run, so with
                                                          d <= 0.9 a short run still reaches lr0
    sparsity_scale(s) = min(1, (s + 1) / W_sparsity)                       (W_sparsity = 0: 1)

Dead latents: steps_since_fired_F[i] = 0 if latent i fired in the batch, else + 1;
    dead_F = steps_since_fired_F >= window.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


WARMUP_CAP = 0.1
"""Largest share of a run's steps that warmup may take."""


def lr_at(step: int, total: int, lr: float, warmup: int, decay_fraction: float) -> float:
    """Learning rate at `step`: linear warmup over `warmup` steps (at most WARMUP_CAP of `total`),
    linear decay to 0 over the last `decay_fraction` of `total` steps (see module docstring)."""
    warmup = min(warmup, max(1, int(WARMUP_CAP * total))) if warmup > 0 else 0
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
        """Counters live on fired_F's device (no host copy per step; checkpoints move them to CPU)."""
        self.steps_since_fired_F = self.steps_since_fired_F.to(fired_F.device)
        fired_F = fired_F.to(torch.bool)
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_F] = 0

    def dead_mask_F(self) -> torch.Tensor:
        return self.steps_since_fired_F >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead_mask_F().float().mean())


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
