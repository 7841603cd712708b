"""Feature edits inside a running model: `Edit` and the `intervene` context manager.

An `Edit` names the features of one SAE to change and how; `intervene(model, edits)` splices
them into the model (one or more SAEs, several hook points at once) through `models.splice`, the
mechanism `evaluate` uses too. Effects are measured in effects.py; `lora:` hooks are patched in
two passes by lora_patch.py. Leaves out: choosing features (experiments do), parsing edit texts
(the CLI does).

Shapes: B batch, S sequence, D d_in, F d_sae. At a hook, with s the SAE's input scale (1 for a
saved SAE) and x_BSD the activation:

    f        = encode(x)
    f'       = edit(f):  f'[:, scale] = f * c_j;  f'[:, clamp] = v_j;  f'[:, ablate] = 0   (in that order)
    steer_D  = sum_j alpha_j W_dec_FD[j] / s                       (decoder directions, raw units)
    keep_error=True  (default):  x' = x + (decode(f') - decode(f)) + steer_D
                               = decode(f') + (x - decode(f)) + steer_D     the error term is kept
    keep_error=False:            x' = decode(f') + steer_D                   the SAE replaces x

decode(f') - decode(f) = (f' - f)[:, J] W_dec_FD[J] / s over the edited features J only (the fast
path; `edit_delta_reference` decodes both in full). With no feature edit the activation is returned
unchanged (bit for bit), and with steering only the encoder never runs. Positions where `mask_BS`
is False (e.g. BOS, padding) are left alone.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import UsageError, raise_all
from saelab.intervene.lora_patch import TwoPassLora
from saelab.models import causal_lm, resolve_hooks, splice



@dataclass
class Edit:
    """Feature edits of one SAE at one hook point."""

    sae: Any
    """The SAE (`saelab.saes.SAE`); its d_in must equal the hook's width."""
    hook: str | None = None
    """Hook point to splice into; None = the hook recorded in the SAE's metadata.json."""
    ablate: Sequence[int] = ()
    """Features set to 0."""
    clamp: Mapping[int, float] = field(default_factory=dict)
    """Feature -> value it is set to (on every edited position, whether it fired or not)."""
    scale: Mapping[int, float] = field(default_factory=dict)
    """Feature -> factor its activation is multiplied by."""
    steer: Mapping[int, float] = field(default_factory=dict)
    """Feature -> alpha: add alpha * (decoder direction of the feature) to the activation."""

    def feature_ids(self) -> list[int]:
        """Every feature this edit names."""
        return [*map(int, self.ablate), *map(int, self.clamp), *map(int, self.scale), *map(int, self.steer)]

    def hook_name(self) -> str:
        hook = self.hook or (getattr(self.sae, "metadata", None) or {}).get("hook")
        if not hook:
            raise UsageError("this SAE records no hook point in its metadata.json; pass Edit(sae, hook=NAME) "
                             "(CLI: --hook NAME).")
        return hook

    def is_empty(self) -> bool:
        return not (self.ablate or self.clamp or self.scale or self.steer)


def check_edit(edit: Edit, name: str = "SAE") -> list[str]:
    """Problems with an edit's feature ids (out of range, non-integer), one string each."""
    d_sae = int(edit.sae.W_dec_FD.shape[0])
    problems = []
    for kind, ids in (("ablate", edit.ablate), ("clamp", edit.clamp), ("scale", edit.scale), ("steer", edit.steer)):
        bad = [i for i in ids if not (0 <= int(i) < d_sae)]
        if bad:
            problems.append(f"{name}: --{kind} feature(s) {', '.join(map(str, bad))} out of range; the SAE has "
                            f"{d_sae} features (ids 0 .. {d_sae - 1})")
    return problems


def _edited_features(edit: Edit, f_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, f'[:, J] - f[:, J]) for the features J touched by scale / clamp / ablate."""
    J = sorted({*map(int, edit.scale), *map(int, edit.clamp), *map(int, edit.ablate)})
    idx_J = torch.tensor(J, dtype=torch.long, device=f_BF.device)
    f_BJ = f_BF[:, idx_J]
    new_BJ = f_BJ.clone()
    pos = {j: n for n, j in enumerate(J)}
    for j, c in edit.scale.items():
        new_BJ[:, pos[int(j)]] *= float(c)
    for j, v in edit.clamp.items():
        new_BJ[:, pos[int(j)]] = float(v)
    for j in edit.ablate:
        new_BJ[:, pos[int(j)]] = 0.0
    return idx_J, new_BJ - f_BJ


def steer_vector(edit: Edit) -> torch.Tensor | None:
    """steer_D = sum_j alpha_j W_dec_FD[j] / s, or None without steering."""
    if not edit.steer:
        return None
    sae = edit.sae
    idx = torch.tensor([int(j) for j in edit.steer], dtype=torch.long, device=sae.W_dec_FD.device)
    alpha = torch.tensor([float(a) for a in edit.steer.values()], dtype=sae.W_dec_FD.dtype, device=idx.device)
    return (alpha @ sae.W_dec_FD[idx]) / sae.input_scale


def edit_delta(edit: Edit, x_BD: torch.Tensor, f_BF: torch.Tensor | None = None) -> torch.Tensor:
    """decode(f') - decode(f) over the edited features only (float32 [B, D]); fast path."""
    sae = edit.sae
    if f_BF is None:
        f_BF = sae.encode(x_BD)
    idx_J, dF_BJ = _edited_features(edit, f_BF)
    return (dF_BJ @ sae.W_dec_FD[idx_J]) / sae.input_scale


def edit_delta_reference(edit: Edit, x_BD: torch.Tensor) -> torch.Tensor:
    """decode(f') - decode(f) by decoding both in full; the reference for `edit_delta`."""
    sae = edit.sae
    f_BF = sae.encode(x_BD)
    g_BF = f_BF.clone()
    for j, c in edit.scale.items():
        g_BF[:, int(j)] *= float(c)
    for j, v in edit.clamp.items():
        g_BF[:, int(j)] = float(v)
    for j in edit.ablate:
        g_BF[:, int(j)] = 0.0
    return sae.decode(g_BF) - sae.decode(f_BF)


def apply_edit(edit: Edit, x_BD: torch.Tensor, keep_error: bool = True) -> torch.Tensor:
    """x' for rows of raw activations (module docstring); computed in float32, returned in x's dtype."""
    has_feature_edit = bool(edit.ablate or edit.clamp or edit.scale)
    steer_D = steer_vector(edit)
    if keep_error and not has_feature_edit and steer_D is None:
        return x_BD
    x32 = x_BD.float()
    if keep_error:
        out = x32
        if has_feature_edit:
            out = out + edit_delta(edit, x32)
    else:
        f_BF = edit.sae.encode(x32)
        if has_feature_edit:
            idx_J, dF_BJ = _edited_features(edit, f_BF)
            f_BF = f_BF.index_add(1, idx_J, dF_BJ)
        out = edit.sae.decode(f_BF)
    if steer_D is not None:
        out = out + steer_D
    return out.to(x_BD.dtype)


class _Inputs:
    """Remembers the input ids of the current forward pass of the causal LM (for BOS positions)."""

    def __init__(self, model):
        self.ids_BS: torch.Tensor | None = None
        self.bos_id = getattr(getattr(causal_lm(model), "config", None), "bos_token_id", None)
        self.handle = causal_lm(model).register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, mod, args, kwargs):
        self.ids_BS = kwargs.get("input_ids", args[0] if args else None)


def outlier_limit(sae) -> float | None:
    """Norm above which a position counts as a massive activation for this SAE: the outlier ratio
    times the median row norm of the store it was trained on (metadata `norms`), or None."""
    norms = (getattr(sae, "metadata", None) or {}).get("norms") or {}
    if norms.get("median") is None or norms.get("outlier_ratio") is None:
        return None
    return float(norms["outlier_ratio"]) * float(norms["median"])


def _splice_fn(edit: Edit, keep_error: bool, mask_BS: torch.Tensor | None, width: int, inputs: _Inputs,
               limit: float | None, left: dict):
    """x -> x with the edit applied at the positions that are edited: those of mask_BS (when its shape
    fits), never BOS, and not massive activations (||x|| > limit)."""
    def fn(x_BSD: torch.Tensor) -> torch.Tensor:
        if x_BSD.shape[-1] != width:
            raise UsageError(f"the SAE has d_in {width}, but hook {edit.hook_name()!r} has width "
                             f"{x_BSD.shape[-1]}; pass the hook (and model) the SAE was trained on.")
        shape = tuple(x_BSD.shape[:2])
        rows = torch.ones(shape, dtype=torch.bool, device=x_BSD.device)
        if mask_BS is not None and tuple(mask_BS.shape) == shape:
            rows &= mask_BS.to(x_BSD.device).bool()
        ids = inputs.ids_BS
        if inputs.bos_id is not None and ids is not None and tuple(ids.shape) == shape:
            bos = ids.to(x_BSD.device) == inputs.bos_id
            left["bos"] += int((rows & bos).sum())
            rows &= ~bos
        if limit is not None:
            big = x_BSD.float().norm(dim=-1) > limit
            left["outliers"] += int((rows & big).sum())
            rows &= ~big
        out = x_BSD.clone()
        out[rows] = apply_edit(edit, x_BSD[rows], keep_error)
        return out
    return fn


@contextlib.contextmanager
def intervene(model, edits: Edit | Sequence[Edit], keep_error: bool = True,
              mask_BS: torch.Tensor | None = None, keep_outliers: bool = False,
              left: dict | None = None) -> Iterator[list]:
    """Within the block, every forward pass of `model` runs with the edits spliced in.

        with intervene(model, [Edit(sae, ablate=[12, 845], steer={77: 4.0})]):
            logits = model(ids).logits

    Several edits may name different hook points (all applied in one pass) or the same one (applied
    in the order given, each to the previous one's output).

    Args:
        model: the causal LM (`LoadedModel.model`).
        edits: one Edit or a list.
        keep_error: add the SAE's reconstruction error back (only the edits change the model).
        mask_BS: bool [B, S], positions to edit; used when a forward's [B, S] matches it (other
            shapes, e.g. generation steps, edit every position). None = every position.
            BOS positions (the model's bos_token_id) are never edited, like in training, where the
            SAE never saw them.
        keep_outliers: also edit positions whose norm marks them as massive activations (above the
            SAE's training store's outlier ratio x median norm; left alone by default).
        left: a dict that counts the positions left unedited: {"bos": n, "outliers": n} (added to).
    Yields:
        the resolved HookPoints, one per edit.
    Raises:
        UsageError: unknown hook, feature id out of range, SAE width != hook width (on first forward).
    """
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    problems = [p for i, e in enumerate(edits) for p in check_edit(e, f"SAE #{i}")]
    raise_all(problems, "bad feature edits")
    hps = [resolve_hooks(model, [e.hook_name()])[0] for e in edits]
    lora_fns: dict[str, tuple[Any, list]] = {}  # lora hook name -> (hook point, edit fns in order)
    left = left if left is not None else {}
    left.setdefault("bos", 0)
    left.setdefault("outliers", 0)
    inputs = _Inputs(model)
    with contextlib.ExitStack() as stack:
        stack.callback(inputs.handle.remove)
        for e, hp in zip(edits, hps):
            limit = None if keep_outliers or hasattr(hp, "parts") else outlier_limit(e.sae)
            fn = _splice_fn(e, keep_error, mask_BS, int(e.sae.W_dec_FD.shape[1]), inputs, limit, left)
            if hasattr(hp, "parts"):
                lora_fns.setdefault(hp.name, (hp, []))[1].append(fn)
            else:
                stack.enter_context(splice(model, hp, fn))
        if lora_fns:
            TwoPassLora(model, list(lora_fns.values())).install(stack)
        yield hps
