"""Read an EleutherAI sparsify SAE: `HOOKPOINT/cfg.json` + `HOOKPOINT/sae.safetensors`.

`SparseCoder.save_to_disk` (sparsify/sparse_coder.py, checked against eai-sparsify 1.3) writes the
module's state_dict with safetensors and its SparseCoderConfig plus `d_in` as cfg.json. The SAE:

    f = TopK_k( ReLU( (x - b_dec) encoder.weight^T + encoder.bias ) )    encoder.weight [F, D]
    x_hat = f W_dec + b_dec                                               W_dec [F, D]

TopK of the ReLU'd pre-activations keeps the same values as saelab's ReLU(TopK(pre)) (where fewer
than k are positive both give zeros), so it maps onto saelab's `topk` with W_enc = encoder.weight^T.

Refused, with a message: `activation = "groupmax"` (one winner per block of F/k latents, an
activation saelab does not have), `transcode` (predicts another module's output from this one's
input: not an autoencoder of one hook) and `skip_connection` (adds x W_skip^T to the output).

A training run writes one sub-directory per hookpoint (module paths of the base model, e.g.
`layers.12`) beside the run's `config.json`; the hookpoint becomes saelab's `model.layers.12` and the
run's `model` field the model name.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab.errors import UsageError
from saelab.saes.formats.common import Foreign, check_shapes, need, require_files
from saelab.saes.formats.hooks import from_base_model_path

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def read_sparsify(path: Path) -> Foreign:
    """Parse one sparsify hookpoint directory into a Foreign (module docstring).

    Raises:
        UsageError: missing files, refused options, shapes that do not match d_in / num_latents.
    """
    require_files(path, [CFG, WEIGHTS], "sparsify")
    cfg_path = path / CFG
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{cfg_path} is not valid JSON ({e}).") from None
    problems = []
    if cfg.get("activation", "topk") != "topk":
        problems.append(f"activation = {cfg.get('activation')!r} (saelab has TopK, not group-max)")
    if cfg.get("transcode"):
        problems.append("transcode = true (a transcoder predicts another module's output; saelab imports autoencoders)")
    if cfg.get("skip_connection"):
        problems.append("skip_connection = true (a linear skip path W_skip that saelab's SAEs do not have)")
    if problems:
        raise UsageError(f"{cfg_path} cannot be imported: " + "; ".join(problems) + ".")
    D = int(need(cfg, "d_in", cfg_path))
    Fn = int(cfg.get("num_latents") or 0) or D * int(need(cfg, "expansion_factor", cfg_path))
    k = int(need(cfg, "k", cfg_path))
    try:
        w = {n: v.float() for n, v in load_file(str(path / WEIGHTS)).items()}
    except SafetensorError as e:
        raise UsageError(f"{path / WEIGHTS} is not a readable safetensors file ({e}).") from None
    check_shapes(path / WEIGHTS, w, {"encoder.weight": (Fn, D), "encoder.bias": (Fn,), "W_dec": (Fn, D),
                                     "b_dec": (D,)})
    hookpoint = path.resolve().name
    run_cfg = path.resolve().parent / "config.json"
    model_name, notes = None, []
    if run_cfg.is_file():
        try:
            run = json.loads(run_cfg.read_text())
            model_name = run.get("model") if isinstance(run.get("model"), str) else None
        except json.JSONDecodeError:
            notes.append(f"{run_cfg} is not valid JSON; model name unknown")
    hook = from_base_model_path(hookpoint)
    extra = {k_: cfg[k_] for k_ in ("k", "num_latents", "expansion_factor", "normalize_decoder", "multi_topk")
             if k_ in cfg}
    return Foreign("topk", w["encoder.weight"].T, w["W_dec"], w["encoder.bias"], w["b_dec"], k=k, hook=hook,
                   foreign_hook=hookpoint, hook_note=f"hookpoint {hookpoint!r} read as {hook!r} (base model at "
                   "`model`, as in Llama, Gemma, Qwen)", model_name=model_name, notes=notes, extra=extra)


__all__ = ["read_sparsify", "CFG", "WEIGHTS"]
