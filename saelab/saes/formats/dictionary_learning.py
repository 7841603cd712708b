"""Read a dictionary_learning SAE: `ae.pt` (a torch-saved state_dict) + `config.json` beside it.

`ae.pt` is a pickle. saelab opens it only with `torch.load(weights_only=True)`, which unpickles
tensors and plain containers and refuses anything that could run code; a file that needs more is
refused with a message. The training loop (dictionary_learning/training.py) writes
`trainer_i/config.json` ({"trainer": {dict_class, activation_dim, dict_size, k, layer, lm_name,
submodule_name, ...}}) and, at the end, `trainer_i/ae.pt` with the biases already scaled back to
raw activation units (`scale_biases(norm_factor)`). An interrupted run leaves a backup
{"ae": state_dict, "norm_factor": c, "step": ...} in normalised units; it is read with the same
`scale_biases(c)` applied.

The dictionaries (dictionary.py, trainers/*.py; nn.Linear stores weight as [out, in]):

    AutoEncoder            f = ReLU((x - bias) encoder.weight^T + encoder.bias)        -> relu
                           x_hat = f decoder.weight^T + bias
    AutoEncoderNew         f = ReLU(x encoder.weight^T + encoder.bias)                 -> relu (b_dec not
                           x_hat = f decoder.weight^T + decoder.bias                      subtracted: folded)
    AutoEncoderTopK        f = TopK_k(ReLU((x - b_dec) encoder.weight^T + encoder.bias)) -> topk
                           (the stored `threshold` is used only with encode(use_threshold=True))
    BatchTopKSAE           f = r 1[r > threshold],  r = ReLU((x - b_dec) encoder.weight^T + encoder.bias)
                           -> batchtopk (its inference path; a threshold < 0, never set, gives ReLU -> relu)
    MatryoshkaBatchTopKSAE as BatchTopKSAE with W_enc [D, F], W_dec [F, D] parameters -> batchtopk
    JumpReluAutoEncoder    f = ReLU(pre 1[pre > threshold]),  pre = x W_enc + b_enc      -> jumprelu
                           (apply_b_dec_to_input is False unless set by hand; it is not saved)
    GatedAutoEncoder       z = (x - decoder_bias) encoder.weight^T, g = z + gate_bias,
                           m = exp(r_mag) z + mag_bias, f = 1[g > 0] ReLU(m)              -> jumprelu with
                           W_enc = encoder.weight^T exp(r_mag), b_enc = mag_bias,
                           θ = mag_bias - exp(r_mag) gate_bias (see saelens.py for the derivation)

The class comes from config.json's `dict_class` when present, else from the tensor names.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import UsageError
from saelab.saes.formats.common import Foreign, check_shapes
from saelab.saes.formats.hooks import from_base_model_path

WEIGHTS, CFG = "ae.pt", "config.json"

_KEYS = {  # dict_class -> tensor names that identify it
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "GatedAutoEncoder": {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
}
_BIASES = {  # what each class's scale_biases multiplies
    "AutoEncoder": ("encoder.bias", "bias"), "AutoEncoderNew": ("encoder.bias", "decoder.bias"),
    "AutoEncoderTopK": ("encoder.bias", "b_dec", "threshold"), "BatchTopKSAE": ("encoder.bias", "b_dec", "threshold"),
    "MatryoshkaBatchTopKSAE": ("b_enc", "b_dec", "threshold"), "JumpReluAutoEncoder": ("b_dec", "b_enc", "threshold"),
    "GatedAutoEncoder": ("decoder_bias", "mag_bias", "gate_bias"),
}


def _load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path} holds more than tensors ({str(e).splitlines()[0]}); saelab opens "
                         "dictionary_learning files only with torch.load(weights_only=True), which never "
                         "runs code from the file. Re-save the state_dict alone.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UsageError(f"{path} is not a readable torch file ({str(e).splitlines()[0]}).") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict.")
    return obj


def _which(sd: dict[str, Tensor], cfg: dict[str, Any], path: Path) -> str:
    named = cfg.get("dict_class")
    if named:
        if named not in _KEYS:
            raise UsageError(f"{path}: dict_class {named!r} cannot be imported; saelab reads "
                             f"{', '.join(sorted(_KEYS))}.")
        return named
    names = set(sd)
    hits = [c for c, keys in _KEYS.items() if keys == names]
    if len(hits) == 1:
        return hits[0]
    if hits:  # TopK and BatchTopK share their tensors: only config.json tells them apart
        raise UsageError(f"{path}: the tensors fit {' and '.join(hits)}; config.json (with trainer.dict_class) "
                         "is needed to tell which. Copy it beside ae.pt.")
    raise UsageError(f"{path}: tensors {', '.join(sorted(names))} match no dictionary_learning class saelab "
                     f"reads ({', '.join(sorted(_KEYS))}).")


def read_dictionary_learning(path: Path) -> Foreign:
    """Parse `ae.pt` (a file, or a directory holding it) into a Foreign (module docstring).

    Raises:
        UsageError: unreadable or non-weights-only file, unknown class, shapes that do not match
            the config's activation_dim / dict_size.
    """
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise UsageError(f"{path} is not a dictionary_learning SAE: {weights.name} is missing.")
    cfg_path = weights.parent / CFG
    trainer: dict[str, Any] = {}
    notes: list[str] = []
    if cfg_path.is_file():
        try:
            trainer = json.loads(cfg_path.read_text()).get("trainer") or {}
        except json.JSONDecodeError as e:
            raise UsageError(f"{cfg_path} is not valid JSON ({e}).") from None
    else:
        notes.append(f"no {CFG} beside {weights.name}: class read from the tensor names; hook and model unknown")
    obj = _load(weights)
    scale = None
    if "ae" in obj and isinstance(obj["ae"], dict):  # a training backup, in normalised units
        scale = obj.get("norm_factor")
        if not trainer and isinstance(obj.get("config"), dict):
            trainer = obj["config"]  # the backup carries the trainer config too
        notes.append(f"{weights.name} is a training backup (step {obj.get('step')}), not a finished run")
        obj = obj["ae"]
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    cls = _which(sd, trainer, weights)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if scale is not None:
        for name in _BIASES[cls]:
            if name != "threshold" or float(sd[name].max()) >= 0:
                sd[name] = sd[name] * float(scale)
        notes.append(f"biases scaled by the backup's norm_factor {float(scale):.6g}, as the training loop does at the end")
    w_dec = sd.get("W_dec")
    Fn, D = (sd["encoder.weight"].shape if "encoder.weight" in sd else (w_dec.shape if w_dec is not None else (0, 0)))
    D, Fn = int(trainer.get("activation_dim") or D), int(trainer.get("dict_size") or Fn)
    fo = _map(cls, sd, D, Fn, weights)
    fo.notes = notes + fo.notes
    sub = trainer.get("submodule_name")
    m = re.fullmatch(r"(resid_post|mlp_out|attn_out)_layer_(\d+)", sub or "")
    if m:
        site = {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}[m.group(1)]
        fo.hook = from_base_model_path(f"layers.{int(m.group(2))}{site}")
    elif sub:
        fo.hook_note = f"submodule {sub!r} has no saelab hook name saelab knows; pass --hook NAME"
    fo.foreign_hook, fo.model_name = sub, trainer.get("lm_name")
    fo.extra = {k: trainer[k] for k in ("dict_class", "trainer_class", "activation_dim", "dict_size", "k", "layer",
                                         "lm_name", "submodule_name") if k in trainer}
    return fo


def _map(cls: str, sd: dict[str, Tensor], D: int, Fn: int, source: Path) -> Foreign:
    lin = {"encoder.weight": (Fn, D), "decoder.weight": (D, Fn)}
    if cls == "AutoEncoder":
        check_shapes(source, sd, {**lin, "encoder.bias": (Fn,), "bias": (D,)})
        return Foreign("relu", sd["encoder.weight"].T, sd["decoder.weight"].T, sd["encoder.bias"], sd["bias"])
    if cls == "AutoEncoderNew":
        check_shapes(source, sd, {**lin, "encoder.bias": (Fn,), "decoder.bias": (D,)})
        return Foreign("relu", sd["encoder.weight"].T, sd["decoder.weight"].T, sd["encoder.bias"], sd["decoder.bias"],
                       subtract_b_dec=False)
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        check_shapes(source, sd, {**lin, "encoder.bias": (Fn,), "b_dec": (D,), "k": (), "threshold": ()})
        W_enc, W_dec, b_enc = sd["encoder.weight"].T, sd["decoder.weight"].T, sd["encoder.bias"]
    if cls == "MatryoshkaBatchTopKSAE":
        check_shapes(source, sd, {"W_enc": (D, Fn), "W_dec": (Fn, D), "b_enc": (Fn,), "b_dec": (D,), "k": (),
                                  "threshold": ()}, allowed_extra=("group_sizes",))
        W_enc, W_dec, b_enc = sd["W_enc"], sd["W_dec"], sd["b_enc"]
    if cls == "AutoEncoderTopK":
        return Foreign("topk", W_enc, W_dec, b_enc, sd["b_dec"], k=int(sd["k"]),
                       notes=[] if float(sd["threshold"]) < 0 else
                       [f"its inference threshold {float(sd['threshold']):.6g} (encode(use_threshold=True)) is not "
                        "used: saelab reproduces the default TopK encode"])
    if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        thr = float(sd["threshold"])
        if thr < 0:
            return Foreign("relu", W_enc, W_dec, b_enc, sd["b_dec"],
                           notes=["threshold was never set (-1): its encode keeps every positive latent, read as relu"])
        return Foreign("batchtopk", W_enc, W_dec, b_enc, sd["b_dec"], k=int(sd["k"]), batch_threshold=thr)
    if cls == "JumpReluAutoEncoder":
        check_shapes(source, sd, {"W_enc": (D, Fn), "W_dec": (Fn, D), "b_enc": (Fn,), "b_dec": (D,), "threshold": (Fn,)})
        return Foreign("jumprelu", sd["W_enc"], sd["W_dec"], sd["b_enc"], sd["b_dec"], subtract_b_dec=False,
                       threshold_F=sd["threshold"])
    check_shapes(source, sd, {**lin, "decoder_bias": (D,), "r_mag": (Fn,), "gate_bias": (Fn,), "mag_bias": (Fn,)})
    e = sd["r_mag"].double().exp()
    return Foreign("jumprelu", sd["encoder.weight"].T * e.float(), sd["decoder.weight"].T, sd["mag_bias"],
                   sd["decoder_bias"], threshold_F=sd["mag_bias"].double() - e * sd["gate_bias"].double(),
                   notes=["gated SAE imported as an exactly equivalent JumpReLU (threshold = mag_bias - exp(r_mag) gate_bias)"])


__all__ = ["read_dictionary_learning", "WEIGHTS", "CFG"]
