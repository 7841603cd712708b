"""Which model, hook and store an SAE belongs to, and the one set of checks that refuses a mismatch.

Every stage that puts an SAE next to a store or a model (evaluate, interpret, intervene, circuits)
asks here. Plain dicts in: the SAE's metadata.json, store.json, `LoadedModel.info`; no torch.

    same model  <=>  sha256 equal, when both sides record one; else names equal, when both record
                     one; else unknown (passes, with a warning when the SAE records no model)
    hook        =    the hook asked for, else the SAE's metadata `hook`, else the store's only hook
    held out    =    the store's val chunks for the SAE's training (val_fraction, seed): the split it
                     never saw (`trained_split`)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from saelab.errors import UsageError

log = logging.getLogger(__name__)


def describe_model(info: Mapping | None) -> str:
    """`name (sha256 0123456789ab)` for messages."""
    info = info or {}
    sha = str(info.get("sha256") or "?")
    return f"{info.get('name') or info.get('spec') or '?'} (sha256 {sha[:12]})"


def same_model(a: Mapping | None, b: Mapping | None) -> bool | None:
    """True / False when the two model records can be compared (module docstring), else None."""
    a, b = a or {}, b or {}
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    if a.get("name") and b.get("name"):
        return a["name"] == b["name"]
    return None


def sae_meta(sae) -> dict:
    """The metadata.json dict of a loaded SAE ({} for one that has none)."""
    return dict(getattr(sae, "metadata", None) or {})


def trained_split(meta: Mapping) -> tuple[float, int]:
    """(val_fraction, seed) of the SAE's training, so a store's "val" split is the chunks it never saw
    (the training defaults 0.05 and 0 for an SAE that records no training)."""
    train_cfg = meta.get("training") or {}
    return float(train_cfg.get("val_fraction", 0.05)), int(train_cfg.get("seed", 0))


def resolve_sae_hook(meta: Mapping, store_hooks: Sequence[str], hook: str | None = None,
                     name: str = "the SAE") -> str:
    """The hook to read for an SAE (module docstring).

    Raises:
        UsageError: the SAE records no hook and the store holds several.
    """
    chosen = hook or meta.get("hook")
    if chosen is None:
        if len(store_hooks) != 1:
            raise UsageError(f"{name} records no hook point in its metadata.json and the store holds "
                             f"{len(store_hooks)} ({', '.join(store_hooks)}); pass --hook NAME.")
        chosen = store_hooks[0]
        log.warning("%s has no hook in its metadata; assuming the store's only hook %r", name, chosen)
    return chosen


def store_problems(name: str, meta: Mapping, d_in: int, hook: str, store_meta: Mapping, store_path: str) -> list[str]:
    """Why an SAE (metadata `meta`, width `d_in`) cannot read `hook` of this store: [] when it can."""
    widths = {h["name"]: int(h["width"]) for h in store_meta.get("hooks", [])}
    problems = []
    if hook not in widths:
        problems.append(f"{name} reads hook {hook!r}, but store {store_path} holds "
                        f"{', '.join(map(repr, widths))}; use the store the SAE was trained on, or --hook")
    elif widths[hook] != d_in:
        problems.append(f"{name} has d_in {d_in}, but hook {hook!r} of store {store_path} has width {widths[hook]}")
    if same_model(meta.get("model"), store_meta.get("model")) is False:
        problems.append(f"{name} was trained on activations of model {describe_model(meta.get('model'))}, but "
                        f"store {store_path} was collected from {describe_model(store_meta.get('model'))}")
    return problems


def model_problems(name: str, meta: Mapping, model_info: Mapping) -> list[str]:
    """Why an SAE cannot be spliced into the loaded model `model_info`: [] when it can."""
    if not meta.get("model"):
        log.warning("%s records no model in metadata.json; cannot check it matches %s", name,
                    describe_model(model_info))
        return []
    if same_model(meta.get("model"), model_info) is False:
        return [f"{name} was trained on activations of model {describe_model(meta.get('model'))}, but the "
                f"model is {describe_model(model_info)}; pass --model with the model the SAE was trained on"]
    return []


def store_model_problems(store_meta: Mapping, store_path: str, model_info: Mapping) -> list[str]:
    """Why a store's activations do not come from the loaded model (model or LoRA adapter differ)."""
    problems = []
    if same_model(store_meta.get("model"), model_info) is False:
        problems.append(f"store {store_path} was collected from model {describe_model(store_meta.get('model'))}, "
                        f"but --model is {describe_model(model_info)}")
    store_ad, model_ad = store_meta.get("adapter"), model_info.get("adapter")
    if (store_ad or {}).get("sha256") != (model_ad or {}).get("sha256"):
        problems.append(f"store {store_path} was collected with adapter {(store_ad or {}).get('path', 'none')}, but "
                        f"the model has {'adapter ' + str(model_ad.get('path')) if model_ad else 'none'}; pass the "
                        f"store's adapter with --adapter{' ' + str(store_ad.get('path')) if store_ad else ''}"
                        f"{'' if store_ad else ' (none: drop --adapter)'}")
    return problems


def check_sae_model(sae, model_info: Mapping, name: str = "SAE") -> list[str]:
    """`model_problems` of a loaded SAE."""
    return model_problems(name, sae_meta(sae), model_info)
