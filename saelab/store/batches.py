"""Shuffled, resumable training batches from an activation store, with bounded memory.

Owns the order in which rows of one hook point are served; reading and checking files belongs
to reader.py (`ActivationStore.read_activations`). On object storage the chunks are read `prefetch`
ahead in a background thread (prefetch.py), in the order below, so the batches are the same. Not
here: equalising batch counts between ranks (ranks with fewer chunks finish first).

Order for epoch e with seed s, over this rank's chunks c_0 .. c_{n-1} (rank r of W takes every
W-th chunk of the split, c = chunks[r::W]):

    order_e   = permutation_{rng(s, e)}(n)                     chunk order for the epoch
    group g   = order_e[g*K : (g+1)*K]                         K = shuffle_chunks chunks in memory
    buffer_g  = carry_{g-1} ++ rows of the chunks of group g   M_g rows, float16 [M_g, D]
    perm_g    = permutation_{rng(s, e, g)}(M_g)
    batch b   = buffer_g[perm_g[b*B : (b+1)*B]]                for b < M_g // B, as float32 [B, D]
    carry_g   = buffer_g[perm_g[(M_g // B)*B :]]               < B rows, passed on to group g+1

so each row is served exactly once per epoch, except the last group's remainder (< B rows), which
is dropped (drop_last) or served as a short batch. Memory: K chunks of fp16 plus < B carried rows.
With skip_flagged, the rows a chunk's manifest flags as massive activations are left out of
perm_g (the permutation is drawn over all M_g rows first, so the order of the others is unchanged).

Resume: the state is (epoch, group, batch, carry row identities); `load_state_dict` rebuilds the
group's buffer from the memory-mapped chunks and skips the batches already served, so a resumed
run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from saelab.errors import UsageError
from saelab.store.prefetch import Prefetcher

log = logging.getLogger(__name__)


class BatchIterator:
    """Iterate float32 batches [B, D] of one hook; see the module docstring for the order.

    Built by `ActivationStore.batches(hook, batch_size, ...)`. Iterating it twice continues where
    the first iteration stopped (it is a stream with a position, like a data loader with state).
    """

    def __init__(self, store, hook: str, batch_size: int, chunks: list, seed: int = 0, shuffle_chunks: int = 4,
                 epochs: int | None = 1, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, skip_flagged: bool = False, prefetch: int = 2):
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_chunks < 1:
            problems.append(f"shuffle_chunks must be >= 1, got {shuffle_chunks}")
        if epochs is not None and epochs < 1:
            problems.append(f"epochs must be >= 1 or None (endless), got {epochs}")
        if prefetch < 0:
            problems.append(f"prefetch must be >= 0 chunks (0: read in the caller's thread), got {prefetch}")
        if not 0 <= rank < world_size:
            problems.append(f"rank must be in 0 .. world_size-1 = {world_size - 1}, got {rank}")
        if problems:
            raise UsageError("bad batch settings:\n" + "\n".join(f"  - {p}" for p in problems))
        self.store, self.hook, self.batch_size = store, hook, batch_size
        self.width = store.width(hook)
        self.chunks = list(chunks)[rank::world_size]
        if not self.chunks:
            raise UsageError(f"no chunks to read for rank {rank} of {world_size} in {store.path} "
                             f"({len(chunks)} chunks in this split). Collect more tokens, use smaller "
                             f"--chunk-tokens, or fewer ranks.")
        self.seed, self.shuffle_chunks, self.epochs = seed, shuffle_chunks, epochs
        self.drop_last, self.shuffle, self.skip_flagged = drop_last, shuffle, skip_flagged
        self.prefetch = prefetch if getattr(store, "remote", False) else 0
        """Chunks read ahead in a background thread (object storage only; a local store is memory-mapped)."""
        self.skipped_per_epoch = sum(len(c.flagged_rows(hook)) for c in self.chunks) if skip_flagged else 0
        """Flagged rows left out per epoch."""
        self.rows_per_epoch = sum(c.num_tokens for c in self.chunks) - self.skipped_per_epoch
        self.batches_per_epoch = self.rows_per_epoch // batch_size + (
            0 if drop_last or self.rows_per_epoch % batch_size == 0 else 1)
        if self.batches_per_epoch == 0:
            raise UsageError(f"batch_size {batch_size} is larger than the {self.rows_per_epoch:,} rows this "
                             f"rank reads per epoch, so drop_last would leave no batch. Use a smaller batch "
                             f"size, drop_last=False, or a bigger store.")
        self._pos = {(c.shard, c.index): i for i, c in enumerate(self.chunks)}
        self._epoch, self._group, self._batch = 0, 0, 0
        self._carry_CR = np.zeros((0, 2), dtype=np.int64)  # (position in self.chunks, row)
        self._carry_x: np.ndarray | None = np.zeros((0, self.width), np.float16)  # its rows; None: re-read them

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless BatchIterator (epochs=None) has no length")
        return self.batches_per_epoch * self.epochs

    # -- order
    def _chunk_order(self, epoch: int) -> np.ndarray:
        n = len(self.chunks)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _row_perm(self, epoch: int, group: int, m: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, group, 1]).permutation(m) if self.shuffle else np.arange(m)

    def _read(self, i: int) -> np.ndarray:
        return self.store.read_activations(self.chunks[i], self.hook)

    def _upcoming(self) -> Iterator[int]:
        """Chunk positions in the order `__iter__` reads them, from the current group on."""
        epoch, group = self._epoch, self._group
        while self.epochs is None or epoch < self.epochs:
            order = self._chunk_order(epoch)
            yield from (int(i) for i in order[group * self.shuffle_chunks:])
            epoch, group = epoch + 1, 0

    def _load(self, group_chunks: np.ndarray, read) -> tuple[np.ndarray, np.ndarray]:
        """The buffer (carry first, then whole chunks) and each buffer row's source start offset."""
        carry = self._carry_CR
        sizes = [len(carry)] + [self.chunks[i].num_tokens for i in group_chunks]
        starts = np.cumsum([0] + sizes)
        x_MD = np.empty((starts[-1], self.width), dtype=np.float16)
        if self._carry_x is not None:  # kept from the previous group of this run
            x_MD[:len(carry)] = self._carry_x
        else:  # after load_state_dict: read the carried rows back from their chunks
            for pos in np.unique(carry[:, 0]):
                sel = carry[:, 0] == pos
                x_MD[:len(carry)][sel] = self._read(pos)[carry[sel, 1]]
        for j, i in enumerate(group_chunks):
            x_MD[starts[j + 1]:starts[j + 2]] = read(i)
        return x_MD, starts

    def _keep_M(self, group_chunks: np.ndarray, starts: np.ndarray, m: int) -> np.ndarray:
        """bool [M]: buffer rows not flagged (carried rows were kept when they were first loaded)."""
        keep = np.ones(m, dtype=bool)
        for j, i in enumerate(group_chunks):
            keep[starts[j + 1] + self.chunks[i].flagged_rows(self.hook)] = False
        return keep

    def _identities(self, idx: np.ndarray, group_chunks: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(chunk position, row) of buffer rows `idx`."""
        src = np.searchsorted(starts, idx, side="right") - 1
        out = np.empty((len(idx), 2), dtype=np.int64)
        from_carry = src == 0
        out[from_carry] = self._carry_CR[idx[from_carry]]
        rest = ~from_carry
        out[rest, 0] = np.asarray(group_chunks, dtype=np.int64)[src[rest] - 1]
        out[rest, 1] = idx[rest] - starts[src[rest]]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        pf = Prefetcher(self._read, self._upcoming(), self.prefetch) if self.prefetch else None
        try:
            yield from self._batches(pf.get if pf else self._read)
        finally:
            if pf is not None:
                pf.close()

    def _batches(self, read) -> Iterator[torch.Tensor]:
        B = self.batch_size
        while self.epochs is None or self._epoch < self.epochs:
            order = self._chunk_order(self._epoch)
            groups = [order[i:i + self.shuffle_chunks] for i in range(0, len(order), self.shuffle_chunks)]
            while self._group < len(groups):
                gc = groups[self._group]
                x_MD, starts = self._load(gc, read)
                perm = self._row_perm(self._epoch, self._group, len(x_MD))
                if self.skip_flagged:
                    perm = perm[self._keep_M(gc, starts, len(x_MD))[perm]]
                n_full = len(x_MD) // B
                while self._batch < n_full:
                    sel = perm[self._batch * B:(self._batch + 1) * B]
                    self._batch += 1  # the state now points at the next batch
                    yield torch.from_numpy(x_MD[sel].astype(np.float32))
                rest = perm[n_full * B:]
                last = self._group == len(groups) - 1
                if last and len(rest) and not self.drop_last and self._batch == n_full:
                    self._batch += 1
                    yield torch.from_numpy(x_MD[rest].astype(np.float32))
                self._carry_CR = np.zeros((0, 2), np.int64) if last else self._identities(rest, gc, starts)
                self._carry_x = x_MD[rest[:0] if last else rest]
                self._group, self._batch = self._group + 1, 0
                del x_MD
            self._epoch, self._group = self._epoch + 1, 0

    # -- resume
    def _fingerprint(self) -> str:
        ids = ",".join(f"{c.shard}:{c.index}:{c.num_tokens}" for c in self.chunks)
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """JSON-safe position: loading it into an iterator built the same way continues at the next batch."""
        carry = [[self.chunks[p].shard, self.chunks[p].index, int(r)] for p, r in self._carry_CR]
        return {"epoch": self._epoch, "group": self._group, "batch": self._batch, "carry": carry,
                "seed": self.seed, "batch_size": self.batch_size, "hook": self.hook,
                "shuffle_chunks": self.shuffle_chunks, "shuffle": self.shuffle, "chunks": self._fingerprint(),
                "skip_flagged": self.skip_flagged}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of an iterator over the same store, split and settings."""
        mine = self.state_dict()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
                for k in ("seed", "batch_size", "hook", "shuffle_chunks", "shuffle", "chunks", "skip_flagged")
                if state.get(k, False if k == "skip_flagged" else None) != mine[k]]
        if diff:
            raise UsageError("cannot resume the batch stream: it was saved with other settings or another set "
                             "of chunks (did the store grow?):\n" + "\n".join(f"  - {d}" for d in diff)
                             + "\n  Resume with the same store and settings, or start a new run.")
        self._epoch, self._group, self._batch = state["epoch"], state["group"], state["batch"]
        self._carry_CR = np.array([[self._pos[(s, i)], r] for s, i, r in state["carry"]], dtype=np.int64).reshape(-1, 2)
        self._carry_x = None


class RowBatch(NamedTuple):
    """Consecutive rows of one chunk, in store order."""

    offset: int
    """Global row index of the first row."""
    x_BD: torch.Tensor
    """float32 activations."""
    flagged_B: torch.Tensor
    """bool: the chunk's manifest flags the row as a massive activation."""
    position_B: torch.Tensor
    """int64 position of the row in its packed window."""


def rows_in_order(store, hook: str, batch_size: int, chunks=None, positions: bool = False,
                  prefetch: int = 2) -> Iterator[RowBatch]:
    """RowBatch over `chunks` (default: every chunk) in global row order, `batch_size` rows at a time
    and never across a chunk boundary: the one in-order reader that evaluation and interpretation
    share (their sums do not depend on order; a fixed order makes `--tokens` reproducible).
    `positions` also reads each chunk's seqpos (else position_B is empty). On object storage the
    next `prefetch` chunks are read in a background thread."""
    order = sorted(store.chunks if chunks is None else chunks, key=lambda c: c.offset)
    read = lambda c: store.read_activations(c, hook)  # noqa: E731
    pf = Prefetcher(read, order, prefetch) if prefetch and getattr(store, "remote", False) else None
    try:
        yield from _rows(store, hook, batch_size, order, positions, pf.get if pf else read)
    finally:
        if pf is not None:
            pf.close()


def _rows(store, hook: str, batch_size: int, order: list, positions: bool, read) -> Iterator[RowBatch]:
    for chunk in order:
        a_ND = read(chunk)
        flag_N = np.zeros(chunk.num_tokens, dtype=bool)
        flag_N[chunk.flagged_rows(hook)] = True
        pos_N = np.asarray(store.read_seqpos(chunk)[:, 1], dtype=np.int64) if positions else None
        for s in range(0, chunk.num_tokens, batch_size):
            e = min(s + batch_size, chunk.num_tokens)
            yield RowBatch(chunk.offset + s, torch.from_numpy(np.asarray(a_ND[s:e], dtype=np.float32)),
                           torch.from_numpy(flag_N[s:e]),
                           torch.from_numpy(pos_N[s:e]) if positions else torch.zeros(0, dtype=torch.int64))
