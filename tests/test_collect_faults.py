"""collect under faults (issue 20): a lost manifest, a larger --tokens, errors that need no model.

Tiny random Llama saved as a local directory; every run takes well under a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from saelab.cli import main
from saelab.collect import collect
from saelab.errors import DataError, UsageError
from saelab.store import ShardWriter, load_store
from tests.builders import tiny_collect_cfg as cfg_for

pytestmark = pytest.mark.usefixtures("one_thread")


def digest(path: Path) -> dict[str, str]:
    """sha256 of every chunk file, plus each manifest's chunk entries without timestamps."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.suffix == ".npy":
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.name == "manifest.json":
            m = json.loads(f.read_text())
            out[str(f.relative_to(path))] = json.dumps(
                [{k: v for k, v in c.items() if k != "written_at"} for c in m["chunks"]]
                + [m["sequences_done"], m["batches_done"], m["tokens_done"], m["done"]], sort_keys=True)
    return out


def test_collect_refuses_to_delete_chunks_of_a_lost_manifest(llama_dir, corpus_dir, tmp_path):
    collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=150), quiet=True)
    sdir = tmp_path / "s" / "shard_00000"
    original = json.loads((sdir / "manifest.json").read_text())
    (sdir / "manifest.json").unlink()
    chunks = sorted(p.name for p in sdir.glob("chunk_*"))
    assert len(chunks) >= 6
    with pytest.raises(DataError, match="rebuild-manifest"):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=150), quiet=True)
    assert sorted(p.name for p in sdir.glob("chunk_*")) == chunks, "collect deleted chunk files it did not write"
    assert main(["verify", "--rebuild-manifest", str(tmp_path / "s")]) == 0
    rebuilt = json.loads((sdir / "manifest.json").read_text())
    same = lambda c: {k: v for k, v in c.items() if k != "written_at"}  # noqa: E731
    assert [same(c) for c in rebuilt["chunks"]] == [same(c) for c in original["chunks"]]  # incl. outlier flags
    assert (rebuilt["sequences_done"], rebuilt["batches_done"]) == (original["sequences_done"], original["batches_done"])
    res = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "s", tokens=150), quiet=True)
    assert res.tokens >= 150 and sorted(p.name for p in sdir.glob("chunk_*")) == chunks


def test_a_larger_tokens_extends_a_complete_store_to_what_one_run_writes(llama_dir, corpus_dir, tmp_path):
    small = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "grown", tokens=70), quiet=True)
    assert 70 <= small.tokens < 200
    grown = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "grown", tokens=200), quiet=True)
    assert grown.tokens >= 200
    direct = collect(cfg_for(llama_dir, corpus_dir, tmp_path / "direct", tokens=200), quiet=True)
    assert grown.tokens == direct.tokens
    assert digest(tmp_path / "grown") == digest(tmp_path / "direct")  # same chunks, byte for byte
    assert json.loads((tmp_path / "grown" / "store.json").read_text())["tokens_target"] == 200
    assert load_store(tmp_path / "grown").num_tokens == direct.tokens


def test_out_under_a_regular_file_fails_before_the_model_loads(corpus_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cfg = cfg_for(tmp_path / "no_such_model", corpus_dir, tmp_path / "file" / "store")
    with pytest.raises(UsageError) as e:
        collect(cfg, quiet=True)
    msg = str(e.value)
    assert "is a regular file" in msg and str(tmp_path / "file") in msg
    assert "no_such_model" not in msg, "the model was looked at first"
    assert "resume" not in msg and "intact" not in msg, "there is nothing to resume"


def test_locked_shard_fails_before_the_model_loads_naming_the_holder(corpus_dir, tmp_path, capsys):
    from tests.builders import id_store_meta

    with ShardWriter.open(tmp_path / "s", id_store_meta(), 0, 1):
        rc = main(["collect", "--model", str(tmp_path / "no_such_model"), "--corpus", str(corpus_dir),
                   "--out", str(tmp_path / "s"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err
    assert "no_such_model" not in err


def test_device_cuda_without_cuda_is_a_usage_error(llama_dir, corpus_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["collect", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", str(tmp_path / "s"),
               "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "--device cpu" in err and "Traceback" not in err
