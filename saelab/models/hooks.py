"""Hook points: name a place in a causal LM, read activations there (`capture`), replace them (`splice`).

A hook name is a module path relative to the causal LM plus `:input` / `:output` (the default):
`model.layers.15` (residual stream after decoder layer 15), `model.layers.15.self_attn.o_proj:input`,
LoRA internals `model.layers.3.mlp.down_proj.lora_A.default` (a peft wrapper's `base_model.model.`
prefix is stripped). Tuple outputs (attention modules) give their first element. `lora:TYPES`
(e.g. `lora:gate,up,down,q,k,v,o`) is a composite hook point: every layer's A->B activation of those
adapter types, concatenated per token (see `saelab.models.lora`); `capture` reads it in the same pass.

`capture` runs one forward pass and, with stop_early, raises a private exception as soon as the last
requested hook (in execution order) has fired, so later layers and the LM head never run.

Shapes: B batch, S sequence, D width of a hook point, V vocab.

    h_l = layer_l(h_{l-1})                                   `model.layers.{l}`
    loss_BS[b, t] = -log softmax(logits_BSV[b, t])[input_ids_BS[b, t + 1]],   t = 0 .. S-2
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saelab.errors import UsageError, did_you_mean
from saelab.models.lora import is_lora_spec, resolve_lora_hook
from saelab.models.points import HookPoint, causal_lm, layers_of, split_name

def resolve_hooks(model: nn.Module, names: Sequence[str] | str) -> list[HookPoint]:
    """Turn hook names into HookPoints; every unknown name is reported at once.

    Raises:
        UsageError: naming each bad hook, the model's layer range, the nearest valid name and the
            `saelab hooks` command that lists them all.
    """
    if isinstance(names, str):
        names = [names]
    lm = causal_lm(model)
    modules = {n: m for n, m in lm.named_modules() if n}
    n_layers = len(layers_of(model))
    problems, out = [], []
    for raw in names:
        if is_lora_spec(raw):
            try:
                out.append(resolve_lora_hook(model, raw))
            except UsageError as e:
                problems.append(str(e))
            continue
        module_name, io = split_name(raw)
        if io not in ("input", "output"):
            problems.append(f"hook point {raw!r} has suffix ':{io}'; expected ':input' or ':output'.")
            continue
        if module_name not in modules:
            problems.append(f"hook point {module_name!r} not found in the model ({n_layers} layers: "
                            f"0 .. {n_layers - 1}).{did_you_mean(module_name, modules)}")
            continue
        name = module_name if io == "output" else f"{module_name}:input"
        out.append(HookPoint(name=name, module_name=module_name, io=io, module=modules[module_name]))
    if problems:
        hint = "Run `saelab hooks --model MODEL` to see valid names."
        if len(problems) == 1:
            raise UsageError(f"{problems[0]}\n  {hint}")
        raise UsageError("bad hook points:\n" + "\n".join(f"  - {p}" for p in problems) + f"\n  {hint}")
    seen = set()
    return [h for h in out if not (h.name in seen or seen.add(h.name))]


def _as_hooks(model: nn.Module, hooks) -> list:
    """HookPoints (and LoraHookPoints) for names or already-resolved hook points."""
    if isinstance(hooks, str) or not isinstance(hooks, (list, tuple)):
        hooks = [hooks]
    strs = [h for h in hooks if isinstance(h, str)]
    resolved = iter(resolve_hooks(model, strs)) if strs else iter(())
    return [next(resolved) if isinstance(h, str) else h for h in hooks]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured; caught in capture()."""


def _register(hp: HookPoint, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    """fn(x) -> None (observe) for this hook point's activation x."""
    if hp.io == "input":
        return hp.module.register_forward_pre_hook(
            lambda mod, args, kwargs: fn(_first_input(args, kwargs)), with_kwargs=True)
    return hp.module.register_forward_hook(lambda mod, args, out: fn(_first_output(out)))


def _forward(model: nn.Module, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None):
    device = next(model.parameters()).device
    mask = None if attention_mask_BS is None else attention_mask_BS.to(device)
    return model(input_ids=input_ids_BS.to(device), attention_mask=mask, use_cache=False)


def capture(model: nn.Module, hook_points, input_ids_BS: torch.Tensor,
            attention_mask_BS: torch.Tensor | None = None, stop_early: bool = True) -> dict[str, torch.Tensor]:
    """Run one forward pass and return the activation at every hook point.

    With `stop_early`, the pass is aborted as soon as the last of the requested hooks (in execution
    order) has fired, so later layers and the LM head never run. The result is the same as a full pass.

    Args:
        model: the causal LM (`LoadedModel.model`).
        hook_points: names or HookPoints.
        input_ids_BS: token ids [B, S].
        attention_mask_BS: 1 for real tokens, 0 for padding [B, S]; None = all real.
        stop_early: skip everything after the last requested hook.
    Returns:
        {hook name: tensor [B, S, D]} on the device and in the dtype where the model computed it.
    """
    requested = _as_hooks(model, hook_points)
    # a LoRA hook point is read through its parts (one lora_A module per layer and type)
    hps = list({p.name: p for h in requested for p in getattr(h, "parts", (h,))}.values())
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make(hp: HookPoint):
        def observe(x):
            if hp.name in acts:
                raise UsageError(f"hook point {hp.name!r} runs more than once per forward pass (a module "
                                 "shared or called in a loop); pick a module that runs once.")
            acts[hp.name] = x.detach().clone()
            if stop_early and len(acts) == len(hps):
                raise _StopForward
        return observe

    try:
        for hp in hps:
            handles.append(_register(hp, make(hp)))
        with torch.inference_mode():
            try:
                _forward(model, input_ids_BS, attention_mask_BS)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [hp.name for hp in hps if hp.name not in acts]
    if missing:
        raise UsageError(f"hook points {missing} did not run during the forward pass (modules the "
                         "model holds but does not call). Pick hook points from `saelab hooks`.")
    return {h.name: torch.cat([acts[p.name] for p in h.parts], dim=-1) if hasattr(h, "parts") else acts[h.name]
            for h in requested}


@contextlib.contextmanager
def splice(model: nn.Module, hook_point, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[HookPoint]:
    """Within the block, the activation x at `hook_point` is replaced by fn(x) on every forward.

    fn gets x [B, S, D] and must return a tensor of the same shape. For a tuple output only the
    first element is replaced; for `:input` the first positional (or `hidden_states`) argument.
    """
    (hp,) = _as_hooks(model, [hook_point])
    if hasattr(hp, "parts"):
        raise UsageError(f"hook {hp.name!r} is the concatenation of {len(hp.parts)} LoRA activations computed at "
                         "different depths, so it cannot be replaced in one pass: capture it first, then run "
                         "again inside saelab.models.lora.lora_patch(model, hook, x_hat_BSD).")

    def pre(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
        return args, {**kwargs, key: fn(kwargs[key])}

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        if isinstance(out, list):
            return [fn(out[0]), *out[1:]]
        return fn(out)

    if hp.io == "input":
        handle = hp.module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = hp.module.register_forward_hook(post)
    try:
        yield hp
    finally:
        handle.remove()


def token_losses(model: nn.Module, input_ids_BS: torch.Tensor,
                 attention_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy at each position (active splices apply).

        loss_BS[b, t] = -log softmax(logits_BSV[b, t])[input_ids_BS[b, t + 1]],  t = 0 .. S-2

    Returns:
        loss [B, S-1] float32 on the CPU; 0 where the target token is padding
        (weight means by `attention_mask_BS[:, 1:]`).
    """
    with torch.inference_mode():
        logits_BSV = _forward(model, input_ids_BS, attention_mask_BS).logits
        targets_BS = input_ids_BS[:, 1:].to(logits_BSV.device)
        rows = [F.cross_entropy(logits_BSV[b, :-1].float(), targets_BS[b], reduction="none")
                for b in range(logits_BSV.shape[0])]  # one row at a time bounds the float32 copy
        loss = torch.stack(rows).cpu()
    if attention_mask_BS is not None:
        loss = loss * attention_mask_BS[:, 1:].to(loss.dtype)
    return loss


def list_hook_points(model_or_loaded, seq_len: int = 4) -> list[tuple[str, int]]:
    """Every hook point of a model with its width, in execution order, from one tiny forward pass.

    Includes each module whose output is a [B, S, D] activation (layers, attention, MLP, norms,
    projections, LoRA A->B), and `name:input` for linear layers.
    """
    model = model_or_loaded.model if hasattr(model_or_loaded, "info") else model_or_loaded  # LoadedModel
    lm = causal_lm(model)
    batch = 2  # batch 2 tells per-token activations apart from shared tensors (rotary tables, [1, S, d])
    found: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []

    def make(name: str, mod: nn.Module):
        def hook(m, args, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(mod, nn.Linear):
                x = _first_input(args, {}) if args else None
                if isinstance(x, torch.Tensor) and x.dim() == 3 and tuple(x.shape[:2]) == (batch, seq_len):
                    found.setdefault(f"{name}:input", int(x.shape[-1]))
            y = _first_output(out)
            if isinstance(y, torch.Tensor) and y.dim() == 3 and tuple(y.shape[:2]) == (batch, seq_len):
                found.setdefault(name, int(y.shape[-1]))
        return hook

    for name, mod in lm.named_modules():
        if name and not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            handles.append(mod.register_forward_hook(make(name, mod)))
    try:
        ids = torch.full((batch, seq_len), 5, dtype=torch.long)
        with torch.inference_mode():
            _forward(model, ids, None)
    finally:
        for h in handles:
            h.remove()
    return [(n, w) for n, w in found.items() if calls.get(n.partition(":")[0], 0) == 1]
