"""Hook points: the shared names that hooks, LoRA hooks and model loading all use.

A hook name is a module path relative to the causal LM plus `:input` / `:output` (default),
e.g. `model.layers.15`, `model.layers.15.self_attn.o_proj:input`. `causal_lm` unwraps a peft model
(names are relative to the causal LM inside), `layers_of` finds the decoder layer list.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from saelab.errors import UsageError

_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """A place in the model where activations are read or replaced."""

    name: str
    """Canonical name: module path, plus `:input` when reading the module's input."""
    module_name: str
    """Module path relative to the causal LM (`model.layers.15.mlp`)."""
    io: Literal["input", "output"]
    """Read the module's first positional input or its output (`[0]` of a tuple output)."""
    module: nn.Module = dataclasses.field(repr=False, compare=False)
    """The module itself."""


def layer_hook(i: int) -> str:
    """Hook name of the residual stream after decoder layer `i`."""
    return f"model.layers.{int(i)}"


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper (names are relative to it), else the model itself."""
    if type(model).__name__.startswith("Peft") and hasattr(model, "base_model"):
        return model.base_model.model
    return model


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list (`model.layers` for Llama, Gemma2, DeepseekV3 and most causal LMs)."""
    lm = causal_lm(model)
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for name, mod in lm.named_modules():  # other layouts: the first list named *.layers / *.h
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return mod
    raise UsageError(f"could not find the decoder layers of {type(lm).__name__}: saelab knows models "
                     "whose layers live at `model.layers` (Llama, Gemma2, DeepseekV3, ...).")


def split_name(name: str) -> tuple[str, str]:
    """(module path, "input" | "output") of a hook name; a peft `base_model.model.` prefix is dropped."""
    module_name, _, io = name.strip().partition(":")
    if module_name.startswith(_PEFT_PREFIX):
        module_name = module_name[len(_PEFT_PREFIX):]
    return module_name, io or "output"
