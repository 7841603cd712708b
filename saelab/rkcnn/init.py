"""Data-driven SAE initialisation: RkCNN-mined decoder rows, and the simpler inits it must beat.

`RkcnnConfig` holds every option of `--init rkcnn` (its fields are the `--rkcnn-*` flags of
`saelab train`); `rkcnn_fraction`, `rkcnn_init_encoder` and `rkcnn_orient` apply to every
data-driven init. `data_init(X_ND, d_sae, kind, cfg)`
returns the decoder rows: n = min(round(fraction · d_sae), available) data-driven rows first, then
random unit rows. With X_ND the init sample and xc_n = x_n − mean(x):

    rkcnn      the directions kept by `probe` (r = n, at most h = `subsets`)
    data_rows  unit(xc_n) for n random distinct rows
    kmeans     unit(centre_c) for the n k-means centres of xc (k-means++ seeding, 10 Lloyd steps)
    pca        the top-n principal axes of xc (at most D)

`orient` "heavy_tail" flips each row d so that mean_n ((x_n − mean) · d)³ ≥ 0 (a latent with a
tied encoder fires only on positive projections; this points it at the sparse tail). "none" keeps
the sign the method leaves (largest entry positive for RkCNN).

Encoder of the data-driven latents (`init_encoder`): "tied" W_enc[:, i] = W_dec[i]ᵀ; "random"
W_enc[:, i] ~ U(−1, 1)/√D independently (the method's code only seeds decoder columns and leaves its
encoder at its random init). `random_encoder_columns_` applies "random" to an SAE's W_enc_DF.

Not here: scoring (probe.py), the selection rules (select.py), SAE classes (saes/), training.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from saelab.errors import UsageError, raise_all
from saelab.rkcnn.probe import KURTOSES, SAMPLINGS, SCORES, ProbeResult, kmeans, probe
from saelab.rkcnn.select import DEDUPS

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("rkcnn", "data_rows", "kmeans", "pca")
"""Data-driven init kinds (`TrainConfig.init` values other than "random")."""


@dataclass
class RkcnnConfig:
    """Options of the data-driven inits. Defaults follow the method's code. Field names carry the
    `rkcnn_` prefix because configs that embed this group (`TrainConfig`) flatten it: field = flag."""

    rkcnn_fraction: float = 0.5
    """Share of the latents whose decoder rows start at data-driven directions (rkcnn: at most --rkcnn-subsets)."""
    rkcnn_subsets: int = 600
    """rkcnn: random dimension subsets scored (h); it keeps the best min(fraction * d_sae, h)."""
    rkcnn_subset_size: int | None = None
    """rkcnn: dims per subset (m); default round(sqrt(d_in))."""
    rkcnn_score: Literal["kurtosis", "knn", "variance_ratio"] = "kurtosis"
    """rkcnn: how subsets are ranked (saelab/rkcnn/probe.py)."""
    rkcnn_kurtosis: Literal["coordinate_mean", "principal"] = "coordinate_mean"
    """rkcnn kurtosis score: mean per-coordinate excess kurtosis (the method) or that of the principal projection."""
    rkcnn_knn_k: int = 5
    """rkcnn knn score: neighbours per row."""
    rkcnn_knn_rows: int | None = None
    """rkcnn knn score: rows sampled (None: all rows of the init sample; N² distances per subset)."""
    rkcnn_sampling: Literal["random", "partition"] = "random"
    """rkcnn: independent random subsets, or disjoint partitions of the dims (reshuffled each round)."""
    rkcnn_dedup: Literal["none", "subsets", "cos_cap", "dominant", "deflation"] = "none"
    """rkcnn: none (the method), distinct subsets, greedy |cos| cap, one per dominant coordinate, or deflation."""
    rkcnn_cos_cap: float = 0.5
    """rkcnn dedup cos_cap / deflation: largest |cos| allowed between two kept directions."""
    rkcnn_standardize: bool = False
    """rkcnn: probe the coordinates scaled to unit variance (directions mapped back to x space)."""
    rkcnn_exclude_massive: float = 0.0
    """rkcnn: leave out dims whose std exceeds this times the median std (0: keep all)."""
    rkcnn_init_encoder: Literal["random", "tied"] = "random"
    """Encoder columns of the data-driven latents: random (the method) or W_dec transposed."""
    rkcnn_orient: Literal["none", "heavy_tail"] = "none"
    """Sign of each data-driven row: as found (the method), or towards the data's heavy tail."""

    def __post_init__(self):
        p = []
        if not 0.0 <= self.rkcnn_fraction <= 1.0:
            p.append(f"rkcnn_fraction={self.rkcnn_fraction} must be between 0 and 1 (the share of latents initialised "
                     "from data); e.g. --rkcnn-fraction 0.1")
        if self.rkcnn_subsets < 1:
            p.append(f"rkcnn_subsets={self.rkcnn_subsets} must be >= 1")
        if self.rkcnn_subset_size is not None and self.rkcnn_subset_size < 1:
            p.append(f"rkcnn_subset_size={self.rkcnn_subset_size} must be >= 1 (or unset for sqrt(d_in))")
        if self.rkcnn_knn_k < 1 or (self.rkcnn_knn_rows is not None and self.rkcnn_knn_rows < 2):
            p.append(f"rkcnn_knn_k={self.rkcnn_knn_k} must be >= 1 and rkcnn_knn_rows={self.rkcnn_knn_rows} >= 2 (or unset)")
        if not 0.0 < self.rkcnn_cos_cap <= 1.0:
            p.append(f"rkcnn_cos_cap={self.rkcnn_cos_cap} must be in (0, 1]")
        if not self.rkcnn_exclude_massive >= 0:  # also NaN
            p.append(f"rkcnn_exclude_massive={self.rkcnn_exclude_massive} must be >= 0 (0 keeps every dim)")
        for name, allowed in (("score", SCORES), ("kurtosis", KURTOSES), ("sampling", SAMPLINGS), ("dedup", DEDUPS),
                              ("init_encoder", ("random", "tied")), ("orient", ("none", "heavy_tail"))):
            if getattr(self, "rkcnn_" + name) not in allowed:
                p.append(f"rkcnn_{name}={getattr(self, 'rkcnn_' + name)!r} is not one of {', '.join(allowed)}")
        raise_all(p, "rkcnn init config")

    def probe_kwargs(self) -> dict:
        """The `probe` keyword arguments these options set."""
        return {"score": self.rkcnn_score, "kurtosis": self.rkcnn_kurtosis, "k_neighbors": self.rkcnn_knn_k,
                "knn_rows": self.rkcnn_knn_rows, "sampling": self.rkcnn_sampling, "dedup": self.rkcnn_dedup,
                "cos_cap": self.rkcnn_cos_cap, "standardize": self.rkcnn_standardize,
                "exclude_massive": self.rkcnn_exclude_massive}


class InitResult(NamedTuple):
    """Decoder rows for an SAE, from `data_init` / `rkcnn_init`."""

    dirs_FD: torch.Tensor
    """float32 [F, D]: unit-norm rows; data-driven rows first, then random unit vectors."""
    mined_mask_F: torch.Tensor
    """bool [F]: True where the row is data-driven."""
    probe: ProbeResult | None
    """The probe behind the rkcnn rows (None for the other kinds)."""


RkcnnInit = InitResult  # the old name


def random_unit_rows(n: int, D: int, seed: int) -> torch.Tensor:
    """n random unit vectors in D dims (Gaussian, normalised): float32 [n, D]."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, D, generator=g)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def orient_heavy_tail(x_ND: torch.Tensor, dirs_MD: torch.Tensor) -> torch.Tensor:
    """Flip each direction so the third moment of the data's projection on it is >= 0.

        p_nm = (x_n − mean(x)) · dirs_m,   dirs_m <- sign(mean_n p_nm³) dirs_m   (sign(0) = +1)
    """
    if dirs_MD.shape[0] == 0:
        return dirs_MD
    x = x_ND.float()
    p_NM = (x - x.mean(0)) @ dirs_MD.T
    sign_M = torch.where(p_NM.double().pow(3).mean(0) < 0, -1.0, 1.0).to(dirs_MD.dtype)
    return dirs_MD * sign_M[:, None]


@torch.no_grad()
def random_encoder_columns_(W_enc_DF: torch.Tensor, mask_F: torch.Tensor, seed: int) -> torch.Tensor:
    """W_enc[:, i] ~ U(−1, 1)/√D for the latents in mask_F (in place; the same law as an untied SAE init)."""
    D = W_enc_DF.shape[0]
    g = torch.Generator().manual_seed(seed + 104_729)
    n = int(mask_F.sum())
    W_enc_DF[:, mask_F] = ((torch.rand(D, n, generator=g) * 2 - 1) / math.sqrt(D)).to(W_enc_DF)
    return W_enc_DF


def _unit(v_ND: torch.Tensor) -> torch.Tensor:
    return v_ND / v_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _rows(X_ND: torch.Tensor, n: int, kind: str, cfg: RkcnnConfig, seed: int, labels) -> tuple[torch.Tensor, ProbeResult | None]:
    X = X_ND.float()
    N, D = X.shape
    xc_ND = X - X.mean(0)
    if kind == "rkcnn":
        m = cfg.rkcnn_subset_size if cfg.rkcnn_subset_size is not None else max(1, round(math.sqrt(D)))
        res = probe(X, m=m, h=cfg.rkcnn_subsets, r=max(n, 1), labels=labels, seed=seed, **cfg.probe_kwargs())
        return res.directions_RD[:n], res
    if kind == "data_rows":
        g = torch.Generator().manual_seed(seed + 1)
        return _unit(xc_ND[torch.randperm(N, generator=g)[:min(n, N)]]), None
    if kind == "kmeans":
        return _unit(kmeans(xc_ND, min(n, N), seed, iters=10)[0]), None
    if kind == "pca":
        _, _, V_DD = torch.linalg.svd(xc_ND.double(), full_matrices=False)
        return V_DD[:min(n, D)].float(), None
    raise UsageError(f"init kind {kind!r} is not one of {', '.join(KINDS)}.")


def data_init(X_ND: torch.Tensor, d_sae: int, kind: str = "rkcnn", cfg: RkcnnConfig | None = None,
              seed: int = 0, labels: torch.Tensor | None = None) -> InitResult:
    """Decoder rows: round(cfg.rkcnn_fraction · d_sae) data-driven rows of `kind`, then random unit rows.

    Args:
        X_ND: the initialisation sample (raw activations).
        d_sae: number of latents F.
        kind: "rkcnn", "data_rows", "kmeans" or "pca" (module docstring).
        cfg: the options (default RkcnnConfig()).
        seed: makes the probe, the row choice, k-means and the random rows deterministic.
        labels: int [N] labels for the rkcnn knn score (None: k-means clusters).
    Returns:
        InitResult(dirs_FD, mined_mask_F, probe): data-driven rows first, each oriented per cfg.rkcnn_orient.
    """
    cfg = cfg or RkcnnConfig()
    if d_sae < 1:
        raise UsageError(f"d_sae={d_sae} must be at least 1.")
    D = X_ND.shape[1]
    want = round(cfg.rkcnn_fraction * d_sae)
    dirs_FD = random_unit_rows(d_sae, D, seed + 7919)
    mined_F = torch.zeros(d_sae, dtype=torch.bool)
    if want == 0:
        return InitResult(dirs_FD, mined_F, None)
    rows_ND, res = _rows(X_ND, want, kind, cfg, seed, labels)
    if cfg.rkcnn_orient == "heavy_tail":
        rows_ND = orient_heavy_tail(X_ND, rows_ND)
    n = rows_ND.shape[0]
    if n < want:
        log.warning("%s init: asked for %d data-driven latents (fraction %.2f of %d) but only %d are available "
                    "(rkcnn: h=%d subsets and the dedup rule; pca: at most D=%d); the other %d start random. "
                    "Raise h to mine more.", kind, want, cfg.rkcnn_fraction, d_sae, n, cfg.rkcnn_subsets, D, d_sae - n)
    dirs_FD[:n] = rows_ND
    mined_F[:n] = True
    return InitResult(dirs_FD, mined_F, res)


def rkcnn_init(X_ND: torch.Tensor, d_sae: int, fraction: float = 0.5, h: int = 600, m: int | None = None,
               score: str = "kurtosis", seed: int = 0, labels: torch.Tensor | None = None, **options) -> InitResult:
    """`data_init(kind="rkcnn")` with the common options as arguments; **options: other RkcnnConfig
    fields, with or without their `rkcnn_` prefix (`dedup="cos_cap"`)."""
    options = {k if k.startswith("rkcnn_") else "rkcnn_" + k: v for k, v in options.items()}
    return data_init(X_ND, d_sae, "rkcnn", RkcnnConfig(rkcnn_fraction=fraction, rkcnn_subsets=h, rkcnn_subset_size=m,
                                                      rkcnn_score=score, **options), seed, labels)
