"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders"), trained with straight-through estimators and an L0 penalty.

    pre_BF   = (x_n - b_dec) W_enc + b_enc
    f_BF     = JumpReLU_θ(pre) = pre * H(pre - θ)          θ = threshold_F > 0, H the step function
    x_hat_n  = f W_dec + b_dec
    loss     = mean_b ||x_n - x_hat_n||^2 + sparsity_scale * l0_coeff * mean_b P(f_b)

with the penalty P either the L0 norm itself (`penalty="step"`, the paper's eq. 10),
P = sum_f H(pre_bf - θ_f), or its smooth variant (`penalty="tanh"`, Anthropic's "Circuits Updates
January 2025"), P = sum_f tanh(tanh_scale * f_bf ||W_dec[f]||).

H has zero derivative almost everywhere, so θ learns through the pseudo-derivatives of the paper's
section 4 (rectangle kernel K(u) = 1[|u| < 1/2], bandwidth ε); see `_JumpReLUFn` and `_StepFn`.

Initialisation (`init_from_data_`). A latent below its threshold on every token gets no gradient at
all (∂f/∂pre = 0 there), so a latent that dies stays dead. With b_enc = 0, θ ≈ 0 and W_enc = W_dec^T,
about half of all latents fire on every token; the reconstruction then overshoots by hundreds of
unit vectors and its gradient drives most encoders below threshold for good (on planted data: 81% of
latents dead within 600 steps, 0% of the dictionary recovered). So the encoder bias is set from the
sample instead, so that each latent starts firing on `init_density` of the tokens:

    b_enc_f <- θ_f - q_f,    q_f = the (1 - init_density) quantile over the sample of pre_f (b_enc = 0)

(cf. Anthropic's "Circuits Updates January 2025", which also chooses b_enc from the data so that
features start out firing rarely). It leaves θ, W_enc and W_dec as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, InitDirs, SAEConfig, TrainOutput, stats_output


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: ClassVar[str] = "jumprelu"

    l0_coeff: float = 0.5
    """Weight of the L0 penalty (inputs are normalised to E||x||^2 = d_in)."""
    penalty: Literal["step", "tanh"] = "step"
    """L0 penalty: exact count with a straight-through gradient, or a smooth tanh surrogate."""
    tanh_scale: float = 4.0
    """c in tanh(c f ||W_dec||) for penalty=tanh."""
    bandwidth: float = 0.05
    """ε, the width of the rectangle kernel in the threshold's pseudo-gradient."""
    threshold_init: float = 0.1
    """Initial threshold of every latent."""
    init_density: float = 0.01
    """init_from_data_ sets b_enc so each latent fires on this fraction of the sample (0: b_enc = 0)."""

    def _problems(self) -> list[str]:
        out = []
        if self.bandwidth <= 0:
            out.append(f"bandwidth must be > 0, got {self.bandwidth}")
        if self.threshold_init <= 0:
            out.append(f"threshold_init must be > 0, got {self.threshold_init}")
        if self.l0_coeff < 0:
            out.append(f"l0_coeff must be >= 0, got {self.l0_coeff}")
        if not 0.0 <= self.init_density < 1.0:
            out.append(f"init_density must be in [0, 1), got {self.init_density}")
        return out


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """y = z H(z - θ), with the pseudo-gradients of Rajamanoharan et al. 2024, eq. 11:

        ∂y/∂z = H(z - θ)                               (exact away from z = θ)
        ∂y/∂θ = -(θ / ε) K((z - θ) / ε)                (straight-through; true derivative is 0 a.e.)
    """

    @staticmethod
    def forward(ctx, z_BF, theta_F, eps: float):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.eps = eps
        return z_BF * (z_BF > theta_F)

    @staticmethod
    def backward(ctx, g_BF):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_z = g_BF * (z > theta)
        g_theta = (-(theta / eps) * _rect((z - theta) / eps) * g_BF).sum(0)
        return g_z, g_theta, None


class _StepFn(torch.autograd.Function):
    """y = H(z - θ), with the pseudo-gradients of Rajamanoharan et al. 2024, eq. 12:

        ∂y/∂z = 0                                      (z learns only through the reconstruction)
        ∂y/∂θ = -(1 / ε) K((z - θ) / ε)
    """

    @staticmethod
    def forward(ctx, z_BF, theta_F, eps: float):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.eps = eps
        return (z_BF > theta_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (-(1.0 / eps) * _rect((z - theta) / eps) * g_BF).sum(0)
        return None, g_theta, None


class JumpReLUSAE(SAE):
    """JumpReLU with an L0 penalty (see module docstring)."""

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, init_dirs_FD: InitDirs = None):
        super().__init__(cfg, init_dirs_FD)
        self.threshold_F = nn.Parameter(torch.full((self.cfg.d_sae,), float(self.cfg.threshold_init)))

    @torch.no_grad()
    def init_from_data_(self, x_sample_ND: Tensor) -> None:
        """Input scale and b_dec as every SAE, then b_enc from `init_density` (module docstring).

        Args:
            x_sample_ND: raw activations; at most 4096 evenly spaced rows are used for b_enc.
        """
        super().init_from_data_(x_sample_ND)
        p = self.cfg.init_density
        if p <= 0:
            return
        x = x_sample_ND.to(self.W_dec_FD.device, torch.float32)
        x = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], 4096), device=x.device).long()]
        self.b_enc_F.zero_()
        W_enc_DF = self.W_enc()
        rank = min(x.shape[0], max(1, round((1.0 - p) * x.shape[0])))  # kthvalue: no size limit, unlike quantile
        xc_ND = x * self.input_scale - self.b_dec_D
        for lo in range(0, self.cfg.d_sae, 1024):  # blocks of latents keep memory at [N, 1024]
            q = (xc_ND @ W_enc_DF[:, lo:lo + 1024]).kthvalue(rank, dim=0).values
            self.b_enc_F[lo:lo + 1024] = self.threshold_F[lo:lo + 1024] - q

    def activation(self, pre_BF: Tensor) -> Tensor:
        return pre_BF * (pre_BF > self.threshold_F)

    def training_loss(self, x_BD: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        x_n = x_BD * self.input_scale
        pre = self.pre_acts_n(x_n, self.W_enc())
        f_BF = _JumpReLUFn.apply(pre, self.threshold_F, self.cfg.bandwidth)
        x_hat = f_BF @ self.W_dec_FD + self.b_dec_D
        mse = (x_hat - x_n).pow(2).sum(-1).mean()
        if self.cfg.penalty == "step":
            l0_term = _StepFn.apply(pre, self.threshold_F, self.cfg.bandwidth).sum(-1).mean()
        else:
            l0_term = torch.tanh(self.cfg.tanh_scale * f_BF.abs() * self.W_dec_FD.norm(dim=-1)).sum(-1).mean()
        sparsity = self.cfg.l0_coeff * l0_term
        loss = mse + sparsity_scale * sparsity
        with torch.no_grad():
            l0 = torch.count_nonzero(f_BF).float() / x_BD.shape[0]
            fired = f_BF.abs().amax(0) > 0
        return stats_output(loss, x_n, x_hat, l0, fired, sparsity=sparsity, mse=mse)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """Renormalise decoder rows; keep thresholds positive."""
        super().after_optimizer_step_()
        self.threshold_F.clamp_(min=1e-6)
