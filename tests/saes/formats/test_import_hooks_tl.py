"""The TransformerLens -> saelab hook table, checked against TransformerLens itself.

TransformerLens's TransformerBridge wraps a Hugging Face model and exposes TransformerLens's hook
names; the activation at each name must equal what saelab captures at the name the table maps it to,
on an identical copy of the model (the bridge rewires the model it wraps).
"""
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from saelab.models import capture, resolve_hooks
from saelab.saes.formats.hooks import from_transformer_lens
from tests.builders import random_ids, tiny_gemma2, tiny_llama

bridge_mod = pytest.importorskip("transformer_lens.model_bridge", reason="needs the interop extra (sae-lens)")

SITES = ["hook_resid_pre", "hook_resid_post", "hook_resid_mid", "hook_attn_out", "hook_mlp_out", "attn.hook_z",
         "mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear"]


@pytest.mark.parametrize("build, name", [(tiny_llama, "meta-llama/Llama-3.2-1B"), (tiny_gemma2, "google/gemma-2-2b")])
def test_every_mapped_hook_reads_what_transformer_lens_reads(tmp_path, build, name):
    wrapped, tok = build()
    ours, _ = build()  # same seed, same weights
    tok.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_mod.TransformerBridge.boot_transformers(
            name, hf_model=wrapped.eval(), tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    ids = random_ids(2, 8)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    for layer in (0, 1):
        for site in SITES:
            tl = f"blocks.{layer}.{site}"
            hook, _ = from_transformer_lens(tl, name)
            hp = resolve_hooks(ours.eval(), [hook])
            got = capture(ours, hp, ids, torch.ones_like(ids), stop_early=False)[hp[0].name]
            ref = cache[tl].reshape(got.shape)  # hook_z: [B, S, heads, d_head] flattened head-major
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{tl} -> {hook}")
