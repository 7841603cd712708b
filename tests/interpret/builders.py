"""Builders for the interpretation tests: a tokenizer with hostile tokens, an identity SAE, a crafted store.

The identity SAE (ReLU, W_enc = I, b = 0) makes feature j's activation on a row equal to
max(0, x_j) of that row, so every statistic and example has a known answer from the planted store.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HOOK = "model.layers.0"
MODEL_SHA = "0" * 64

# Token texts a model vocabulary really can contain; the ones that would run code set data-pwned.
HOSTILE = [
    "</script><script>document.documentElement.setAttribute('data-pwned','script')</script>",
    "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">",
    "<!--<script>",
    "&amp;",
    "\"double\" 'single'",
    "a\u2028b",
]
WORDS = ["<unk>", " the", " cat", " sat", " on", " mat", "\n", " dog"]
VOCAB = WORDS + HOSTILE


def hostile_tokenizer(directory: Path):
    """A word-level PreTrainedTokenizerFast over VOCAB (id = position), saved to `directory`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>")),
        unk_token="<unk>")
    tok.save_pretrained(directory)
    return tok


def identity_sae(directory: Path, d: int, model_sha: str = MODEL_SHA, hook: str = HOOK) -> Path:
    """A saved ReLU SAE with W_enc = I_d (so f = relu(x)), recording its hook and model."""
    from saelab.saes import ReLUConfig, make_sae

    sae = make_sae(ReLUConfig(d_in=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(d))
        sae.W_dec_FD.copy_(torch.eye(d))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
        sae.input_scale.fill_(1.0)
    sae.save(directory, metadata={"hook": hook, "model": {"sha256": model_sha, "name": "tiny"}})
    return Path(directory)


def write_store(root: Path, seqs: list[list[int]], acts: list[np.ndarray], tokenizer_dir: Path | None = None,
                num_shards: int = 1, seqs_per_chunk: int = 2, model_sha: str = MODEL_SHA) -> Path:
    """A store with the real ShardWriter: sequence i -> shard i % num_shards, row = one token.

    acts[i] is [len(seqs[i]), D] float; seqpos = (i, position).
    """
    from saelab.store import ShardWriter

    d = acts[0].shape[1]
    meta = {"model": {"spec": str(tokenizer_dir or "none"), "name": "tiny", "sha256": model_sha,
                      "architecture": "LlamaForCausalLM", "num_layers": 1, "d_model": d},
            "hooks": [{"name": HOOK, "width": d}],
            "tokenizer": {"name": "hostile", "vocab_size": len(VOCAB), "bos_id": 0, "eos_id": 0, "pad_id": 0},
            "corpus": {"spec": "test", "fingerprint": "x"}, "max_length": 64, "keep_special": True,
            "batch_size": 1, "chunk_tokens": 1, "tokens_target": sum(map(len, seqs))}
    for s in range(num_shards):
        w = ShardWriter.open(root, meta, s, num_shards)
        mine = [i for i in range(len(seqs)) if i % num_shards == s]
        for c in range(0, len(mine), seqs_per_chunk):
            part = mine[c:c + seqs_per_chunk]
            tokens = np.concatenate([np.asarray(seqs[i], np.int32) for i in part])
            seqpos = np.concatenate([np.stack([np.full(len(seqs[i]), i), np.arange(len(seqs[i]))], 1)
                                     for i in part]).astype(np.int32)
            x = np.concatenate([acts[i] for i in part]).astype(np.float32)
            w.write_chunk(tokens, seqpos, {HOOK: x}, sequences_done=c + len(part), batches_done=c + len(part))
        w.finish()
    return Path(root)
