"""Faults in a store's files (issue 20): a lost manifest, foreign chunk files, unknown format versions,
an object-dtype chunk, a locked shard. Each test fails on a saelab that accepted them silently."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from saelab.cli import main
from saelab.errors import DataError, UsageError
from saelab.store import ShardWriter, load_store
from saelab.store.check import verify_store
from saelab.store.synthetic import make_synthetic_store
from tests.builders import HOOK, chunk_arrays, id_store, id_store_meta

SHARD0 = "shard_00000"


def _synthetic(root: Path) -> Path:
    """2 shards x 4 chunks of 256 rows, every shard complete."""
    return make_synthetic_store(root, d_in=8, n_tokens=2048, chunk_tokens=256, num_shards=2, seed=3)


def _set_sha(manifest: Path, file_name: str, path: Path) -> None:
    """Make a tampered chunk file pass its size and sha256 checks (a consistent forgery)."""
    from saelab.atomic import sha256_file

    m = json.loads(manifest.read_text())
    for c in m["chunks"]:
        for f in c["files"].values():
            if f["file"] == file_name:
                f["sha256"], f["bytes"] = sha256_file(path), path.stat().st_size
    manifest.write_text(json.dumps(m))


# ------------------------------------------------------------------ a lost shard manifest


def test_verify_fails_naming_the_orphaned_chunks_of_a_lost_manifest(tmp_path):
    root = _synthetic(tmp_path / "s")
    (root / SHARD0 / "manifest.json").unlink()
    rep = verify_store(root)
    assert not rep.ok
    files = {p.file for p in rep.problems}
    assert {f"{SHARD0}/chunk_{i:06d}.*" for i in range(4)} | {f"{SHARD0}/manifest.json"} == files
    assert "rebuild-manifest" in next(p.message for p in rep.problems if p.file.endswith("manifest.json"))
    assert main(["verify", str(root)]) == 1


def test_a_writer_deletes_no_chunk_it_did_not_write(tmp_path):
    root = _synthetic(tmp_path / "s")
    sdir = root / SHARD0
    meta = json.loads((root / "store.json").read_text())
    (sdir / "manifest.json").unlink()
    before = sorted(p.name for p in sdir.glob("chunk_*"))
    with pytest.raises(DataError, match=r"no manifest.json.*rebuild-manifest"):
        ShardWriter.open(root, meta, 0, 2)
    assert sorted(p.name for p in sdir.glob("chunk_*")) == before and len(before) == 12

    # with a manifest: an unlisted chunk that no interrupted write explains (index 7, 4 listed) stays too
    stray = root / "shard_00001" / "chunk_000007.tokens.npy"
    stray.write_bytes((root / "shard_00001" / "chunk_000000.tokens.npy").read_bytes())
    with pytest.raises(DataError, match="chunk_000007.tokens.npy"):
        ShardWriter.open(root, meta, 1, 2)
    assert stray.exists()


def test_rebuild_manifest_checks_every_chunk_and_restores_the_store(tmp_path, capsys):
    root = _synthetic(tmp_path / "s")
    original = json.loads((root / SHARD0 / "manifest.json").read_text())
    (root / SHARD0 / "manifest.json").unlink()

    # a chunk with a NaN: nothing is written, the file is named, exit 1
    bad = root / SHARD0 / f"chunk_000002.{HOOK}.npy"
    good_bytes = bad.read_bytes()
    x = np.load(bad)
    x[5, 1] = np.nan
    np.save(bad, x)
    assert main(["verify", "--rebuild-manifest", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"chunk_000002.{HOOK}.npy: 1 NaN/inf values" in out and "NOT rebuilt" in out
    assert not (root / SHARD0 / "manifest.json").exists()

    bad.write_bytes(good_bytes)
    assert main(["verify", "--rebuild-manifest", str(root)]) == 0
    assert "rebuilt shard_00000/manifest.json: 4 chunk(s)" in capsys.readouterr().out
    rebuilt = json.loads((root / SHARD0 / "manifest.json").read_text())
    for k in ("sequences_done", "batches_done", "tokens_done", "done", "shard", "num_shards", "format_version"):
        assert rebuilt[k] == original[k], k
    keep = ("index", "num_tokens", "files", "overflow", "nan", "sequences_done", "batches_done", "norms")
    assert [{k: c[k] for k in keep} for c in rebuilt["chunks"]] == [{k: c[k] for k in keep} for c in original["chunks"]]
    assert verify_store(root).ok and len(load_store(root).chunks) == 8


def test_rebuild_refuses_a_gap_and_never_replaces_a_readable_manifest(tmp_path, capsys):
    root = _synthetic(tmp_path / "s")
    (root / SHARD0 / "manifest.json").unlink()
    for p in (root / SHARD0).glob("chunk_000001.*"):
        p.unlink()
    stamp = (root / "shard_00001" / "manifest.json").stat().st_mtime_ns
    assert main(["verify", "--rebuild-manifest", str(root)]) == 1
    assert "chunks 1 are missing" in capsys.readouterr().out
    assert not (root / SHARD0 / "manifest.json").exists()
    assert (root / "shard_00001" / "manifest.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------ unknown format versions


@pytest.mark.parametrize("version", [99, 0, None])
def test_unknown_shard_manifest_version_is_refused_everywhere(tmp_path, version):
    root = id_store(tmp_path / "s", num_shards=1, chunks=(2,))
    mpath = root / SHARD0 / "manifest.json"
    m = json.loads(mpath.read_text())
    m["format_version"] = version
    mpath.write_text(json.dumps(m))
    rep = verify_store(root)
    assert [p.file for p in rep.problems] == [f"{SHARD0}/manifest.json"] and "format_version" in rep.problems[0].message
    with pytest.raises(DataError, match=rf"manifest.json has format_version {version}"):
        load_store(root)
    with pytest.raises(DataError, match="format_version"):
        ShardWriter.open(root, id_store_meta(), 0, 1)


def test_unknown_store_json_version_fails_verify(tmp_path, capsys):
    root = id_store(tmp_path / "s", num_shards=1, chunks=(1,))
    meta = json.loads((root / "store.json").read_text())
    meta["format_version"] = 99
    (root / "store.json").write_text(json.dumps(meta))
    rep = verify_store(root)
    assert not rep.ok and "format_version 99" in str(rep.problems[0])
    assert main(["verify", str(root)]) == 1
    with pytest.raises(UsageError, match="format_version 99"):
        load_store(root)


# ------------------------------------------------------------------ a chunk that is not a plain array


def test_object_dtype_chunk_is_a_named_data_error(tmp_path):
    root = id_store(tmp_path / "s", num_shards=1, chunks=(2,))
    sdir = root / SHARD0
    name = "chunk_000001.model.layers.1.npy"
    np.save(sdir / name, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _set_sha(sdir / "manifest.json", name, sdir / name)
    store = load_store(root)
    with pytest.raises(DataError, match=rf"{name} is not a plain .npy array"):
        store.read_activations(1, "model.layers.1")


# ------------------------------------------------------------------ a shard locked by another writer


def test_lock_message_names_the_holders_pid_and_host(tmp_path):
    root = tmp_path / "s"
    with ShardWriter.open(root, id_store_meta(), 0, 1) as w:
        w.write_chunk(*chunk_arrays(0, 0, 5), sequences_done=1, batches_done=1)
        with pytest.raises(UsageError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            ShardWriter.open(root, id_store_meta(), 0, 1)


def test_rebuild_replaces_an_unreadable_manifest_and_keeps_it_aside(tmp_path):
    root = _synthetic(tmp_path / "s")
    mpath = root / SHARD0 / "manifest.json"
    original = json.loads(mpath.read_text())
    mpath.write_text(mpath.read_text()[:100])  # truncated
    assert not verify_store(root).ok
    assert main(["verify", "--rebuild-manifest", str(root)]) == 0
    assert [c["files"] for c in json.loads(mpath.read_text())["chunks"]] == [c["files"] for c in original["chunks"]]
    assert (root / f"{SHARD0}.manifest.json.damaged").read_text() == json.dumps(original, indent=1, sort_keys=True)[:100]
