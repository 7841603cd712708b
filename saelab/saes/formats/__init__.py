"""SAEs trained by other libraries: detect the format of a path and load it as a saelab SAE.

    from saelab.saes.formats import detect_format, load_foreign
    detect_format("gemma-scope/layer_12/width_16k/average_l0_82")   # -> "npz"
    sae = load_foreign("runs/sparsify/layers.12")                    # a saelab TopKSAE, eval mode

Formats (the names of `saelab import --format`), and the files that identify them:

    saelab               cfg.json with saelab_version + model.safetensors  (load with load_sae)
    saelens              cfg.json + sae_weights.safetensors                 saelens.py
    sparsify             cfg.json + sae.safetensors                         sparsify.py
    dictionary-learning  ae.pt (+ config.json)                              dictionary_learning.py
    npz                  params.npz or one *.npz (Gemma Scope)              npz.py

A directory that holds none of these but has exactly one sub-directory that does (a sparsify run
with one hookpoint, a dictionary_learning run with one trainer) resolves to that sub-directory;
with several, the error lists them. Each reader maps the format's conventions onto saelab's
(equations in its docstring; shared folding in common.py) and records in `sae.metadata`: `hook`
(saelab's name, or None when it cannot be mapped), `model` ({}: a foreign name is no saelab model
id; `saelab import --model` records the real one) and `imported` {format, source, foreign_hook,
model (the source's model name), notes}. Not here: writing other formats (saelab/export.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from saelab.errors import UsageError
from saelab.saes.base import SAE
from saelab.saes.formats.common import Foreign, build_sae
from saelab.saes.formats.dictionary_learning import read_dictionary_learning
from saelab.saes.formats.npz import read_npz
from saelab.saes.formats.saelens import read_saelens
from saelab.saes.formats.sparsify import read_sparsify

READERS: dict[str, Callable[[Path], Foreign]] = {
    "saelens": read_saelens,
    "sparsify": read_sparsify,
    "dictionary-learning": read_dictionary_learning,
    "npz": read_npz,
}
FORMATS = ("saelab", *READERS)
"""Every format name detect_format returns."""

_EXPECTED = ("saelab (cfg.json + model.safetensors), saelens (cfg.json + sae_weights.safetensors), sparsify "
             "(cfg.json + sae.safetensors), dictionary-learning (ae.pt), npz (params.npz)")


def _is_saelab_cfg(cfg_path: Path) -> bool:
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and ("saelab_version" in raw or "format_version" in raw)


def _format_of_dir(d: Path) -> str | None:
    if (d / "model.safetensors").is_file() and (d / "cfg.json").is_file():
        return "saelab"  # read_cfg / load_sae check the rest
    if (d / "sae_weights.safetensors").is_file():
        return "saelens"
    if (d / "sae.safetensors").is_file():
        return "sparsify"
    if (d / "ae.pt").is_file():
        return "dictionary-learning"
    if (d / "params.npz").is_file() or len(list(d.glob("*.npz"))) == 1:
        return "npz"
    if (d / "cfg.json").is_file() and _is_saelab_cfg(d / "cfg.json"):
        return "saelab"  # incomplete: load_sae names the missing file
    return None


def resolve(path: str | Path) -> tuple[str, Path]:
    """(format, the file or directory that holds the SAE) for `path`.

    Raises:
        UsageError: the path does not exist, holds no SAE, or several (listed).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{p} does not exist. Pass an SAE directory or file ({_EXPECTED}).")
    if p.is_file():
        name = p.name
        if name.endswith(".npz"):
            return "npz", p
        if name.endswith(".pt"):
            return "dictionary-learning", p
        if name in ("sae_weights.safetensors", "sae.safetensors", "model.safetensors", "cfg.json"):
            fmt = _format_of_dir(p.parent)
            if fmt:
                return fmt, p.parent
        raise UsageError(f"{p} is a file saelab cannot read as an SAE. Pass the SAE's directory, an .npz "
                         f"archive or an ae.pt ({_EXPECTED}).")
    fmt = _format_of_dir(p)
    if fmt:
        return fmt, p
    subs = sorted((d, f) for d in p.iterdir() if d.is_dir() and (f := _format_of_dir(d)))
    if len(subs) == 1:
        return subs[0][1], subs[0][0]
    where = p.resolve()
    if subs:
        listed = ", ".join(f"{d.name} ({f})" for d, f in subs[:12]) + (" ..." if len(subs) > 12 else "")
        raise UsageError(f"{where} holds {len(subs)} SAEs: {listed}. Pass one of them.")
    raise UsageError(f"{where} holds no SAE: none of the files of a known format is there or in a sub-directory. "
                     f"Expected one of: {_EXPECTED}.")


def detect_format(path: str | Path) -> str:
    """The format name of the SAE at `path` (one of FORMATS); see `resolve`."""
    return resolve(path)[0]


def load_foreign(path: str | Path, format: str | None = None, device: str | torch.device = "cpu",
                 hook: str | None = None) -> SAE:
    """Load an SAE written by another library as a saelab SAE (eval mode, raw-activation units).

    Args:
        path: the SAE's directory or file (see the module docstring).
        format: one of READERS' names; None detects it.
        device: where to put the SAE.
        hook: saelab hook name to record, overriding what the format's names map to.
    Raises:
        UsageError: an unknown format, a saelab directory (use load_sae), missing files, shapes that do
            not match the declared config, options saelab cannot reproduce.
    """
    if format is not None and format not in READERS:
        raise UsageError(f"unknown SAE format {format!r}; saelab imports {', '.join(READERS)}.")
    try:
        fmt, where = resolve(path)
    except UsageError:
        if format is None or not Path(path).exists():
            raise
        fmt, where = format, Path(path)  # the reader names the files that are missing
    if format is not None:
        if fmt != format and not (format == "dictionary-learning" and where.is_file()):
            raise UsageError(f"{path} holds an SAE in the {fmt} format, not {format}. Pass --format {fmt} "
                             "(or leave the format out to detect it).")
        fmt = format
    if fmt == "saelab":
        raise UsageError(f"{path} is a saelab SAE directory; load it with load_sae, not as a foreign format.")
    fo = READERS[fmt](where)
    if hook is not None:
        fo.hook, fo.hook_note = hook, None
    return build_sae(fo, fmt, where, device)


__all__ = ["FORMATS", "READERS", "detect_format", "load_foreign", "resolve", "Foreign"]
