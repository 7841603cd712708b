"""What every foreign-format reader returns, and the one place that turns it into a saelab SAE.

A reader (saelens.py, sparsify.py, dictionary_learning.py, npz.py) parses its files into a `Foreign`:
weights in saelab's orientation (W_enc_DF, W_dec_FD, b_enc_F, b_dec_D), the saelab architecture
that computes the same function, and what it could or could not map (hook, model, notes).
`build_sae` then applies the conventions that differ between libraries (bias sums in float64):

    pre-encoder bias   Some formats compute pre = x W_enc + b_enc with no b_dec subtracted (Gemma
                       Scope, SAELens with apply_b_dec_to_input = false, dictionary_learning's
                       JumpReLU). saelab always computes pre = (x - b_dec) W_enc + b_enc, so
                           b_enc' = b_enc + b_dec W_enc                  (`subtract_b_dec=False`)
                       gives the same pre-activations (up to float32 rounding of b_enc'). Weights stay
                       float32 (a float64 copy of a 131k-wide W_enc would not fit in memory); the sum
                       is taken in float64, a block of latents at a time.
    JumpReLU           Foreign f = ReLU(pre) 1[pre > θ]; saelab f = pre 1[pre > θ'] with
                           θ' = max(θ, 0)
                       which is the same function for every θ (a negative θ lets ReLU decide).
    inputs             Imported SAEs read raw activations: input_scale = 1, as after `SAE.save`.

Shape legend: see saes/base.py. This module deliberately imports the architecture modules, not the
`saelab.saes` package (whose `load_sae` dispatches here).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import UsageError, raise_all
from saelab.saes.base import SAE
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.saes.relu import ReLUConfig, ReLUSAE
from saelab.saes.topk import TopKConfig, TopKSAE

log = logging.getLogger(__name__)

_ARCHS = {"relu": (ReLUSAE, ReLUConfig), "topk": (TopKSAE, TopKConfig),
          "batchtopk": (BatchTopKSAE, BatchTopKConfig), "jumprelu": (JumpReLUSAE, JumpReLUConfig)}


@dataclass
class Foreign:
    """An SAE read from another library's files, mapped onto a saelab architecture."""

    architecture: str
    """saelab architecture computing the same function: relu, topk, batchtopk or jumprelu."""
    W_enc_DF: Tensor
    W_dec_FD: Tensor
    b_enc_F: Tensor
    b_dec_D: Tensor
    subtract_b_dec: bool = True
    """True if the format computes pre = (x - b_dec) W_enc + b_enc; False if pre = x W_enc + b_enc."""
    threshold_F: Tensor | None = None
    """JumpReLU thresholds θ (any sign; see the module docstring)."""
    k: int | None = None
    """Latents kept per token (topk, batchtopk)."""
    batch_threshold: float | None = None
    """The inference threshold of a BatchTopK SAE."""
    hook: str | None = None
    """saelab hook name (`model.layers.12`), or None when it could not be mapped."""
    foreign_hook: str | None = None
    """The hook / hookpoint / submodule name as the format wrote it."""
    hook_note: str | None = None
    """How the hook was mapped or why it could not be (dropped when the caller names the hook)."""
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)
    """What the mapping changed, assumed or could not carry over; logged as warnings and saved."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Format-specific provenance kept in metadata.json (config values of the source)."""


def check_shapes(source: Path, tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                 allowed_extra: tuple[str, ...] = ()) -> None:
    """Raise one UsageError listing every missing tensor, unexpected tensor and wrong shape.

    Args:
        source: the weights file (named in the message).
        tensors: what the file holds.
        expected: name -> shape the declared config implies.
        allowed_extra: names that may be present beyond `expected`.
    """
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - set(allowed_extra))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(expected[name])}")
        elif tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            problems.append(f"tensor {name} holds NaN or inf values")
    raise_all(problems, f"{source} does not match its declared configuration")


def need(cfg: dict[str, Any], key: str, source: Path) -> Any:
    """cfg[key], or a UsageError naming the file and the missing field."""
    if key not in cfg or cfg[key] is None:
        raise UsageError(f"{source} has no {key!r} field; it is required to rebuild the SAE. "
                         "Was the file edited or written by another tool?")
    return cfg[key]


def require_files(directory: Path, names: list[str], fmt: str) -> None:
    """UsageError naming every file of `names` missing from `directory`."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise UsageError(f"{directory} is not a complete {fmt} SAE: {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} missing (expected {', '.join(names)}). "
                         "Copy the whole directory.")


def _f32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32)


def fold_input_bias(b_enc_F: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, block: int = 16384) -> Tensor:
    """b_enc + b_dec W_enc in float64, `block` latents at a time; returned as float32."""
    b_dec = b_dec_D.double()
    out = b_enc_F.double().clone()
    for lo in range(0, W_enc_DF.shape[1], block):
        out[lo:lo + block] += b_dec @ W_enc_DF[:, lo:lo + block].double()
    return out.float()


def build_sae(fo: Foreign, fmt: str, source: Path, device: str | torch.device = "cpu") -> SAE:
    """The saelab SAE computing `fo`'s function (module docstring), in eval mode, with metadata.

    Raises:
        UsageError: an unknown architecture or a missing k / threshold.
    """
    if fo.architecture not in _ARCHS:
        raise UsageError(f"{source}: cannot map to a saelab architecture ({fo.architecture!r}).")
    W_enc, W_dec = _f32(fo.W_enc_DF), _f32(fo.W_dec_FD)
    b_enc, b_dec = fo.b_enc_F.detach().cpu(), fo.b_dec_D.detach().cpu()
    D, Fn = W_enc.shape
    if not fo.subtract_b_dec:
        b_enc = fold_input_bias(b_enc, b_dec, W_enc)
    cls, cfg_cls = _ARCHS[fo.architecture]
    opts: dict[str, Any] = {}
    if fo.architecture in ("topk", "batchtopk"):
        if fo.k is None or not 0 < fo.k <= Fn:
            raise UsageError(f"{source}: k = {fo.k} is not between 1 and d_sae = {Fn}.")
        opts["k"] = int(fo.k)
    cfg = cfg_cls(d_in=D, d_sae=Fn, normalize_input=False, normalize_decoder=False, b_dec_init="zeros", **opts)
    sae = cls(cfg)
    with torch.no_grad():
        sae.W_enc_DF.copy_(W_enc)
        sae.W_dec_FD.copy_(W_dec)
        sae.b_enc_F.copy_(b_enc)
        sae.b_dec_D.copy_(b_dec)
        if fo.architecture == "jumprelu":
            if fo.threshold_F is None:
                raise UsageError(f"{source}: a JumpReLU SAE needs a threshold per latent; none was found.")
            sae.threshold_F.copy_(fo.threshold_F.detach().cpu().double().clamp_min(0.0))
        if fo.architecture == "batchtopk":
            if fo.batch_threshold is None or fo.batch_threshold < 0:
                raise UsageError(f"{source}: this BatchTopK SAE has no inference threshold "
                                 f"({fo.batch_threshold}); it was saved before any training step.")
            sae.threshold.fill_(float(fo.batch_threshold))
    notes = fo.notes + ([fo.hook_note] if fo.hook_note else [])
    for note in notes:
        log.warning("%s: %s", source, note)
    if fo.hook is None and not fo.hook_note:
        log.warning("%s: no saelab hook point recorded; pass --hook NAME to the tools that use it", source)
    sae.metadata = {
        "hook": fo.hook,
        "model": {},  # a name alone would not match saelab's model ids; `saelab import --model` fills it
        "imported": {"format": fmt, "source": str(source.resolve()), "foreign_hook": fo.foreign_hook,
                     "model": fo.model_name, "notes": notes, **({"config": fo.extra} if fo.extra else {})},
    }
    return sae.to(device).eval()


__all__ = ["Foreign", "build_sae", "check_shapes", "need", "require_files", "fold_input_bias"]
