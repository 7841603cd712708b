"""Safe files: atomic directories (write `NAME.tmp/`, fsync, `os.replace` to `NAME/`) and file hashes.

Owns the one implementation used by `SAE.save` (saes/base.py) and the training checkpoints
(checkpoint.py), so a crash at any moment leaves either the old directory or the new one, never a
half-written mix. An old `NAME/` is moved to `NAME.old/` for the instant of the swap and removed
after it. Single files are the store's business (`store_format.write_bytes_atomic`).

L0: stdlib only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
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


__all__ = ["commit_dir", "fresh_tmp", "fsync_tree", "sha256_file"]
