"""Pure metric functions for SAE evaluation: reconstruction, sparsity, dictionary geometry, downstream.

This module owns the arithmetic only. It takes tensors and returns tensors or named results; it knows
no SAE class, no store and no model (`evaluate.py` wires those together). Every metric that is
averaged over a data set is computed from *sufficient statistics* summed over tokens, so the answer
does not depend on how the set was cut into batches (per-batch averages are never averaged again).

Shapes: `B` tokens in a batch, `N` tokens in a whole set, `D` d_in, `F` d_sae, `V` vocab.

Reconstruction (raw, unnormalised activation space; sums over all N tokens):

    mse      = sum_n ||x_n - x_hat_n||^2 / (N * D)
    mean_D   = sum_n x_n / N
    var_tot  = sum_n ||x_n - mean_D||^2 = sum_n ||x_n||^2 - N ||mean_D||^2      (float64 sums)
    fvu      = sum_n ||x_n - x_hat_n||^2 / var_tot          (explained variance = 1 - fvu)
    cosine   = (1/N) sum_n <x_n, x_hat_n> / (||x_n|| ||x_hat_n||)    (0 where either norm is 0)
    rel_norm = (1/N) sum_n ||x_hat_n|| / ||x_n||
    rel_error = (1/N) sum_n ||x_n - x_hat_n|| / ||x_n||      per-token relative error: each token
               counts once whatever its norm, so a few massive rows cannot decide it (FVU sums
               squared errors, so rows with 100x the median norm weigh 10^4x; report both)

FVU is measured about the set's mean, not about zero: x_hat = mean_D gives fvu = 1 exactly, while
x_hat = 0 gives 1 + N ||mean_D||^2 / var_tot, which is 1 only for centred data.

Sparsity (a latent is *active* on a token when f != 0):

    l0          = (1/N) sum_n #{i : f_ni != 0}
    freq_F      = #{n : f_ni != 0} / N
    dead        = #{i : freq_i = 0}           dense = #{i : freq_i > dense_threshold} (default 0.1)

Dictionary geometry (rows of W_dec_FD are the decoder directions):

    norm_F      = ||W_dec_i||
    max_cos_F   = max_{j != i} <W_dec_i, W_dec_j> / (||W_dec_i|| ||W_dec_j||)   (blocked: never F x F)

Downstream (next-token distributions p = softmax(logits_clean), q = softmax(logits_spliced)):

    kl_n            = sum_v p_nv (log p_nv - log q_nv)                      KL(clean || spliced)
    ce_recovered    = (ce_ablated - ce_sae) / (ce_ablated - ce_clean)

Fast paths (streaming sums, non-zero-index sparsity counts, blocked max-cosine) each have a plain reference path and a parity test
(`tests/test_metrics.py`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------
# Reconstruction


class ReconSums(NamedTuple):
    """Sufficient statistics of reconstruction over a set of tokens (float64; add with `add_recon`)."""

    n: int
    """Tokens summed over."""
    sum_x_D: Tensor
    """sum_n x_n, float64 [D]."""
    sum_sq_x: Tensor
    """sum_n ||x_n||^2, float64 scalar."""
    sum_sq_err: Tensor
    """sum_n ||x_n - x_hat_n||^2, float64 scalar."""
    sum_cos: Tensor
    """sum_n cos(x_n, x_hat_n), float64 scalar."""
    sum_rel_norm: Tensor
    """sum_n ||x_hat_n|| / ||x_n||, float64 scalar."""
    sum_rel_err: Tensor
    """sum_n ||x_n - x_hat_n|| / ||x_n||, float64 scalar."""


class Reconstruction(NamedTuple):
    """Reconstruction metrics of a whole set (see the module docstring for the equations)."""

    mse: float
    """Mean over tokens and dimensions of (x - x_hat)^2."""
    fvu: float
    """Fraction of variance unexplained, about the set's mean."""
    explained_variance: float
    """1 - fvu."""
    cosine: float
    """Per-token cosine similarity of x and x_hat, averaged over tokens."""
    rel_norm: float
    """Per-token ||x_hat|| / ||x||, averaged over tokens."""
    rel_error: float
    """Per-token ||x - x_hat|| / ||x||, averaged over tokens."""


def recon_sums(x_BD: Tensor, x_hat_BD: Tensor) -> ReconSums:
    """Sufficient statistics of one batch.

    Args:
        x_BD: activations (raw space).
        x_hat_BD: reconstructions of `x_BD` (same space and shape).
    Returns:
        ReconSums over the B tokens.
    """
    if x_BD.shape != x_hat_BD.shape or x_BD.ndim != 2:
        raise ValueError(f"x_BD {tuple(x_BD.shape)} and x_hat_BD {tuple(x_hat_BD.shape)} must both be [B, D]")
    x64_BD = x_BD.double()
    err_B = (x_BD - x_hat_BD).float().pow(2).sum(-1)
    norm_x_B = x_BD.float().norm(dim=-1)
    norm_xh_B = x_hat_BD.float().norm(dim=-1)
    dot_B = (x_BD.float() * x_hat_BD.float()).sum(-1)
    cos_B = torch.where((norm_x_B > 0) & (norm_xh_B > 0), dot_B / (norm_x_B * norm_xh_B).clamp_min(_EPS), 0.0)
    rel_B = norm_xh_B / norm_x_B.clamp_min(_EPS)
    rel_err_B = err_B.sqrt() / norm_x_B.clamp_min(_EPS)
    return ReconSums(
        n=x_BD.shape[0],
        sum_x_D=x64_BD.sum(0),
        sum_sq_x=x64_BD.pow(2).sum(),
        sum_sq_err=err_B.double().sum(),
        sum_cos=cos_B.double().sum(),
        sum_rel_norm=rel_B.double().sum(),
        sum_rel_err=rel_err_B.double().sum(),
    )


def empty_recon(d: int) -> ReconSums:
    """The sums of the empty set of width d."""
    z = torch.zeros((), dtype=torch.float64)
    return ReconSums(0, torch.zeros(d, dtype=torch.float64), *[z.clone() for _ in ReconSums._fields[2:]])


def empty_sparsity(d_sae: int) -> SparsitySums:
    """The sums of the empty set for d_sae latents."""
    return SparsitySums(0, torch.zeros(d_sae, dtype=torch.int64), torch.zeros(d_sae + 1, dtype=torch.int64))


def add_recon(a: ReconSums | None, b: ReconSums) -> ReconSums:
    """a + b, field by field (a may be None: the empty set)."""
    if a is None:
        return b
    return ReconSums(*(x + y for x, y in zip(a, b)))


def total_variance(s: ReconSums) -> float:
    """sum_n ||x_n - mean||^2 from streaming sums (float64)."""
    if s.n == 0:
        return 0.0
    return float(s.sum_sq_x - s.sum_x_D.pow(2).sum() / s.n)


def reconstruction_metrics(s: ReconSums) -> Reconstruction:
    """Turn summed statistics into metrics.

    Raises:
        ValueError: for an empty set, or a set whose activations do not vary (FVU undefined).
    """
    if s.n == 0:
        raise ValueError("no tokens: reconstruction metrics are undefined on an empty set")
    d = s.sum_x_D.numel()
    var_tot = total_variance(s)
    # Relative tolerance: sum ||x||^2 - N ||mean||^2 cancels catastrophically when the data is constant.
    if var_tot <= 1e-12 * max(float(s.sum_sq_x), _EPS):
        raise ValueError(f"the {s.n} activations do not vary (total variance {var_tot:.3g}): FVU is undefined")
    fvu = float(s.sum_sq_err) / var_tot
    return Reconstruction(
        mse=float(s.sum_sq_err) / (s.n * d),
        fvu=fvu,
        explained_variance=1.0 - fvu,
        cosine=float(s.sum_cos) / s.n,
        rel_norm=float(s.sum_rel_norm) / s.n,
        rel_error=float(s.sum_rel_err) / s.n,
    )


def fvu(x_ND: Tensor, x_hat_ND: Tensor) -> Tensor:
    """FVU of a set held in memory: ||x - x_hat||^2 / ||x - mean(x)||^2 (the streamed `ReconSums`
    version is `reconstruction_metrics`; tests check one against the other)."""
    return (x_ND - x_hat_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum().clamp_min(1e-12)


def variance_share_of_top(dev_N: Tensor, fraction: float) -> float:
    """Share of the total variance held by the top `fraction` of rows, given each row's squared
    deviation from the set's mean dev_N = ||x_n - mean||^2 (at least one row counts)."""
    if dev_N.numel() == 0 or float(dev_N.sum()) <= 0:
        return 0.0
    k = max(1, math.ceil(fraction * dev_N.numel()))
    return float(dev_N.double().topk(k).values.sum() / dev_N.double().sum())


def mean_activation(s: ReconSums) -> Tensor:
    """mean_D of the set, float32 [D] (used for mean-ablation)."""
    return (s.sum_x_D / max(s.n, 1)).float()


# ---------------------------------------------------------------------------------------------------
# Sparsity


class SparsitySums(NamedTuple):
    """Counts over a set of tokens (int64; add with `add_sparsity`)."""

    n: int
    """Tokens counted."""
    fired_F: Tensor
    """Number of tokens on which each latent was active, int64 [F]."""
    l0_hist: Tensor
    """l0_hist[k] = number of tokens with exactly k active latents, int64 [F + 1]."""


class Sparsity(NamedTuple):
    """Sparsity metrics of a whole set."""

    l0: float
    """Mean number of active latents per token."""
    freq_F: Tensor
    """Firing frequency of each latent (fraction of tokens where it is active), float64 [F]."""
    dead: int
    """Latents never active on the set."""
    dense: int
    """Latents active on more than `dense_threshold` of the tokens."""
    dead_frac: float
    """dead / F."""
    dense_frac: float
    """dense / F."""


def sparsity_sums(f_BF: Tensor) -> SparsitySums:
    """Counts of one batch of latent activations `f_BF` (active means f != 0).

    Fast path: bincounts over the indices of the non-zeros, O(B F) scan + O(nnz) counting; reductions
    of a dense [B, F] bool mask are several times slower on CPU. `sparsity_sums_reference` is the
    plain version (parity test in tests/test_metrics.py).
    """
    n_tok, n_latents = f_BF.shape
    rows_Z, cols_Z = f_BF.nonzero(as_tuple=True)
    l0_B = torch.bincount(rows_Z, minlength=n_tok)
    return SparsitySums(
        n=n_tok,
        fired_F=torch.bincount(cols_Z, minlength=n_latents).to(torch.int64),
        l0_hist=torch.bincount(l0_B, minlength=n_latents + 1).to(torch.int64),
    )


def sparsity_sums_reference(f_BF: Tensor) -> SparsitySums:
    """Reference for `sparsity_sums`: sums of the dense active mask."""
    active_BF = f_BF != 0
    return SparsitySums(
        n=f_BF.shape[0],
        fired_F=active_BF.sum(0, dtype=torch.int64),
        l0_hist=torch.bincount(active_BF.sum(-1), minlength=f_BF.shape[1] + 1),
    )


def add_sparsity(a: SparsitySums | None, b: SparsitySums) -> SparsitySums:
    """a + b, field by field (a may be None: the empty set)."""
    if a is None:
        return b
    return SparsitySums(a.n + b.n, a.fired_F + b.fired_F, a.l0_hist + b.l0_hist)


def sparsity_metrics(s: SparsitySums, dense_threshold: float = 0.1) -> Sparsity:
    """Mean L0, firing frequencies, dead and dense counts of a whole set.

    Raises:
        ValueError: for an empty set.
    """
    if s.n == 0:
        raise ValueError("no tokens: sparsity metrics are undefined on an empty set")
    n_latents = s.fired_F.numel()
    ks = torch.arange(s.l0_hist.numel(), dtype=torch.float64)
    freq_F = s.fired_F.double() / s.n
    dead = int((s.fired_F == 0).sum())
    dense = int((freq_F > dense_threshold).sum())
    return Sparsity(
        l0=float((ks * s.l0_hist.double()).sum()) / s.n,
        freq_F=freq_F,
        dead=dead,
        dense=dense,
        dead_frac=dead / n_latents,
        dense_frac=dense / n_latents,
    )


def log10_density_histogram(freq_F: Tensor, bins: int = 50, lo: float = -8.0) -> dict:
    """Histogram of log10 firing frequency of the latents that fired at least once.

    Returns:
        {"edges": [bins + 1], "counts": [bins], "dead": int}; frequencies below 10**lo go in the first bin.
    """
    alive = freq_F[freq_F > 0]
    logf = alive.double().log10().clamp(lo, 0.0)
    counts = torch.histc(logf, bins=bins, min=lo, max=0.0) if alive.numel() else torch.zeros(bins)
    edges = torch.linspace(lo, 0.0, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()], "dead": int((freq_F == 0).sum())}


# ---------------------------------------------------------------------------------------------------
# Dictionary geometry


def decoder_norms(W_dec_FD: Tensor) -> Tensor:
    """||W_dec_i|| for each latent, float32 [F]."""
    return W_dec_FD.float().norm(dim=-1)


def max_cos_to_others(W_dec_FD: Tensor, block: int = 2048) -> Tensor:
    """For each decoder direction, the largest cosine similarity to any *other* direction.

    Computed `block` rows at a time, so memory is block x F, never F x F.

    Args:
        W_dec_FD: decoder weights, one direction per row (F >= 2).
        block: rows per block.
    Returns:
        max_cos_F: float32 [F]; a zero direction has cosine 0 to everything.
    """
    n_latents = W_dec_FD.shape[0]
    if n_latents < 2:
        raise ValueError("max cosine to other directions needs at least 2 decoder directions")
    unit_FD = W_dec_FD.float() / W_dec_FD.float().norm(dim=-1, keepdim=True).clamp_min(_EPS)
    out_F = torch.empty(n_latents)
    for start in range(0, n_latents, block):
        stop = min(start + block, n_latents)
        cos_bF = unit_FD[start:stop] @ unit_FD.T
        rows = torch.arange(stop - start)
        cos_bF[rows, rows + start] = -math.inf
        out_F[start:stop] = cos_bF.max(dim=-1).values
    return out_F


def max_cos_to_others_reference(W_dec_FD: Tensor) -> Tensor:
    """Reference: the full F x F cosine matrix, diagonal masked (small F only)."""
    W = W_dec_FD.double()
    cos_FF = F.cosine_similarity(W[:, None, :], W[None, :, :], dim=-1, eps=_EPS)
    cos_FF.fill_diagonal_(-math.inf)
    return cos_FF.max(dim=-1).values.float()


def histogram(values: Tensor, bins: int, lo: float, hi: float) -> dict:
    """{"edges": [bins + 1], "counts": [bins]} of `values` clamped into [lo, hi]."""
    v = values.double().clamp(lo, hi)
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    return {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()]}


# ---------------------------------------------------------------------------------------------------
# Downstream


def token_kl(logits_clean_BV: Tensor, logits_spliced_BV: Tensor) -> Tensor:
    """KL(clean || spliced) of the next-token distributions, per token, float32 [B] (nats)."""
    logp_BV = F.log_softmax(logits_clean_BV.float(), dim=-1)
    logq_BV = F.log_softmax(logits_spliced_BV.float(), dim=-1)
    return (logp_BV.exp() * (logp_BV - logq_BV)).sum(-1)


def token_ce(logits_BV: Tensor, targets_B: Tensor) -> Tensor:
    """Cross-entropy of the target tokens, per token, float32 [B] (nats)."""
    return F.cross_entropy(logits_BV.float(), targets_B.long(), reduction="none")


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(ce_ablated - ce_sae) / (ce_ablated - ce_clean): 1 for a perfect SAE, 0 for one no better than
    ablating the hook. NaN when ablating the hook does not change the loss (the ratio is undefined)."""
    denom = ce_ablated - ce_clean
    if abs(denom) <= 1e-9 * max(abs(ce_clean), 1.0):
        return math.nan
    return (ce_ablated - ce_sae) / denom
