"""Test builders for SAEs: planted-dictionary data and a tiny inline training loop.

    data = PlantedDictionary(n_features=512, d=64, active=5, seed=0)
    x_BD = data.sample(1024)                        # sums of a few planted unit directions
    train_sae(sae, data, steps=2000)                # Adam, the SAE's own hooks, fixed seed
    recovered_fraction(sae.W_dec_FD, data.dirs_FD)  # share of planted directions found (cos >= 0.9)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PlantedDictionary:
    """x = sum over `active` random latents i (drawn with replacement) of m_i d_i, with d_i unit directions and m_i ~ U(0.5, 1.5)."""

    def __init__(self, n_features: int = 512, d: int = 64, active: int = 5, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.dirs_FD = F.normalize(torch.randn(n_features, d, generator=self.gen), dim=-1)
        self.active = active

    def sample(self, n: int) -> torch.Tensor:
        idx_NA = torch.randint(self.dirs_FD.shape[0], (n, self.active), generator=self.gen)
        mag_NA = 0.5 + torch.rand(n, self.active, generator=self.gen)
        return torch.einsum("na,nad->nd", mag_NA, self.dirs_FD[idx_NA])


def recovered_fraction(W_dec_FD: torch.Tensor, dirs_FD: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions whose best-matching decoder row has cosine >= threshold."""
    cos = F.normalize(dirs_FD, dim=-1) @ F.normalize(W_dec_FD.detach(), dim=-1).T
    return (cos.max(dim=1).values >= threshold).float().mean().item()


def train_sae(sae, data: PlantedDictionary, steps: int, batch: int = 512, lr: float = 3e-3,
              warmup_sparsity: int = 0) -> None:
    """A minimal training loop that calls the SAE exactly as train.py does."""
    sae.init_from_data_(data.sample(4096))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup_sparsity) if warmup_sparsity else 1.0
        out = sae.training_loss(data.sample(batch), sparsity_scale=scale)
        out.loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_optimizer_step_()
