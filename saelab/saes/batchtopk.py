"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the B*k largest ReLU'd pre-activations of the whole batch (so tokens get a variable
number of latents, k on average):

    f_BF = ReLU(pre_BF) * 1[ReLU(pre_BF) among the B*k largest of the batch]

At inference (eval mode) a fixed threshold replaces the batch dependence:

    f_BF = pre_BF * 1[pre_BF > threshold]

`threshold` (a buffer) is a running average of the smallest kept positive activation of each training
batch (Bussmann et al. 2024, section 3): threshold <- beta threshold + (1 - beta) min_kept.
Everything else (AuxK, dead counters, the sparse forward/backward of ops.py) is TopK's.

Batch selection, fast path (`batch_topk_selection`, exact, no per-row top-k and no sort):

    t      = a value a few standard deviations below the B*k-th largest, from a strided sample
    C      = {(b, f): pre_bf >= max(t, smallest positive)}      one pass, row-major, ~1.2 B*k pairs
    keep   = the B*k largest of C (a k-th value selection over C; ties keep row-major order)

If the sample overshot (|C| < B*k), C is every positive entry instead, so the result is exact either
way. Pairs whose ReLU is 0 are left out (they change neither x_hat nor any gradient), so a batch
with fewer than B*k positive pre-activations keeps them all. `dense=True` uses
`batch_topk_selection_reference` (one top-B*k over the flattened [B, F] matrix) and the dense autograd
path, for the parity tests. Differences from Bussmann et al.'s code: theirs takes a top-B*k over the
flattened batch and keeps zero entries; the kept set of positive entries is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes import ops
from saelab.saes.base import InitDirs
from saelab.saes.ops import Selection
from saelab.saes.topk import TopKConfig, TopKSAE

SAMPLE = 65_536
"""Entries of [B, F] sampled (an even stride, coprime to F) to place the first cut t."""
SAMPLE_SIGMAS = 4.0
"""t is the (E + 4 sqrt(E) + 8)-th largest sample value, E = the expected count above the true cut."""


@dataclass
class BatchTopKConfig(TopKConfig):
    architecture: ClassVar[str] = "batchtopk"

    threshold_beta: float = 0.999
    """Decay of the running average that estimates the inference threshold."""

    def _problems(self) -> list[str]:
        out = super()._problems()
        if not 0.0 <= self.threshold_beta < 1.0:
            out.append(f"threshold_beta must be in [0, 1), got {self.threshold_beta}")
        return out


def _selection(pos_N: Tensor, pre_BF: Tensor) -> Selection:
    """A Selection from flat row-major positions (sorted) into pre_BF."""
    B, F_ = pre_BF.shape
    row_N = torch.div(pos_N, F_, rounding_mode="floor")
    feat_N = pos_N - row_N * F_
    crow_B1 = torch.searchsorted(row_N, torch.arange(B + 1, device=pre_BF.device))
    return Selection(feat_N, row_N, crow_B1, pre_BF.reshape(-1)[pos_N])


def _first_largest(v_C: Tensor, n: int) -> Tensor:
    """bool [C]: the n largest of v_C, ties at the n-th value kept in order of position."""
    cut = v_C.kthvalue(v_C.numel() - n + 1).values
    above = v_C > cut
    at = v_C == cut
    return above | (at & (at.cumsum(0) <= n - above.sum()))


def batch_topk_selection(pre_BF: Tensor, k: int, total: int | None = None) -> Selection:
    """The (up to) `total` (default B*k) largest positive pre-activations of the batch, row-major (no
    grad); the fast path of the module docstring. Pure torch: the same code runs on CUDA."""
    B, F_ = pre_BF.shape
    total = B * k if total is None else total
    flat = pre_BF.reshape(-1)
    n = flat.numel()
    positive = torch.finfo(flat.dtype).tiny  # flat >= tiny: positive (subnormals aside)
    cand_C = None
    stride = n // SAMPLE
    if stride >= 4 and 8 * total < n:
        while math.gcd(stride, F_) != 1:
            stride += 1
        sample = flat[stride // 2::stride]
        expect = sample.numel() * total / n
        r = min(sample.numel(), math.ceil(expect + SAMPLE_SIGMAS * math.sqrt(expect) + 8))
        t = sample.kthvalue(sample.numel() - r + 1).values.clamp_min(positive)
        cand_C = (flat >= t).nonzero().squeeze(1)
        if cand_C.numel() < total and bool(t > positive):  # overshot: fall back to every positive entry
            cand_C = None
    if cand_C is None:
        cand_C = (flat >= positive).nonzero().squeeze(1)
    if cand_C.numel() > total:
        cand_C = cand_C[_first_largest(flat[cand_C], total)]
    return _selection(cand_C, pre_BF)


def distributed_batch_topk_selection(pre_BF: Tensor, k: int, rank: int, world: int, all_gather) -> Selection:
    """Under DDP, this rank's part of the selection one process would make on the global batch (every
    rank's B rows, stacked in rank order): the W*B*k largest positive entries, ties at the cut kept in
    rank order, then row-major.

    No rank can hold more than T = W*B*k of the global top T, so each rank takes its own top T
    (`batch_topk_selection`), pads it to T with -inf and all-gathers it: the T-th largest of the W*T
    values is the global cut. `all_gather(t_T)` returns the [W, T] stack of every rank's t_T.
    """
    B, F_ = pre_BF.shape
    total = world * B * k
    cand = batch_topk_selection(pre_BF, k, total=total)
    v_C = cand.pre_N
    padded = v_C.new_full((total,), -math.inf)
    padded[:v_C.numel()] = v_C
    all_WT = all_gather(padded)
    cut = all_WT.reshape(-1).kthvalue(all_WT.numel() - total + 1).values
    if not bool(cut > 0):  # fewer than T positive entries in the global batch: every rank keeps all of its own
        return cand
    above, at = v_C > cut, v_C == cut
    room = total - int((all_WT > cut).sum()) - int((all_WT[:rank] == cut).sum())
    keep = above | (at & (at.cumsum(0) <= max(room, 0)))
    return _selection((cand.row_N * F_ + cand.feat_N)[keep], pre_BF)


def batch_topk_selection_reference(pre_BF: Tensor, k: int) -> Selection:
    """The plain version: one top-B*k over the flattened ReLU'd batch, zeros dropped, sorted."""
    relu = F.relu(pre_BF).reshape(-1)
    top = relu.topk(min(pre_BF.shape[0] * k, relu.numel()), sorted=False)
    return _selection(top.indices[top.values > 0].sort().values, pre_BF)


class BatchTopKSAE(TopKSAE):
    """BatchTopK (see module docstring)."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, init_dirs_FD: InitDirs = None):
        super().__init__(cfg, init_dirs_FD)
        self.register_buffer("threshold", torch.full((), -1.0))
        self._pending_min: Tensor | None = None
        self.distributed: tuple | None = None
        """(rank, world, all_gather) while a DDP trainer runs: training steps select over the global batch."""

    def activation(self, pre_BF: Tensor) -> Tensor:
        if self.training or self.threshold < 0:
            sel = self._local_select(pre_BF.detach())
            keep_BF = ops.to_dense(torch.ones_like(sel.pre_N), sel, pre_BF.shape[1])
            return F.relu(pre_BF) * keep_BF
        return pre_BF * (pre_BF > self.threshold)

    def select(self, pre_BF: Tensor) -> Selection:
        """The training step's selection: over the global batch under DDP (`distributed`), else this batch."""
        if self.training and self.distributed is not None:
            rank, world, all_gather = self.distributed
            return distributed_batch_topk_selection(pre_BF, self.cfg.k, rank, world, all_gather)
        return self._local_select(pre_BF)

    def _local_select(self, pre_BF: Tensor) -> Selection:
        if self.cfg.dense:
            return batch_topk_selection_reference(pre_BF, self.cfg.k)
        return batch_topk_selection(pre_BF, self.cfg.k)

    def _after_select(self, v_N: Tensor) -> None:
        if not self.training:
            return
        # min over positive values without a host sync: non-positive ones become +inf (inf = none kept)
        v = torch.where(v_N > 0, v_N.detach(), torch.full_like(v_N, math.inf))
        m = v.amin() if v.numel() else v.new_full((), math.inf)
        self._pending_min = m if self._pending_min is None else torch.minimum(self._pending_min, m)

    def reduce_step_state_(self, reduce_max, reduce_sum) -> None:
        """TopK's, plus the smallest kept activation over all ranks: the global batch's, as one
        process would see it (every rank's threshold agrees)."""
        super().reduce_step_state_(reduce_max, reduce_sum)
        if self._pending_min is not None:
            self._pending_min = -reduce_max(-self._pending_min)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """TopK's updates, then the running threshold from the batches since the last step."""
        super().after_optimizer_step_()
        m = self._pending_min
        self._pending_min = None
        if m is None or not bool(torch.isfinite(m)):
            return
        if self.threshold < 0:
            self.threshold.copy_(m)
        else:
            b = self.cfg.threshold_beta
            self.threshold.mul_(b).add_((1 - b) * m)
