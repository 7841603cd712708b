"""Shared SAE maths: geometric median, decoder-gradient projection, and the sparse fast path.

Shape legend: see saes/base.py. Here N = number of selected (token, latent) pairs, stored row-major
as a compressed row layout: `crow_B1` [B+1] offsets, `feat_N` latent index, `row_N` token index.

The sparse fast path (TopK family). With the selection (row_n, feat_n) fixed, training needs

    pre_N     = xc[row_n] . W_enc[:, feat_n] + b_enc[feat_n]       xc = x_n - b_dec   (select_preacts)
    x_hat_BD  = sum_{n in row b} v_n W_dec[feat_n]                                   (decode_sparse)

and their gradients, computed without any dense [B, F] or [F, D] matmul:

    dL/dv_n          = g[row_n] . W_dec[feat_n]               sampled dense-dense product (SDDMM)
    dL/dW_dec[f]     = sum_{n: feat_n = f} v_n g[row_n]       CSR [F, B] @ g_BD
    dL/dW_enc[:, f]  = sum_{n: feat_n = f} gp_n xc[row_n]     CSR [F, B] @ xc_BD, transposed
    dL/db_enc[f]     = sum_{n: feat_n = f} gp_n               index_add
    dL/db_dec        = -W_enc (dL/db_enc)                      (through xc = x_n - b_dec)

Cost per token: O(K D) instead of O(F D); only the forward encoder matmul (needed to choose the
top k) is dense. `dense=True` selects the plain autograd reference used by the parity tests.

Geometric median (Weiszfeld 1937): iterate  m <- sum_i w_i x_i / sum_i w_i,  w_i = 1 / ||x_i - m||.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor, without torch's "beta" / "invariant checks" warnings (the ops we use are stable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size)


@torch.no_grad()
def geometric_median(x_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising sum_i ||x_i - m|| (Weiszfeld iterations from the mean).

    Args:
        x_ND: sample points.
    Returns:
        m_D: the geometric median (float32).
    """
    x = x_ND.double()
    m = x.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-12)
        new = (w_N[:, None] * x).sum(0) / w_N.sum()
        shift = (new - m).norm()
        m = new
        if shift <= tol * (m.norm() + 1e-12):
            break
    return m.float()


@torch.no_grad()
def remove_parallel_grad_(grad_FD: Tensor, W_FD: Tensor) -> None:
    """grad_f <- grad_f - (grad_f . w_f / ||w_f||^2) w_f for every row f, in place."""
    coef_F = torch.einsum("fd,fd->f", grad_FD, W_FD) / torch.einsum("fd,fd->f", W_FD, W_FD).clamp_min(1e-12)
    grad_FD.addcmul_(coef_F[:, None], W_FD, value=-1)  # no [F, D] temporaries


def uniform_crow(B: int, K: int, device=None) -> Tensor:
    """Row offsets of a selection with exactly K entries per row: [0, K, 2K, ..., BK]."""
    return torch.arange(0, B * K + 1, K, device=device)


class Selection(NamedTuple):
    """Selected (token, latent) pairs in row-major order (columns within a row in any order)."""

    feat_N: Tensor
    """Latent index of each pair."""
    row_N: Tensor
    """Token index of each pair (non-decreasing)."""
    crow_B1: Tensor
    """Row offsets [B + 1]: the pairs of token b are crow_B1[b] : crow_B1[b + 1]."""
    pre_N: Tensor
    """Pre-activation values of the pairs (no grad)."""


class Transposed(NamedTuple):
    """The selection pattern as CSR [F, B], built once and shared by the encoder and decoder backward."""

    order_N: Tensor
    """Permutation sorting the pairs by latent (stable, so tokens stay sorted within a latent)."""
    crow_F1: Tensor
    """Latent offsets [F + 1]."""
    col_N: Tensor
    """Token index of each pair in latent order."""


def transpose_selection(sel: Selection, F_: int) -> Transposed:
    """Group the selected pairs by latent (one stable sort of N integers).

    On CPU the sort and the counts run in numpy: a radix sort on 16-bit keys (F <= 65536) takes
    ~0.5 ms for N = 131k, while torch's parallel stable sort, ~1.3 ms at best, stalls for 20-450 ms
    when the 2 cores are shared (measured); torch.bincount likewise (median 24 ms vs 0.2 ms).
    """
    if sel.feat_N.device.type == "cpu":
        feat = sel.feat_N.numpy()
        keys = feat.astype(np.uint16) if F_ <= 1 << 16 else feat.astype(np.int32)
        order = np.argsort(keys, kind="stable")
        crow = np.zeros(F_ + 1, dtype=np.int32)
        np.cumsum(np.bincount(feat, minlength=F_), out=crow[1:])
        col = sel.row_N.numpy()[order].astype(np.int32)
        return Transposed(torch.from_numpy(order), torch.from_numpy(crow), torch.from_numpy(col))
    order = torch.argsort(sel.feat_N.to(torch.int32), stable=True)
    crow = torch.zeros(F_ + 1, dtype=torch.int32, device=sel.feat_N.device)
    crow[1:] = torch.bincount(sel.feat_N, minlength=F_).cumsum(0)
    # int32 CSR indices: the CPU sparse matmul is ~25% faster than with int64 (fine below 2^31 pairs)
    return Transposed(order, crow, sel.row_N[order].to(torch.int32))


def _csr_matmul(t: Transposed, values_N: Tensor, dense_BD: Tensor) -> Tensor:
    """sum over pairs n with feat_n = f of values_n dense[row_n]: CSR [F, B] @ dense [B, D] -> [F, D]."""
    S = _csr(t.crow_F1, t.col_N, values_N[t.order_N], (t.crow_F1.shape[0] - 1, dense_BD.shape[0]))
    return S @ dense_BD


class _SelectPreacts(torch.autograd.Function):
    """pre_N = xc[row_n] . W_enc[:, feat_n] + b_enc[feat_n], xc = x_n - b_dec (values given).

    Forward returns the precomputed values (they come from the dense encoder matmul that chose the
    selection); backward is the sparse gradient of the module docstring.
    """

    @staticmethod
    def forward(ctx, pre_N, xc_BD, W_enc_DF, b_enc_F, b_dec_D, feat_N, order_N, crow_F1, col_N):
        ctx.save_for_backward(xc_BD, W_enc_DF, feat_N, order_N, crow_F1, col_N)
        return pre_N.clone()

    @staticmethod
    def backward(ctx, gp_N):
        xc_BD, W_enc_DF, feat_N, order_N, crow_F1, col_N = ctx.saved_tensors
        F_ = W_enc_DF.shape[1]
        g_W = g_benc = g_bdec = None
        if ctx.needs_input_grad[2]:
            g_W = _csr_matmul(Transposed(order_N, crow_F1, col_N), gp_N, xc_BD).T
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_benc = torch.zeros(F_, dtype=gp_N.dtype, device=gp_N.device).index_add_(0, feat_N, gp_N)
            if ctx.needs_input_grad[4]:
                g_bdec = -(W_enc_DF @ g_benc)
        return None, None, g_W, g_benc, g_bdec, None, None, None, None


class _DecodeSparse(torch.autograd.Function):
    """x_hat_BD = sum_{n in row b} v_n W_dec[feat_n] (no bias); backward as in the module docstring."""

    @staticmethod
    def forward(ctx, v_N, feat_N, crow_B1, order_N, crow_F1, col_N, W_dec_FD):
        ctx.save_for_backward(v_N, feat_N, crow_B1, order_N, crow_F1, col_N, W_dec_FD)
        return F.embedding_bag(feat_N, W_dec_FD, crow_B1[:-1], mode="sum", per_sample_weights=v_N)

    @staticmethod
    def backward(ctx, g_BD):
        v_N, feat_N, crow_B1, order_N, crow_F1, col_N, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        F_, B = W_dec_FD.shape[0], g_BD.shape[0]
        g_v = g_W = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(crow_B1, feat_N, torch.ones_like(v_N), (B, F_))
            g_v = torch.sparse.sampled_addmm(pattern, g_BD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[6]:
            g_W = _csr_matmul(Transposed(order_N, crow_F1, col_N), v_N, g_BD)
        return g_v, None, None, None, None, None, g_W


def select_preacts(sel: Selection, x_n_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor,
                   t: Transposed | None) -> Tensor:
    """Differentiable pre-activations of the selected pairs.

    Args:
        sel: the selection, with its pre-activation values computed without grad.
        x_n_BD: normalised input (no grad).
        t: `transpose_selection(sel)` for the fast path; None for the plain autograd reference
            (recompute the dense pre-activations and index them).
    Returns:
        pre_N, differentiable with respect to W_enc_DF, b_enc_F, b_dec_D.
    """
    if t is None:
        pre = torch.addmm(b_enc_F - b_dec_D @ W_enc_DF, x_n_BD, W_enc_DF)  # as SAE.pre_acts_n
        return pre[sel.row_N, sel.feat_N]
    with torch.no_grad():
        xc_BD = x_n_BD - b_dec_D
    return _SelectPreacts.apply(sel.pre_N, xc_BD, W_enc_DF, b_enc_F, b_dec_D, sel.feat_N, *t)


def decode_sparse(v_N: Tensor, sel: Selection, W_dec_FD: Tensor, t: Transposed | None) -> Tensor:
    """x_hat_BD = f_BF W_dec_FD for the sparse f holding v_N at the selected pairs; no bias.

    t=None scatters into a dense f_BF and uses a matmul (the reference path).
    """
    if t is None:
        return to_dense(v_N, sel, W_dec_FD.shape[0]) @ W_dec_FD
    return _DecodeSparse.apply(v_N, sel.feat_N, sel.crow_B1, *t, W_dec_FD)


def to_dense(v_N: Tensor, sel: Selection, F_: int) -> Tensor:
    """Scatter values at a selection into a dense f_BF."""
    B = sel.crow_B1.shape[0] - 1
    return torch.zeros(B, F_, dtype=v_N.dtype, device=v_N.device).index_put((sel.row_N, sel.feat_N), v_N)
