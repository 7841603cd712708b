"""A local disk cache of the chunk files of stores on object storage, addressed by content.

Off unless `SAELAB_STORE_CACHE` names a directory. Then every chunk file read from a remote store
is kept as

    $SAELAB_STORE_CACHE/<sha256[:2]>/<sha256>.npy

and later reads (the next epoch, evaluation, interpretation, another process on the machine) map
that file instead of fetching the object again. A shard manifest names each file by its sha256 and
chunk files are never rewritten, so a copy is valid exactly while its bytes hash to its name:
nothing goes stale, stores that share a file share its copy, and a damaged copy is dropped and
fetched again. `SAELAB_STORE_CACHE_GB` caps the cache's size; past it, the least recently read
files go first (a process rescans the directory only when its own count passes the cap, so with
several processes writing, the cache can run over it until the next rescan). Manifests and
store.json are never cached: they change while a store grows.

Leaves out: reading and checking remote bytes (reader.py), the fsspec side (remote.py).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from saelab.errors import DataError, UsageError

log = logging.getLogger(__name__)

ENV_DIR, ENV_GB = "SAELAB_STORE_CACHE", "SAELAB_STORE_CACHE_GB"


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    d = os.environ.get(ENV_DIR, "").strip()
    return Path(d).expanduser() if d else None


def cache_limit() -> int | None:
    """The size cap in bytes (None: no cap)."""
    raw = os.environ.get(ENV_GB, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise UsageError(f"{ENV_GB}={raw!r} is not a size: give the cache's cap in GB as a positive number "
                         f"(e.g. {ENV_GB}=200), or unset it for no cap.")
    return int(gb * 1e9)


def _path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / f"{sha256}.npy"


def lookup(entry: dict, check, verify: bool) -> Path | None:
    """The cached copy of the file `entry` describes (manifest entry: sha256, bytes), or None.

    `check(path, entry, check_hash)` is the store's local-file check; a copy it refuses is deleted.
    A hit is marked as read now (its access time), for the size cap's eviction order.
    """
    root = cache_dir()
    if root is None:
        return None
    p = _path(root, entry["sha256"])
    if not p.is_file():
        return None
    try:
        check(p, entry, verify)
    except DataError:
        log.warning("the cached copy %s differs from its manifest entry (size or sha256): dropping it and "
                    "fetching the file again", p)
        p.unlink(missing_ok=True)
        return None
    try:
        os.utime(p, (time.time(), p.stat().st_mtime))  # atime only: the mtime keys the once-per-process hash check
    except OSError:
        pass
    return p


def put(entry: dict, data: bytes) -> Path | None:
    """Keep checked bytes in the cache (atomically: a reader never sees a partial file); then hold
    the size cap. Returns the copy, or None when caching is off or the write failed (a full or
    read-only disk costs speed, not the read)."""
    root = cache_dir()
    if root is None:
        return None
    p = _path(root, entry["sha256"])
    # not format.write_bytes_atomic: its fixed `.tmp` name would collide when several processes
    # (DDP ranks) fetch the same chunk, and a failed cache write must not become a usage error
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not keep %s in the store cache %s (%s); reads fetch it again", p.name, root, e)
        return None
    limit = cache_limit()
    if limit is not None:  # scan the directory only when this process's running total passes the cap
        held = _held.get(root)
        _held[root] = (held if held is not None else _scan(root)[1]) + len(data)
        if _held[root] > limit:
            _held[root] = evict(root, limit, keep=p)
    return p


_held: dict[Path, int] = {}
"""Per cache directory: its bytes as this process last counted them plus what it wrote since
(other processes' writes are seen at the next scan)."""


def _scan(root: Path) -> tuple[list, int]:
    """[(atime, size, path)] of the cached files, and their total size."""
    files = []
    for sub in root.iterdir() if root.is_dir() else []:
        if sub.is_dir():
            for f in sub.glob("*.npy"):
                try:
                    st = f.stat()
                except FileNotFoundError:  # another process evicted it
                    continue
                files.append((st.st_atime, st.st_size, f))
    return files, sum(size for _, size, _ in files)


def evict(root: Path, limit: int, keep: Path | None = None) -> int:
    """Delete the least recently read files until the cache holds at most `limit` bytes (never
    `keep`, the file just written). Returns the bytes left."""
    files, total = _scan(root)
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= limit:
            break
        if keep is not None and f == keep:
            continue
        f.unlink(missing_ok=True)
        total -= size
    return total
