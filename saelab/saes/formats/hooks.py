"""Hook names of other libraries <-> saelab hook names (module paths of the Hugging Face causal LM).

TransformerLens names (used by SAELens), read from TransformerLens's `TransformerBlock.forward`:

    TransformerLens                    saelab (Llama-style)                    saelab (Gemma 2 / 3)
    blocks.L.hook_resid_pre            model.layers.L:input                    same
    blocks.L.hook_resid_post           model.layers.L                          same
    blocks.L.hook_resid_mid            model.layers.L.post_attention_layernorm:input
                                                                               model.layers.L.pre_feedforward_layernorm:input
    blocks.L.hook_attn_out             model.layers.L.self_attn                model.layers.L.post_attention_layernorm
    blocks.L.hook_mlp_out              model.layers.L.mlp                      model.layers.L.post_feedforward_layernorm
    blocks.L.attn.hook_z               model.layers.L.self_attn.o_proj:input   same (heads flattened, head-major)
    blocks.L.mlp.hook_post             model.layers.L.mlp.down_proj:input      same
    blocks.L.mlp.hook_pre              model.layers.L.mlp.gate_proj            same (gated MLPs)
    blocks.L.mlp.hook_pre_linear       model.layers.L.mlp.up_proj              same

Gemma 2 and 3 normalise the attention and MLP outputs before adding them to the residual stream,
and TransformerLens hooks those outputs after the norm. Other names (per-head q/k/v, layer-norm
internals, GPT-2-style models whose blocks live elsewhere) are not mapped: the SAE is imported
without a hook and a note says so.

sparsify and dictionary_learning name modules of the base model (`layers.12`, `layers.12.mlp`), so
saelab's name is `model.` + that path for models whose base model sits at `model` (Llama, Gemma,
Qwen, Mistral, SmolLM). saelab -> TransformerLens (for the SAELens export) inverts the table.
"""
from __future__ import annotations

import re

_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_resid_mid|hook_attn_out|hook_mlp_out|"
                 r"attn\.hook_z|mlp\.hook_post|mlp\.hook_pre|mlp\.hook_pre_linear)$")

_LLAMA = {
    "hook_resid_pre": "model.layers.{L}:input",
    "hook_resid_post": "model.layers.{L}",
    "hook_resid_mid": "model.layers.{L}.post_attention_layernorm:input",
    "hook_attn_out": "model.layers.{L}.self_attn",
    "hook_mlp_out": "model.layers.{L}.mlp",
    "attn.hook_z": "model.layers.{L}.self_attn.o_proj:input",
    "mlp.hook_post": "model.layers.{L}.mlp.down_proj:input",
    "mlp.hook_pre": "model.layers.{L}.mlp.gate_proj",
    "mlp.hook_pre_linear": "model.layers.{L}.mlp.up_proj",
}
_POSTNORM = {**_LLAMA,
             "hook_resid_mid": "model.layers.{L}.pre_feedforward_layernorm:input",
             "hook_attn_out": "model.layers.{L}.post_attention_layernorm",
             "hook_mlp_out": "model.layers.{L}.post_feedforward_layernorm"}


def postnorm_family(model: str | None) -> bool:
    """True for Gemma 2 / 3 models (by name or HF architecture), whose blocks normalise their outputs."""
    return bool(model) and re.search(r"gemma[-_ ]?[23](?!\d*b)", str(model), re.IGNORECASE) is not None  # not gemma-2b


def from_transformer_lens(name: str | None, model: str | None = None) -> tuple[str | None, str | None]:
    """(saelab hook name or None, a note on what was assumed or not mapped, or None)."""
    if not name:
        return None, "the SAE records no hook name"
    if name.startswith("model."):
        return name, None
    m = _TL.match(name)
    if m is None:
        return None, (f"hook {name!r} has no saelab equivalent that saelab knows; pass --hook NAME "
                      "(see `saelab hooks --model M`)")
    table = _POSTNORM if postnorm_family(model) else _LLAMA
    hook = table[m.group(2)].format(L=int(m.group(1)))
    note = None
    if m.group(2) in ("hook_resid_mid", "hook_attn_out", "hook_mlp_out"):
        note = (f"hook {name!r} mapped to {hook!r} assuming a "
                f"{'Gemma 2/3 (post-norm)' if table is _POSTNORM else 'Llama-style'} block; check it with "
                "`saelab hooks --model M`")
    return hook, note


def to_transformer_lens(hook: str | None, model: str | None = None) -> str | None:
    """The TransformerLens name of a saelab hook, or None when the table has no entry for it."""
    if not hook:
        return None
    table = _POSTNORM if postnorm_family(model) else _LLAMA
    for tl, pattern in table.items():
        rx = "^" + re.escape(pattern).replace(re.escape("{L}"), r"(\d+)") + "$"
        m = re.match(rx, hook)
        if m:
            return f"blocks.{int(m.group(1))}.{tl}"
    return None


def from_base_model_path(path: str | None) -> str | None:
    """`layers.12.mlp` (a module path of the base model) -> `model.layers.12.mlp`."""
    if not path:
        return None
    return path if path.startswith("model.") else f"model.{path}"


__all__ = ["from_transformer_lens", "to_transformer_lens", "from_base_model_path", "postnorm_family"]
