"""The SAE base: config fields every architecture shares, the module skeleton, save and load.

Shape legend (used across saelab): B batch (tokens), D d_in, F d_sae (latents), K kept per token,
N rows of a data sample. Weight orientation, fixed everywhere: W_enc_DF, W_dec_FD.

Every architecture computes, with s the input-normalisation scale (a buffer, `input_scale`):

    x_n       = s x                                    normalised input, E||x_n||^2 = d_in
    pre_BF    = (x_n - b_dec_D) W_enc_DF + b_enc_F     pre-activations
    f_BF      = act(pre_BF)                            architecture-specific (ReLU, TopK, ...)
    x_hat_BD  = (f_BF W_dec_FD + b_dec_D) / s

Tied SAEs have no W_enc parameter: W_enc_DF = enc_scale * W_dec_FD^T (enc_scale a scalar buffer).

Folding (done by `save`): with W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s, s' = 1,
the saved SAE maps raw x to raw x_hat and gives the same f (tied: enc_scale' = s^2 enc_scale).
Training-time state (unfolded, for exact resume) is the ordinary `state_dict()`.

This module owns: `SAEConfig`, `SAE`, `TrainOutput`, `save`, `load_sae`, the checkpoint format.
It leaves out the training loop (train.py) and the architecture maths (relu.py, topk.py, ...).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from saelab import __version__
from saelab.atomic import commit_dir, fresh_tmp, sha256_file
from saelab.config import to_dict
from saelab.errors import UsageError, raise_all
from saelab.metrics import fvu
from saelab.saes.ops import geometric_median

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Checkpoint format written by `save`; `load_sae` refuses newer ones."""

InitDirs = Tensor | Callable[[int, int], Tensor] | None
"""Decoder init: None (random unit rows), a tensor [M, D] (M <= d_sae) of directions for the first M
latents, or a callable (d_sae, d_in) -> [M, D]."""


@dataclass
class SAEConfig:
    """Fields every SAE architecture has. Subclasses add their own (k, l1_coeff, ...)."""

    architecture: ClassVar[str] = ""

    d_in: int = 0
    """Width of the activations (0: taken from the store)."""
    d_sae: int = 0
    """Number of latents (0: expansion_factor * d_in)."""
    expansion_factor: int = 8
    """Latents per input dimension, used when d_sae is 0. A resolved config (and so cfg.json) holds
    d_sae / d_in, or 0 when d_sae is not a whole multiple of d_in."""
    tied: bool = False
    """Tie the encoder to the decoder: W_enc = W_dec^T."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (the gradient component parallel to each row is removed)."""
    init_enc_from_dec: bool = True
    """Initialise the encoder as the transpose of the decoder."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How init_from_data_ sets b_dec from a data sample."""
    normalize_input: bool = True
    """Scale inputs so that E||s x||^2 = d_in during training (folded into the saved weights)."""

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{f.name} must be a finite number, got {v}")
        for name in ("d_in", "d_sae", "expansion_factor"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        problems += self._problems()
        raise_all(problems, f"invalid {type(self).__name__}")

    def _problems(self) -> list[str]:
        """Architecture-specific validation; return one string per problem."""
        return []

    def resolved(self, d_in: int | None = None) -> "SAEConfig":
        """A copy with d_in (from the argument when 0) and d_sae (expansion_factor * d_in when 0)."""
        d = self.d_in or (d_in or 0)
        if d <= 0:
            raise UsageError("d_in is not set: pass --d-in (alias --d_model) or train from a store, "
                             "which knows the width of its activations.")
        d_sae = self.d_sae or self.expansion_factor * d
        return dataclasses.replace(self, d_in=d, d_sae=d_sae, expansion_factor=d_sae // d if d_sae % d == 0 else 0)


class TrainOutput(NamedTuple):
    """What `SAE.training_loss` returns. All but `loss` are detached."""

    loss: Tensor
    """Scalar to backpropagate: mse + sparsity_scale * sparsity + aux."""
    mse: Tensor
    """Mean over the batch of ||x_n - x_hat_n||^2 (normalised units, summed over D)."""
    sparsity: Tensor
    """Sparsity penalty, coefficient included, before the warm-up scale (0 for TopK)."""
    aux: Tensor
    """Auxiliary loss, coefficient included (AuxK for the TopK family, else 0)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    fvu: Tensor
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    fired_F: Tensor
    """bool [F]: latents non-zero on at least one token of the batch."""


class SAE(nn.Module):
    """Base of all architectures. Subclasses implement `activation` and `training_loss`."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig

    def __init__(self, cfg: SAEConfig, init_dirs_FD: InitDirs = None):
        super().__init__()
        cfg = cfg.resolved()  # d_sae and expansion_factor agree, so cfg.json describes this SAE
        self.cfg = cfg
        D, Fn = cfg.d_in, cfg.d_sae
        self.W_dec_FD = nn.Parameter(torch.empty(Fn, D))
        if cfg.tied:
            self.register_buffer("enc_scale", torch.ones(()))
        else:
            self.W_enc_DF = nn.Parameter(torch.empty(D, Fn))
        self.b_enc_F = nn.Parameter(torch.zeros(Fn))
        self.b_dec_D = nn.Parameter(torch.zeros(D))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("init_from_dirs_F", torch.zeros(Fn, dtype=torch.bool))
        self.metadata: dict[str, Any] = {}
        self.reset_parameters_(init_dirs_FD)

    # ----------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters_(self, init_dirs_FD: InitDirs = None) -> None:
        """Random unit decoder rows, optionally the first M from given directions; encoder = W_dec^T."""
        D, Fn = self.cfg.d_in, self.cfg.d_sae
        W = torch.randn(Fn, D)
        self.init_from_dirs_F.zero_()
        if init_dirs_FD is not None:
            dirs = init_dirs_FD(Fn, D) if callable(init_dirs_FD) else init_dirs_FD
            dirs = torch.as_tensor(dirs, dtype=torch.float32)
            if dirs.ndim != 2 or dirs.shape[1] != D or dirs.shape[0] > Fn:
                raise UsageError(f"init_dirs_FD has shape {tuple(dirs.shape)}; expected [M, {D}] with "
                                 f"M <= d_sae = {Fn}. Pass one direction of width d_in per row.")
            W[: dirs.shape[0]] = dirs.to(W)
            self.init_from_dirs_F[: dirs.shape[0]] = True
        W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        if not self.cfg.normalize_decoder:
            W *= 0.1  # small initial decoder norms when they are free (Conerly et al. 2024 use 0.05-1)
        self.W_dec_FD.copy_(W)
        if not self.cfg.tied:
            if self.cfg.init_enc_from_dec:
                self.W_enc_DF.copy_(W.T)
            else:
                self.W_enc_DF.copy_(torch.empty(D, Fn).uniform_(-1, 1) / math.sqrt(D))
        self.b_enc_F.zero_()
        self.b_dec_D.zero_()

    @torch.no_grad()
    def init_from_data_(self, x_sample_ND: Tensor) -> None:
        """Set the input scale (E||s x||^2 = d_in) and b_dec (geometric median / mean of s x).

        Args:
            x_sample_ND: a sample of raw activations, a few thousand rows is plenty.
        """
        x = x_sample_ND.to(self.W_dec_FD.device, torch.float32)
        if self.cfg.normalize_input:
            ms = x.pow(2).sum(-1).mean()
            if not torch.isfinite(ms) or ms <= 0:
                raise UsageError(f"cannot normalise inputs: mean squared norm of the sample is {ms.item()}. "
                                 "Check the activations (all zeros? NaN?).")
            self.input_scale.fill_(math.sqrt(self.cfg.d_in / ms.item()))
        xn = x * self.input_scale
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec_D.copy_(geometric_median(xn))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec_D.copy_(xn.mean(0))

    # -------------------------------------------------------------------------------- the maths
    def W_enc(self) -> Tensor:
        """The encoder matrix [D, F] (a view of the decoder for tied SAEs)."""
        if self.cfg.tied:
            return self.W_dec_FD.T * self.enc_scale
        return self.W_enc_DF

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """pre_BF = (s x - b_dec) W_enc + b_enc."""
        return self.pre_acts_n(x_BD * self.input_scale, self.W_enc())

    def pre_acts_n(self, x_n_BD: Tensor, W_enc_DF: Tensor) -> Tensor:
        """pre_BF = x_n W_enc + (b_enc - b_dec W_enc), from normalised input.

        Same value as (x_n - b_dec) W_enc + b_enc, but autograd needs no [B, D] input gradient for
        b_dec (one dense matmul fewer): dL/db_dec = -W_enc sum_b dL/dpre_b.
        """
        return torch.addmm(self.b_enc_F - self.b_dec_D @ W_enc_DF, x_n_BD, W_enc_DF)

    def activation(self, pre_BF: Tensor) -> Tensor:
        """f_BF = act(pre_BF); each architecture defines it."""
        raise NotImplementedError

    def encode(self, x_BD: Tensor) -> Tensor:
        """f_BF = act((s x - b_dec) W_enc + b_enc): the latent activations [B, F]."""
        return self.activation(self.pre_acts(x_BD))

    def decode(self, f_BF: Tensor) -> Tensor:
        """x_hat_BD = (f W_dec + b_dec) / s."""
        return (f_BF @ self.W_dec_FD + self.b_dec_D) / self.input_scale

    def forward(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat_BD, f_BF)."""
        f_BF = self.encode(x_BD)
        return self.decode(f_BF), f_BF

    # ----------------------------------------------------------------------------- training hooks
    def training_loss(self, x_BD: Tensor, sparsity_scale: float = 1.0) -> TrainOutput:
        """Loss of one batch of raw activations (normalised inside); see TrainOutput."""
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step_(self) -> None:
        """Remove the decoder-gradient component parallel to each (unit) decoder row."""
        if self.cfg.normalize_decoder and self.W_dec_FD.grad is not None:
            from saelab.saes.ops import remove_parallel_grad_

            remove_parallel_grad_(self.W_dec_FD.grad, self.W_dec_FD)

    def reduce_step_state_(self, reduce_max, reduce_sum) -> None:
        """Under DDP, before `after_optimizer_step_`: combine the per-rank state a step gathered
        (e.g. which latents fired) so every rank applies the global batch's. `reduce_max` and
        `reduce_sum` map a tensor to its max / sum over ranks. Nothing to combine here."""

    @torch.no_grad()
    def after_optimizer_step_(self) -> None:
        """Renormalise decoder rows to unit norm."""
        if self.cfg.normalize_decoder:
            self.W_dec_FD /= self.W_dec_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    # ------------------------------------------------------------------------------- save / load
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The state_dict with the input scale folded into the weights (see module docstring)."""
        s = self.input_scale.double()
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        out["W_dec_FD"] = (out["W_dec_FD"].double() / s).to(out["W_dec_FD"].dtype)
        out["b_dec_D"] = (out["b_dec_D"].double() / s).to(out["b_dec_D"].dtype)
        if self.cfg.tied:
            out["enc_scale"] = (out["enc_scale"].double() * s * s).to(out["enc_scale"].dtype)
        else:
            out["W_enc_DF"] = (out["W_enc_DF"].double() * s).to(out["W_enc_DF"].dtype)
        out["input_scale"] = torch.ones_like(out["input_scale"])
        return out

    def config_dict(self) -> dict[str, Any]:
        """cfg.json: architecture, every config field, format and saelab versions."""
        return {"architecture": self.cfg.architecture, **to_dict(self.cfg),
                "format_version": FORMAT_VERSION, "saelab_version": __version__}

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write cfg.json, model.safetensors (normalisation folded) and metadata.json atomically.

        The directory is written as `path.tmp/`, then renamed over `path` (an old `path` is moved
        aside first and deleted after the rename), so a crash never leaves a half-written SAE.
        """
        from safetensors.torch import save_file

        final = Path(path)
        tmp = fresh_tmp(final)
        tensors = {k: v.contiguous().cpu() for k, v in self.folded_state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = dict(metadata if metadata is not None else self.metadata)
        meta["weights_sha256"] = sha256_file(tmp / "model.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        commit_dir(tmp, final)
        return final


def stats_output(loss: Tensor, x_BD: Tensor, x_hat_BD: Tensor, l0: Tensor, fired_F: Tensor,
                 sparsity: Tensor | None = None, aux: Tensor | None = None,
                 mse: Tensor | None = None) -> TrainOutput:
    """Assemble a TrainOutput (fvu, and mse unless given, computed here; all but loss detached)."""
    zero = loss.new_zeros(())
    with torch.no_grad():
        err = (x_BD - x_hat_BD).pow(2).sum(-1).mean() if mse is None else mse.detach()
        v = fvu(x_BD, x_hat_BD)
    return TrainOutput(loss, err, (sparsity if sparsity is not None else zero).detach(),
                       (aux if aux is not None else zero).detach(), l0.detach().float(), v, fired_F)


__all__ = ["SAEConfig", "SAE", "TrainOutput", "FORMAT_VERSION", "stats_output"]
