"""A store of planted sparse features, written with the real `ShardWriter`: no model involved.

For `saelab train --quick-test` and tests. Each row is a sparse sum of known unit directions:

    x_n = sum_{j<A} m_nj dirs_FD[i_nj] + 0.01 eps_n,   i_nj ~ U{0..F-1},  m_nj ~ U[0.5, 1.5),  eps ~ N(0, I)
"""
from __future__ import annotations

from pathlib import Path

import torch

from saelab.store.writer import ShardWriter


def make_synthetic_store(root: str | Path, d_in: int = 32, n_tokens: int = 32_768, chunk_tokens: int = 2048,
                         n_features: int | None = None, active: int = 4, num_shards: int = 1,
                         seed: int = 0, hook: str = "model.layers.0") -> Path:
    """A store of planted sparse features (see the module docstring), `n_features` default 4 * d_in.
    For tests and --quick-test; no model involved. Chunks are generated one at a time."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    n_features = n_features or 4 * d_in
    dirs_FD = _directions(g, n_features, d_in)
    meta = {"model": {"spec": "synthetic", "name": "synthetic", "sha256": "0" * 64, "architecture": "none",
                      "num_layers": 1, "d_model": d_in},
            "hooks": [{"name": hook, "width": d_in}], "tokenizer": {"name": "none", "vocab_size": 1},
            "corpus": {"spec": "synthetic", "fingerprint": f"planted-{seed}"}, "max_length": chunk_tokens,
            "keep_special": False, "batch_size": 1, "chunk_tokens": chunk_tokens, "tokens_target": n_tokens}
    n_chunks = max(1, n_tokens // chunk_tokens)
    writers = [ShardWriter.open(root, meta, s, num_shards) for s in range(num_shards)]
    for c in range(n_chunks):
        idx_NA = torch.randint(0, n_features, (chunk_tokens, active), generator=g)
        mag_NA = 0.5 + torch.rand(chunk_tokens, active, generator=g)
        x_ND = (mag_NA[..., None] * dirs_FD[idx_NA]).sum(1) + 0.01 * torch.randn(chunk_tokens, d_in, generator=g)
        seqpos_N2 = torch.stack([torch.full((chunk_tokens,), c, dtype=torch.int32),
                                 torch.arange(chunk_tokens, dtype=torch.int32)], 1)
        w = writers[c % num_shards]
        w.write_chunk(torch.zeros(chunk_tokens, dtype=torch.int32).numpy(), seqpos_N2.numpy(),
                      {hook: x_ND.numpy()}, sequences_done=w.sequences_done + 1, batches_done=w.batches_done + 1)
    for w in writers:
        w.finish()
    return root


def _directions(g: torch.Generator, n_features: int, d_in: int) -> torch.Tensor:
    dirs_FD = torch.randn(n_features, d_in, generator=g)
    return dirs_FD / dirs_FD.norm(dim=-1, keepdim=True)


def planted_directions(d_in: int = 32, n_features: int | None = None, seed: int = 0) -> torch.Tensor:
    """The unit directions dirs_FD that `make_synthetic_store` with the same arguments plants."""
    return _directions(torch.Generator().manual_seed(seed), n_features or 4 * d_in, d_in)
