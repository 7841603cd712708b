"""Which model, hook and store an SAE belongs to, and the checks that refuse a mismatched pair.

Every stage that puts an SAE next to a store or a model (evaluate, interpret, intervene,
circuits) asks here. Identity is the model's sha256 when both sides record one, else its name.
Works on plain dicts (SAE metadata.json, store.json, `LoadedModel.info`); no torch, no models.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)


def describe_model(info: Mapping | None) -> str:
    info = info or {}
    sha = str(info.get("sha256") or "?")
    return f"{info.get('name') or info.get('spec') or '?'} (sha256 {sha[:12]})"


def check_sae_model(sae, model_info: Mapping, name: str = "SAE") -> list[str]:
    """Problems when the SAE's metadata says it was trained on another model than `model_info`.

    Compares sha256 when both sides have one, else the model name; an SAE without model metadata
    passes (with a warning).
    """
    meta = (getattr(sae, "metadata", None) or {}).get("model") or {}
    if not meta:
        log.warning("%s records no model in metadata.json; cannot check it matches %s", name, describe_model(model_info))
        return []
    a, b = meta.get("sha256"), model_info.get("sha256")
    same = (a == b) if (a and b) else (meta.get("name") == model_info.get("name"))
    if same:
        return []
    return [f"{name} was trained on activations of model {describe_model(meta)}, but the loaded model is "
            f"{describe_model(model_info)}; pass --model with the model the SAE was trained on"]
