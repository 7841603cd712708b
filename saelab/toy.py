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

2. `PlantedFeatures`: X = Σ m_a dirs[i_a] (+ Gaussian noise), `active` draws per row, the one
   planted-dictionary generator for SAE recovery tests and synthetic stores (`planted_dictionary` is
   one batch of it).

3. `random_linear_toy`: the RkCNN seed's toy, h = x W with random unit rows W and no training
   (optionally with each row on `support` coordinates: a privileged basis), and `dominant_labels`.

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
    """float32 [N, F]: `active` draws per row, magnitudes U[0.5, 1.5] (summed when a draw repeats)."""


class PlantedFeatures:
    """The one planted-dictionary generator of saelab: X = Σ_a m_a dirs[i_a] + noise · ε.

        dirs_FD  = unit rows of a Gaussian [F, D]          (drawn once, from `seed`)
        per row: i_1 .. i_A  uniform over F features        (A = active; without replacement when
                                                             distinct, else independent draws)
                 m_a ~ U[0.5, 1.5],  ε ~ N(0, I_D)

    The generator carries on from the dictionary draw, so successive `draw`/`sample` calls give
    fresh, reproducible rows (a stream, as training wants).
    """

    def __init__(self, n_features: int = 512, d: int = 64, active: int = 5, seed: int = 0, distinct: bool = False,
                 noise: float = 0.0):
        problems = []
        if n_features < 1 or d < 1:
            problems.append(f"n_features={n_features} and d={d} must be at least 1")
        if not 1 <= active <= (n_features if distinct else active):
            problems.append(f"active={active} must be between 1 and n_features={n_features}")
        if noise < 0:
            problems.append(f"noise={noise} must be >= 0")
        raise_all(problems, "planted features")
        self.gen = torch.Generator().manual_seed(seed)
        self.dirs_FD = F.normalize(torch.randn(n_features, d, generator=self.gen), dim=-1)
        self.active, self.distinct, self.noise = active, distinct, noise

    def draw(self, n: int) -> PlantedData:
        """n fresh rows with their codes."""
        Fn, D = self.dirs_FD.shape
        if self.distinct:
            idx_NA = torch.rand(n, Fn, generator=self.gen).argsort(dim=1)[:, :self.active]
        else:
            idx_NA = torch.randint(Fn, (n, self.active), generator=self.gen)
        mag_NA = 0.5 + torch.rand(n, self.active, generator=self.gen)
        codes_NF = torch.zeros(n, Fn).index_put_((torch.arange(n)[:, None].expand_as(idx_NA), idx_NA), mag_NA,
                                                 accumulate=True)
        X_ND = torch.einsum("na,nad->nd", mag_NA, self.dirs_FD[idx_NA])
        if self.noise > 0:
            X_ND = X_ND + self.noise * torch.randn(n, D, generator=self.gen)
        return PlantedData(X_ND, self.dirs_FD, codes_NF)

    def sample(self, n: int) -> torch.Tensor:
        """n fresh rows X_ND."""
        return self.draw(n).X_ND


def planted_dictionary(n_dirs: int, d: int, n_samples: int, active_per_sample: int, seed: int = 0,
                       noise: float = 0.0) -> PlantedData:
    """One batch of `PlantedFeatures(n_dirs, d, active_per_sample, seed, distinct=True, noise)`."""
    return PlantedFeatures(n_dirs, d, active_per_sample, seed, distinct=True, noise=noise).draw(n_samples)


# ---------------------------------------------------------------------------------------------
# The RkCNN seed's toy: an untrained linear map, and a privileged-basis variant


class LinearToy(NamedTuple):
    """h = x W_FD: feature i is written along row i of W (the RkCNN seed's toy model, untrained)."""

    W_FD: torch.Tensor
    """float32 [F, D]: unit rows, the true feature directions."""
    p: float
    """Probability that a feature is active in a sample."""

    def sample(self, n: int, seed: int) -> ToySample:
        """x_BF (active with probability p, magnitude U[0, 1]) and h_BD = x W."""
        g = torch.Generator().manual_seed(seed)
        x_BF = sample_features(n, self.W_FD.shape[0], self.p, g)
        return ToySample(x_BF, x_BF @ self.W_FD)


def random_linear_toy(n_features: int, d_hidden: int, p: float, seed: int, support: int | None = None) -> LinearToy:
    """Random unit rows W (Gaussian, normalised), as the seed's toy; with `support`, each row lives on
    `support` random coordinates only (a privileged basis: features aligned with few hidden dims)."""
    g = torch.Generator().manual_seed(seed)
    W_FD = torch.randn(n_features, d_hidden, generator=g)
    if support is not None:
        keep_FD = torch.zeros(n_features, d_hidden, dtype=torch.bool)
        keep_FD.scatter_(1, torch.rand(n_features, d_hidden, generator=g).argsort(1)[:, :support], True)
        W_FD = W_FD * keep_FD
    return LinearToy(F.normalize(W_FD, dim=-1), p)


def dominant_labels(x_BF: torch.Tensor) -> torch.Tensor:
    """label_b = argmax_i x_bi, or −1 when no feature is active (the seed's knn labels): int64 [B]."""
    return torch.where(x_BF.amax(1) > 0, x_BF.argmax(1), torch.full((x_BF.shape[0],), -1))
