"""Synthetic data with known features: the toy model of superposition, and planted dictionaries.

Owns two generators whose ground truth is known by construction, for testing SAEs and RkCNN:

1. The ReLU-output toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition",
   section 2). Shapes: B batch, F n_features, D d_hidden (the "activation" width an SAE would see).

       x_BF:  x_i = u_i · [ξ_i < p],   u_i ~ U[0, 1], ξ_i ~ U[0, 1]  independently
       h_BD = x_BF W_DFᵀ                      (h = W x: feature i is written along column W[:, i])
       x̂_BF = ReLU(h_BD W_DF + b_F)          (x' = ReLU(Wᵀ h + b))
       loss = mean_b Σ_i I_i (x_i − x̂_i)²,   I_i = importance_decay^i

   The ground-truth feature directions are the columns of W: `feature_dirs_FD = W_DFᵀ`, so each
   hidden vector is exactly h = Σ_i x_i · feature_dirs_FD[i].

2. `planted_dictionary`: X = codes · dirs (+ optional Gaussian noise) with `active_per_sample`
   non-zero codes per row, for SAE recovery tests.

Not here: probing (rkcnn.py), experiments and plots (experiments/toy.py).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from saelab.errors import raise_all

log = logging.getLogger(__name__)


@dataclass
class ToyConfig:
    """The toy model of superposition and how to train it."""

    n_features: int = 10
    """Number of sparse input features F."""
    d_hidden: int = 5
    """Width D of the hidden layer the features are compressed into."""
    feature_probability: float = 0.1
    """Probability p that a feature is active in a sample (sparsity is 1 − p)."""
    importance_decay: float = 0.9
    """Importance of feature i is importance_decay**i."""
    steps: int = 3000
    """Adam steps of training."""
    batch_size: int = 1024
    """Samples per training step."""
    lr: float = 1e-2
    """Adam learning rate."""

    def __post_init__(self):
        problems = []
        if self.n_features < 1:
            problems.append(f"n_features={self.n_features} must be at least 1")
        if self.d_hidden < 1:
            problems.append(f"d_hidden={self.d_hidden} must be at least 1")
        if not 0.0 < self.feature_probability <= 1.0:
            problems.append(f"feature_probability={self.feature_probability} must be in (0, 1]")
        if not 0.0 < self.importance_decay <= 1.0:
            problems.append(f"importance_decay={self.importance_decay} must be in (0, 1]")
        if self.steps < 0 or self.batch_size < 1:
            problems.append(f"steps={self.steps} must be >= 0 and batch_size={self.batch_size} >= 1")
        raise_all(problems, "toy model config")


class ToySample(NamedTuple):
    """Inputs and hidden activations drawn from a toy model."""

    x_BF: torch.Tensor
    """float32 [B, F]: sparse feature magnitudes."""
    h_BD: torch.Tensor
    """float32 [B, D]: hidden activations h = W x."""


def sample_features(n: int, n_features: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """x_BF with each feature active with probability p, magnitude U[0, 1] when active."""
    active_BF = torch.rand(n, n_features, generator=generator) < p
    return torch.rand(n, n_features, generator=generator) * active_BF


def importance(cfg: ToyConfig) -> torch.Tensor:
    """I_F = importance_decay ** arange(F)."""
    return cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32)


def toy_loss(x_BF: torch.Tensor, x_hat_BF: torch.Tensor, importance_F: torch.Tensor) -> torch.Tensor:
    """Importance-weighted reconstruction loss: mean_b Σ_i I_i (x_i − x̂_i)²."""
    return ((x_BF - x_hat_BF) ** 2 * importance_F).sum(1).mean()


class ToyModel(torch.nn.Module):
    """x̂ = ReLU(Wᵀ W x + b) with W_DF [d_hidden, n_features], b_F [n_features]."""

    def __init__(self, cfg: ToyConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        # Xavier-normal init as in the paper's notebook.
        std = (2.0 / (cfg.n_features + cfg.d_hidden)) ** 0.5
        self.W_DF = torch.nn.Parameter(torch.randn(cfg.d_hidden, cfg.n_features, generator=g) * std)
        self.b_F = torch.nn.Parameter(torch.zeros(cfg.n_features))
        self.seed = seed

    def hidden(self, x_BF: torch.Tensor) -> torch.Tensor:
        """h_BD = x W_DFᵀ."""
        return x_BF @ self.W_DF.T

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        """x̂_BF = ReLU(h W_DF + b)."""
        return F.relu(self.hidden(x_BF) @ self.W_DF + self.b_F)

    @property
    def feature_dirs_FD(self) -> torch.Tensor:
        """Ground-truth feature directions in hidden space: row i = column i of W (not normalised)."""
        return self.W_DF.detach().T.clone()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> ToySample:
        """n fresh samples (x, h = W x), deterministic for a seed."""
        g = torch.Generator().manual_seed(seed)
        x_BF = sample_features(n, self.cfg.n_features, self.cfg.feature_probability, g)
        return ToySample(x_BF, self.hidden(x_BF))


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread. The toy model's ops are tiny: on a busy 2-core machine a second
    thread only adds synchronisation (measured: 400 steps took 13 s on 2 threads, 0.26 s on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_toy_model(cfg: ToyConfig, seed: int = 0) -> ToyModel:
    """Train the toy model with Adam on fresh samples each step; deterministic for a seed."""
    with _one_thread():
        return _train(cfg, seed)


def _train(cfg: ToyConfig, seed: int) -> ToyModel:
    model = ToyModel(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1_000_003)
    imp_F = importance(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.steps):
        x_BF = sample_features(cfg.batch_size, cfg.n_features, cfg.feature_probability, g)
        loss = toy_loss(x_BF, model(x_BF), imp_F)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log.debug("toy model seed %d: final loss %.5f after %d steps", seed, loss.item(), cfg.steps)
    model.eval()
    return model


class PlantedData(NamedTuple):
    """Synthetic activations built from a known dictionary."""

    X_ND: torch.Tensor
    """float32 [N, D]: X = codes_NF · dirs_FD + noise."""
    dirs_FD: torch.Tensor
    """float32 [F, D]: unit-norm ground-truth directions."""
    codes_NF: torch.Tensor
    """float32 [N, F]: exactly `active_per_sample` non-zeros per row, magnitudes U[0.5, 1.5]."""


def planted_dictionary(n_dirs: int, d: int, n_samples: int, active_per_sample: int, seed: int = 0,
                       noise: float = 0.0) -> PlantedData:
    """X = codes · dirs + noise·ε, with random unit `dirs` and sparse non-negative `codes`.

    Args:
        n_dirs: dictionary size F.
        d: activation width D.
        n_samples: rows N.
        active_per_sample: non-zero codes per row (chosen uniformly without replacement).
        seed: makes everything deterministic.
        noise: standard deviation of added Gaussian noise.
    """
    problems = []
    if not 1 <= active_per_sample <= n_dirs:
        problems.append(f"active_per_sample={active_per_sample} must be between 1 and n_dirs={n_dirs}")
    if d < 1 or n_samples < 1:
        problems.append(f"d={d} and n_samples={n_samples} must be at least 1")
    raise_all(problems, "planted_dictionary")
    g = torch.Generator().manual_seed(seed)
    dirs_FD = torch.randn(n_dirs, d, generator=g)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    active_NK = torch.rand(n_samples, n_dirs, generator=g).argsort(dim=1)[:, :active_per_sample]
    mags_NK = 0.5 + torch.rand(n_samples, active_per_sample, generator=g)
    codes_NF = torch.zeros(n_samples, n_dirs).scatter_(1, active_NK, mags_NK)
    X_ND = codes_NF @ dirs_FD
    if noise > 0:
        X_ND += noise * torch.randn(n_samples, d, generator=g)
    return PlantedData(X_ND, dirs_FD, codes_NF)
