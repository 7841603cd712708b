"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") with the AuxK loss.

    pre_BF   = (x_n - b_dec) W_enc + b_enc
    f_BF     = ReLU(TopK_k(pre_BF))                    k largest per token, the rest 0
    x_hat_n  = f W_dec + b_dec
    loss     = mean_b ||x_n - x_hat_n||^2 + aux

AuxK (Gao et al. 2024, section A.2): with e = x_n - x_hat_n (a constant target) and dead latents
(no activation for `dead_tokens` tokens), ê = ReLU(TopK_{aux_k}(pre_BF over dead latents)) W_dec,

    aux = aux_coeff * mean_b ||e - ê||^2                 (0 when no latent is dead)

so dead latents get a gradient towards explaining the residual. The per-latent counter
`tokens_since_fired_F` is a buffer (checkpointed with the weights); `training_loss` notes which
latents fired, `after_optimizer_step_` applies it once per optimiser step.

Training uses the sparse fast path of ops.py (no dense [B, F] or [F, D] matmul in the backward);
`dense=True` is the plain autograd reference. AuxK works on the M dead columns only: pair-wise sparse
when aux_k is a small share of M, else dense [B, D] x [D, M] maths (`_auxk_dense_columns`); either
way it never touches the live latents' columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes import ops
from saelab.saes.base import SAE, InitDirs, SAEConfig, TrainOutput, stats_output
from saelab.saes.ops import Selection


@dataclass
class TopKConfig(SAEConfig):
    architecture: ClassVar[str] = "topk"

    k: int = 32
    """Latents kept per token."""
    aux_k: int = 512
    """Dead latents fed to the AuxK loss per token; 0 turns it off."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024 use 1/32)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead (for AuxK)."""
    dense: bool = False
    """Use the plain dense autograd path instead of the sparse fast path (for checking; slower)."""

    def _problems(self) -> list[str]:
        out = []
        if self.k <= 0:
            out.append(f"k must be >= 1, got {self.k}")
        if self.d_sae and self.k > self.d_sae:
            out.append(f"k = {self.k} is larger than d_sae = {self.d_sae}")
        if self.aux_k < 0:
            out.append(f"aux_k must be >= 0, got {self.aux_k}")
        return out


def topk_selection(pre_BF: Tensor, k: int) -> Selection:
    """The k largest pre-activations of each row (no grad)."""
    B = pre_BF.shape[0]
    v_BK, i_BK = pre_BF.topk(k, dim=-1, sorted=False)
    row_N = torch.arange(B, device=pre_BF.device).repeat_interleave(k)
    return Selection(i_BK.reshape(-1), row_N, ops.uniform_crow(B, k, pre_BF.device), v_BK.reshape(-1))


AUX_DENSE_RATIO = 8
"""AuxK uses dense maths over the dead columns when aux_k >= n_dead / AUX_DENSE_RATIO, else the
pair-wise sparse path (the crossover measured on CPU, d_in 576: sparse pairs cost ~8-12x a dense
multiply-add)."""


class TopKSAE(SAE):
    """TopK with AuxK (see module docstring)."""

    config_class = TopKConfig
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig, init_dirs_FD: InitDirs = None):
        super().__init__(cfg, init_dirs_FD)
        self.register_buffer("tokens_since_fired_F", torch.zeros(self.cfg.d_sae, dtype=torch.long))
        self._pending_fired_F: Tensor | None = None
        self._pending_tokens = 0

    def activation(self, pre_BF: Tensor) -> Tensor:
        v, i = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, i, F.relu(v))

    def select(self, pre_BF: Tensor) -> Selection:
        """Which (token, latent) pairs are kept during training."""
        return topk_selection(pre_BF, self.cfg.k)

    def training_loss(self, x_BD: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        x_n = x_BD * self.input_scale
        W_enc = self.W_enc()
        with torch.no_grad():
            pre_BF = self.pre_acts_n(x_n, W_enc)
        sel = self.select(pre_BF)
        t = None if self.cfg.dense else ops.transpose_selection(sel, self.cfg.d_sae)
        v_N = F.relu(ops.select_preacts(sel, x_n, W_enc, self.b_enc_F, self.b_dec_D, t))
        x_hat = ops.decode_sparse(v_N, sel, self.W_dec_FD, t) + self.b_dec_D
        err_BD = x_hat - x_n
        mse = err_BD.pow(2).sum(-1).mean()
        aux = self._auxk(pre_BF, x_n, W_enc, -err_BD.detach())
        loss = mse + aux
        with torch.no_grad():
            active = v_N > 0
            l0 = active.sum().float() / x_BD.shape[0]
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_BD.device)
            fired[sel.feat_N[active]] = True
            self._note_fired(fired, x_BD.shape[0])
            self._after_select(v_N)
        return stats_output(loss, x_n, x_hat, l0, fired, aux=aux, mse=mse)

    def _after_select(self, v_N: Tensor) -> None:
        """Hook for BatchTopK's threshold estimate."""

    def dead_mask(self) -> Tensor:
        """bool [F]: latents that have not fired for `dead_tokens` tokens."""
        return self.tokens_since_fired_F >= self.cfg.dead_tokens

    def _auxk(self, pre_BF: Tensor, x_n: Tensor, W_enc: Tensor, e_BD: Tensor) -> Tensor:
        dead_F = self.dead_mask()
        n_dead = int(dead_F.sum())
        if self.cfg.aux_k == 0 or n_dead == 0:
            return x_n.new_zeros(())
        kk = min(self.cfg.aux_k, n_dead)
        if self.cfg.dense:  # reference: top kk over all latents with the live ones masked out
            with torch.no_grad():
                sel = topk_selection(pre_BF.masked_fill(~dead_F, float("-inf")), kk)
            v_N = F.relu(ops.select_preacts(sel, x_n, W_enc, self.b_enc_F, self.b_dec_D, None))
            e_hat = ops.decode_sparse(v_N, sel, self.W_dec_FD, None)
        else:
            idx_M = dead_F.nonzero().squeeze(1)
            if kk * AUX_DENSE_RATIO >= n_dead:
                e_hat = self._auxk_dense_columns(idx_M, kk, x_n, W_enc)
            else:
                with torch.no_grad():
                    v_BK, j_BK = pre_BF.index_select(1, idx_M).topk(kk, dim=-1, sorted=False)
                    B = pre_BF.shape[0]
                    sel = Selection(idx_M[j_BK.reshape(-1)], torch.arange(B, device=pre_BF.device).repeat_interleave(kk),
                                    ops.uniform_crow(B, kk, pre_BF.device), v_BK.reshape(-1))
                t = ops.transpose_selection(sel, self.cfg.d_sae)
                v_N = F.relu(ops.select_preacts(sel, x_n, W_enc, self.b_enc_F, self.b_dec_D, t))
                e_hat = ops.decode_sparse(v_N, sel, self.W_dec_FD, t)
        return self.cfg.aux_coeff * (e_hat - e_BD).pow(2).sum(-1).mean()

    def _auxk_dense_columns(self, idx_M: Tensor, kk: int, x_n: Tensor, W_enc: Tensor) -> Tensor:
        """ê_BD when kk is a large share of the M dead latents: dense maths on those M columns only.

        pre_BM = x_n W_enc[:, idx] + (b_enc[idx] - b_dec W_enc[:, idx]), v = ReLU(TopK_kk(pre_BM)),
        ê = v W_dec[idx]: three [B, D, M] matmuls with their backward, instead of B * kk pair-wise
        sparse products (which run ~10x below the dense matmul rate on CPU).
        """
        W_DM = W_enc.index_select(1, idx_M)
        pre_BM = torch.addmm(self.b_enc_F[idx_M] - self.b_dec_D @ W_DM, x_n, W_DM)
        v_BM = F.relu(pre_BM)
        if kk < idx_M.shape[0]:
            with torch.no_grad():
                keep_BM = torch.zeros_like(pre_BM).scatter_(1, pre_BM.topk(kk, dim=-1, sorted=False).indices, 1.0)
            v_BM = v_BM * keep_BM
        return v_BM @ self.W_dec_FD.index_select(0, idx_M)

    def _note_fired(self, fired_F: Tensor, n_tokens: int) -> None:
        if not self.training:
            return
        self._pending_fired_F = fired_F if self._pending_fired_F is None else self._pending_fired_F | fired_F
        self._pending_tokens += n_tokens

    def reduce_step_state_(self, reduce_max, reduce_sum) -> None:
        """The global batch's firing and token count, so every rank's dead-latent counters agree."""
        if self._pending_fired_F is not None:
            self._pending_fired_F = reduce_max(self._pending_fired_F.to(torch.int32)).bool()
            self._pending_tokens = int(reduce_sum(torch.tensor(self._pending_tokens, dtype=torch.int64)))

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """Renormalise decoder rows; update the dead-latent counters from the batches since the last step."""
        super().after_optimizer_step_()
        if self._pending_fired_F is not None:
            self.tokens_since_fired_F += self._pending_tokens
            self.tokens_since_fired_F[self._pending_fired_F] = 0
        self._pending_fired_F, self._pending_tokens = None, 0
