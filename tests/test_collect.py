"""collect: model + corpus -> store, on tiny random models saved as local Hugging Face directories."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.collect import collect, from_launcher, shard_target
from saelab.errors import UsageError
from saelab.store import load_store
from tests.builders import BOS_ID, PAD_ID, TINY_MODELS, make_text_corpus
from tests.builders import tiny_collect_cfg as cfg_for


def save_tiny(arch: str, path: Path, scale_embed: float = 1.0) -> Path:
    model, tok = TINY_MODELS[arch]()
    if scale_embed != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(scale_embed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def store_digest(path: Path) -> dict[str, str]:
    """sha256 of every chunk file, plus the manifests without their timestamps."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.suffix == ".npy":
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.name == "manifest.json":
            m = json.loads(f.read_text())
            volatile = lambda k: "time" in k or k.startswith("session") or k.endswith("_at")
            m["chunks"] = [{k: v for k, v in c.items() if not volatile(k)} for c in m.get("chunks", [])]
            out[str(f.relative_to(path))] = json.dumps({k: v for k, v in m.items() if not volatile(k)},
                                                       sort_keys=True)
    return out


def test_stored_rows_are_the_models_hidden_states(llama_dir, corpus_dir, tmp_path):
    # layer 0: hidden_states[1] is its output (the last entry of hidden_states is after the final norm)
    res = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", layer=[0]), quiet=True)
    store = load_store(tmp_path / "s")
    assert store.hooks == ["model.layers.0"] and store.width("model.layers.0") == 64
    assert store.num_tokens == res.tokens > 0
    assert len(store.chunks) >= 2  # chunk_tokens 60 forces several chunks

    from saelab.corpus import pack_sequences, resolve_corpus
    from saelab.models import load_model

    loaded = load_model(str(llama_dir))
    seqs = list(pack_sequences(resolve_corpus(str(corpus_dir)).documents(0), loaded.tokenizer, 16,  # seed 0: the default
                               bos_id=BOS_ID, eos_id=2, pad_id=PAD_ID))
    ids = torch.tensor(np.stack([s.input_ids for s in seqs]))
    mask = torch.tensor(np.stack([s.attention_mask for s in seqs]))
    with torch.no_grad():
        hs = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    rows = 0
    for c in store.chunks:
        sp = store.read_seqpos(c)
        tok = store.read_tokens(c)
        act = torch.from_numpy(np.asarray(store.read_activations(c, "model.layers.0"), dtype=np.float32))
        assert (tok != BOS_ID).all() and (tok != PAD_ID).all(), "BOS and padding must be left out"
        np.testing.assert_array_equal(tok, ids[sp[:, 0], sp[:, 1]].numpy())  # context is rebuildable
        torch.testing.assert_close(act, hs[sp[:, 0], sp[:, 1]].float(), atol=2e-3, rtol=2e-3)
        rows += len(tok)
    assert rows == int((ids != BOS_ID).logical_and(mask.bool()).sum())  # the corpus ran out: all of it


def test_no_stored_row_sits_at_position_0_and_every_window_opens_with_bos(llama_dir, corpus_dir, tmp_path):
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=400), quiet=True)
    store = load_store(tmp_path / "s")
    assert store.meta["packing"] == "bos-every-window"
    assert store.meta["corpus"]["shuffle_documents"] is True and store.meta["corpus"]["document_seed"] == 0
    pos = np.concatenate([store.read_seqpos(c)[:, 1] for c in store.chunks])
    assert pos.min() == 1  # position 0 is BOS in every window, and BOS is never stored
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "k", tokens=400, keep_special=True), quiet=True)
    kept = load_store(tmp_path / "k")
    first = [kept.read_tokens(c)[kept.read_seqpos(c)[:, 1] == 0] for c in kept.chunks]
    assert (np.concatenate(first) == BOS_ID).all() and sum(map(len, first)) > 1


def test_a_store_of_the_old_packing_rule_is_read_but_not_appended_to(llama_dir, corpus_dir, tmp_path, caplog):
    cfg = cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=100)
    collect(cfg, quiet=True)
    sj = tmp_path / "s" / "store.json"
    meta = json.loads(sj.read_text())
    del meta["packing"]  # as written by a saelab before windows started with BOS
    sj.write_text(json.dumps(meta))
    before = store_digest(tmp_path / "s")
    with pytest.raises(UsageError, match="old packing rule.*not appended to.*new --out"):
        collect(dataclasses.replace(cfg, tokens=300), quiet=True)
    assert store_digest(tmp_path / "s") == before  # nothing written, nothing removed
    with caplog.at_level("WARNING"):
        assert load_store(tmp_path / "s").num_tokens > 0
    assert "old rule" in caplog.text


def test_token_target_and_keep_special(llama_dir, corpus_dir, tmp_path):
    res = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "a", tokens=50), quiet=True)
    assert 50 <= res.tokens < 50 + 2 * 16  # stops after the batch that reaches the target
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "b", tokens=50, keep_special=True), quiet=True)
    toks = np.concatenate([load_store(tmp_path / "b").read_tokens(c) for c in load_store(tmp_path / "b").chunks])
    assert (toks == BOS_ID).any()


def test_rerun_with_other_settings_is_refused(llama_dir, corpus_dir, tmp_path):
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=40), quiet=True)
    before = store_digest(tmp_path / "s")
    with pytest.raises(UsageError, match=r"max_length.*16.*32|max_length.*32.*16"):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=40, max_length=32), quiet=True)
    with pytest.raises(UsageError, match="hook"):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=40, layer=[0]), quiet=True)
    assert store_digest(tmp_path / "s") == before, "a refused run must not touch the store"


def test_shards_split_the_corpus_disjointly(llama_dir, corpus_dir, tmp_path):
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "one"), quiet=True)
    for s in range(2):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "two", shard=s, num_shards=2), quiet=True)
    one, two = load_store(tmp_path / "one"), load_store(tmp_path / "two")
    keys = lambda st, shard=None: {tuple(r) for c in st.chunks if shard is None or c.shard == shard
                                   for r in st.read_seqpos(c).tolist()}
    k0, k1 = keys(two, 0), keys(two, 1)
    assert k0 and k1 and not (k0 & k1)
    assert k0 | k1 == keys(one)
    assert {s for s, _ in k0} == {s for s, _ in k0 if s % 2 == 0}
    assert shard_target(10, 0, 3) + shard_target(10, 1, 3) + shard_target(10, 2, 3) == 10


def test_several_hooks_from_one_pass(llama_dir, corpus_dir, tmp_path):
    hooks = ["model.layers.0.mlp", "model.layers.0.self_attn.o_proj:input", "model.layers.1"]
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", layer=[], hook=hooks, tokens=40), quiet=True)
    store = load_store(tmp_path / "s")
    assert sorted(store.hooks) == sorted(hooks)
    assert all(store.width(h) == 64 for h in hooks)


@pytest.mark.parametrize("arch", ["gemma2", "deepseek_v3"])
def test_other_architectures(arch, corpus_dir, tmp_path):
    d = save_tiny(arch, tmp_path / arch)
    hooks = ["model.layers.1", "model.layers.1.mlp"]
    collect(cfg_for(d, corpus_dir, tmp_path / "s", layer=[], hook=hooks, tokens=40), quiet=True)
    store = load_store(tmp_path / "s")
    acts = store.read_activations(store.chunks[0], "model.layers.1.mlp")
    assert acts.shape[1] == 64 and np.isfinite(acts).all() and np.abs(acts).sum() > 0
    assert store.meta["model"]["architecture"].lower().startswith(arch.split("_")[0])


def test_fp16_overflow_is_clamped_and_counted(corpus_dir, tmp_path):
    d = save_tiny("llama", tmp_path / "big", scale_embed=1e7)
    res = collect(cfg_for(d, corpus_dir, tmp_path / "s", layer=[], hook=["model.embed_tokens"], tokens=40),
                  quiet=True)
    assert res.overflow > 0
    store = load_store(tmp_path / "s")
    a = np.asarray(store.read_activations(store.chunks[0], "model.embed_tokens"), dtype=np.float32)
    assert np.isfinite(a).all() and np.abs(a).max() == np.float32(np.finfo(np.float16).max)


def _cli(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, SAELAB_TORCH_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "saelab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _collect_args(model_dir, corpus, out, *extra):
    return ["collect", "--model", str(model_dir), "--layer", "1", "--corpus", str(corpus), "--out", str(out),
            "--tokens", "100k", "--chunk-tokens", "64", "--max-length", "16", "--batch-size", "2", "--quiet", *extra]


def test_resume_after_sigkill_is_byte_identical(llama_dir, tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=150, seed=1)
    full = _cli(*_collect_args(llama_dir, corpus, tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()

    victim = _cli(*_collect_args(llama_dir, corpus, tmp_path / "killed"))
    manifest = tmp_path / "killed" / "shard_00000" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text() or "{}").get("chunks", [])) >= 2:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed; make the corpus larger"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    partial = json.loads(manifest.read_text())
    assert not partial.get("done") and len(partial["chunks"]) < len(
        json.loads((tmp_path / "full/shard_00000/manifest.json").read_text())["chunks"])

    resumed = _cli(*_collect_args(llama_dir, corpus, tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert not list((tmp_path / "killed").rglob("*.tmp"))
    a, b = store_digest(tmp_path / "full"), store_digest(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert a == b


def test_parallel_writers_match_sequential_shards(llama_dir, corpus_dir, tmp_path):
    for s in range(2):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "seq", shard=s, num_shards=2), quiet=True)
    p = _cli(*_collect_args(llama_dir, corpus_dir, tmp_path / "par", "--parallel", "2", "--chunk-tokens", "60",
                            "--tokens", "10000"))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert store_digest(tmp_path / "seq") == store_digest(tmp_path / "par")


def test_cli_usage_errors_exit_2_without_traceback(llama_dir, corpus_dir, tmp_path):
    p = _cli("collect", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", str(tmp_path / "s"),
             "--shard", "3", "--num-shards", "2")
    assert p.wait(timeout=120) == 2
    err = p.stderr.read()
    assert "--shard 3" in err and "Traceback" not in err
    p = _cli("collect", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", str(tmp_path / "s"),
             "--hook", "model.layers.9")
    assert p.wait(timeout=120) == 2
    err = p.stderr.read()
    assert "model.layers.9" in err and "saelab hooks" in err and "Traceback" not in err


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=6, seed=2, words=(200, 300))
    p = _cli("collect", "--layer", "15", "--corpus", str(corpus), "--out", str(tmp_path / "s"),
             "--tokens", "600", "--max-length", "128", "--batch-size", "4", "--verify", "--quiet")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    store = load_store(tmp_path / "s")
    assert store.width("model.layers.15") == 576 and store.num_tokens >= 600
    assert store.meta["model"]["num_layers"] == 30 and len(store.meta["model"]["sha256"]) == 64


def test_torchrun_ranks_write_the_hand_sharded_store(llama_dir, corpus_dir, tmp_path):
    """torchrun --nproc-per-node 2 (2 CPU processes): shard = RANK, num_shards = WORLD_SIZE; every chunk
    file equals, byte for byte, those of two hand-started --shard 0/1 --num-shards 2 writers."""
    for s in range(2):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "hand", shard=s, num_shards=2), quiet=True)
    env = dict(os.environ, SAELAB_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "saelab", *_collect_args(llama_dir, corpus_dir, tmp_path / "torchrun", "--chunk-tokens",
                                                       "60", "--tokens", "10000", "--verify")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    hand, ran = store_digest(tmp_path / "hand"), store_digest(tmp_path / "torchrun")
    assert sum(k.endswith(".npy") for k in hand) >= 4 and any("shard_00001" in k for k in hand)
    assert hand == ran
    npy = sorted((tmp_path / "hand").rglob("*.npy"))
    assert [hashlib.sha256(f.read_bytes()).digest() for f in npy] == [
        hashlib.sha256((tmp_path / "torchrun" / f.relative_to(tmp_path / "hand")).read_bytes()).digest() for f in npy]


def test_launcher_environment_sets_shard_and_device(llama_dir, corpus_dir, tmp_path):
    cfg = cfg_for(llama_dir, corpus_dir, tmp_path / "s", device="cuda")
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    got = from_launcher(cfg, env)
    assert (got.shard, got.num_shards, got.lm.device) == (5, 8, "cuda:1")
    assert from_launcher(cfg, {}) is cfg  # not launched: flags as given
    with pytest.raises(UsageError, match="contradict torchrun's RANK 5"):
        from_launcher(dataclasses.replace(cfg, shard=1, num_shards=2), env)
    with pytest.raises(UsageError, match="--nproc-per-node 1"):
        from_launcher(cfg_for(llama_dir, corpus_dir, tmp_path / "s", device="auto"), env)
    one_per_node = from_launcher(cfg_for(llama_dir, corpus_dir, tmp_path / "s", device="auto"),
                                 dict(env, LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"))
    assert (one_per_node.shard, one_per_node.lm.device) == (5, "auto")
