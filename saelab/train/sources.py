"""Where the training loop's tensors come from: a store and its splits, or a model streaming a corpus.

Owns opening and checking the store for training (hook choice, --num-shards, --d-in), the train
and validation batch streams and the initialisation sample. Validation metrics are in
validation.py, the loop in loop.py, the reader in saelab.store.

Splits (see store.py): chunk c is in val <=> u(seed, c) < val_fraction. Every stream here uses
the run's seed and val_fraction, so the validation chunks are never trained on.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from saelab.corpus import batch_sequences, open_corpus, pack_corpus
from saelab.errors import UsageError, did_you_mean
from saelab.models import capture, load_model, resolve_hooks, tokenizer_info
from saelab.store import load_store, unit_hash
from saelab.store.format import OUTLIER_RATIO

log = logging.getLogger(__name__)


def open_store(data: str | None, num_shards: int | None = None):
    """The store at `data`, restricted to its first `num_shards` shards when given."""
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
    """Store-reading options every stream of a run shares: its split, shuffle buffer and whether rows
    collect flagged as massive activations are left out (the default; --keep-outliers keeps them), and
    how many chunks a store on object storage fetches ahead."""
    prefetch = getattr(cfg, "prefetch_chunks", None)
    return {"val_fraction": cfg.val_fraction, "shuffle_chunks": cfg.shuffle_chunks,
            "skip_flagged": not getattr(cfg, "keep_outliers", False),
            "prefetch": cfg.shuffle_chunks if prefetch is None else prefetch}


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


# ---------------------------------------------------------------------------------------------------
# Data sources: what the loop reads (a store, or a model streaming over a corpus)


class StoreSource:
    """Training data from an activation store (`--data`)."""

    def __init__(self, cfg):
        self.store = open_store(cfg.data, cfg.num_shards)
        self.hook, self.d_in = resolve_hook(self.store, cfg.hook, cfg.d_in)
        self.path, self.meta = str(self.store.path), self.store.meta
        self.norms = {"median": self.store.norm_median(self.hook), "outlier_ratio": self.meta.get("outlier_ratio")}
        flagged = self.store.flagged_count(self.hook)
        if flagged:
            share = flagged / max(self.store.num_tokens, 1)
            if cfg.keep_outliers:
                log.warning("training on %d row(s) (%.3f%%) that collect flagged as massive activations "
                            "(--keep-outliers)", flagged, 100 * share)
            else:
                log.info("leaving out %d row(s) (%.3f%%) that collect flagged as massive activations (norm > %s x "
                         "the median); --keep-outliers trains on them", flagged, 100 * share,
                         self.meta.get("outlier_ratio"))

    def run_tokens(self, cfg) -> int:
        """Tokens the run trains on: --tokens, else the training split (less flagged rows) x epochs."""
        if cfg.tokens is not None:
            return cfg.tokens
        train = self.store.select("train", cfg.val_fraction, cfg.seed)
        rows = sum(c.num_tokens for c in train) - (0 if cfg.keep_outliers else self.store.flagged_count(self.hook, train))
        return rows * cfg.epochs

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

    Sequences come from `saelab.corpus.pack_corpus`; sequence i is in the validation split iff
    u(seed, i) < val_fraction (the store's rule, per sequence instead of per chunk), and rank r of W
    takes every W-th training sequence. Rows kept are those of `keep_mask` (no BOS, no padding).
    Shuffling: a buffer of `shuffle_buffer` rows; each batch draws batch_size random rows out of it
    (seeded), then the buffer is refilled. Memory: shuffle_buffer + one forward pass of rows.
    Resume replays the stream from the start and skips the batches already served (exact, but it
    repeats the forward passes up to the checkpoint).
    """

    def __init__(self, cfg):
        if cfg.hook is None:
            raise UsageError("streaming from --model needs a hook point: pass --hook NAME or --layer N "
                             "(see `saelab hooks --model M`).")
        if cfg.tokens is None:
            raise UsageError("streaming from --model has no fixed length: pass --tokens N (e.g. 10M).")
        device = "cpu" if cfg.lm.device == "auto" else cfg.lm.device
        self.lm = load_model(cfg.lm.model, dtype=cfg.lm.dtype, device=device, quiet=True)
        self.hp = resolve_hooks(self.lm.model, [cfg.hook])[0]
        self.hook = self.hp.name
        self.corpus = open_corpus(cfg.text)
        self.tok = tokenizer_info(self.lm.tokenizer)
        probe = torch.tensor([[self.tok["bos_id"], self.tok["eos_id"]]], device=device)
        self.d_in = int(capture(self.lm.model, [self.hp], probe)[self.hook].shape[-1])
        if cfg.d_in is not None and cfg.d_in != self.d_in:
            raise UsageError(f"--d-in {cfg.d_in} disagrees with the model: {self.hook} has width {self.d_in}.")
        self.device, self.path = device, f"stream:{cfg.lm.model}:{cfg.text.corpus}"
        self.meta = {"model": self.lm.info, "tokenizer": self.tok, "max_length": cfg.text.max_length,
                     "corpus": {"spec": self.corpus.spec, "fingerprint": self.corpus.fingerprint},
                     "hooks": [{"name": self.hook, "width": self.d_in}]}
        self.norms = {"median": None, "outlier_ratio": OUTLIER_RATIO}

    def _sequences(self, cfg, split: str, rank: int, world: int):
        n = 0
        for seq in pack_corpus(self.corpus, self.lm.tokenizer, self.tok, cfg.text):
            in_val = unit_hash(f"{cfg.seed}:seq:{seq.index}") < cfg.val_fraction
            if in_val != (split == "val"):
                continue
            if n % world == rank:
                yield seq
            n += 1

    def rows(self, cfg, split: str, rank: int = 0, world: int = 1):
        """Activations x_ND of consecutive forward passes (kept positions only), float32 on CPU; rows
        above OUTLIER_RATIO x the pass's median norm are left out unless --keep-outliers (the rule
        collect applies, with the forward pass standing in for a chunk)."""
        for ids_BS, mask_BS, keep_BS, _ in batch_sequences(self._sequences(cfg, split, rank, world), FORWARD_SEQS):
            x_BSD = capture(self.lm.model, [self.hp], ids_BS.to(self.device), mask_BS.to(self.device))[self.hook]
            x_ND = x_BSD.float().cpu()[keep_BS]
            if not cfg.keep_outliers and len(x_ND):
                norms_N = x_ND.norm(dim=-1)
                x_ND = x_ND[norms_N <= OUTLIER_RATIO * norms_N.median()]
            yield x_ND

    def run_tokens(self, cfg) -> int:
        return cfg.tokens  # streaming needs --tokens

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
