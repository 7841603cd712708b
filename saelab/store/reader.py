"""The activation store's reader: checked memory-mapped reads, the train/val split, batches.

`load_store(path) -> ActivationStore` is what training, evaluation and interpretation use:
metadata, the list of complete chunks, checked memory-mapped reads, a train/val split by chunk, a
subset of shards, and shuffled batches (`batches`, implemented in batches.py).

Only chunks listed in a shard manifest exist for the reader, so a chunk being written is invisible.
Every file read is checked against its manifest entry: size always, sha256 once per file per
process (numpy loads flipped or trailing bytes silently; the hash is what catches them).

Row order: chunks in store order (shard-major, then chunk index); `ChunkInfo.offset` is the global
row index of a chunk's first row in that order, so row r of chunk c is global row c.offset + r.

Train/val split, per chunk c and seed s:

    u(c) = int(sha256(f"{s}:{c.shard}:{c.index}")[:16], 16) / 2**64     in [0, 1)
    c is in val  <=>  u(c) < val_fraction

(plus: at least one val and one train chunk when there are >= 2 chunks). A chunk's side never
changes as a store grows, so a val set stays held out while collection continues.

On object storage (`path` an fsspec URL, remote.py) a chunk file is read whole into memory and its
size and sha256 are checked on every read (with `verify`), then viewed as an array without a copy;
token and seqpos arrays of the last few chunks are kept in memory. Batch streams read the next
chunks in a background thread (prefetch.py), so the rows and their order are those of the local store.
With SAELAB_STORE_CACHE set, checked files are also kept on local disk by sha256 and mapped from
there on later reads (cache.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from saelab.errors import DataError, UsageError, did_you_mean
from saelab.store.format import (
    MANIFEST_JSON, SEQPOS, STORE_JSON, TOKENS, check_format_version, npy_from_bytes, read_json, sha256_file,
    shard_dir_name,
)
from saelab.store import cache as remote_cache
from saelab.store.remote import RemotePath, location, sha256_bytes

log = logging.getLogger(__name__)

Split = Literal["train", "val", "all"]
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of files hashed in this process
_SMALL_CACHE = 64  # remote token/seqpos arrays kept per store (a few MB each at most)


@dataclass(frozen=True)
class ChunkInfo:
    """One complete chunk, as the reader sees it."""

    shard: int
    """Shard number."""
    index: int
    """Chunk number within the shard."""
    num_tokens: int
    """Rows N of the chunk."""
    offset: int
    """Global row index of the chunk's first row (store order: shard-major, then index)."""
    files: dict = field(compare=False, hash=False, repr=False)
    """'tokens', 'seqpos', hook name -> manifest entry {file, sha256, bytes, shape, dtype}."""
    norms: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Hook name -> the chunk's row-norm statistics and flagged rows ({} in older stores)."""

    def flagged_rows(self, hook: str) -> np.ndarray:
        """int64 rows of this chunk flagged as massive activations at `hook` (empty if none)."""
        return np.asarray((self.norms.get(hook) or {}).get("flagged_rows", []), dtype=np.int64)

    @property
    def name(self) -> str:
        return f"{shard_dir_name(self.shard)}/chunk_{self.index:06d}"


class ActivationStore:
    """A store on disk or on object storage (or a subset of its shards). Cheap to create: it reads only JSON."""

    def __init__(self, path: Path | RemotePath | str, meta: dict, chunks: list[ChunkInfo], verify: bool = True):
        self.path, self.meta, self.chunks, self.verify = location(path), meta, chunks, verify
        self._hooks = {h["name"]: h for h in meta["hooks"]}
        self._small: OrderedDict = OrderedDict()

    @property
    def remote(self) -> bool:
        """True for a store on object storage (reads are whole-file and checked; batch streams prefetch)."""
        return isinstance(self.path, RemotePath)

    @property
    def hooks(self) -> list[str]:
        """Hook point names, in store.json order."""
        return list(self._hooks)

    @property
    def num_tokens(self) -> int:
        """Rows in the listed chunks."""
        return sum(c.num_tokens for c in self.chunks)

    def norm_median(self, hook: str) -> float | None:
        """The median row norm of `hook` over the store (the median of its chunks' medians), or None
        for a store written before norms were recorded."""
        meds = [c.norms[hook]["median"] for c in self.chunks if (c.norms or {}).get(hook)]
        return float(np.median(meds)) if meds else None

    def flagged_count(self, hook: str, chunks: list[ChunkInfo] | None = None) -> int:
        """Rows of `hook` flagged as massive activations in `chunks` (default: all)."""
        return sum(len(c.flagged_rows(hook)) for c in (self.chunks if chunks is None else chunks))

    def width(self, hook: str) -> int:
        """D of a hook point."""
        return int(self._hook(hook)["width"])

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, {len(self.chunks)} chunks, {self.num_tokens:,} tokens, hooks={self.hooks})"

    # -- checked reads
    def read_activations(self, chunk: ChunkInfo | int, hook: str) -> np.ndarray:
        """Memory-mapped float16 [N, D] activations of one hook in one chunk."""
        self._hook(hook)
        return self._read(chunk, hook)

    def read_tokens(self, chunk: ChunkInfo | int) -> np.ndarray:
        """Memory-mapped int32 [N] token ids of one chunk."""
        return self._read(chunk, TOKENS)

    def read_seqpos(self, chunk: ChunkInfo | int) -> np.ndarray:
        """Memory-mapped int32 [N, 2] (global sequence index, position in the sequence)."""
        return self._read(chunk, SEQPOS)

    def _read(self, chunk: ChunkInfo | int, key: str) -> np.ndarray:
        c = self.chunks[chunk] if isinstance(chunk, int) else chunk
        entry = c.files[key]
        path = self.path / shard_dir_name(c.shard) / entry["file"]
        if self.remote:
            return self._read_remote(path, entry, small=key in (TOKENS, SEQPOS))
        check_file(path, entry, check_hash=self.verify)
        return self._mapped(path, entry)

    def _mapped(self, path: Path, entry: dict) -> np.ndarray:
        """A checked local .npy file, memory-mapped."""
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:  # e.g. an object array (pickle) or a damaged header
            raise DataError(f"{path} is not a plain .npy array ({e}); saelab never writes such a file. Run "
                            f"`saelab verify {self.path}` and collect that shard again.") from None
        self._check_shape(path, arr, entry)
        return arr

    def _check_shape(self, path, arr: np.ndarray, entry: dict) -> None:
        if list(arr.shape) != list(entry["shape"]) or arr.dtype.name != entry["dtype"]:
            raise DataError(f"{path} holds {arr.dtype.name} {list(arr.shape)}, its manifest says "
                             f"{entry['dtype']} {entry['shape']}: the chunk is corrupted. Run `saelab verify "
                             f"{self.path}` and collect that shard again.")

    def _read_remote(self, path: RemotePath, entry: dict, small: bool) -> np.ndarray:
        if small and str(path) in self._small:
            self._small.move_to_end(str(path))
            return self._small[str(path)]
        hit = remote_cache.lookup(entry, check_file, self.verify)  # SAELAB_STORE_CACHE (cache.py)
        if hit is not None:
            arr = self._mapped(hit, entry)
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{path} is missing but its shard manifest lists it. Run `saelab verify {self.path}`; "
                                "collect that shard again.") from None
            check_bytes(path, data, entry, self.path, check_hash=self.verify)
            arr = npy_from_bytes(data, path)
            self._check_shape(path, arr, entry)
            remote_cache.put(entry, data)
        if small:
            self._small[str(path)] = arr
            while len(self._small) > _SMALL_CACHE:
                self._small.popitem(last=False)
        return arr

    def _hook(self, hook: str) -> dict:
        if hook not in self._hooks:
            raise UsageError(f"hook {hook!r} is not in store {self.path} (it holds {', '.join(self._hooks)})."
                             + did_you_mean(hook, self._hooks))
        return self._hooks[hook]

    # -- selections
    def split_chunks(self, val_fraction: float = 0.05, seed: int = 0) -> tuple[list[ChunkInfo], list[ChunkInfo]]:
        """(train, val) chunks: a deterministic split by chunk (see the module docstring)."""
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        u = {c: unit_hash(f"{seed}:{c.shard}:{c.index}") for c in self.chunks}
        val = {c for c in self.chunks if u[c] < val_fraction}
        if len(self.chunks) >= 2 and val_fraction > 0:
            if not val:
                val = {min(self.chunks, key=u.get)}
            if len(val) == len(self.chunks):
                val.discard(max(self.chunks, key=u.get))
        return [c for c in self.chunks if c not in val], [c for c in self.chunks if c in val]

    def select(self, split: Split = "all", val_fraction: float = 0.05, seed: int = 0) -> list[ChunkInfo]:
        """The chunks of one side of `split_chunks`, or all of them."""
        if split == "all":
            return list(self.chunks)
        if split not in ("train", "val"):
            raise UsageError(f"split must be train, val or all, got {split!r}.")
        train, val = self.split_chunks(val_fraction, seed)
        return train if split == "train" else val

    def subset(self, shards: list[int] | None = None) -> ActivationStore:
        """A view of some shards only; chunk offsets keep their global values."""
        if shards is None:
            return self
        n = self.meta["num_shards"]
        bad = [s for s in shards if not 0 <= s < n]
        if bad:
            raise UsageError(f"shards {bad} are out of range: store {self.path} has shards 0 .. {n - 1}.")
        keep = set(shards)
        return ActivationStore(self.path, self.meta, [c for c in self.chunks if c.shard in keep], self.verify)

    def batches(self, hook: str, batch_size: int, split: Split = "train", seed: int = 0, shuffle_chunks: int = 4,
                epochs: int | None = 1, drop_last: bool = True, shards: list[int] | None = None, rank: int = 0,
                world_size: int = 1, val_fraction: float = 0.05, shuffle: bool = True, skip_flagged: bool = False,
                prefetch: int = 2):
        """Shuffled float32 batches [B, D] of one hook; see `saelab.store.batches.BatchIterator`.
        `prefetch`: chunks read ahead in a background thread on object storage (0: none)."""
        from saelab.store.batches import BatchIterator

        store = self.subset(shards)
        return BatchIterator(store, hook, batch_size, store.select(split, val_fraction, seed), seed=seed,
                             shuffle_chunks=shuffle_chunks, epochs=epochs, drop_last=drop_last, rank=rank,
                             world_size=world_size, shuffle=shuffle, skip_flagged=skip_flagged, prefetch=prefetch)


def unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2.0**64


def check_file(path: Path, entry: dict, check_hash: bool = True) -> None:
    """Refuse a chunk file whose size (always) or sha256 (once per process) differs from its entry."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing but its shard manifest lists it. Run `saelab verify "
                         f"{path.parent.parent}`; collect that shard again.") from None
    if st.st_size != entry["bytes"]:
        kind = "truncated" if st.st_size < entry["bytes"] else "padded with extra bytes"
        raise DataError(f"{path} is {kind}: {st.st_size:,} bytes, its manifest says {entry['bytes']:,}. "
                         f"Run `saelab verify {path.parent.parent}`; collect that shard again.")
    key = (str(path), st.st_size, st.st_mtime_ns, entry["sha256"])
    if not check_hash or key in _VERIFIED:
        return
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path} is corrupted: sha256 mismatch with its manifest. Run `saelab verify "
                         f"{path.parent.parent}`; collect that shard again.")
    _VERIFIED.add(key)


def check_bytes(path: RemotePath, data: bytes, entry: dict, root, check_hash: bool = True) -> None:
    """Refuse the bytes of a remote chunk file whose size or sha256 differs from its manifest entry."""
    if len(data) != entry["bytes"]:
        kind = "truncated" if len(data) < entry["bytes"] else "padded with extra bytes"
        raise DataError(f"{path} is {kind}: {len(data):,} bytes, its manifest says {entry['bytes']:,}. "
                        f"Run `saelab verify {root}`; collect that shard again.")
    if check_hash and sha256_bytes(data) != entry["sha256"]:
        raise DataError(f"{path} is corrupted: sha256 mismatch with its manifest. Run `saelab verify "
                        f"{root}`; collect that shard again.")


def load_store(path: str | Path | RemotePath, verify: bool = True) -> ActivationStore:
    """Open a store for reading (JSON only; arrays are mapped, or fetched, on demand).

    Args:
        path: the store directory (holds store.json), or an fsspec URL such as s3://bucket/store.
        verify: check each file's sha256 the first time it is read in this process (on object
            storage: every time, since every read fetches the whole file).
    Raises:
        UsageError: not a store, or a manifest is unreadable or of an unknown format_version; a bad
            URL or a missing fsspec backend (naming the extra to install).
    """
    root = location(path)
    if not (root / STORE_JSON).is_file():
        what = "does not exist" if not root.exists() else f"has no {STORE_JSON}"
        raise UsageError(f"{root} {what}: it is not an activation store. Make one with "
                         f"`saelab collect --out {root} ...`.")
    meta = read_json(root / STORE_JSON, "store manifest")
    check_format_version(meta, root / STORE_JSON, "store manifest")
    if "packing" not in meta and meta.get("tokenizer", {}).get("bos_id") is not None and "corpus" in meta:
        log.warning("store %s was packed under the old rule (BOS only at document starts): windows after the "
                    "first begin mid-document and their first token is an attention sink with a huge norm. "
                    "Results on it are dominated by those rows; collect a new store.", root)
    chunks, offset = [], 0
    for shard in range(meta["num_shards"]):
        mpath = root / shard_dir_name(shard) / MANIFEST_JSON
        if not mpath.exists():
            continue
        manifest = read_json(mpath, "shard manifest")
        check_format_version(manifest, mpath, "shard manifest")
        for c in manifest["chunks"]:
            chunks.append(ChunkInfo(shard, c["index"], c["num_tokens"], offset, c["files"], c.get("norms") or {}))
            offset += c["num_tokens"]
    return ActivationStore(root, meta, chunks, verify)
