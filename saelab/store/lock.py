"""Shard locks, and the checks a writer can make before any model is loaded.

One process writes a shard at a time: it holds `flock(STORE/shard_XXXXX/.lock)` while open (the
lock goes away with a crashed process) and writes `pid host` into that file, so a refused writer's
message names the holder. `preflight(root, shard)` runs what needs no model (an --out under a
regular file, a shard locked by another writer) so collect can fail before loading one.

On object storage there is no flock: the same rule is kept by a lease object (lease.py), and
`preflight` and `shard_is_locked` ask it instead.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from saelab.errors import UsageError
from saelab.store.format import LOCK_FILE, os_error_to_usage, shard_dir_name
from saelab.store.lease import held_error, is_stale, lease_is_live, read_lease
from saelab.store.remote import RemotePath, location


def lock_shard(shard_dir: Path, shard: int, root: Path) -> int:
    """flock the shard and write `pid host` into the lock file, so a refused writer can name us."""
    path = shard_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_error_to_usage(e, path, "cannot open the shard: ", resumable=False) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked_error(path, shard, root) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _locked_error(lock: Path, shard: int, root: Path) -> UsageError:
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
    except OSError:
        pid = host = ""
    holder = f"pid {pid} on host {host}, " if pid and host else ""
    return UsageError(f"shard {shard} of {root} is being written by another process ({holder}holding {lock}). "
                      "Wait for it to finish, stop it, or give this run another --shard.")


def preflight(root: str | Path, shard: int) -> None:
    """Checks that need no model, so collect can fail before loading one.

    Raises:
        UsageError: `root` (or a parent) is a regular file, or shard `shard` is locked by a live writer
            (on object storage: a bad URL, a missing backend or bucket, no credentials, a live lease).
    """
    root = location(root)
    if isinstance(root, RemotePath):
        bucket = RemotePath(root.fs, root.protocol, root.key.split("/")[0])
        if not bucket.exists():
            raise UsageError(f"--out {root}: the bucket {bucket} does not exist (or these credentials cannot see "
                             "it). Create it first, or fix the URL.")
        if root.is_file():
            raise UsageError(f"--out {root} is an object, not a prefix, so the store cannot be created there. "
                             "Choose another --out.")
        lease, _ = read_lease(root / shard_dir_name(shard))
        if lease is not None and not is_stale(lease):
            raise held_error(root / shard_dir_name(shard), shard, root, lease)
        return
    for p in (root, *root.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise UsageError(f"--out {root}: {p} is a regular file, not a directory, so the store cannot "
                                 "be created there. Choose another --out.")
            break
    lock = root / shard_dir_name(shard) / LOCK_FILE
    if shard_is_locked(lock.parent):
        raise _locked_error(lock, shard, root)


def shard_is_locked(shard_dir: Path | RemotePath) -> bool:
    """True when a live writer holds the shard (used by `saelab monitor`)."""
    if isinstance(shard_dir, RemotePath):
        return lease_is_live(shard_dir)
    try:
        fd = os.open(shard_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
