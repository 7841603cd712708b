"""LoRA adapter SAEs: the lora: hook and its slice map, adapter checks, fine-tuning, decoder heatmaps.

Tiny random Llama models saved as local directories, adapters built here with peft.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.collect import CollectConfig, collect
from saelab.errors import UsageError
from saelab.finetune import FinetuneConfig, finetune
from saelab.interpret.adapters import adapter_heatmap, adapter_heatmap_reference, lora_panels, store_slices
from saelab.models import capture, load_model, resolve_hooks
from saelab.models.lora import LORA_TYPES, lora_patch, resolve_lora_hook
from saelab.store import load_store
from tests.builders import make_adapter, make_text_corpus, random_ids, save_tiny_llama, tiny_llama

ALL = "lora:gate,up,down,q,k,v,o"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_text_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12, seed=0)


def _collect(tmp_path, base_dir, corpus_dir, adapter, hooks, tokens=240):
    cfg = CollectConfig(out=str(tmp_path / "store"), model=str(base_dir), adapter=str(adapter), hook=hooks,
                        corpus=str(corpus_dir), tokens=tokens, chunk_tokens=128, max_length=32, batch_size=4)
    collect(cfg, quiet=True)
    return load_store(tmp_path / "store")


def _all_rows(store, hook):
    return np.concatenate([np.asarray(store.read_activations(c, hook), dtype=np.float32) for c in store.chunks])


def test_slices_map_right_single_adapter_nonzero(tmp_path, base_dir, corpus_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", rank=2, only=(1, "v"))
    store = _collect(tmp_path, base_dir, corpus_dir, adapter, [ALL])
    hook = store.meta["hooks"][0]
    assert hook["name"] == ALL and hook["width"] == 2 * 7 * 2  # layers x types x rank
    slices = store.meta["slices"][ALL]
    # layer-major, then gate,up,down,q,k,v,o; contiguous ranges of width = rank
    assert [(s["layer"], s["type"]) for s in slices] == [(l, t) for l in range(2) for t in LORA_TYPES]
    assert [s["start"] for s in slices] == list(range(0, 28, 2))
    assert all(s["stop"] - s["start"] == s["rank"] == 2 for s in slices)
    assert slices[7 + 5]["module"] == "model.layers.1.self_attn.v_proj"
    x = _all_rows(store, hook["name"])
    nonzero = set(np.nonzero(np.abs(x).max(0) > 0)[0].tolist())
    target = next(s for s in slices if (s["layer"], s["type"]) == (1, "v"))
    assert nonzero == set(range(target["start"], target["stop"]))


def test_lora_hook_alongside_ordinary_hook_equals_input_times_A(tmp_path, base_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", targets=("q", "gate"), rank=3)
    lm = load_model(str(base_dir), adapter=str(adapter), quiet=True)
    hps = resolve_hooks(lm.model, ["lora:q,gate", "model.layers.1.self_attn.q_proj:input", "model.layers.0"])
    assert hps[0].name == "lora:gate,q"  # canonical order, whatever order was typed
    ids = random_ids(2, 12)
    acts = capture(lm.model, hps, ids)  # one pass
    x_BSD = acts["lora:gate,q"]
    assert x_BSD.shape == (2, 12, 2 * 2 * 3)
    sl = next(s for s in hps[0].slices if (s.layer, s.type) == (1, "q"))
    A = dict(lm.model.named_parameters())["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
    expect = acts["model.layers.1.self_attn.q_proj:input"] @ A.T
    torch.testing.assert_close(x_BSD[..., sl.start:sl.stop], expect, rtol=1e-5, atol=1e-5)


def test_rank_pattern_gives_per_adapter_ranks(tmp_path, base_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", targets=("up", "o"), rank=2, rank_pattern={"o_proj": 4})
    lm = load_model(str(base_dir), adapter=str(adapter), quiet=True)
    hp = resolve_lora_hook(lm.model, "lora:up,o")
    assert [(s.layer, s.type, s.rank) for s in hp.slices] == [(0, "up", 2), (0, "o", 4), (1, "up", 2), (1, "o", 4)]
    assert hp.width == 12 and capture(lm.model, [hp], random_ids(1, 5))[hp.name].shape == (1, 5, 12)


def test_default_store_name_carries_initials():
    assert CollectConfig(hook=["lora:q,k,v,o,gate,up,down"]).out == "data/lora_gudqkvo"
    assert CollectConfig(hook=["model.layers.3", "lora:v,q"]).out == "data/lora_qv"
    assert CollectConfig(hook=["model.layers.3"]).out == "data/run"
    assert CollectConfig(out="x", hook=[ALL]).out == "x"
    # --hook lora:v,q,model.layers.1 arrives split on commas
    assert CollectConfig(hook=["lora:v", "q", "model.layers.1"]).hook == ["lora:v,q", "model.layers.1"]


def test_adapter_base_mismatch_names_shapes(tmp_path, base_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", targets=("q",), rank=2)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama-64"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    narrow = save_tiny_llama(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(UsageError) as e:
        load_model(str(narrow), adapter=str(adapter), quiet=True)
    msg = str(e.value)
    assert "tiny-llama-64" in msg and "[2, 64]" in msg and "in_features 32" in msg and "hidden size 32" in msg


def test_merged_adapter_has_nothing_to_hook(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = make_adapter(base_dir, tmp_path / "ad", targets=("q",))
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tiny_llama()[1].save_pretrained(tmp_path / "merged")
    with pytest.raises(UsageError, match="full model directory"):
        load_model(str(base_dir), adapter=str(tmp_path / "merged"), quiet=True)
    lm = load_model(str(tmp_path / "merged"), quiet=True)  # the merged model itself, no adapter
    with pytest.raises(UsageError, match="no LoRA modules.*merged"):
        resolve_hooks(lm.model, ["lora:q"])


def test_missing_and_unknown_types_are_named(tmp_path, base_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", targets=("q", "v"))
    lm = load_model(str(base_dir), adapter=str(adapter), quiet=True)
    with pytest.raises(UsageError, match=r"no gate modules; it adapts q,v"):
        resolve_hooks(lm.model, ["lora:gate,q"])
    with pytest.raises(UsageError, match=r"unknown adapter type\(s\) 'mlp'"):
        resolve_hooks(lm.model, ["lora:q,mlp"])
    with pytest.raises(UsageError, match="cannot be replaced in one pass"):
        from saelab.models import splice
        with splice(lm.model, "lora:q", lambda x: x):
            pass


def test_lora_patch_zero_equals_adapter_disabled(tmp_path, base_dir):
    adapter = make_adapter(base_dir, tmp_path / "ad", rank=2)
    lm = load_model(str(base_dir), adapter=str(adapter), quiet=True)
    ids = random_ids(2, 10)
    hp = resolve_lora_hook(lm.model, ALL)
    with torch.no_grad():
        with_adapter = lm.model(input_ids=ids).logits
        with lm.model.disable_adapter():
            base = lm.model(input_ids=ids).logits
        with lora_patch(lm.model, hp, torch.zeros(2, 10, hp.width)):
            patched = lm.model(input_ids=ids).logits
        x = capture(lm.model, [hp], ids)[hp.name]
        with lora_patch(lm.model, hp, x):
            same = lm.model(input_ids=ids).logits
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(patched, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same, with_adapter, rtol=1e-5, atol=1e-5)


def test_finetune_lowers_loss_and_saves_peft_adapter(tmp_path, base_dir, corpus_dir):
    cfg = FinetuneConfig(out=str(tmp_path / "adapter"), model=str(base_dir), corpus=str(corpus_dir), rank=2,
                         targets=["v", "q", "up"], steps=25, lr=2e-2, batch_size=4, max_length=32, eval_sequences=4)
    res = finetune(cfg, quiet=True)
    assert res.eval_loss_after < res.eval_loss_before - 0.05
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    out = Path(res.out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "training.json", "loss.png"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "training.json").read_text())
    assert len(rec["losses"]) == 25 and rec["config"]["targets"] == ["up", "q", "v"]
    lm = load_model(str(base_dir), adapter=str(out), quiet=True)
    hp = resolve_lora_hook(lm.model, "lora:up,q,v")
    assert hp.width == 2 * 3 * 2
    with pytest.raises(UsageError, match="already exists"):
        finetune(cfg, quiet=True)


def test_heatmap_fast_equals_reference_and_finds_planted_cell():
    from saelab.models.lora import LoraSlice

    sl, start = [], 0
    for layer in range(3):
        for t, r in (("gate", 2), ("q", 1), ("o", 3)):
            if (layer, t) == (2, "q"):
                continue  # an absent adapter stays NaN
            sl.append(LoraSlice(layer, t, f"model.layers.{layer}.x", r, start, start + r))
            start += r
    W = torch.randn(5, start)
    fast, ref = adapter_heatmap(W, sl), adapter_heatmap_reference(W, sl)
    torch.testing.assert_close(fast.values_FLT, ref.values_FLT, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert fast.layers == [0, 1, 2] and fast.types == ["gate", "q", "o"]
    assert torch.isnan(fast.values_FLT[:, 2, 1]).all()
    planted = next(s for s in sl if (s.layer, s.type) == (1, "o"))
    W2 = torch.zeros(1, start)
    W2[0, planted.start:planted.stop] = torch.tensor([3.0, 0.0, 4.0])
    H = adapter_heatmap(W2, [s.to_json() for s in sl]).values_FLT[0]
    assert H[1, 2] == 5.0 and torch.nansum(H) == 5.0
    panels = lora_panels(W2.expand(4, -1), sl, [3])
    p = panels[3][0].to_json()
    assert p["rows"] == ["L0", "L1", "L2"] and p["cols"] == ["gate", "q", "o"] and p["values"][1][2] == 5.0
    assert p["values"][2][1] is None
    assert store_slices({"slices": {"lora:gate,q,o": [s.to_json() for s in sl]}}, "lora:gate,q,o") == sl
    assert store_slices({}, "model.layers.3") is None
    with pytest.raises(UsageError, match="width"):
        adapter_heatmap(torch.zeros(2, start + 1), sl)


@pytest.mark.slow
def test_embedded_model_rank1_all_seven_is_210_wide(tmp_path):
    from peft import LoraConfig, get_peft_model

    lm = load_model("default", quiet=True)
    pm = get_peft_model(lm.model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=[LORA_TYPES[t].split(".")[-1] for t in LORA_TYPES]))
    pm.save_pretrained(tmp_path / "ad")
    lm = load_model("default", adapter=str(tmp_path / "ad"), quiet=True)
    hp = resolve_lora_hook(lm.model, ALL)
    assert hp.width == 210 and len(hp.slices) == 210
    assert (hp.slices[-1].layer, hp.slices[-1].type) == (29, "o")
    x = capture(lm.model, [hp], torch.tensor([[1, 504, 3456, 28, 7]]))[hp.name]
    assert x.shape == (1, 5, 210) and torch.isfinite(x).all()


def test_cli_lora_finetune_reports_bad_settings(capsys):
    from saelab.cli import main

    assert main(["lora-finetune", "--targets", "q,mlp", "--rank", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--rank must be at least 1" in err and "--targets q,mlp" in err
    with pytest.raises(SystemExit) as e:
        main(["lora-finetune", "--help"])
    assert e.value.code == 0
