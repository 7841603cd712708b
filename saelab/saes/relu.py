"""ReLU SAE trained with an L1 penalty (optionally weighted by decoder row norms).

    f_BF     = ReLU((x_n - b_dec) W_enc + b_enc)
    x_hat_n  = f W_dec + b_dec
    loss     = mean_b ||x_n - x_hat_n||^2 + sparsity_scale * l1_coeff * mean_b sum_f f_bf ||W_dec[f]||

With `l1_weighted` false the norm factor is dropped. Weighting by the decoder norm (Conerly et al.
2024, "Circuits Updates April 2024") stops the SAE from shrinking f while growing W_dec; it is the
default together with free (not unit-norm) decoder rows. The step is plain dense autograd: nothing
here is sparse enough to gain from the TopK fast path.

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

    def _problems(self) -> list[str]:
        return [f"l1_coeff must be >= 0, got {self.l1_coeff}"] if self.l1_coeff < 0 else []


class ReLUSAE(SAE):
    """ReLU + L1 (see module docstring)."""

    config_class = ReLUConfig
    cfg: ReLUConfig

    def activation(self, pre_BF: Tensor) -> Tensor:
        return F.relu(pre_BF)

    def training_loss(self, x_BD: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        x_n = x_BD * self.input_scale
        f_BF = F.relu(self.pre_acts_n(x_n, self.W_enc()))
        x_hat = f_BF @ self.W_dec_FD + self.b_dec_D
        mse = (x_hat - x_n).pow(2).sum(-1).mean()
        if self.cfg.l1_weighted:
            l1 = (f_BF @ self.W_dec_FD.norm(dim=-1)).mean()
        else:
            l1 = f_BF.sum(-1).mean()
        sparsity = self.cfg.l1_coeff * l1
        loss = mse + sparsity_scale * sparsity
        with torch.no_grad():
            l0 = torch.count_nonzero(f_BF).float() / x_BD.shape[0]
            fired = f_BF.amax(0) > 0
        return stats_output(loss, x_n, x_hat, l0, fired, sparsity=sparsity, mse=mse)
