"""Building one chunk of a shard: its .npy files written batch by batch, then published at once.

Owns: the fp16 conversion, each file's tmp -> fsync -> rename (or upload for a remote store), the
chunk's overflow / NaN counts and row-norm statistics (outlier flags). Leaves out: which chunk comes
next, locking and the manifest (writer.py, which hands out `ChunkBuilder`s and records their entries).

Per element x of a hook's activations [N, D]:

    stored = fp16( clip(x, -65504, +65504) )      overflow = #{ |x| > 65504 }      nan = #{ x is NaN }
"""
from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import UsageError
from saelab.store.format import (
    FP16_MAX, NPY_HEADER_BYTES, SEQPOS, TOKENS, ChunkEntry, chunk_file_name, npy_header, os_error_to_usage,
    outlier_flags, sha256_file,
)
from saelab.store.remote import RemotePath, upload_atomic

log = logging.getLogger(__name__)


class _ArrayFile:
    """An .npy file written row by row to `<name>.tmp`, its header fixed up at the end. For a remote
    `path` the .tmp file is in the local `spool` directory and `commit` uploads it."""

    def __init__(self, path: Path | RemotePath, dtype: np.dtype, row_shape: tuple[int, ...], spool: Path | None = None):
        self.path = path
        self.tmp = spool / (path.name + ".tmp") if spool is not None else path.with_name(path.name + ".tmp")
        self.dtype, self.row_shape, self.rows = np.dtype(dtype), row_shape, 0
        try:
            self.f = open(self.tmp, "wb")
            self.f.write(npy_header(self.dtype, (0, *row_shape)))
        except OSError as e:
            raise os_error_to_usage(e, self.tmp) from None

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        assert a.shape[1:] == self.row_shape, f"{self.path.name}: rows {a.shape[1:]} != {self.row_shape}"
        try:
            self.f.write(memoryview(a).cast("B"))
        except OSError as e:
            self.abort()
            raise os_error_to_usage(e, self.tmp) from None
        self.rows += a.shape[0]

    def commit(self) -> dict:
        """Fix the header, check the size, hash, fsync and rename. Returns the manifest entry."""
        shape = (self.rows, *self.row_shape)
        nbytes = NPY_HEADER_BYTES + self.rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        try:
            self.f.seek(0)
            self.f.write(npy_header(self.dtype, shape))
            self.f.flush()
            if not isinstance(self.path, RemotePath):  # a spool file is uploaded, not kept
                os.fsync(self.f.fileno())
            size = os.fstat(self.f.fileno()).st_size
            self.f.close()
            if size != nbytes:  # numpy and some file systems report a full disk without an errno
                raise OSError(errno.ENOSPC, f"wrote {size} of {nbytes} bytes")
            digest = sha256_file(self.tmp)
            if isinstance(self.path, RemotePath):
                upload_atomic(self.path, self.tmp)
                self.tmp.unlink()
            else:
                os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise os_error_to_usage(e, self.tmp) from None
        return {"file": self.path.name, "sha256": digest, "bytes": nbytes, "shape": list(shape),
                "dtype": self.dtype.name}

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


class ChunkBuilder:
    """A chunk being written batch by batch (memory bounded by one batch, not by the chunk).

    Get one from `ShardWriter.begin_chunk()`, call `append(...)` once per forward batch, then
    `commit(sequences_done, batches_done)`; `abort()` throws it away. `ShardWriter.write_chunk`
    does all three for a chunk held in memory.
    """

    def __init__(self, writer, index: int):  # writer: the ShardWriter (writer.py) that began this chunk
        self.writer, self.index = writer, index
        d, hooks = writer.shard_dir, writer.hooks
        sp = writer.spool
        self.files = {
            TOKENS: _ArrayFile(d / chunk_file_name(index, TOKENS), np.int32, (), sp),
            SEQPOS: _ArrayFile(d / chunk_file_name(index, SEQPOS), np.int32, (2,), sp),
        }
        for h in hooks:
            self.files[h["name"]] = _ArrayFile(d / chunk_file_name(index, h["key"]), np.float16, (h["width"],), sp)
        self.overflow = {h["name"]: 0 for h in hooks}
        self.nan = {h["name"]: 0 for h in hooks}
        self.norms: dict[str, list[np.ndarray]] = {h["name"]: [] for h in hooks}
        self.num_tokens = 0

    def append(self, tokens_N, seqpos_N2, acts: dict[str, Any], overflow: dict[str, int] | None = None) -> None:
        """Add N rows: token ids [N], (sequence, position) [N, 2], and hook name -> activations [N, D]
        (numpy or torch, any float dtype). `overflow` adds counts of values the caller already
        clamped to the fp16 range (per hook) to the chunk's own count."""
        tokens_N = _as_numpy(tokens_N)
        seqpos_N2 = _as_numpy(seqpos_N2)
        n = tokens_N.shape[0]
        problems = []
        if tokens_N.ndim != 1:
            problems.append(f"tokens must be 1-D [N], got shape {tokens_N.shape}")
        if seqpos_N2.shape != (n, 2):
            problems.append(f"seqpos must be [N, 2] = [{n}, 2], got {seqpos_N2.shape}")
        expected = {h["name"]: h["width"] for h in self.writer.hooks}
        if set(acts) != set(expected):
            problems.append(f"activations given for {sorted(acts)}, the store holds {sorted(expected)}")
        for name, x in acts.items():
            if name in expected and tuple(x.shape) != (n, expected[name]):
                problems.append(f"{name}: activations of shape {tuple(x.shape)}, expected [{n}, {expected[name]}]")
        if problems:
            self.abort()
            raise UsageError("write_chunk got arrays that do not match the store:\n"
                             + "\n".join(f"  - {p}" for p in problems))
        try:
            self.files[TOKENS].append(tokens_N.astype(np.int32, copy=False))
            self.files[SEQPOS].append(seqpos_N2.astype(np.int32, copy=False))
            for name, x in acts.items():
                x16, over, nan = to_fp16(_as_numpy(x))
                self.overflow[name] += over
                self.nan[name] += nan
                self.files[name].append(x16)
                self.norms[name].append(np.linalg.norm(x16.astype(np.float32), axis=1))  # of what is stored
        except UsageError:  # disk full or not writable: leave no tmp files behind
            self.abort()
            raise
        for name, count in (overflow or {}).items():
            self.overflow[name] = self.overflow.get(name, 0) + int(count)
        self.num_tokens += n

    def commit(self, sequences_done: int, batches_done: int) -> ChunkEntry:
        """Close every file (tmp -> fsync -> rename), then record the chunk in the shard manifest."""
        files = {}
        try:
            self.writer._check_lease()
            for name, af in self.files.items():
                files[name] = af.commit()
        except UsageError:
            self.abort()
            raise
        ratio = self.writer.meta.get("outlier_ratio")
        norms = {}
        for name, parts in self.norms.items():
            earlier = [c["norms"][name]["median"] for c in self.writer.manifest["chunks"] if (c.get("norms") or {}).get(name)]
            norms[name] = outlier_flags(np.concatenate(parts) if parts else np.zeros(0, np.float32), earlier, ratio)
            if norms[name]["flagged"]:
                log.info("chunk %d of %s: %d row(s) of %s flagged as massive activations (norm > %g x the running "
                         "median %.4g; max %.4g)", self.index, self.writer.shard_dir, norms[name]["flagged"], name,
                         ratio, norms[name]["reference_median"], norms[name]["max"])
        entry = ChunkEntry(self.index, self.num_tokens, files, self.overflow, self.nan,
                           int(sequences_done), int(batches_done), time.time(), norms)
        for name, count in self.overflow.items():
            if count:
                log.warning("chunk %d of %s: %d activation values of %s were beyond the fp16 range "
                            "(+-65504) and were clamped", self.index, self.writer.shard_dir, count, name)
        self.writer._record(entry)
        return entry

    def abort(self) -> None:
        for af in self.files.values():
            af.abort()


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor: bf16 has no numpy dtype, so go through float32
        t = x.detach().cpu()
        if t.is_floating_point() and str(t.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def to_fp16(x_ND: np.ndarray) -> tuple[np.ndarray, int, int]:
    """fp16(clip(x, +-65504)), the number of clamped values and the number of NaNs."""
    nan = 0
    hi, lo = x_ND.max(initial=-np.inf), x_ND.min(initial=np.inf)
    if np.isnan(hi) or np.isnan(lo):
        nan = int(np.count_nonzero(np.isnan(x_ND)))
        hi, lo = np.nanmax(x_ND, initial=-np.inf), np.nanmin(x_ND, initial=np.inf)
    over = 0
    if hi > FP16_MAX or lo < -FP16_MAX:
        over = int(np.count_nonzero(np.abs(x_ND) > FP16_MAX))
        x_ND = np.clip(x_ND, -FP16_MAX, FP16_MAX)
    return x_ND.astype(np.float16), over, nan
