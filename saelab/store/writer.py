"""The shard writer: appends complete chunks to one shard of a store, atomically and resumably.

Owns: creating or joining a store (store.json, first writer wins), locking a shard to one process,
cleaning up after a crash, and the shard manifest. Leaves out: building a chunk's files and the fp16
conversion (chunk.py: NaN is stored as NaN and counted; `saelab verify` reports it), what the rows
are (collect.py decides the batch grid and which positions to keep) and reading (store.py).

Crash safety: chunk files go tmp -> fsync -> rename, then the manifest (tmp -> fsync -> rename)
lists them. On open, a writer deletes `*.tmp` files and the files of chunk `chunks_done` (the one
chunk a crash can leave renamed but unlisted), so the next chunk it writes is exactly the one an
uninterrupted run would have written next. It deletes nothing else: other unlisted chunk files, or
chunk files in a shard without a manifest, make it refuse (`saelab verify --rebuild-manifest`
rebuilds a lost manifest). A full disk or a read-only directory becomes a UsageError that says so
(and that re-running resumes, when there is something to resume).

Locking a shard and the checks collect makes before loading a model live in lock.py.

On object storage (`root` an fsspec URL, see remote.py) the same steps hold with other means: a
chunk's files are built in a local spool directory (one chunk, under TMPDIR), then each is
published through a temporary key (`<name>.tmp-<uuid>`, moved into place) before the manifest that
lists it; leftover temporary keys are deleted on open; store.json is created with a conditional
put; and the shard is held by a lease object (lease.py) instead of flock, checked before every
publish.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from saelab.errors import DataError, UsageError
from saelab.store.chunk import ChunkBuilder
from saelab.store.format import (
    FORMAT_VERSION, MANIFEST_JSON, SEQPOS, STORE_JSON, TOKENS, ChunkEntry, check_format_version, check_identity,
    fsync_dir, hook_key, json_bytes, os_error_to_usage, read_json, shard_dir_name, write_bytes_atomic,
)
from saelab.store.lease import Lease
from saelab.store.lock import lock_shard, preflight
from saelab.store.remote import RemotePath, create_exclusive, is_tmp_name, location

log = logging.getLogger(__name__)



class ShardWriter:
    """Writes the chunks of one shard of a store; the resume point is read from its manifest.

    Use `ShardWriter.open(root, run_meta, shard, num_shards)`, then `write_chunk(...)` (or
    `begin_chunk()` for batch-by-batch writing) and `finish()`. One process per shard: the shard is
    locked (flock; on object storage a lease) while open; a crashed process's lock goes away with it
    (a lease goes stale).
    """

    def __init__(self, root: Path | RemotePath, meta: dict, shard: int, num_shards: int, manifest: dict,
                 lock: int | Lease):
        self.root, self.meta, self.shard, self.num_shards = root, meta, shard, num_shards
        self.shard_dir = root / shard_dir_name(shard)
        self.hooks: list[dict] = meta["hooks"]
        self.manifest = manifest
        self._lock: int | Lease | None = lock
        self.remote = isinstance(root, RemotePath)
        self.spool = Path(tempfile.mkdtemp(prefix=f"saelab-{shard_dir_name(shard)}-")) if self.remote else None
        """Local directory where a remote chunk's files are built before upload (None for a local store)."""

    # -- resume point
    @property
    def chunks(self) -> list[ChunkEntry]:
        return [ChunkEntry.from_json(c) for c in self.manifest["chunks"]]

    @property
    def sequences_done(self) -> int:
        return self.manifest["sequences_done"]

    @property
    def batches_done(self) -> int:
        return self.manifest["batches_done"]

    @property
    def tokens_done(self) -> int:
        return sum(c["num_tokens"] for c in self.manifest["chunks"])

    @property
    def chunks_done(self) -> int:
        return len(self.manifest["chunks"])

    @property
    def done(self) -> bool:
        return bool(self.manifest["done"])

    @classmethod
    def open(cls, root: str | Path, run_meta: dict, shard: int, num_shards: int) -> ShardWriter:
        """Create or join the store at `root` and open shard `shard` of `num_shards` for writing.

        `run_meta` is the store.json content (see docs/architecture.md); `format_version`,
        `saelab_version`, `dtype`, `num_shards` and each hook's `key` are filled in if absent.

        Raises:
            UsageError: the store exists with different identity fields, the shard is being
                written by another process, or the directory is not writable.
        """
        root = location(root)
        if not 0 <= shard < num_shards:
            raise UsageError(f"shard {shard} is out of range for {num_shards} shards: use --shard 0 .. {num_shards - 1}.")
        meta = _complete_meta(run_meta, num_shards)
        shard_dir = root / shard_dir_name(shard)
        preflight(root, shard)
        try:
            shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error_to_usage(e, shard_dir, "cannot create the store: ", resumable=False) from None
        meta = _create_or_check_store_json(root, meta)
        lock = Lease.acquire(shard_dir, shard, root) if isinstance(root, RemotePath) else lock_shard(shard_dir, shard, root)
        try:
            manifest = _load_or_new_manifest(shard_dir, shard, num_shards)
            _clean_shard_dir(shard_dir, manifest)
        except BaseException:
            os.close(lock) if isinstance(lock, int) else lock.release()
            raise
        w = cls(root, meta, shard, num_shards, manifest, lock)
        w.manifest["session_started_at"] = time.time()
        w.manifest["session_tokens_start"] = w.tokens_done
        w._save_manifest()
        if w.chunks_done:
            log.info("resuming %s at chunk %d (%d sequences, %d tokens done)",
                     shard_dir, w.chunks_done, w.sequences_done, w.tokens_done)
        return w

    def reopen_short_last_chunk_(self, chunk_tokens: int) -> bool:
        """Drop the last chunk from the manifest (and its files) if it holds fewer than `chunk_tokens`
        rows, so a larger target re-collects it on the same batch grid. Returns True if dropped.

        A chunk closes short only at the old token target (or where the corpus ended), so after this
        the shard continues exactly as an uninterrupted run to the new target would have.
        """
        self._check_open()
        chunks = self.manifest["chunks"]
        if not chunks or chunks[-1]["num_tokens"] >= chunk_tokens:
            self.manifest["done"] = False
            self._save_manifest()
            return False
        last = chunks.pop()
        prev = chunks[-1] if chunks else {"sequences_done": 0, "batches_done": 0}
        m = self.manifest
        m["sequences_done"], m["batches_done"] = prev["sequences_done"], prev["batches_done"]
        m["tokens_done"], m["done"] = self.tokens_done, False
        m["session_tokens_start"] = self.tokens_done
        self._save_manifest()  # first the manifest, then the files: a crash in between leaves chunk
        for f in last["files"].values():  # `chunks_done`'s files, which the next open removes
            (self.shard_dir / f["file"]).unlink(missing_ok=True)
        return True

    def begin_chunk(self) -> ChunkBuilder:
        """Start the next chunk, to be filled batch by batch."""
        self._check_open()
        return ChunkBuilder(self, self.chunks_done)

    def write_chunk(self, tokens_N, seqpos_N2, acts: dict[str, Any], sequences_done: int,
                    batches_done: int, overflow: dict[str, int] | None = None) -> ChunkEntry:
        """Write one complete chunk atomically and record it, with the shard's progress after it.

        Args:
            tokens_N: int token ids [N].
            seqpos_N2: int (global sequence index, position) [N, 2].
            acts: hook name -> float activations [N, D] (numpy or torch); stored as fp16.
            sequences_done, batches_done: the resume point once this chunk is on disk.
            overflow: hook name -> values the caller already clamped (added to the chunk's count).
        """
        b = self.begin_chunk()
        b.append(tokens_N, seqpos_N2, acts, overflow)
        return b.commit(sequences_done, batches_done)

    def finish(self) -> None:
        """Mark the shard complete and release it."""
        self._check_open()
        self.manifest["done"] = True
        self._save_manifest()
        self.close()

    def close(self) -> None:
        """Release the shard lock without marking it done (the shard can be resumed later)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if isinstance(lock, int):
            os.close(lock)
        elif lock is not None:
            lock.release()
        if getattr(self, "spool", None) is not None:
            shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _check_open(self) -> None:
        if self._lock is None:
            raise RuntimeError(f"ShardWriter for {self.shard_dir} is closed; open it again to write more.")

    def _check_lease(self) -> None:
        """On object storage: raise if another writer has taken this shard's lease (nothing is published then)."""
        self._check_open()
        if isinstance(self._lock, Lease):
            self._lock.check()

    def _record(self, entry: ChunkEntry) -> None:
        self._check_lease()
        if not self.remote:
            fsync_dir(self.shard_dir)
        m = self.manifest
        m["chunks"].append(entry.to_json())
        m["sequences_done"], m["batches_done"] = entry.sequences_done, entry.batches_done
        m["tokens_done"] = self.tokens_done
        m["done"] = False
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["updated_at"] = time.time()
        write_bytes_atomic(self.shard_dir / MANIFEST_JSON, json_bytes(self.manifest))


def _complete_meta(run_meta: dict, num_shards: int) -> dict:
    from saelab import __version__

    meta = json.loads(json.dumps(run_meta))  # a deep, JSON-safe copy
    if meta.get("num_shards", num_shards) != num_shards:
        raise UsageError(f"run_meta says num_shards={meta['num_shards']} but the writer was opened with {num_shards}.")
    meta["num_shards"] = num_shards
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("saelab_version", __version__)
    meta.setdefault("dtype", "float16")
    if not meta.get("hooks"):
        raise UsageError("run_meta has no hooks: pass hooks=[{'name': ..., 'width': ...}, ...].")
    keys = set()
    for h in meta["hooks"]:
        h.setdefault("key", hook_key(h["name"]))
        if h["key"] in (TOKENS, SEQPOS) or h["key"] in keys:
            raise UsageError(f"hook {h['name']!r} gives the file key {h['key']!r}, which is taken.")
        keys.add(h["key"])
    return meta


def _create_or_check_store_json(root: Path | RemotePath, meta: dict) -> dict:
    """First writer wins (tmp + hard link, which fails if store.json exists; on object storage a
    conditional put); everyone else compares."""
    path = root / STORE_JSON
    if isinstance(path, RemotePath):
        create_exclusive(path, json_bytes(meta))
    elif not path.exists():
        tmp = root / f"{STORE_JSON}.{socket.gethostname()}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(json_bytes(meta))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                if not path.exists():  # no hard links on this file system: a small race remains
                    os.replace(tmp, path)
            fsync_dir(root)
        except OSError as e:
            raise os_error_to_usage(e, path, "cannot create the store: ", resumable=False) from None
        finally:
            tmp.unlink(missing_ok=True)
    existing = read_json(path, "store manifest")
    check_identity(existing, meta, root)
    return existing


def raise_tokens_target(root: str | Path, tokens: int) -> None:
    """Record a larger token target in store.json (what `saelab monitor` measures progress against)."""
    path = location(root) / STORE_JSON
    meta = read_json(path, "store manifest")
    if int(meta.get("tokens_target") or 0) < tokens:
        meta["tokens_target"] = int(tokens)
        write_bytes_atomic(path, json_bytes(meta))


def _load_or_new_manifest(shard_dir: Path, shard: int, num_shards: int) -> dict:
    path = shard_dir / MANIFEST_JSON
    if not path.exists():
        orphans = sorted(p.name for p in shard_dir.glob("chunk_*.npy"))
        if orphans:
            raise DataError(
                f"{shard_dir} holds {len(orphans)} chunk files ({orphans[0]} .. {orphans[-1]}) but no {MANIFEST_JSON}: "
                f"its manifest is lost, and collect does not delete files it did not write. Run `saelab verify "
                f"--rebuild-manifest {shard_dir.parent}` to rebuild it from the chunk files (each is checked first), "
                f"or move them away to collect this shard again.")
        return {"format_version": FORMAT_VERSION, "shard": shard, "num_shards": num_shards,
                "sequences_done": 0, "batches_done": 0, "tokens_done": 0, "done": False,
                "created_at": time.time(), "chunks": []}
    m = read_json(path, "shard manifest")
    check_format_version(m, path, "shard manifest")
    if m.get("shard") != shard or m.get("num_shards") != num_shards:
        raise UsageError(f"{path} belongs to shard {m.get('shard')} of {m.get('num_shards')}, not "
                         f"{shard} of {num_shards}. Use the same --num-shards or another --out.")
    problems = []
    sizes = {p.name: p.stat().st_size for p in shard_dir.iterdir()}  # one listing (one request remotely)
    for c in m["chunks"]:
        for f in c["files"].values():
            p = shard_dir / f["file"]
            size = sizes.get(p.name)
            if size != f["bytes"]:
                problems.append(f"{p}: " + ("missing" if size is None else f"{size} bytes, manifest says {f['bytes']}"))
    if problems:
        raise UsageError(f"shard {shard_dir} lists chunks that are damaged:\n  - " + "\n  - ".join(problems)
                         + f"\n  Run `saelab verify {shard_dir.parent}`; delete {shard_dir} to collect this shard again.")
    return m


def _clean_shard_dir(shard_dir: Path, manifest: dict) -> None:
    """Delete what an interrupted writer of this shard leaves: `*.tmp` files and the files of chunk
    `chunks_done` (renamed into place, not yet listed). Refuse, deleting nothing, if other unlisted
    chunk files are present: this writer cannot know where they came from."""
    listed = {f["file"] for c in manifest["chunks"] for f in c["files"].values()}
    interrupted = f"chunk_{len(manifest['chunks']):06d}."
    leftovers, foreign = [], []
    for p in sorted(shard_dir.iterdir()):
        if is_tmp_name(p.name) or p.name.startswith(interrupted):
            leftovers.append(p)
        elif p.name.startswith("chunk_") and p.name not in listed:
            foreign.append(p.name)
    if foreign:
        raise DataError(f"{shard_dir} holds {len(foreign)} chunk file(s) its manifest does not list and no "
                        f"interrupted write explains ({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}). "
                        f"collect does not delete files it did not write: run `saelab verify {shard_dir.parent}`, "
                        "then move them away.")
    for p in leftovers:
        log.info("removing leftover %s", p)
        p.unlink(missing_ok=True)
