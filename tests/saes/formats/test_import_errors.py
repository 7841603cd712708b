"""Format detection, load_sae on any directory, hook-name tables, and the clear errors for bad input."""
import numpy as np
import pytest
import torch

from saelab.cli import main
from saelab.errors import UsageError
from saelab.models import resolve_hooks, splice
from saelab.saes import REGISTRY, load_sae, make_sae, read_cfg
from saelab.saes.formats import detect_format, load_foreign
from saelab.saes.formats.hooks import (
    from_base_model_path, from_transformer_lens, postnorm_family, to_transformer_lens,
)
from tests.builders import random_ids, save_tiny_llama, tiny_llama


def _npz(path, d=8, f=24):
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, W_enc=rng.normal(size=(d, f)).astype(np.float32), W_dec=rng.normal(size=(f, d)).astype(np.float32),
             b_enc=np.zeros(f, np.float32), b_dec=np.zeros(d, np.float32))


def _saelab(path):
    make_sae(REGISTRY["topk"][1](d_in=8, d_sae=24, k=3)).save(path, metadata={"hook": "model.layers.0"})


def test_load_sae_reads_saelab_and_foreign_directories(tmp_path):
    _saelab(tmp_path / "ours")
    _npz(tmp_path / "theirs" / "params.npz")
    assert detect_format(tmp_path / "ours") == "saelab" and detect_format(tmp_path / "theirs") == "npz"
    assert load_sae(tmp_path / "ours").metadata["hook"] == "model.layers.0"
    theirs = load_sae(tmp_path / "theirs")
    assert theirs.cfg.architecture == "relu" and theirs.metadata["imported"]["format"] == "npz"
    _saelab(tmp_path / "run" / "sae_best")  # a run directory with one SAE resolves to it
    assert load_sae(tmp_path / "run").cfg.architecture == "topk"
    assert read_cfg(tmp_path / "theirs")[0].architecture == "relu" and read_cfg(tmp_path / "ours")[0].k == 3


def test_directories_without_an_sae(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="holds no SAE.*Expected one of: saelab"):
        load_sae(".")
    with pytest.raises(UsageError, match="holds no SAE"):
        read_cfg(".")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="holds no SAE"):
        load_sae(tmp_path)
    with pytest.raises(UsageError, match="is a file saelab cannot read as an SAE"):
        load_sae(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="cfg.json is missing"):
        load_sae(tmp_path / "nope")
    _saelab(tmp_path / "broken")
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    with pytest.raises(UsageError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path / "broken")
    _saelab(tmp_path / "a" / "final")
    _saelab(tmp_path / "a" / "sae_best")
    with pytest.raises(UsageError, match=r"holds 2 SAEs: final \(saelab\), sae_best \(saelab\)\. Pass one of them"):
        load_sae(tmp_path / "a")


def test_unknown_format_and_wrong_format(tmp_path, capsys):
    _npz(tmp_path / "x" / "params.npz")
    with pytest.raises(UsageError, match="unknown SAE format 'gguf'; saelab imports saelens, sparsify"):
        load_foreign(tmp_path / "x", format="gguf")
    with pytest.raises(UsageError, match="in the npz format, not sparsify"):
        load_foreign(tmp_path / "x", format="sparsify")
    _saelab(tmp_path / "ours")
    with pytest.raises(UsageError, match="is a saelab SAE directory; load it with load_sae"):
        load_foreign(tmp_path / "ours")
    with pytest.raises(SystemExit) as e:  # argparse refuses it before saelab runs
        main(["import", "--format", "gguf", str(tmp_path / "x"), str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("tl, llama, gemma2", [
    ("blocks.12.hook_resid_post", "model.layers.12", "model.layers.12"),
    ("blocks.0.hook_resid_pre", "model.layers.0:input", "model.layers.0:input"),
    ("blocks.3.hook_mlp_out", "model.layers.3.mlp", "model.layers.3.post_feedforward_layernorm"),
    ("blocks.3.hook_attn_out", "model.layers.3.self_attn", "model.layers.3.post_attention_layernorm"),
    ("blocks.3.hook_resid_mid", "model.layers.3.post_attention_layernorm:input",
     "model.layers.3.pre_feedforward_layernorm:input"),
    ("blocks.5.attn.hook_z", "model.layers.5.self_attn.o_proj:input", "model.layers.5.self_attn.o_proj:input"),
    ("blocks.5.mlp.hook_post", "model.layers.5.mlp.down_proj:input", "model.layers.5.mlp.down_proj:input"),
])
def test_transformer_lens_hook_names_both_ways(tl, llama, gemma2):
    assert from_transformer_lens(tl, "meta-llama/Llama-3.1-8B")[0] == llama
    assert from_transformer_lens(tl, "google/gemma-2-2b")[0] == gemma2
    assert to_transformer_lens(llama, "LlamaForCausalLM") == tl
    assert to_transformer_lens(gemma2, "Gemma2ForCausalLM") == tl


@pytest.mark.parametrize("model, postnorm", [("google/gemma-2-2b", True), ("Gemma2ForCausalLM", True),
                                             ("google/gemma-3-27b-it", True), ("google/gemma-2b", False),
                                             ("gemma-7b", False), ("meta-llama/Llama-3.1-8B", False), (None, False)])
def test_post_norm_family(model, postnorm):
    assert postnorm_family(model) is postnorm


def test_unmapped_hook_names_say_so():
    hook, note = from_transformer_lens("blocks.4.attn.hook_q", "gpt2")
    assert hook is None and "--hook NAME" in note
    assert from_transformer_lens("model.layers.2.mlp")[0] == "model.layers.2.mlp"  # already saelab's
    assert to_transformer_lens("lora:gate,up") is None
    assert from_base_model_path("layers.7.mlp") == "model.layers.7.mlp"


def test_imported_sae_splices_into_a_real_model_at_its_mapped_hook(tmp_path):
    """Gemma Scope-style archive of x = ReLU(x) - ReLU(-x): spliced at the hook read from its path, the
    tiny Llama's logits are unchanged; with the decoder zeroed they change."""
    model, _ = tiny_llama()
    d = model.config.hidden_size
    eye = np.eye(d, dtype=np.float32)
    site = tmp_path / "gemma-scope-tiny-pt-res" / "layer_0"
    site.mkdir(parents=True)
    np.savez(site / "params.npz", W_enc=np.concatenate([eye, -eye], 1), W_dec=np.concatenate([eye, -eye], 0),
             b_enc=np.zeros(2 * d, np.float32), b_dec=np.zeros(d, np.float32))
    sae = load_sae(site)
    assert sae.metadata["hook"] == "model.layers.0"
    hp = resolve_hooks(model, [sae.metadata["hook"]])[0]
    ids = random_ids(2, 8)
    with torch.no_grad():
        clean = model(ids).logits
        with splice(model, hp, lambda x: sae(x.reshape(-1, d))[0].reshape(x.shape)):
            spliced = model(ids).logits
        sae.W_dec_FD.zero_()
        with splice(model, hp, lambda x: sae(x.reshape(-1, d))[0].reshape(x.shape)):
            ablated = model(ids).logits
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)
    assert (ablated - clean).abs().max() > 1e-2


def test_import_with_model_checks_hook_and_width_and_records_the_model(tmp_path, capsys):
    llama = str(save_tiny_llama(tmp_path / "llama"))
    d = 64  # tiny_llama's hidden size
    _npz(tmp_path / "s64" / "params.npz", d=d, f=2 * d)
    _npz(tmp_path / "s8" / "params.npz", d=8, f=16)
    assert main(["import", str(tmp_path / "s64"), str(tmp_path / "o1"), "--hook", "model.layers.9", "--model", llama]) == 2
    assert "model.layers.9" in capsys.readouterr().err  # names the missing hook and the valid range
    assert main(["import", str(tmp_path / "s8"), str(tmp_path / "o2"), "--hook", "model.layers.1", "--model", llama]) == 2
    assert f"has width {d}, but the SAE has d_in=8" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "s64"), str(tmp_path / "o3"), "--hook", "model.layers.1", "--model", llama]) == 0
    assert "(checked)" in capsys.readouterr().out
    meta = load_sae(tmp_path / "o3").metadata
    assert meta["hook"] == "model.layers.1" and len(meta["model"]["sha256"]) == 64
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
