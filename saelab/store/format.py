"""The activation store's on-disk format: names, manifests, checksums and safe file writes.

Shared by the writer (writer.py, chunk.py), the reader (reader.py) and the checker (check.py);
it holds no state and reads no arrays. Layout (docs/architecture.md, "The activation store"):

    STORE/store.json                                run manifest, written once by the first writer
    STORE/shard_XXXXX/manifest.json                 progress + one entry per complete chunk
    STORE/shard_XXXXX/chunk_YYYYYY.tokens.npy       int32   [N]      token id of each row
    STORE/shard_XXXXX/chunk_YYYYYY.seqpos.npy       int32   [N, 2]   (sequence index, position)
    STORE/shard_XXXXX/chunk_YYYYYY.<hookkey>.npy    float16 [N, D]   activations of one hook point

Shape legend: N rows (tokens) of a chunk, D width of a hook point.

Every file is written as `<name>.tmp`, fsynced and renamed (`write_bytes_atomic`); a chunk file is
listed in its shard manifest with {file, sha256, bytes, shape, dtype}. A .npy header here is always
NPY_HEADER_BYTES long, so the writer can fix the row count in place once a chunk closes.
"""
from __future__ import annotations

import errno
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab.atomic import sha256_file  # noqa: F401 - part of the store's format helpers
from saelab.errors import DataError, UsageError
from saelab.store.remote import RemotePath, location, put_atomic

FORMAT_VERSION = 1
STORE_JSON = "store.json"
MANIFEST_JSON = "manifest.json"
LOCK_FILE = ".lock"
TOKENS = "tokens"
SEQPOS = "seqpos"
FP16_MAX = 65504.0
OUTLIER_RATIO = 5.0
"""Default --outlier-ratio: a row whose norm exceeds this multiple of the running median is flagged.
Chosen from data (docs/data-fidelity.md): on SmolLM2-135M's layer-15 residual stream, with BOS at
every window start, the largest ordinary row of 40,882 was 2.8x the median (99.99th percentile
1.6x), while the massive activations left sat at 10.6x and 30.8x."""
# Fields of store.json that must match when a writer joins or resumes a store. Dotted names
# compare one key of a nested dict. batch_size, chunk_tokens and num_shards fix the batch grid and
# the corpus split, so a resumed store stays byte-identical and shards stay disjoint.
IDENTITY_FIELDS = (
    "format_version", "model.sha256", "hooks", "dtype", "max_length", "tokenizer",
    "corpus.fingerprint", "keep_special", "adapter", "slices", "num_shards", "batch_size",
    "chunk_tokens", "packing", "outlier_ratio", "corpus.shuffle_documents", "corpus.document_seed",
)
NPY_HEADER_BYTES = 128  # fixed, so a chunk's header can be rewritten in place once N is known


def hook_key(name: str) -> str:
    """Filename-safe key of a hook point: 'model.layers.3.self_attn.o_proj:input' ->
    'model.layers.3.self_attn.o_proj@input'."""
    return name.replace(":", "@").replace("/", "_").replace(os.sep, "_")


def shard_dir_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def chunk_file_name(index: int, key: str) -> str:
    return f"chunk_{index:06d}.{key}.npy"


def shard_target(tokens: int, shard: int, num_shards: int) -> int:
    """Tokens shard `shard` stores of a `tokens` target: an even split, the first shards taking the remainder."""
    return tokens // num_shards + (1 if shard < tokens % num_shards else 0)


# ----------------------------------------------------------------------------------- file helpers

def os_error_to_usage(e: OSError, path: Path, what: str = "", resumable: bool = True) -> UsageError:
    """Turn a write failure into a message a person can act on. `resumable`: chunks may already be
    on disk (say that they are intact and that re-running resumes); False while creating a store."""
    again = "re-run the same command: it resumes from the last complete chunk" if resumable else "re-run"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"{path} is not writable ({e.strerror})"
        fix = "Fix the permissions or choose another --out."
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        cause = f"{path} cannot be a directory: a part of that path is a regular file"
        fix = "Choose another --out."
    elif e.errno in (errno.ENOSPC, errno.EDQUOT, None):
        cause = f"the disk is full (or over quota) at {path}"
        fix = f"Free some space and {again}."
    else:
        cause = f"could not write {path}: {e}"
        fix = f"{again[0].upper()}{again[1:]}."
    intact = " Every completed chunk is intact." if resumable else ""
    return UsageError(f"{what}{cause}.{intact} {fix}")


def check_format_version(data: dict, path: Path | str, what: str) -> None:
    """Refuse a store.json or shard manifest whose format_version this saelab does not know.

    Known versions: 1 .. FORMAT_VERSION (a missing version is unknown too: every writer sets it).
    """
    v = data.get("format_version")
    if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= FORMAT_VERSION:
        return
    newer = isinstance(v, int) and v > FORMAT_VERSION
    raise DataError(f"{what} {path} has format_version {v!r}; this saelab reads versions 1 .. {FORMAT_VERSION}. "
                    + ("Upgrade saelab to read it." if newer else
                       "The file was not written by saelab or is damaged; collect the store again."))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path | RemotePath, data: bytes) -> None:
    """tmp -> fsync -> rename, verifying the size written (a full disk may not raise errno); on
    object storage, a temporary key moved into place (`remote.put_atomic`)."""
    if isinstance(path, RemotePath):
        return put_atomic(path, data)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if os.fstat(f.fileno()).st_size != len(data):
                raise OSError(errno.ENOSPC, "short write")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error_to_usage(e, path) from None
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_json(path: Path | RemotePath, what: str) -> dict:
    """Read a JSON file of the store (local or remote), with an error that names it."""
    try:
        return json.loads(location(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e}); the file is damaged.") from None


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header padded to exactly NPY_HEADER_BYTES."""
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body_len = NPY_HEADER_BYTES - 10
    assert len(d) < body_len, f"npy header too long for shape {shape}"
    body = d.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def npy_from_bytes(data: bytes, path) -> np.ndarray:
    """A read-only array over the bytes of a whole .npy file (no copy; no pickle), as np.load reads it.

    Raises:
        DataError: not a plain version 1/2 .npy array (an object array, a damaged header).
    """
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or fortran:
            raise ValueError("an object or Fortran-ordered array")
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    except ValueError as e:
        raise DataError(f"{path} is not a plain .npy array ({e}); saelab never writes such a file. Run "
                        f"`saelab verify` on its store and collect that shard again.") from None
    return arr.reshape(shape)


def get_nested(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


@dataclass
class ChunkEntry:
    """One complete chunk as listed in a shard manifest."""

    index: int
    """Chunk number within its shard (0, 1, ...)."""
    num_tokens: int
    """Rows N in every file of the chunk."""
    files: dict[str, dict]
    """'tokens', 'seqpos' and each hook name -> {file, sha256, bytes, shape, dtype}."""
    overflow: dict[str, int]
    """Hook name -> count of values beyond +-65504 that were clamped."""
    nan: dict[str, int]
    """Hook name -> count of NaN values (stored as NaN)."""
    sequences_done: int
    """Shard progress after this chunk: sequences consumed from this shard's part of the corpus."""
    batches_done: int
    """Shard progress after this chunk: forward batches run."""
    written_at: float
    """Unix time the chunk was committed."""
    norms: dict | None = None
    """Hook name -> row-norm statistics and outlier flags of this chunk (see `outlier_flags`):
    {median, max, reference_median, ratio, flagged, flagged_rows}; None in stores written before."""

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> ChunkEntry:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def check_identity(existing: dict, new: dict, root: Path | str) -> None:
    """Raise a UsageError naming every identity field where `new` differs from the store's."""
    check_format_version(existing, location(root) / STORE_JSON, "store manifest")
    if new.get("packing") and not existing.get("packing"):
        raise UsageError(
            f"store {root} was written under the old packing rule: BOS only at document starts, so every "
            "window after the first began mid-document and its first token became an attention sink with "
            "a norm about 100x the median, which dominated the store. It can still be read (with a "
            f"warning), but not appended to. Collect into a new --out (windows now start with BOS).")
    problems = []
    for name in IDENTITY_FIELDS:
        a, b = get_nested(existing, name), get_nested(new, name)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    problems.append((f"{name}.{k}", a.get(k), b.get(k)))
        elif a != b:
            if name == "hooks":
                a = [(h.get("name"), h.get("width")) for h in a or []]
                b = [(h.get("name"), h.get("width")) for h in b or []]
            problems.append((name, a, b))
    if problems:
        lines = [f"{f}={_short(a)}; this run asks for {_short(b)}" for f, a, b in problems]
        raise UsageError(f"store {root} was collected with " + ("\n  ".join(lines) if len(lines) == 1 else
                         "\n  - " + "\n  - ".join(lines) + "\n ") + ". Use another --out or the same settings.")


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 200 else s[:197] + "..."


def outlier_flags(norms_N: np.ndarray, earlier_medians: list[float], ratio: float | None) -> dict:
    """Row-norm statistics of one chunk and the rows flagged as massive activations.

        m_c      = median_n ||x_n||                      this chunk's median row norm
        ref_c    = median(m_0, ..., m_c)                 the running median over this shard's chunks
        flagged  = { n : ||x_n|| > ratio * ref_c }       (no row is flagged when ratio is None)

    The running median is rebuilt from the manifest on resume, so a resumed store flags the same rows.
    Also kept, for `verify` and `monitor` to tell how concentrated a store is without reading it:
    sum_sq = sum_n ||x_n||^2 and top_sq = the largest ceil(TOP_SHARE * N) values of ||x_n||^2.
    """
    if len(norms_N) == 0:
        return {"rows": 0, "median": 0.0, "max": 0.0, "reference_median": 0.0, "ratio": ratio, "flagged": 0,
                "flagged_rows": [],
                "sum_sq": 0.0, "top_sq": []}
    med = float(np.median(norms_N))
    ref = float(np.median(earlier_medians + [med]))
    rows = np.nonzero(norms_N > ratio * ref)[0].tolist() if ratio is not None else []
    sq = norms_N.astype(np.float64) ** 2
    k = int(np.ceil(TOP_SHARE * len(sq)))
    return {"rows": len(norms_N), "median": med, "max": float(norms_N.max()), "reference_median": ref, "ratio": ratio,
            "flagged": len(rows), "flagged_rows": rows, "sum_sq": float(sq.sum()),
            "top_sq": np.sort(sq)[-k:][::-1].round(3).tolist()}


TOP_SHARE = 0.001
"""`verify` and `monitor` report the share of the summed squared norm held by this top share of rows."""


def concentration(chunk_norms: list[dict]) -> tuple[int, int, float]:
    """(rows, flagged rows, share of sum ||x||^2 held by the top TOP_SHARE of rows) of one hook over
    chunks' `norms` entries (the top rows of the whole are found among each chunk's own top rows)."""
    rows = sum(int(c.get("rows", 0)) for c in chunk_norms)
    flagged = sum(int(c.get("flagged", 0)) for c in chunk_norms)
    total = sum(float(c.get("sum_sq", 0.0)) for c in chunk_norms)
    k = int(np.ceil(TOP_SHARE * rows))
    top = sorted((v for c in chunk_norms for v in c.get("top_sq", [])), reverse=True)[:k]
    return rows, flagged, (sum(top) / total if total > 0 else 0.0)
