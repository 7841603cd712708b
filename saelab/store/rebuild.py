"""Rebuild a lost shard manifest from its chunk files: `saelab verify --rebuild-manifest STORE`.

Only an explicit command does this (collect and verify never do): a manifest is what says a chunk
is complete, so a rebuilt one is written only after every chunk file has been checked, and only
for a shard whose manifest is missing (or unreadable: it is moved to STORE/shard_XXXXX.manifest.json.damaged).

Checks, per chunk index c = 0, 1, ... (contiguous from 0) and store.json's hooks h of width D_h:

    files     chunk_c.tokens.npy, chunk_c.seqpos.npy and chunk_c.<key_h>.npy all present, no others
    arrays    plain .npy (no pickle); tokens int32 [N], seqpos int32 [N, 2], h float16 [N, D_h]
    values    0 <= token < vocab_size;  seq % num_shards == shard;  0 <= pos < max_length;
              no NaN or inf in any activation file

and the progress each entry records, from the chunk's own rows (the batch grid of collect.py):

    batches_done(c)   = max_n(seq_n // num_shards) // batch_size + 1      (local sequence index)
    sequences_done(c) = batches_done(c) * batch_size
    overflow_h(c)     = #{ |x| == 65504 }        (values the writer clamped; an upper bound)
    norms_h(c)        = outlier_flags(||x_n|| of the stored fp16 rows, medians of chunks 0..c-1, ratio)
                        (exactly what the writer recorded: the same rows flagged as massive activations)

Any problem: nothing is written, and every problem is reported with its file. On object storage
the same checks run on each chunk file fetched whole (one chunk in memory at a time), and a damaged
manifest is moved aside by a server-side copy.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saelab.store.format import (
    FORMAT_VERSION, FP16_MAX, MANIFEST_JSON, SEQPOS, STORE_JSON, TOKENS, ChunkEntry, check_format_version,
    json_bytes, npy_from_bytes, outlier_flags, read_json, sha256_file, shard_dir_name, shard_target,
    write_bytes_atomic,
)
from saelab.errors import UsageError
from saelab.store.remote import RemotePath, location, sha256_bytes

_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.(.+)\.npy$")
_BLOCK_ROWS = 1 << 16


@dataclass
class RebuildReport:
    """What `rebuild_manifests` did."""

    path: Path
    rebuilt: dict[int, int] = field(default_factory=dict)
    """Shard -> chunks listed in its new manifest."""
    problems: list[str] = field(default_factory=list)
    """Why nothing was written (file: message)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def rebuild_manifests(path: str | Path) -> RebuildReport:
    """Write a manifest for every shard of the store that has chunk files but no (readable) manifest.

    Raises:
        UsageError: `path` is not a store (no readable store.json of a known format_version).
    """
    root = location(path)
    meta = read_json(root / STORE_JSON, "store manifest")
    check_format_version(meta, root / STORE_JSON, "store manifest")
    rep = RebuildReport(root)
    plans = {}
    for shard in range(meta["num_shards"]):
        sdir = root / shard_dir_name(shard)
        mpath = sdir / MANIFEST_JSON
        if mpath.is_file():
            try:
                read_json(mpath, "shard manifest")
                continue  # a readable manifest is never replaced
            except UsageError:
                pass
        if not sdir.is_dir() or not any(sdir.glob("chunk_*.npy")):
            continue
        entries, problems = _check_shard(sdir, shard, meta)
        rep.problems += problems
        plans[shard] = entries
    if rep.problems:
        return rep
    for shard, entries in plans.items():
        sdir = root / shard_dir_name(shard)
        mpath = sdir / MANIFEST_JSON
        if mpath.exists():  # kept beside the shard, where verify does not count it as a stray file
            damaged = root / f"{sdir.name}.{MANIFEST_JSON}.damaged"
            if isinstance(mpath, RemotePath):
                mpath.fs.mv(mpath.key, damaged.key)
            else:
                os.replace(mpath, damaged)
        tokens = sum(e.num_tokens for e in entries)
        last = entries[-1]
        now = time.time()
        manifest = {"format_version": FORMAT_VERSION, "shard": shard, "num_shards": meta["num_shards"],
                    "sequences_done": last.sequences_done, "batches_done": last.batches_done,
                    "tokens_done": tokens,
                    "done": tokens >= shard_target(int(meta.get("tokens_target") or 0), shard, meta["num_shards"]),
                    "created_at": now, "rebuilt_at": now, "chunks": [e.to_json() for e in entries]}
        write_bytes_atomic(mpath, json_bytes(manifest))
        rep.rebuilt[shard] = len(entries)
    return rep


def _check_shard(sdir: Path, shard: int, meta: dict) -> tuple[list[ChunkEntry], list[str]]:
    hooks = {h["key"]: h for h in meta["hooks"]}
    want = {TOKENS, SEQPOS, *hooks}
    by_index: dict[int, dict[str, Path]] = {}
    problems = []
    for p in sorted(sdir.glob("chunk_*")):
        m = _CHUNK_RE.match(p.name)
        if not m:
            problems.append(f"{p}: not a chunk file name (chunk_NNNNNN.KEY.npy)")
            continue
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = p
    indices = sorted(by_index)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        problems.append(f"{sdir}: chunks {_ranges(missing)} are missing; chunk indices must run 0, 1, 2, ... "
                        "(move the later chunk files away to rebuild the manifest of the ones before)")
    entries: list[ChunkEntry] = []
    medians: dict[str, list[float]] = {h["name"]: [] for h in hooks.values()}
    for index in indices:
        files = by_index[index]
        if set(files) != want:
            lacking, extra = sorted(want - set(files)), sorted(set(files) - want)
            problems.append(f"{sdir}/chunk_{index:06d}: " + "; ".join(
                ([f"missing files for {', '.join(lacking)}"] if lacking else [])
                + ([f"files for keys store.json does not know: {', '.join(extra)}"] if extra else [])))
            continue
        entry, bad = _check_chunk(files, index, shard, meta, hooks, medians)
        problems += bad
        if entry is not None:
            entries.append(entry)
            for name, n in entry.norms.items():
                medians[name].append(n["median"])
    return entries, problems


def _check_chunk(files: dict[str, Path], index: int, shard: int, meta: dict, hooks: dict[str, dict],
                 medians: dict[str, list[float]]):
    problems, arrays, entry_files, digests = [], {}, {}, {}
    for key, p in files.items():
        try:
            if isinstance(p, RemotePath):  # fetched whole once: the array and its hash come from those bytes
                data = p.read_bytes()
                arrays[key], digests[key] = npy_from_bytes(data, p), sha256_bytes(data)
            else:
                arrays[key] = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, UsageError) as e:
            problems.append(f"{p}: not a plain .npy array ({e})")
    if problems:
        return None, problems
    n = len(arrays[TOKENS])
    expect = {TOKENS: ("int32", (n,)), SEQPOS: ("int32", (n, 2)),
              **{k: ("float16", (n, int(h["width"]))) for k, h in hooks.items()}}
    for key, (dtype, shape) in expect.items():
        a = arrays[key]
        if a.dtype.name != dtype or tuple(a.shape) != shape:
            problems.append(f"{files[key]}: holds {a.dtype.name} {list(a.shape)}, expected {dtype} {list(shape)}")
    if problems:
        return None, problems
    tokens, seqpos = np.asarray(arrays[TOKENS]), np.asarray(arrays[SEQPOS])
    vocab = (meta.get("tokenizer") or {}).get("vocab_size")
    if n and (tokens.min() < 0 or (vocab and tokens.max() >= vocab)):
        problems.append(f"{files[TOKENS]}: token ids in [{tokens.min()}, {tokens.max()}] fall outside [0, {vocab})")
    S, max_len = meta["num_shards"], meta.get("max_length")
    if n and (seqpos[:, 0].min() < 0 or np.any(seqpos[:, 0] % S != shard)):
        problems.append(f"{files[SEQPOS]}: holds sequences of another shard (sequence i belongs to shard i % {S})")
    if n and (seqpos[:, 1].min() < 0 or (max_len and seqpos[:, 1].max() >= max_len)):
        problems.append(f"{files[SEQPOS]}: positions outside [0, {max_len})")
    overflow, nan, norms = {}, {}, {}
    for key, h in hooks.items():
        a, bad, over, row_norms = arrays[key], 0, 0, []
        for i in range(0, n, _BLOCK_ROWS):
            block = np.asarray(a[i:i + _BLOCK_ROWS])
            bad += int(np.count_nonzero(~np.isfinite(block)))
            over += int(np.count_nonzero(np.abs(block) == FP16_MAX))
            row_norms.append(np.linalg.norm(block.astype(np.float32), axis=1))
        if bad:
            problems.append(f"{files[key]}: {bad:,} NaN/inf values")
        overflow[h["name"]], nan[h["name"]] = over, 0
        if n:
            norms[h["name"]] = outlier_flags(np.concatenate(row_norms), medians[h["name"]], meta.get("outlier_ratio"))
    if problems or n == 0:
        return None, problems or [f"{files[TOKENS]}: an empty chunk (saelab never writes one)"]
    batch = int(meta.get("batch_size") or 1)
    batches_done = int(seqpos[:, 0].max()) // S // batch + 1
    names = {TOKENS: TOKENS, SEQPOS: SEQPOS, **{k: h["name"] for k, h in hooks.items()}}
    for key, p in files.items():
        a = arrays[key]
        entry_files[names[key]] = {"file": p.name, "sha256": digests.get(key) or sha256_file(p), "bytes": p.stat().st_size,
                                   "shape": list(a.shape), "dtype": a.dtype.name}
    return ChunkEntry(index, n, entry_files, overflow, nan, batches_done * batch, batches_done,
                      p.stat().st_mtime, norms), []


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs[:8]) + (", ..." if len(xs) > 8 else "")


def render_rebuild(rep: RebuildReport) -> str:
    """One line per rebuilt shard, or one ✗ line per problem."""
    if rep.problems:
        return "\n".join([f"{rep.path}: the manifest was NOT rebuilt (nothing written):"]
                         + [f"✗ {p}" for p in rep.problems])
    if not rep.rebuilt:
        return f"{rep.path}: every shard with chunk files has a readable manifest; nothing to rebuild"
    return "\n".join(f"✓ rebuilt {shard_dir_name(s)}/{MANIFEST_JSON}: {n} chunk(s), each checked"
                     for s, n in rep.rebuilt.items())
