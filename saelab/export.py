"""Export a saelab SAE directory to other tools' formats. Today: SAELens.

SAELens reads a directory with `cfg.json` (its config field names) and `sae_weights.safetensors`
(tensors `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in], and
`threshold` [d_sae] for JumpReLU). Its inference equations, which the export must reproduce:

    sae_in  = x - b_dec                     (apply_b_dec_to_input = true)
    pre     = sae_in W_enc + b_enc
    standard:  f = ReLU(pre)
    topk:      f = ReLU(TopK_k(pre))        (k in activation_fn_kwargs and as `k`)
    jumprelu:  f = ReLU(pre) * 1[pre > threshold]
    x_hat   = f W_dec + b_dec

Mapping: relu -> standard; topk -> topk; jumprelu -> jumprelu; batchtopk -> jumprelu with every
threshold set to the inference threshold estimated in training (how SAELens itself serves BatchTopK
SAEs). Weights come from the saved SAE, so input normalisation is already folded in
(`normalize_activations = "none"`); tied SAEs are written untied.
Not here: SAELens' sparsity file (feature frequencies), Neuronpedia ids.

Hook names: `hook_name` is the TransformerLens name of the saelab hook (`model.layers.7` ->
`blocks.7.hook_resid_post`; the table is in saes/formats/hooks.py), or the saelab name when the table
has none; `metadata.saelab_hook` keeps saelab's name so `saelab import` restores it exactly.
Reading SAELens directories (the other direction) lives in saes/formats/saelens.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.errors import UsageError
from saelab.saes import load_sae
from saelab.saes.formats.hooks import to_transformer_lens

log = logging.getLogger(__name__)

SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def saelens_tensors(sae) -> dict[str, Tensor]:
    """SAELens-named weights of a loaded (folded) saelab SAE."""
    if float(sae.input_scale) != 1.0:
        raise UsageError("this SAE still has its input normalisation unfolded; export a directory "
                         "written by SAE.save / `saelab train` (load it with load_sae).")
    arch = sae.cfg.architecture
    out = {
        "W_enc": sae.W_enc().detach().contiguous().float(),
        "W_dec": sae.W_dec_FD.detach().contiguous().float(),
        "b_enc": sae.b_enc_F.detach().contiguous().float(),
        "b_dec": sae.b_dec_D.detach().contiguous().float(),
    }
    if arch == "jumprelu":
        out["threshold"] = sae.threshold_F.detach().contiguous().float()
    elif arch == "batchtopk":
        thr = float(sae.threshold)
        if thr < 0:
            raise UsageError("this BatchTopK SAE has no inference threshold yet (it was saved before any "
                             "training step); train it for at least one step before exporting.")
        out["threshold"] = torch.full((sae.cfg.d_sae,), thr)
    return out


def _hook_layer(hook: str | None) -> int:
    m = re.search(r"layers\.(\d+)", hook or "")
    return int(m.group(1)) if m else -1


def saelens_cfg(sae) -> dict[str, Any]:
    """SAELens cfg.json for a saelab SAE (provenance from its metadata.json where known)."""
    meta = sae.metadata or {}
    hook = meta.get("hook") or ""
    model = meta.get("model") or {}
    arch = SAELENS_ARCH[sae.cfg.architecture]
    tl_hook = to_transformer_lens(hook, model.get("architecture") or model.get("name"))
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": model.get("name", ""),
        "hook_name": tl_hook or hook,
        "hook_layer": _hook_layer(hook),
        "hook_head_index": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.cfg.k} if arch == "topk" else {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "context_size": meta.get("context_size", meta.get("max_length", 0)) or 0,
        "dataset_path": (meta.get("corpus") or {}).get("spec", "") if isinstance(meta.get("corpus"), dict) else "",
        "dataset_trust_remote_code": False,
        "prepend_bos": bool(meta.get("prepend_bos", True)),
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        "metadata": {"exported_from": "saelab", "saelab_architecture": sae.cfg.architecture, "saelab_hook": hook},
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    return cfg


def export_saelens(sae_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write `out/cfg.json` and `out/sae_weights.safetensors` for SAELens from a saelab SAE directory.

    Raises:
        UsageError: bad SAE directory, or `out` exists and overwrite is False.
    """
    from safetensors.torch import save_file

    sae = load_sae(sae_dir)
    final = Path(out)
    if final.exists() and not overwrite:
        raise UsageError(f"{final} already exists. Choose another OUT or pass --overwrite.")
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(saelens_tensors(sae), str(tmp / "sae_weights.safetensors"))
    (tmp / "cfg.json").write_text(json.dumps(saelens_cfg(sae), indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("wrote SAELens directory %s (%s, d_in=%d, d_sae=%d)", final, SAELENS_ARCH[sae.cfg.architecture],
             sae.cfg.d_in, sae.cfg.d_sae)
    return final


def saelens_reference_forward(cfg: dict[str, Any], w: dict[str, Tensor], x_BD: Tensor) -> tuple[Tensor, Tensor]:
    """SAELens' documented inference equations (module docstring), for checking an export."""
    sae_in = x_BD - w["b_dec"] if cfg["apply_b_dec_to_input"] else x_BD
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = F.relu(pre)
    elif cfg["architecture"] == "topk":
        v, i = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, F.relu(v))
    elif cfg["architecture"] == "jumprelu":
        f = F.relu(pre) * (pre > w["threshold"])
    else:
        raise ValueError(cfg["architecture"])
    return f @ w["W_dec"] + w["b_dec"], f
