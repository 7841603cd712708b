"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the B*k largest ReLU'd pre-activations of the whole batch (so tokens get a variable
number of latents, k on average):

    f_BF = ReLU(pre_BF) * 1[ReLU(pre_BF) among the B*k largest of the batch]

At inference (eval mode) a fixed threshold replaces the batch dependence:

    f_BF = pre_BF * 1[pre_BF > threshold]

`threshold` (a buffer) is a running average of the smallest kept positive activation of each training
batch (Bussmann et al. 2024, section 3): threshold <- beta threshold + (1 - beta) min_kept.
Everything else (AuxK, dead counters, sparse fast path) is TopK's.

Batch selection (exact): take the top m = min(F, 2k) per row, then the top B*k of those candidates;
if some row's m-th candidate still makes the cut, that row might hold more, so fall back to a top-B*k
over the full [B, F] matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes.base import InitDirs
from saelab.saes.ops import Selection
from saelab.saes.topk import TopKConfig, TopKSAE


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


def batch_topk_selection(pre_BF: Tensor, k: int) -> Selection:
    """The B*k largest ReLU'd entries of the batch, row-major (no grad)."""
    B, F_ = pre_BF.shape
    total = B * k
    m = min(F_, 2 * k)
    relu_BF = F.relu(pre_BF)
    cand_v_BM, cand_i_BM = relu_BF.topk(m, dim=-1, sorted=False)
    top = cand_v_BM.reshape(-1).topk(total, sorted=False)
    cut = top.values.min()
    last_B = cand_v_BM.amin(-1)  # each row's m-th largest value
    if m < F_ and bool((last_B > cut).any() or ((last_B == cut) & (cut > 0)).any()):
        flat = relu_BF.reshape(-1).topk(total, sorted=False).indices.sort().values
        row_N, feat_N = flat // F_, flat % F_
    else:
        pos = top.indices.sort().values  # candidate positions, row-major
        row_N, feat_N = pos // m, cand_i_BM.reshape(-1)[pos]
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre_BF.device)
    crow[1:] = torch.bincount(row_N, minlength=B).cumsum(0)
    return Selection(feat_N, row_N, crow, pre_BF[row_N, feat_N])


class BatchTopKSAE(TopKSAE):
    """BatchTopK (see module docstring)."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, init_dirs_FD: InitDirs = None):
        super().__init__(cfg, init_dirs_FD)
        self.register_buffer("threshold", torch.full((), -1.0))
        self._pending_min: Tensor | None = None

    def activation(self, pre_BF: Tensor) -> Tensor:
        if self.training or self.threshold < 0:
            sel = batch_topk_selection(pre_BF, self.cfg.k)
            out = torch.zeros_like(pre_BF)
            out[sel.row_N, sel.feat_N] = F.relu(pre_BF[sel.row_N, sel.feat_N])
            return out
        return pre_BF * (pre_BF > self.threshold)

    def select(self, pre_BF: Tensor) -> Selection:
        return batch_topk_selection(pre_BF, self.cfg.k)

    def _after_select(self, v_N: Tensor) -> None:
        if not self.training:
            return
        pos = v_N[v_N > 0]
        if pos.numel():
            m = pos.min().detach()
            self._pending_min = m if self._pending_min is None else torch.minimum(self._pending_min, m)

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """TopK's updates, then the running threshold from the batches since the last step."""
        super().after_optimizer_step_()
        if self._pending_min is not None:
            if self.threshold < 0:
                self.threshold.copy_(self._pending_min)
            else:
                b = self.cfg.threshold_beta
                self.threshold.mul_(b).add_((1 - b) * self._pending_min)
        self._pending_min = None
