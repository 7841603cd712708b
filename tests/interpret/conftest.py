"""Fixtures: a crafted two-shard store with planted activations, its tokenizer and an identity SAE;
the planted-words store of autointerp, opened with its statistics pass."""
from types import SimpleNamespace

import numpy as np
import pytest

from saelab.interpret import check_pair, load_or_compute_stats
from saelab.saes import load_sae
from saelab.store import load_store
from tests.builders import HOSTILE_VOCAB, hostile_tokenizer, planted_words, relu_identity_sae, write_store

D = 4


@pytest.fixture
def crafted(tmp_path):
    """5 sequences of 9 tokens over 2 shards (2 sequences per chunk). Feature 0 fires on every token
    with value 1 + seq + pos/10 (all distinct); feature 1 only on hostile tokens (distinct values); feature 2 never
    (dead); feature 3 is random with half its entries negative."""
    rng = np.random.default_rng(0)
    seqs, acts = [], []
    for i in range(5):
        ids = rng.integers(1, len(HOSTILE_VOCAB), size=9)
        x = np.zeros((9, D), np.float32)
        x[:, 0] = 1 + i + np.arange(9) / 10
        x[:, 1] = np.where(ids >= 8, 1 + (9 * i + np.arange(9)) / 64, -1.0)  # distinct even in fp16
        x[:, 2] = -1.0
        x[:, 3] = rng.normal(size=9)
        seqs.append(ids.tolist())
        acts.append(x)
    tok_dir = tmp_path / "tok"
    tok = hostile_tokenizer(tok_dir)
    store = write_store(tmp_path / "store", seqs, acts, tok_dir, num_shards=2, seqs_per_chunk=2)
    sae = relu_identity_sae(tmp_path / "sae", D)
    # global row order: shard 0 (sequences 0, 2, 4), then shard 1 (1, 3)
    order = [0, 2, 4, 1, 3]
    tokens = np.concatenate([seqs[i] for i in order])
    seqpos = np.concatenate([np.stack([np.full(9, i), np.arange(9)], 1) for i in order])
    f = np.maximum(np.concatenate([acts[i] for i in order]).astype(np.float16).astype(np.float32), 0)
    return SimpleNamespace(store=store, sae=sae, tok=tok, tok_dir=tok_dir, seqs=seqs, acts=acts,
                           tokens=tokens, seqpos=seqpos, f=f, tmp=tmp_path)


@pytest.fixture
def planted(tmp_path):
    """`planted_words` (tests/builders.py) opened: .sae_obj, .store_obj, .hook, .res (statistics pass)."""
    p = planted_words(tmp_path)
    p.sae_obj, p.store_obj = load_sae(p.sae), load_store(p.store)
    p.hook = check_pair(p.sae_obj, p.store_obj)
    p.res = load_or_compute_stats(p.sae_obj, p.store_obj, p.hook, sae_dir=p.sae, cache_dir=tmp_path / "cache")
    return p
