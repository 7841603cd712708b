"""Where the training loop's tensors come from: the store, its splits, validation metrics.

Owns opening and checking the store for training (hook choice, --num-shards, --d-in), the train
and validation batch streams, the initialisation sample, validation metrics of an SAE
(`evaluate_sae`, `evaluate_checkpoint`) and a synthetic planted-feature store for `--quick-test`
and tests. The loop itself is in train.py; the reader in store.py / store_batches.py.

Splits (see store.py): chunk c is in val <=> u(seed, c) < val_fraction. Every stream here uses
the run's seed and val_fraction, so the validation chunks are never trained on.

Validation metrics (sums over the first eval_tokens of the val split, saelab.metrics equations):

    val_loss = sum_b B_b * loss_b / sum_b B_b     (loss_b = training_loss with sparsity_scale 1)
    val_mse, val_fvu, val_cosine, val_l0, val_dead_frac, val_dense_frac   from ReconSums/SparsitySums

Synthetic store: x_n = sum_{j<A} m_nj dirs_FD[i_nj] + 0.01 eps,  i_nj ~ U{0..F-1},  m_nj ~ U[0.5, 1.5).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from saelab.errors import UsageError, did_you_mean

log = logging.getLogger(__name__)


def open_store(data: str | None, num_shards: int | None = None):
    """The store at `data`, restricted to its first `num_shards` shards when given."""
    from saelab.store import load_store

    if data is None:
        raise UsageError("no training data: pass --data STORE (from `saelab collect`), --model M "
                         "--corpus C to stream, or --quick-test for a synthetic run.")
    store = load_store(data)
    if num_shards is not None:
        n = store.meta["num_shards"]
        if not 1 <= num_shards <= n:
            raise UsageError(f"--num-shards {num_shards}: the store {data} has {n} shards; use 1 .. {n}.")
        store = store.subset(list(range(num_shards)))
    return store


def resolve_hook(store, hook: str | None, d_in: int | None) -> tuple[str, int]:
    """(hook, d_in): the requested hook (default: the store's only one) and its width.

    Raises:
        UsageError: several hooks and none chosen, unknown hook, or --d-in disagreeing with the store.
    """
    hooks = list(store.hooks)
    if hook is None:
        if len(hooks) != 1:
            raise UsageError(f"the store {store.path} holds {len(hooks)} hook points ({', '.join(hooks)}); "
                             "choose one with --hook NAME or --layer N.")
        hook = hooks[0]
    elif hook not in hooks:
        raise UsageError(f"hook {hook!r} is not in the store {store.path} (it has: {', '.join(hooks)})."
                         f"{did_you_mean(hook, hooks)}")
    width = int(store.width(hook))
    if d_in is not None and d_in != width:
        raise UsageError(f"--d-in {d_in} disagrees with the store: {hook} has width {width}. "
                         "d_in is read from the store; drop --d-in (--d_model) or fix its value.")
    return hook, width


def split_kwargs(cfg) -> dict[str, Any]:
    return {"val_fraction": cfg.val_fraction, "shuffle_chunks": cfg.shuffle_chunks}


def train_batches(store, hook: str, cfg, rank: int, world: int):
    """The resumable training stream (a BatchIterator: `state_dict` / `load_state_dict`).
    With --tokens it is endless and the loop stops at the step budget."""
    epochs = None if cfg.tokens is not None else cfg.epochs
    return store.batches(hook, batch_size=cfg.batch_size, split="train", seed=cfg.seed, epochs=epochs,
                         rank=rank, world_size=world, **split_kwargs(cfg))


def init_sample(store, hook: str, cfg) -> torch.Tensor:
    """The first init_tokens rows of the training stream (identical on every rank): x_ND."""
    parts, seen = [], 0
    for x_BD in store.batches(hook, batch_size=min(cfg.batch_size, cfg.init_tokens), split="train",
                              seed=cfg.seed, epochs=1, **split_kwargs(cfg)):
        parts.append(x_BD)
        seen += x_BD.shape[0]
        if seen >= cfg.init_tokens:
            break
    if not parts:
        raise UsageError(f"the training split of {store.path} is smaller than one batch; "
                         "lower --batch-size or collect more tokens.")
    x_ND = torch.cat(parts)[: cfg.init_tokens]
    if not bool(torch.isfinite(x_ND).all()):
        raise UsageError(f"the initialisation sample (the first {len(x_ND)} training tokens of {store.path}, "
                         f"hook {hook}) has {int((~torch.isfinite(x_ND)).sum())} NaN/inf values; nothing was "
                         f"trained. Find the chunk with `saelab verify {store.path}`.")
    return x_ND


def val_batches(store, hook: str, cfg, rank: int = 0, world: int = 1):
    """This rank's share of the first eval_tokens rows of the validation split, in a fixed order."""
    it = store.batches(hook, batch_size=cfg.batch_size, split="val", seed=cfg.seed, epochs=1,
                       drop_last=False, shuffle=False, **split_kwargs(cfg))
    seen, i = 0, 0
    for x_BD in it:
        if seen >= cfg.eval_tokens:
            break
        seen += x_BD.shape[0]
        if i % world == rank:
            yield x_BD
        i += 1


@torch.no_grad()
def evaluate_sae(sae, batches, device: torch.device, world: int = 1) -> dict[str, float]:
    """Validation metrics of `sae` over `batches` (iterable of x_BD); see the module docstring.
    Under DDP each rank passes its own batches; the sums are all-reduced."""
    from saelab.metrics import (add_recon, add_sparsity, recon_sums, reconstruction_metrics,
                                sparsity_metrics, sparsity_sums)

    was_training = sae.training
    sae.eval()
    rs = ss = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    try:
        for x_BD in batches:
            x_BD = x_BD.to(device)
            x_hat_BD, f_BF = sae(x_BD)
            loss_sum += float(sae.training_loss(x_BD, sparsity_scale=1.0).loss) * x_BD.shape[0]
            rs = add_recon(rs, recon_sums(x_BD.cpu(), x_hat_BD.float().cpu()))
            ss = add_sparsity(ss, sparsity_sums(f_BF.cpu()))
    finally:
        sae.train(was_training)
    if world > 1:
        rs, ss, loss_sum = _all_reduce_sums(rs, ss, loss_sum, sae.cfg.d_in, sae.cfg.d_sae)
    if rs is None or rs.n == 0:
        raise UsageError("the validation split is empty: raise --val-fraction or use a larger store.")
    rec, sp = reconstruction_metrics(rs), sparsity_metrics(ss)
    return {"val_loss": float(loss_sum) / rs.n, "val_mse": rec.mse, "val_fvu": rec.fvu,
            "val_cosine": rec.cosine, "val_l0": sp.l0, "val_dead_frac": sp.dead_frac,
            "val_dense_frac": sp.dense_frac}


def _all_reduce_sums(rs, ss, loss_sum, d_in: int, d_sae: int):
    from saelab.metrics import ReconSums, SparsitySums

    z = torch.zeros((), dtype=torch.float64)
    if rs is None:  # this rank got no val batch
        rs = ReconSums(0, torch.zeros(d_in, dtype=torch.float64), z, z, z, z)
        ss = SparsitySums(0, torch.zeros(d_sae, dtype=torch.int64), torch.zeros(d_sae + 1, dtype=torch.int64))
    n = torch.tensor(float(rs.n), dtype=torch.float64)
    parts = [n, loss_sum.clone(), *(t.clone() for t in rs[1:]), ss.fired_F.clone(), ss.l0_hist.clone()]
    for t in parts:
        dist.all_reduce(t)
    n_all = int(parts[0])
    return (ReconSums(n_all, *parts[2:7]), SparsitySums(n_all, parts[7], parts[8]), parts[1])


def evaluate_checkpoint(path: str | Path, data: str | None = None, hook: str | None = None,
                        batch_size: int = 4096, eval_tokens: int = 262_144,
                        device: str = "cpu") -> dict[str, float]:
    """Load a saved SAE and measure it on the validation split it was trained with (or of `data`)."""
    from types import SimpleNamespace

    from saelab.saes import load_sae

    sae = load_sae(path, device=device)
    train_cfg = (sae.metadata or {}).get("training") or {}
    data = data or sae.metadata.get("store") or train_cfg.get("data")
    if data is None:
        raise UsageError(f"{path} does not record its store; pass --data STORE.")
    store = open_store(data)
    hook, _ = resolve_hook(store, hook or sae.metadata.get("hook"), None)
    cfg = SimpleNamespace(batch_size=batch_size, eval_tokens=eval_tokens, seed=train_cfg.get("seed", 0),
                          val_fraction=train_cfg.get("val_fraction", 0.05),
                          shuffle_chunks=train_cfg.get("shuffle_chunks", 8))
    return evaluate_sae(sae, val_batches(store, hook, cfg), torch.device(device))


def make_synthetic_store(root: str | Path, d_in: int = 32, n_tokens: int = 32_768, chunk_tokens: int = 2048,
                         n_features: int | None = None, active: int = 4, num_shards: int = 1,
                         seed: int = 0, hook: str = "model.layers.0") -> Path:
    """A store of planted sparse features (module docstring), `n_features` default 4 * d_in.
    For tests and --quick-test; no model involved. Chunks are generated one at a time."""
    from saelab.store import ShardWriter

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    n_features = n_features or 4 * d_in
    dirs_FD = torch.randn(n_features, d_in, generator=g)
    dirs_FD /= dirs_FD.norm(dim=-1, keepdim=True)
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


# ---------------------------------------------------------------------------------------------------
# Data sources: what the loop reads (a store, or a model streaming over a corpus)


class StoreSource:
    """Training data from an activation store (`--data`)."""

    def __init__(self, cfg):
        self.store = open_store(cfg.data, cfg.num_shards)
        self.hook, self.d_in = resolve_hook(self.store, cfg.hook, cfg.d_in)
        self.path, self.meta = str(self.store.path), self.store.meta

    def train_batches(self, cfg, rank: int, world: int):
        return train_batches(self.store, self.hook, cfg, rank, world)

    def init_sample(self, cfg) -> torch.Tensor:
        return init_sample(self.store, self.hook, cfg)

    def val_batches(self, cfg, rank: int, world: int):
        return val_batches(self.store, self.hook, cfg, rank, world)


FORWARD_SEQS = 8
"""Sequences per forward pass when streaming from a model."""


class StreamSource:
    """Training data straight from a model over a corpus (`--model M --corpus C`, no store).

    Sequences come from `saelab.corpus.pack_sequences`; sequence i is in the validation split iff
    u(seed, i) < val_fraction (the store's rule, per sequence instead of per chunk), and rank r of W
    takes every W-th training sequence. Rows kept are those of `keep_mask` (no BOS, no padding).
    Shuffling: a buffer of `shuffle_buffer` rows; each batch draws batch_size random rows out of it
    (seeded), then the buffer is refilled. Memory: shuffle_buffer + one forward pass of rows.
    Resume replays the stream from the start and skips the batches already served (exact, but it
    repeats the forward passes up to the checkpoint).
    """

    def __init__(self, cfg):
        from saelab.corpus import resolve_corpus
        from saelab.models import capture, load_model, resolve_hooks, tokenizer_info

        if cfg.hook is None:
            raise UsageError("streaming from --model needs a hook point: pass --hook NAME or --layer N "
                             "(see `saelab hooks --model M`).")
        if cfg.tokens is None:
            raise UsageError("streaming from --model has no fixed length: pass --tokens N (e.g. 10M).")
        device = "cpu" if cfg.device == "auto" else cfg.device
        self.lm = load_model(cfg.model, device=device, quiet=True)
        self.hp = resolve_hooks(self.lm.model, [cfg.hook])[0]
        self.hook = self.hp.name
        self.corpus = resolve_corpus(cfg.corpus)
        self.tok = tokenizer_info(self.lm.tokenizer)
        probe = torch.tensor([[self.tok["bos_id"], self.tok["eos_id"]]], device=device)
        self.d_in = int(capture(self.lm.model, [self.hp], probe)[self.hook].shape[-1])
        if cfg.d_in is not None and cfg.d_in != self.d_in:
            raise UsageError(f"--d-in {cfg.d_in} disagrees with the model: {self.hook} has width {self.d_in}.")
        self.device, self.path = device, f"stream:{cfg.model}:{cfg.corpus}"
        self.meta = {"model": self.lm.info, "tokenizer": self.tok, "max_length": cfg.max_length,
                     "corpus": {"spec": self.corpus.spec, "fingerprint": self.corpus.fingerprint},
                     "hooks": [{"name": self.hook, "width": self.d_in}]}

    def _sequences(self, cfg, split: str, rank: int, world: int):
        from saelab.corpus import pack_sequences

        from saelab.store import _unit_hash  # the store's split rule, per sequence

        t = self.tok
        n = 0
        for seq in pack_sequences(self.corpus.documents(), self.lm.tokenizer, cfg.max_length, t["bos_id"],
                                  t["eos_id"], t["pad_id"]):
            in_val = _unit_hash(f"{cfg.seed}:seq:{seq.index}") < cfg.val_fraction
            if in_val != (split == "val"):
                continue
            if n % world == rank:
                yield seq
            n += 1

    def rows(self, cfg, split: str, rank: int = 0, world: int = 1):
        """Activations x_ND of consecutive forward passes (kept positions only), float32 on CPU."""
        from saelab.models import capture

        group = []
        for seq in self._sequences(cfg, split, rank, world):
            group.append(seq)
            if len(group) == FORWARD_SEQS:
                yield self._forward(capture, group)
                group = []
        if group:
            yield self._forward(capture, group)

    def _forward(self, capture, group) -> torch.Tensor:
        ids = torch.tensor(np.stack([s.input_ids for s in group]), dtype=torch.long, device=self.device)
        mask = torch.tensor(np.stack([s.attention_mask for s in group]), device=self.device)
        keep = torch.from_numpy(np.stack([s.keep_mask for s in group]))
        x_BSD = capture(self.lm.model, [self.hp], ids, mask)[self.hook].float().cpu()
        return x_BSD[keep]

    def train_batches(self, cfg, rank: int, world: int):
        return ShuffleStream(lambda: self.rows(cfg, "train", rank, world), cfg.batch_size,
                             cfg.shuffle_buffer, cfg.seed + rank)

    def init_sample(self, cfg) -> torch.Tensor:
        x = torch.cat(list(_take_rows(self.rows(cfg, "train"), cfg.init_tokens)))[: cfg.init_tokens]
        if not bool(torch.isfinite(x).all()):
            raise UsageError(f"the model's activations at {self.hook} hold NaN/inf values (try --dtype float32).")
        return x

    def val_batches(self, cfg, rank: int, world: int):
        if not hasattr(self, "_val_ND"):  # computed once: the same val tokens at every evaluation
            self._val_ND = torch.cat(list(_take_rows(self.rows(cfg, "val"), cfg.eval_tokens)))[: cfg.eval_tokens]
        for i, start in enumerate(range(0, len(self._val_ND), cfg.batch_size)):
            if i % world == rank:
                yield self._val_ND[start: start + cfg.batch_size]


def _take_rows(rows, n: int):
    seen = 0
    for x_ND in rows:
        if seen >= n:
            return
        seen += len(x_ND)
        yield x_ND
    if seen == 0:
        raise UsageError("the corpus gave no tokens for this split; use a larger corpus or another --val-fraction.")


class ShuffleStream:
    """Endless shuffled batches [B, D] from a restartable row source, with a bounded buffer.

        buffer <- rows until it holds >= capacity (or the source restarts: the next epoch)
        batch   = buffer[perm[:B]],  buffer = buffer[perm[B:]]     perm ~ generator(seed)
    `state_dict()` is the number of batches served; `load_state_dict` replays that many.
    """

    def __init__(self, make_rows, batch_size: int, capacity: int, seed: int):
        self.make_rows, self.batch_size = make_rows, batch_size
        self.capacity = max(capacity, batch_size)
        self.seed, self.served, self._skip = seed, 0, 0
        self.batches_per_epoch = None

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        buf, rows = None, self.make_rows()
        while True:
            while buf is None or len(buf) < self.capacity:
                x = next(rows, None)
                if x is None:
                    rows = self.make_rows()
                    x = next(rows, None)
                    if x is None:
                        raise UsageError("the corpus holds no training tokens.")
                buf = x if buf is None else torch.cat([buf, x])
            perm = torch.randperm(len(buf), generator=g)
            batch, buf = buf[perm[: self.batch_size]], buf[perm[self.batch_size:]]
            if self._skip:
                self._skip -= 1
                continue
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"served": self.served, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.served = self._skip = int(state["served"])
