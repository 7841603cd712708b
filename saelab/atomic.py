"""Safe files: atomic directories (write `NAME.tmp/`, fsync, `os.replace` to `NAME/`), file hashes, and
claim files (one live process at a time holds a piece of work).

Owns the one implementation used by `SAE.save` (saes/base.py) and the training checkpoints
(checkpoint.py), so a crash at any moment leaves either the old directory or the new one, never a
half-written mix. An old `NAME/` is moved to `NAME.old/` for the instant of the swap and removed
after it. Single files are the store's business (`store_format.write_bytes_atomic`).

L0: stdlib only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path


def fresh_tmp(final: Path) -> Path:
    """An empty `final.tmp/` next to `final` (left-overs of a crashed write are removed first)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, so the rename publishes bytes that are on disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def commit_dir(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final`: fsync its files, move any old `final` aside, rename, drop the old one."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read `block` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


CLAIM_WRITE_S = 60.0
"""A claim file that is still unreadable this long after its last write was left by a crash."""


def claim_file(path: Path) -> bool:
    """Take the work that `path` stands for, for this process: False if another live process holds it.

    The file is created exclusively and holds {host, pid}; a claim whose process is gone (same host)
    is taken over; one from another host is held (its pid cannot be checked). The holder deletes
    the file when done. Local filesystems only (object stores: store/lease.py)."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
                stale = held.get("host") == me["host"] and not pid_running(int(held.get("pid", 0)))
            except FileNotFoundError:  # its holder has just released it
                continue
            except (OSError, ValueError, TypeError, AttributeError):  # being written now, or half-written by a crash
                try:
                    held, stale = None, time.time() - path.stat().st_mtime > CLAIM_WRITE_S
                except FileNotFoundError:  # released meanwhile
                    continue
            if held == me:
                return True
            if not stale:
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def pid_running(pid: int) -> bool:
    """True if a process with this pid exists on this host (signal 0 checks without sending)."""
    if pid <= 0:  # 0 and negative pids name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["claim_file", "commit_dir", "fresh_tmp", "fsync_tree", "pid_running", "sha256_file"]
