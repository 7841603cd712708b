"""Read an SAELens SAE directory: `cfg.json` + `sae_weights.safetensors` (as `SAE.save_model` writes).

SAELens's inference SAEs (sae_lens/saes/*.py, checked against sae-lens 6.54) compute

    sae_in = x - b_dec * apply_b_dec_to_input
    standard:  f = ReLU(sae_in W_enc + b_enc)
    topk:      pre = sae_in W_enc + b_enc (* ||W_dec[f]|| if rescale_acts_by_decoder_norm)
               f = ReLU(TopK_k(pre))
    jumprelu:  pre = sae_in W_enc + b_enc,  f = ReLU(pre) 1[pre > threshold]
    gated:     g = sae_in W_enc + b_gate,  m = sae_in (W_enc exp(r_mag)) + b_mag,  f = 1[g > 0] ReLU(m)
    x_hat = f W_dec (/ ||W_dec[f]|| for rescaled topk) + b_dec

with W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (saelab's orientation). Mapping to saelab:

    standard -> relu;  topk -> topk;  jumprelu -> jumprelu  (BatchTopK SAEs are saved by SAELens as
    jumprelu with one shared threshold, and so arrive as jumprelu)
    rescale_acts_by_decoder_norm:  W_enc' = W_enc n,  b_enc' = b_enc n,  W_dec' = W_dec / n   (n = ||W_dec[f]||)
    gated -> jumprelu:  m = exp(r) (g - b_gate) + b_mag, so g > 0  <=>  m > θ := b_mag - exp(r) b_gate, and
                        f = m 1[m > max(θ, 0)] with W_enc' = W_enc exp(r), b_enc' = b_mag
    apply_b_dec_to_input = false -> folded into b_enc (common.py)
    old `scaling_factor` [d_sae] (finetuning_scaling_factor; decode used f * s): W_dec' = s W_dec

normalize_activations: `none`; `expected_average_only_in` and `covariance_whitening` leave inputs
untouched when SAELens loads from disk (the factor is folded when SAELens saves, or lives outside
the directory), so they are read as-is with a note. `constant_norm_rescale` and `layer_norm` rescale
every token at run time, which saelab's SAEs cannot express: refused.
Config fields: SAELens 6 keeps hook_name / model_name under `metadata`; earlier versions at the top
level (`hook_point`, `activation_fn_str` spellings too). Both are read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab.errors import UsageError
from saelab.saes.formats.common import Foreign, check_shapes, need, require_files
from saelab.saes.formats.hooks import from_transformer_lens

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"

SUPPORTED = ("standard", "topk", "jumprelu", "gated")
_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


def _field(cfg: dict[str, Any], *keys: str) -> Any:
    """First of `keys` found in cfg or in cfg['metadata'] (SAELens 6 moved the provenance there)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
        if meta.get(k) is not None:
            return meta[k]
    return None


def read_saelens(path: Path) -> Foreign:
    """Parse an SAELens directory into a Foreign (module docstring has the equations).

    Raises:
        UsageError: missing files, unsupported architecture or normalisation, shapes that do not
            match d_in / d_sae.
    """
    require_files(path, [CFG, WEIGHTS], "SAELens")
    cfg_path = path / CFG
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{cfg_path} is not valid JSON ({e}).") from None
    act_fn = _field(cfg, "activation_fn", "activation_fn_str") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    arch = cfg.get("architecture") or ("topk" if act_fn == "topk" else "standard")
    if arch not in SUPPORTED:
        raise UsageError(f"{cfg_path}: SAELens architecture {arch!r} cannot be imported; saelab reads "
                         f"{', '.join(SUPPORTED)} (and BatchTopK, which SAELens saves as jumprelu).")
    norm = cfg.get("normalize_activations") or "none"
    if norm is True:
        norm = "expected_average_only_in"
    if norm not in _IDENTITY_NORMS:
        raise UsageError(f"{cfg_path}: normalize_activations = {norm!r} rescales every token at run time, "
                         "which saelab's SAEs cannot express. Only 'none', 'expected_average_only_in' and "
                         "'covariance_whitening' (already folded when SAELens saves) can be imported.")
    D, Fn = int(need(cfg, "d_in", cfg_path)), int(need(cfg, "d_sae", cfg_path))
    try:
        w = {k: v.float() for k, v in load_file(str(path / WEIGHTS)).items()}
    except SafetensorError as e:
        raise UsageError(f"{path / WEIGHTS} is not a readable safetensors file ({e}).") from None
    expected = {"W_enc": (D, Fn), "W_dec": (Fn, D), "b_dec": (D,)}
    expected.update({"b_gate": (Fn,), "b_mag": (Fn,), "r_mag": (Fn,)} if arch == "gated" else {"b_enc": (Fn,)})
    if arch == "jumprelu":
        expected["threshold"] = (Fn,)
    scale_name = next((n for n in ("scaling_factor", "finetuning_scaling_factor") if n in w), None)
    if scale_name:
        expected[scale_name] = (Fn,)
    check_shapes(path / WEIGHTS, w, expected)

    notes: list[str] = []
    W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
    if norm != "none":
        notes.append(f"normalize_activations = {norm!r}: inputs are used as they come, as SAELens does when "
                     "it loads this directory; multiply activations by the release's scaling factor if it has one")
    if scale_name and not torch.equal(w[scale_name], torch.ones_like(w[scale_name])):
        W_dec = W_dec * w[scale_name][:, None]
        notes.append(f"{scale_name} folded into W_dec (features keep SAELens's scale)")
    threshold, k, sa_arch = None, None, arch
    if arch == "gated":
        e = w["r_mag"].double().exp()
        threshold = w["b_mag"].double() - e * w["b_gate"].double()
        W_enc, b_enc, sa_arch = W_enc * e.float(), w["b_mag"], "jumprelu"
        notes.append("gated SAE imported as an exactly equivalent JumpReLU (threshold = b_mag - exp(r_mag) b_gate)")
    else:
        b_enc = w["b_enc"]
        threshold = w.get("threshold")
    if arch == "topk":
        k = _field(cfg, "k") or kwargs.get("k")
        if k is None:
            raise UsageError(f"{cfg_path}: a topk SAE without k (neither 'k' nor activation_fn_kwargs.k).")
        if cfg.get("rescale_acts_by_decoder_norm"):
            n = torch.linalg.vector_norm(W_dec, dim=-1, dtype=torch.float64).clamp_min(1e-8)
            W_enc, b_enc, W_dec = W_enc * n.float(), b_enc.double() * n, W_dec / n.float()[:, None]
            notes.append("rescale_acts_by_decoder_norm folded: decoder rows now have unit norm, features unchanged")
    sa_arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[sa_arch]

    model_name = _field(cfg, "model_name")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    foreign_hook = _field(cfg, "hook_name", "hook_point")
    hook, note = (meta["saelab_hook"], None) if meta.get("saelab_hook") else from_transformer_lens(foreign_hook, model_name)
    head = _field(cfg, "hook_head_index", "hook_point_head_index")
    if head is not None:
        hook, note = None, f"the SAE reads one attention head ({head}) of {foreign_hook!r}; saelab hooks whole modules"
    extra = {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations",
                                 "k", "rescale_acts_by_decoder_norm", "dtype") if k in cfg}
    return Foreign(sa_arch, W_enc, W_dec, b_enc, b_dec, subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                   threshold_F=threshold, k=int(k) if k is not None else None, hook=hook, foreign_hook=foreign_hook,
                   hook_note=note, model_name=model_name, notes=notes, extra=extra)


__all__ = ["read_saelens", "CFG", "WEIGHTS", "SUPPORTED"]
