"""Check a whole activation store (`saelab verify`) and report collection progress (`saelab monitor`).

Owns the checks and their text rendering; the reader's own per-file check lives in store.py
(`check_file`), the on-disk format in store_format.py. Nothing here writes to a store.

verify, per chunk file f listed in a shard manifest:

    exists(f),  size(f) == bytes(f),  sha256(f) == sha256 in manifest,  npy header == (shape, dtype)
    activations:  #NaN, #inf  (both must be 0)
    tokens:       0 <= id < vocab_size
    seqpos:       seq % num_shards == shard,  0 <= pos < max_length

and per shard directory: no unlisted chunk files or leftover *.tmp files (unless a writer is live), and
no chunk files without a manifest (orphans of a lost manifest). store.json and every shard manifest
must have a format_version this saelab knows.

monitor, per shard, from manifest timestamps of the current writer session:

    rate = (tokens_done - session_tokens_start) / (t_last_chunk - session_started_at)
    eta  = (target - tokens_done) / rate,     target = tokens // S + [shard < tokens % S]

Both work on a store on object storage (an fsspec URL): there each chunk file is fetched whole
once, and "a live writer" means a shard lease that is not stale (lease.py) instead of a flock.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saelab.errors import UsageError
from saelab.store.format import (
    LOCK_FILE, MANIFEST_JSON, SEQPOS, STORE_JSON, TOKENS, TOP_SHARE, check_format_version, concentration,
    npy_from_bytes, read_json, sha256_file, shard_dir_name, shard_target,
)
from saelab.store.lease import LEASE_FILE
from saelab.store.lock import shard_is_locked
from saelab.store.remote import RemotePath, is_tmp_name, location, sha256_bytes

_BLOCK_ROWS = 1 << 16
_SHARD_RE = re.compile(r"^shard_(\d{5})$")
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.(.+)\.npy$")


@dataclass
class Problem:
    """One thing wrong with a store, named by its file."""

    file: str
    """Path relative to the store directory."""
    message: str
    """What is wrong."""

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class FileCheck:
    """What verify found for one chunk file."""

    file: str
    shape: list[int]
    dtype: str
    sha256: str
    ok: bool


@dataclass
class VerifyReport:
    """Everything `verify_store` checked; `ok` when `problems` is empty."""

    path: Path
    num_shards: int = 0
    shards_done: int = 0
    num_chunks: int = 0
    num_tokens: int = 0
    hooks: dict[str, int] = field(default_factory=dict)
    """Hook name -> width D."""
    nan: dict[str, int] = field(default_factory=dict)
    """Hook name -> NaN values found in its activation files."""
    inf: dict[str, int] = field(default_factory=dict)
    """Hook name -> inf values found in its activation files."""
    overflow: dict[str, int] = field(default_factory=dict)
    """Hook name -> values clamped to +-65504 when written (from the manifests)."""
    token_min: int | None = None
    token_max: int | None = None
    vocab_size: int | None = None
    files: list[FileCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Not errors: shards not started or still being written."""
    chunk_norms: dict[str, list[dict]] = field(default_factory=dict)
    """Hook name -> the chunks' row-norm entries (manifests), for `concentration`."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str | Path, check_hash: bool = True) -> VerifyReport:
    """Check every file of a store against its manifests; never raises for a damaged store (a bad URL,
    a missing backend or unreadable bucket raises a UsageError)."""
    root = location(path)
    rep = VerifyReport(root)
    if not (root / STORE_JSON).is_file():
        rep.problems.append(Problem(STORE_JSON, "missing: this is not an activation store"
                                    if root.is_dir() else f"{root} does not exist"))
        return rep
    try:
        meta = read_json(root / STORE_JSON, "store manifest")
        check_format_version(meta, root / STORE_JSON, "store manifest")
    except UsageError as e:
        rep.problems.append(Problem(STORE_JSON, str(e)))
        return rep
    rep.num_shards = meta.get("num_shards", 0)
    rep.hooks = {h["name"]: h["width"] for h in meta.get("hooks", [])}
    rep.nan = dict.fromkeys(rep.hooks, 0)
    rep.inf = dict.fromkeys(rep.hooks, 0)
    rep.overflow = dict.fromkeys(rep.hooks, 0)
    rep.vocab_size = (meta.get("tokenizer") or {}).get("vocab_size")
    for p in sorted(root.iterdir()):
        m = _SHARD_RE.match(p.name)
        if p.is_dir() and (not m or int(m.group(1)) >= rep.num_shards):
            rep.problems.append(Problem(p.name, f"unexpected directory (the store has {rep.num_shards} shards)"))
        elif is_tmp_name(p.name) and not p.is_dir():
            rep.problems.append(Problem(p.name, f"left over from an interrupted write of {STORE_JSON} (no reader looks "
                                        f"at it); delete it unless a collect is creating this store right now"))
    for shard in range(rep.num_shards):
        _verify_shard(root, meta, shard, rep, check_hash)
    return rep


def _verify_shard(root: Path, meta: dict, shard: int, rep: VerifyReport, check_hash: bool) -> None:
    sdir = root / shard_dir_name(shard)
    if not (sdir / MANIFEST_JSON).is_file():
        orphans = _orphaned_chunks(sdir)
        for index, names in orphans.items():
            rep.problems.append(Problem(f"{sdir.name}/chunk_{index:06d}.*", f"orphaned: {len(names)} chunk file(s) "
                                        f"({', '.join(names)}) but no {MANIFEST_JSON} lists them"))
        if orphans:
            rep.problems.append(Problem(f"{sdir.name}/{MANIFEST_JSON}", f"missing while {len(orphans)} chunk(s) are "
                                        f"on disk; rebuild it with `saelab verify --rebuild-manifest {root}` "
                                        "(every chunk is checked first) or move the chunk files away"))
        else:
            rep.notes.append(f"{sdir.name}: not started")
        return
    try:
        man = read_json(sdir / MANIFEST_JSON, "shard manifest")
        check_format_version(man, sdir / MANIFEST_JSON, "shard manifest")
    except UsageError as e:
        rep.problems.append(Problem(f"{sdir.name}/{MANIFEST_JSON}", str(e)))
        return
    live = shard_is_locked(sdir)
    rep.shards_done += bool(man.get("done"))
    if not man.get("done"):
        rep.notes.append(f"{sdir.name}: {'being written' if live else 'incomplete'} "
                         f"({len(man['chunks'])} chunks so far)")
    listed = set()
    for c in man["chunks"]:
        rep.num_chunks += 1
        rep.num_tokens += c["num_tokens"]
        for name, n in (c.get("overflow") or {}).items():
            rep.overflow[name] = rep.overflow.get(name, 0) + n
        for name, norms in (c.get("norms") or {}).items():
            rep.chunk_norms.setdefault(name, []).append({**norms, "rows": c["num_tokens"]})
        for key, entry in c["files"].items():
            listed.add(entry["file"])
            _verify_file(sdir, shard, key, entry, meta, rep, check_hash)
    for p in sorted(sdir.iterdir()):
        if p.name in listed or p.name in (MANIFEST_JSON, LOCK_FILE, LEASE_FILE):
            continue
        if live and (is_tmp_name(p.name) or p.name.startswith("chunk_")):
            continue  # the live writer's chunk in progress
        rep.problems.append(Problem(f"{sdir.name}/{p.name}", "not listed in the shard manifest (left over from an "
                                    "interrupted write, which re-running collect removes, or put there by hand)"))


def _orphaned_chunks(sdir: Path) -> dict[int, list[str]]:
    """Chunk index -> names of its chunk_*.npy files in a shard directory (empty if there is none)."""
    out: dict[int, list[str]] = {}
    if sdir.is_dir():
        for p in sorted(sdir.glob("chunk_*.npy")):
            m = _CHUNK_RE.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p.name)
    return out


def _verify_file(sdir: Path, shard: int, key: str, entry: dict, meta: dict, rep: VerifyReport,
                 check_hash: bool) -> None:
    rel = f"{sdir.name}/{entry['file']}"
    path = sdir / entry["file"]
    bad = lambda msg: rep.problems.append(Problem(rel, msg))  # noqa: E731
    remote = isinstance(path, RemotePath)
    try:  # a remote file is fetched once, whole: its size, hash and array come from those bytes
        data = path.read_bytes() if remote else None
    except FileNotFoundError:
        data = None
    if not (data is not None if remote else path.is_file()):
        return bad("missing (listed in the shard manifest)")
    size = len(data) if remote else path.stat().st_size
    if size != entry["bytes"]:
        return bad(f"{'truncated' if size < entry['bytes'] else 'padded'}: {size:,} bytes, manifest says {entry['bytes']:,}")
    digest = entry["sha256"] if not check_hash else sha256_bytes(data) if remote else sha256_file(path)
    if digest != entry["sha256"]:
        rep.files.append(FileCheck(rel, entry["shape"], entry["dtype"], digest, False))
        return bad("sha256 mismatch (the file changed after it was written)")
    try:
        arr = npy_from_bytes(data, path) if remote else np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, UsageError) as e:
        return bad(f"not a readable .npy file ({e})")
    if list(arr.shape) != list(entry["shape"]) or arr.dtype.name != entry["dtype"]:
        return bad(f"holds {arr.dtype.name} {list(arr.shape)}, manifest says {entry['dtype']} {entry['shape']}")
    rep.files.append(FileCheck(rel, list(arr.shape), arr.dtype.name, digest, True))
    if key == TOKENS:
        _check_tokens(arr, rel, rep)
    elif key == SEQPOS:
        _check_seqpos(arr, rel, shard, meta, rep)
    else:
        nan = inf = 0
        for i in range(0, len(arr), _BLOCK_ROWS):
            block = np.asarray(arr[i:i + _BLOCK_ROWS])
            nan += int(np.count_nonzero(np.isnan(block)))
            inf += int(np.count_nonzero(np.isinf(block)))
        rep.nan[key] = rep.nan.get(key, 0) + nan
        rep.inf[key] = rep.inf.get(key, 0) + inf
        if nan or inf:
            bad(f"{nan:,} NaN and {inf:,} inf values")


def _check_tokens(arr: np.ndarray, rel: str, rep: VerifyReport) -> None:
    if not len(arr):
        return
    lo, hi = int(arr.min()), int(arr.max())
    rep.token_min = lo if rep.token_min is None else min(rep.token_min, lo)
    rep.token_max = hi if rep.token_max is None else max(rep.token_max, hi)
    if lo < 0 or (rep.vocab_size and hi >= rep.vocab_size):
        rep.problems.append(Problem(rel, f"token ids in [{lo}, {hi}] fall outside the vocabulary [0, {rep.vocab_size})"))


def _check_seqpos(arr: np.ndarray, rel: str, shard: int, meta: dict, rep: VerifyReport) -> None:
    if not len(arr):
        return
    if np.any(arr[:, 0] % meta["num_shards"] != shard) or arr[:, 0].min() < 0:
        rep.problems.append(Problem(rel, f"holds sequences that do not belong to shard {shard} "
                                    f"(sequence i belongs to shard i % {meta['num_shards']})"))
    max_len = meta.get("max_length")
    if arr[:, 1].min() < 0 or (max_len and arr[:, 1].max() >= max_len):
        rep.problems.append(Problem(rel, f"positions outside [0, {max_len})"))


def render_verify(rep: VerifyReport) -> str:
    """Ticked summary lines, one ✗ line per problem, naming the file."""
    lines = [f"{rep.path}"]
    if STORE_JSON in {p.file for p in rep.problems}:
        return "\n".join(lines + [f"✗ {p}" for p in rep.problems])
    lines.append(f"✓ {rep.num_shards} shard(s) ({rep.shards_done} done), {rep.num_chunks:,} chunks, {rep.num_tokens:,} tokens")
    lines.append("✓ hooks: " + ", ".join(f"{h} [{w}]" for h, w in rep.hooks.items()) + ", float16")
    ok_files = sum(f.ok for f in rep.files)
    lines.append(f"{'✓' if ok_files == len(rep.files) else '✗'} sha256, size and shape of {ok_files:,} of {len(rep.files):,} checked files")
    bad_vals = {h: (rep.nan[h], rep.inf[h]) for h in rep.hooks if rep.nan.get(h) or rep.inf.get(h)}
    lines.append("✓ no NaN or inf" if not bad_vals else "✗ " + ", ".join(
        f"{h}: {n:,} NaN, {i:,} inf" for h, (n, i) in bad_vals.items()))
    if rep.token_min is not None:
        in_range = rep.token_min >= 0 and (not rep.vocab_size or rep.token_max < rep.vocab_size)
        lines.append(f"{'✓' if in_range else '✗'} token ids in [{rep.token_min:,}, {rep.token_max:,}] (vocab {rep.vocab_size or '?'})")
    clamped = {h: n for h, n in rep.overflow.items() if n}
    if clamped:
        lines.append("! clamped to the fp16 range when written: " + ", ".join(f"{h}: {n:,}" for h, n in clamped.items()))
    lines += [concentration_line(h, norms) for h, norms in rep.chunk_norms.items()]
    lines += [f"! {n}" for n in rep.notes]
    lines += [f"✗ {p}" for p in rep.problems]
    lines.append("✓ store is sound" if rep.ok else f"✗ {len(rep.problems)} problem(s)")
    return "\n".join(lines)


@dataclass
class ShardStatus:
    """Progress of one shard, from its manifest."""

    shard: int
    state: str
    """'done', 'writing' (a live writer holds the lock), 'stopped' or 'not started'."""
    tokens_done: int
    tokens_target: int
    chunks: int
    tokens_per_s: float | None
    """Over the current (or last) writer session; None before its first chunk."""
    eta_s: float | None
    """Seconds to the target at tokens_per_s, while writing."""
    disk_bytes: int
    updated_at: float | None

    @property
    def percent(self) -> float:
        return 100.0 * self.tokens_done / self.tokens_target if self.tokens_target else 0.0


def monitor_snapshot(path: str | Path) -> list[ShardStatus]:
    """One status per shard of the store at `path` (a directory or an fsspec URL)."""
    root = location(path)
    meta = read_json(root / STORE_JSON, "store manifest") if (root / STORE_JSON).is_file() else None
    if meta is None:
        raise UsageError(f"{root} has no {STORE_JSON}: no collection has started there (or it is not a store).")
    n, out = meta["num_shards"], []
    for shard in range(n):
        sdir = root / shard_dir_name(shard)
        target = shard_target(int(meta.get("tokens_target") or 0), shard, n)
        if not (sdir / MANIFEST_JSON).is_file():
            out.append(ShardStatus(shard, "not started", 0, target, 0, None, None, 0, None))
            continue
        m = read_json(sdir / MANIFEST_JSON, "shard manifest")
        done = sum(c["num_tokens"] for c in m["chunks"])
        live = shard_is_locked(sdir)
        state = "done" if m.get("done") else "writing" if live else "stopped"
        rate = None
        start, t0 = m.get("session_tokens_start", 0), m.get("session_started_at")
        session = [c for c in m["chunks"] if t0 and c["written_at"] >= t0]
        if session and session[-1]["written_at"] > t0:
            rate = (done - start) / (session[-1]["written_at"] - t0)
        eta = (max(target - done, 0) / rate) if (rate and state == "writing") else None
        disk = sum(p.stat().st_size for p in sdir.iterdir() if p.is_file())
        out.append(ShardStatus(shard, state, done, target, len(m["chunks"]), rate, eta, disk, m.get("updated_at")))
    return out


def render_monitor(path: str | Path, statuses: list[ShardStatus]) -> str:
    """A table: shard, state, tokens done / target (%), chunks, tokens/s, ETA, disk."""
    head = f"{'shard':>5}  {'state':<11} {'tokens done / target':>27}  {'chunks':>6}  {'tok/s':>8}  {'ETA':>9}  {'disk':>9}"
    rows = [f"{path}", head]
    for s in statuses:
        tok = f"{s.tokens_done:,} / {s.tokens_target:,} ({s.percent:5.1f}%)"
        rate = f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else "-"
        rows.append(f"{s.shard:>5}  {s.state:<11} {tok:>27}  {s.chunks:>6}  {rate:>8}  {_duration(s.eta_s):>9}  "
                    f"{_bytes(s.disk_bytes):>9}")
    done = sum(s.tokens_done for s in statuses)
    target = sum(s.tokens_target for s in statuses)
    rows.append(f"{'all':>5}  {'':<11} {f'{done:,} / {target:,}':>27}  {sum(s.chunks for s in statuses):>6}  "
                f"{'':>8}  {'':>9}  {_bytes(sum(s.disk_bytes for s in statuses)):>9}")
    rows += [concentration_line(h, norms) for h, norms in _manifest_norms(path).items()]
    rows.append(time.strftime("updated %Y-%m-%d %H:%M:%S"))
    return "\n".join(rows)


def _manifest_norms(path: str | Path) -> dict[str, list[dict]]:
    """Hook name -> every listed chunk's row-norm entry, read from the shard manifests only."""
    out: dict[str, list[dict]] = {}
    for sdir in sorted(location(path).glob("shard_*")):
        try:
            chunks = read_json(sdir / MANIFEST_JSON, "shard manifest")["chunks"]
        except (UsageError, KeyError):
            continue
        for c in chunks:
            for name, norms in (c.get("norms") or {}).items():
                out.setdefault(name, []).append({**norms, "rows": c["num_tokens"]})
    return out


def concentration_line(hook: str, chunk_norms: list[dict]) -> str:
    """`· hook: 0.012% of rows flagged as massive activations; the top 0.1% hold 3.4% of sum ||x||^2`."""
    rows, flagged, share = concentration(chunk_norms)
    return (f"· {hook}: {flagged:,} of {rows:,} rows ({100 * flagged / max(rows, 1):.3f}%) flagged as massive "
            f"activations; the top {100 * TOP_SHARE:g}% of rows hold {100 * share:.1f}% of the summed ||x||^2")


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""
