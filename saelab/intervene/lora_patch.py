"""Edits at `lora:` hooks, in two passes per forward call of the causal LM.

A `lora:` hook (docs/lora.md) concatenates adapter activations computed at different depths, so it
cannot be spliced in one pass. Before each forward of the causal LM, a capture pass reads x_BSD
(with any edits at ordinary hooks already in place), the edit functions give x'_BSD, and the real
pass runs inside `lora_patch(model, hook, x'_BSD)`. That needs the whole sequence in each call, so
generation under such edits recomputes without a KV cache.
"""
from __future__ import annotations

import contextlib
from typing import Any

from saelab.errors import UsageError
from saelab.models import capture, causal_lm
from saelab.models.lora import lora_patch


def _cache_len(past) -> int:
    if past is None:
        return 0
    return int(past.get_seq_length()) if hasattr(past, "get_seq_length") else len(past)


class TwoPassLora:
    """Edits at `lora:` hooks: before each forward of the causal LM, capture the clean LoRA vectors with
    the same inputs, apply the edit functions, and patch the real forward with `lora_patch`."""

    def __init__(self, model, items: list[tuple[Any, list]]):
        self.model, self.items = model, items
        self.busy, self.stack = False, None

    def install(self, stack: contextlib.ExitStack) -> None:
        lm = causal_lm(self.model)
        handles = [lm.register_forward_pre_hook(self.pre, with_kwargs=True),
                   lm.register_forward_hook(self.post, with_kwargs=True, always_call=True)]
        stack.callback(lambda: [h.remove() for h in handles])
        stack.callback(self.post, None, (), {}, None)

    def pre(self, mod, args, kwargs):
        if self.busy:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        names = ", ".join(hp.name for hp, _ in self.items)
        if ids is None or _cache_len(kwargs.get("past_key_values")) > 0:
            raise UsageError(f"edits at {names} need the whole token sequence in every forward pass (two passes: "
                             "capture, then patch); call the model with input_ids and no KV cache "
                             "(generate(..., use_cache=False)).")
        self.busy = True
        try:
            x = capture(self.model, [hp for hp, _ in self.items], ids, kwargs.get("attention_mask"))
        finally:
            self.busy = False
        self.stack = contextlib.ExitStack()
        for hp, fns in self.items:
            v_BSD = x[hp.name]
            for fn in fns:  # several edits at one hook compose in the order given
                v_BSD = fn(v_BSD)
            self.stack.enter_context(lora_patch(self.model, hp, v_BSD))
        return None

    def post(self, mod, args, kwargs, out):
        if not self.busy and self.stack is not None:
            self.stack.close()
            self.stack = None
        return None
