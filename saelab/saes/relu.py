"""ReLU SAE trained with an L1 penalty (optionally weighted by decoder row norms).

    f_BF     = ReLU((x_n - b_dec) W_enc + b_enc)
    x_hat_n  = f W_dec + b_dec
    loss     = mean_b ||x_n - x_hat_n||^2 + sparsity_scale * l1_coeff * l1
    l1       = mean_b sum_f f_bf n_f,      n_f = ||W_dec[f]||  (1 when `l1_weighted` is false)

Weighting by the decoder norm (Conerly et al. 2024, "Circuits Updates April 2024") stops the SAE from
shrinking f while growing W_dec; it is the default together with free (not unit-norm) decoder rows.

Fast path (`_ReLUL1`): f is dense here, so the step is five dense matmuls (forward: encoder, decoder;
backward: dL/df = g W_dec^T, dL/dW_dec = f^T g, dL/dW_enc as below), plus as few [B, F]
passes as possible; with g = dL/dx_hat and s_F = sum_b f_bF:

    dL/dpre   = (g W_dec^T + c n_F / B) * 1[f > 0]           c = dL/dl1 (one in-place add, one mask)
    dL/dW_dec = f^T g + (c / B) s_f W_dec[f] / n_f            (weighted: the norm's gradient)
    dL/dW_enc = (x_n - b_dec)^T dL/dpre = x_n^T dL/dpre - b_dec (x) dL/db_enc
    dL/db_enc = sum_b dL/dpre_b,    dL/db_dec = sum_b g_b - W_enc dL/db_enc

The encoder bias is folded as in `SAE.pre_acts_n`, so no [B, F] x [F, D] input gradient is formed
for b_dec. The L0 / fired statistics come from one comparison pass. `dense=True` is the plain
autograd reference, checked against the fast path in tests/saes/test_relu.py.

Not here: resampling of dead latents (train.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes.base import SAE, SAEConfig, TrainOutput, stats_output


@dataclass
class ReLUConfig(SAEConfig):
    architecture: ClassVar[str] = "relu"

    normalize_decoder: bool = False
    """Keep decoder rows at unit norm (the gradient component parallel to each row is removed)."""
    l1_coeff: float = 5.0
    """Weight of the L1 penalty (inputs are normalised to E||x||^2 = d_in)."""
    l1_weighted: bool = True
    """Weight each latent's L1 term by the norm of its decoder row."""
    dense: bool = False
    """Use the plain autograd path instead of the fused fast path (for checking; slower)."""

    def _problems(self) -> list[str]:
        return [f"l1_coeff must be >= 0, got {self.l1_coeff}"] if self.l1_coeff < 0 else []


class _ReLUL1(torch.autograd.Function):
    """(x_hat_BD, l1, counts_F) of the module docstring; backward as written there.

    counts_F (latent f active on how many tokens; float, exact below 2^24 tokens) has no gradient.
    """

    @staticmethod
    def forward(ctx, x_n_BD, W_enc_DF, b_enc_F, b_dec_D, W_dec_FD, weighted: bool):
        B = x_n_BD.shape[0]
        f_BF = torch.addmm(b_enc_F - b_dec_D @ W_enc_DF, x_n_BD, W_enc_DF).relu_()
        x_hat_BD = torch.addmm(b_dec_D, f_BF, W_dec_FD)
        s_F = f_BF.sum(0)
        n_F = W_dec_FD.norm(dim=-1) if weighted else torch.ones_like(s_F)
        l1 = (s_F @ n_F) / B
        # gt into a float buffer, then a float sum: ~5x faster than count_nonzero / bool sums on CPU
        counts_F = torch.gt(f_BF, 0, out=torch.empty_like(f_BF)).sum(0)
        ctx.save_for_backward(x_n_BD, W_enc_DF, b_dec_D, W_dec_FD, f_BF, s_F, n_F)
        ctx.weighted = weighted
        ctx.mark_non_differentiable(counts_F)
        return x_hat_BD, l1, counts_F

    @staticmethod
    def backward(ctx, g_BD, g_l1, _g_counts):
        x_n_BD, W_enc_DF, b_dec_D, W_dec_FD, f_BF, s_F, n_F = ctx.saved_tensors
        B = x_n_BD.shape[0]
        g_BD = g_BD.contiguous()
        c = g_l1 / B
        g_pre_BF = g_BD @ W_dec_FD.T
        g_pre_BF.add_(c * n_F)
        torch.ops.aten.threshold_backward.grad_input(g_pre_BF, f_BF, 0, grad_input=g_pre_BF)  # * 1[f > 0]
        g_x = g_W_enc = g_b_enc = g_b_dec = g_W_dec = None
        if ctx.needs_input_grad[0]:
            g_x = g_pre_BF @ W_enc_DF.T
        g_b_enc = g_pre_BF.sum(0)
        if ctx.needs_input_grad[1]:
            g_W_enc = torch.addr(x_n_BD.T @ g_pre_BF, b_dec_D, g_b_enc, alpha=-1)  # (x_n - b_dec)^T dL/dpre
        if ctx.needs_input_grad[3]:
            g_b_dec = g_BD.sum(0) - W_enc_DF @ g_b_enc
        if ctx.needs_input_grad[4]:
            g_W_dec = f_BF.T @ g_BD
            if ctx.weighted:
                g_W_dec.addcmul_((c * s_F / n_F.clamp_min(1e-12))[:, None], W_dec_FD)
        return g_x, g_W_enc, g_b_enc, g_b_dec, g_W_dec, None


class ReLUSAE(SAE):
    """ReLU + L1 (see module docstring)."""

    config_class = ReLUConfig
    cfg: ReLUConfig

    def activation(self, pre_BF: Tensor) -> Tensor:
        return F.relu(pre_BF)

    def training_loss(self, x_BD: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        x_n = x_BD * self.input_scale
        B = x_BD.shape[0]
        if self.cfg.dense:
            f_BF = F.relu(self.pre_acts_n(x_n, self.W_enc()))
            x_hat = f_BF @ self.W_dec_FD + self.b_dec_D
            if self.cfg.l1_weighted:
                l1 = (f_BF @ self.W_dec_FD.norm(dim=-1)).mean()
            else:
                l1 = f_BF.sum(-1).mean()
            with torch.no_grad():
                l0 = torch.count_nonzero(f_BF).float() / B
                fired = f_BF.amax(0) > 0
        else:
            x_hat, l1, counts_F = _ReLUL1.apply(x_n, self.W_enc(), self.b_enc_F, self.b_dec_D, self.W_dec_FD,
                                                self.cfg.l1_weighted)
            l0 = counts_F.double().sum().float() / B
            fired = counts_F > 0
        mse = (x_hat - x_n).pow(2).sum(-1).mean()
        sparsity = self.cfg.l1_coeff * l1
        loss = mse + sparsity_scale * sparsity
        return stats_output(loss, x_n, x_hat, l0, fired, sparsity=sparsity, mse=mse)
