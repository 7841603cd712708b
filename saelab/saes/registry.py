"""The architecture registry (name -> SAE class, config class), and saving's mirror: `load_sae`.

    cfg = REGISTRY["topk"][1](d_in=576, d_sae=4608, k=32)
    sae = make_sae(cfg)
    sae = load_sae("runs/NAME/sae_best")

Names (`relu`, `topk`, `batchtopk`, `jumprelu`) are the file names, the `architecture` value in
cfg.json and the CLI values. `read_cfg` and `load_sae` check what they read: format version,
architecture, sha256 of the weights, tensor names, shapes and finiteness.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab.atomic import sha256_file
from saelab.config import config_from_dict
from saelab.errors import DataError, UsageError, raise_all
from saelab.saes.base import FORMAT_VERSION, SAE, InitDirs, SAEConfig
from saelab.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.saes.formats import load_foreign, resolve
from saelab.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.saes.relu import ReLUConfig, ReLUSAE
from saelab.saes.topk import TopKConfig, TopKSAE

log = logging.getLogger(__name__)

REGISTRY: dict[str, tuple[type[SAE], type[SAEConfig]]] = {
    "relu": (ReLUSAE, ReLUConfig),
    "topk": (TopKSAE, TopKConfig),
    "batchtopk": (BatchTopKSAE, BatchTopKConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUConfig),
}


def make_sae(cfg: SAEConfig, init_dirs_FD: InitDirs = None, d_in: int | None = None,
             device: str | None = None) -> SAE:
    """A freshly initialised SAE for `cfg` (d_in / d_sae resolved; see SAEConfig.resolved).

    Args:
        cfg: an architecture config (its class picks the architecture).
        init_dirs_FD: decoder directions for the first latents (tensor [M, D] or callable), or None.
        d_in: activation width, used when cfg.d_in is 0.
        device: where to put the parameters.
    """
    if cfg.architecture not in REGISTRY:
        raise UsageError(f"unknown architecture {cfg.architecture!r}; known: {', '.join(sorted(REGISTRY))}.")
    sae = REGISTRY[cfg.architecture][0](cfg.resolved(d_in), init_dirs_FD=init_dirs_FD)
    return sae.to(device) if device else sae


def _locate(path: str | Path) -> tuple[str, Path]:
    """(format, where the SAE is) of an existing path; a missing one is left to read_cfg, whose
    message points at a half-finished save (.tmp / .old)."""
    p = Path(path).expanduser()
    return resolve(p) if p.exists() else ("saelab", p)


def read_cfg(path: str | Path) -> tuple[SAEConfig, dict[str, Any]]:
    """Parse `path/cfg.json` into the architecture's config; returns (cfg, raw dict).

    Another library's SAE (saes/formats) gives the config of the saelab SAE it maps to.

    Raises:
        UsageError: missing file, newer format_version, or unknown architecture; DataError: a
            truncated or damaged cfg.json.
    """
    fmt, p = _locate(path)
    if fmt != "saelab":
        sae = load_foreign(p, fmt)
        return sae.cfg, sae.config_dict()
    cfg_path = p / "cfg.json"
    if not cfg_path.is_file():
        hint = f" A half-finished save may have left {p.name}.old or {p.name}.tmp beside it." if (
            p.with_name(p.name + ".old").exists() or p.with_name(p.name + ".tmp").exists()) else ""
        raise UsageError(f"{p} is not an SAE directory: {cfg_path} is missing. Pass a directory written "
                         f"by `saelab train` (e.g. runs/NAME/sae_best).{hint}")
    raw = _read_json(cfg_path)
    version = raw.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise UsageError(f"{cfg_path} has format_version {version}, newer than this saelab reads "
                         f"({FORMAT_VERSION}; written by saelab {raw.get('saelab_version', '?')}). "
                         "Upgrade saelab (pip install -U saelab) to load it.")
    arch = raw.get("architecture")
    if arch not in REGISTRY:
        raise UsageError(f"{cfg_path}: unknown architecture {arch!r}; known: {', '.join(sorted(REGISTRY))}.")
    fields = {k: v for k, v in raw.items() if k not in ("architecture", "format_version", "saelab_version")}
    cfg = config_from_dict(REGISTRY[arch][1], fields, str(cfg_path))
    return cfg, raw


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of an SAE directory; a truncated or foreign file is a DataError naming it."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): the file is truncated or damaged. Copy the SAE "
                        "directory again or use another checkpoint.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not an object: it was not written by saelab.")
    return data


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE directory written by `SAE.save`, checking it thoroughly; returns it in eval mode.

    Checks: format_version not newer, known architecture, sha256 of model.safetensors against
    metadata.json (a flipped byte anywhere is caught), the exact set of tensor names, their shapes,
    and that every value is finite.

    SAEs written by SAELens, sparsify, dictionary_learning or as .npz are read by
    `saes.formats.load_foreign`, which maps their conventions; a path holding no SAE, or several, is
    a UsageError that says so.

    Raises:
        UsageError: naming what is wrong (missing/extra tensors by name, bad shapes, ...).
    """
    fmt, p = _locate(path)
    if fmt != "saelab":
        return load_foreign(p, fmt, device)
    cfg, _ = read_cfg(p)
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{p} has cfg.json but no model.safetensors; the directory is incomplete. "
                         "Re-save the SAE or use another checkpoint.")
    meta_path = p / "metadata.json"
    metadata: dict[str, Any] = {}
    if meta_path.is_file():
        metadata = _read_json(meta_path)
    expected_sha = metadata.get("weights_sha256")
    if expected_sha is None:
        log.warning("%s: no weights_sha256 in metadata.json; cannot detect corrupted bytes", p)
    else:
        actual = sha256_file(weights)
        if actual != expected_sha:
            raise UsageError(f"{weights} is corrupted: its sha256 is {actual[:16]}..., metadata.json records "
                             f"{expected_sha[:16]}.... Copy the checkpoint again or use another one.")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as e:
        raise UsageError(f"{weights} is not a readable safetensors file ({e}).") from None
    sae = REGISTRY[cfg.architecture][0](cfg)
    expected = {k: v.shape for k, v in sae.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, expected "
                            f"{list(expected[name])} for d_in={cfg.d_in}, d_sae={cfg.d_sae}")
        elif tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            problems.append(f"tensor {name} holds NaN or inf values")
    raise_all(problems, f"{weights} does not match its cfg.json ({cfg.architecture}); re-save the SAE")
    sae.load_state_dict(tensors)
    sae.metadata = metadata
    return sae.to(device).eval()
