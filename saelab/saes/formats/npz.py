"""Read an SAE stored as a NumPy `.npz` archive, as Gemma Scope ships them (`params.npz`).

Gemma Scope's JumpReLU SAEs hold W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae],
b_dec [d_model] and threshold [d_sae], and compute (Lieberum et al. 2024, the release's tutorial)

    pre = x W_enc + b_enc                          (b_dec is not subtracted: folded, see common.py)
    f = ReLU(pre) 1[pre > threshold]
    x_hat = f W_dec + b_dec

Any archive with those names is read the same way: with `threshold` it is a JumpReLU SAE, without
it a ReLU SAE (f = ReLU(pre)). A matrix stored the other way round ([d_sae, d_in] for W_enc) is
transposed, with a note; d_in and d_sae come from b_dec and b_enc. The archive is opened with
allow_pickle=False. It records no hook: Gemma Scope's folder names (`layer_12`, and `res` / `mlp` /
`att` in the release name) are read when the path has them, else pass --hook.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saelab.errors import UsageError
from saelab.saes.formats.common import Foreign, check_shapes

WEIGHTS = "params.npz"


def npz_file(path: Path) -> Path:
    """The archive itself, `DIR/params.npz`, or the single .npz in DIR."""
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    found = sorted(path.glob("*.npz")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise UsageError(f"{path}: expected {WEIGHTS} or a single .npz archive, found "
                     f"{', '.join(f.name for f in found) if found else 'none'}. Pass the archive's path.")


def _hook_from_path(p: Path) -> tuple[str | None, str | None]:
    text = str(p.resolve())
    m = re.search(r"layer_(\d+)", text)
    if m is None:
        return None, "the archive records no hook point and its path names no layer_N; pass --hook NAME"
    L = int(m.group(1))
    if re.search(r"[-_/]res[-_/]|pt-res|it-res", text):
        return f"model.layers.{L}", f"hook read from the path as the residual stream after layer {L}"
    if re.search(r"[-_/]mlp[-_/]|pt-mlp|it-mlp", text):
        return f"model.layers.{L}.post_feedforward_layernorm", f"hook read from the path as the MLP output of layer {L} (Gemma 2)"
    if re.search(r"[-_/]att[-_/]|pt-att|it-att", text):
        return f"model.layers.{L}.self_attn.o_proj:input", f"hook read from the path as the attention heads' output of layer {L}"
    return None, f"the path names layer {L} but not the site (res / mlp / att); pass --hook NAME"


def read_npz(path: Path) -> Foreign:
    """Parse an .npz archive into a Foreign (module docstring).

    Raises:
        UsageError: not a readable archive, missing arrays, shapes that do not fit together.
    """
    f = npz_file(path)
    try:
        with np.load(f, allow_pickle=False) as z:
            w = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UsageError(f"{f} is not a readable .npz archive ({e}).") from None
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in w]
    if missing:
        raise UsageError(f"{f} lacks {', '.join(missing)}; an SAE archive holds W_enc, W_dec, b_enc, b_dec "
                         "(and threshold for JumpReLU).")
    D, Fn = w["b_dec"].numel(), w["b_enc"].numel()
    notes: list[str] = []
    for name, want in (("W_enc", (D, Fn)), ("W_dec", (Fn, D))):
        if tuple(w[name].shape) == want[::-1] and D != Fn:
            w[name] = w[name].T
            notes.append(f"{name} was stored as {list(want[::-1])}; transposed to {list(want)}")
    expected = {"W_enc": (D, Fn), "W_dec": (Fn, D), "b_enc": (Fn,), "b_dec": (D,)}
    if "threshold" in w:
        expected["threshold"] = (Fn,)
    check_shapes(f, w, expected)
    hook, note = _hook_from_path(f)
    return Foreign("jumprelu" if "threshold" in w else "relu", w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"],
                   subtract_b_dec=False, threshold_F=w.get("threshold"), hook=hook, hook_note=note, notes=notes)


__all__ = ["read_npz", "npz_file", "WEIGHTS"]
