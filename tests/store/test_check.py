"""`verify_store` / `saelab verify` and `monitor_snapshot` / `saelab monitor` on small synthetic stores."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tests.builders import ID_HOOK as HOOK, chunk_arrays, id_store as make_store, id_store_meta as make_meta

from saelab.cli import main
from saelab.store import ShardWriter
from saelab.store.check import monitor_snapshot, render_monitor, render_verify, verify_store

BAD = f"shard_00001/chunk_000000.{HOOK}.npy"


def test_sound_store_passes_with_counts(tmp_path):
    make_store(tmp_path, chunks=(3, 2))
    rep = verify_store(tmp_path)
    assert rep.ok, rep.problems
    assert (rep.num_shards, rep.shards_done, rep.num_chunks, rep.num_tokens) == (2, 2, 5, 30)
    assert len(rep.files) == 15 and all(f.ok for f in rep.files)
    assert rep.nan == {HOOK: 0} and rep.inf == {HOOK: 0}
    assert (rep.token_min, rep.token_max, rep.vocab_size) == (0, 29, 256)
    text = render_verify(rep)
    assert "✓ 2 shard(s) (2 done), 5 chunks, 30 tokens" in text and "✓ store is sound" in text
    assert "✗" not in text


@pytest.mark.parametrize("damage,message", [("flip", "sha256 mismatch"), ("truncate", "truncated"),
                                            ("append", "padded")])
def test_damaged_chunk_is_named(tmp_path, damage, message):
    make_store(tmp_path, chunks=(2, 2))
    f = tmp_path / BAD
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01  # one bit of one activation: numpy would load it without complaint
    elif damage == "truncate":
        data = data[:-2]
    else:
        data += b"\x00\x00"
    f.write_bytes(bytes(data))
    if damage != "truncate":
        np.load(f)  # numpy itself loads flipped and trailing bytes without complaint
    rep = verify_store(tmp_path)
    assert [p.file for p in rep.problems] == [BAD] and message in rep.problems[0].message
    assert f"✗ {BAD}: {message}" in render_verify(rep)


def test_nan_and_out_of_vocab_tokens_are_problems(tmp_path):
    tokens, seqpos, acts = chunk_arrays(0, 0, 6)
    acts[HOOK][2, 1] = np.nan
    tokens[3] = 300  # vocab is 256
    with ShardWriter.open(tmp_path, make_meta(), 0, 1) as w:
        w.write_chunk(tokens, seqpos, acts, 1, 1)
        w.finish()
    rep = verify_store(tmp_path)
    files = {p.file: p.message for p in rep.problems}
    assert "1 NaN" in files[f"shard_00000/chunk_000000.{HOOK}.npy"]
    assert "outside the vocabulary" in files["shard_00000/chunk_000000.tokens.npy"]
    assert rep.nan == {HOOK: 1}


def test_sequences_in_the_wrong_shard_are_a_problem(tmp_path):
    tokens, seqpos, acts = chunk_arrays(0, 0, 4)
    seqpos[:, 0] = 1  # sequence 1 belongs to shard 1 of 2
    with ShardWriter.open(tmp_path, make_meta(), 0, 2) as w:
        w.write_chunk(tokens, seqpos, acts, 1, 1)
    rep = verify_store(tmp_path)
    assert [p.file for p in rep.problems] == ["shard_00000/chunk_000000.seqpos.npy"]
    assert any("shard_00001: not started" in n for n in rep.notes)


def test_leftover_and_missing_files(tmp_path):
    make_store(tmp_path, chunks=(1, 1))
    (tmp_path / "shard_00000" / "chunk_000001.tokens.npy.tmp").write_bytes(b"x")
    (tmp_path / BAD).unlink()
    (tmp_path / "shard_00007").mkdir()
    for stray in ("store.json.tmp", "store.json.host.123.tmp", "store.json.tmp-" + "0f" * 16):
        (tmp_path / stray).write_bytes(b"{}")
    rep = verify_store(tmp_path)
    msgs = {p.file: p.message for p in rep.problems}
    assert "not listed" in msgs["shard_00000/chunk_000001.tokens.npy.tmp"]
    assert "missing" in msgs[BAD]
    assert "unexpected directory" in msgs["shard_00007"]
    for stray in ("store.json.tmp", "store.json.host.123.tmp", "store.json.tmp-" + "0f" * 16):
        assert "interrupted write of store.json" in msgs[stray]
    assert "store.json" not in msgs


def test_not_a_store(tmp_path):
    rep = verify_store(tmp_path / "nope")
    assert not rep.ok and "does not exist" in str(rep.problems[0])


def test_cli_verify_exit_codes_and_names_bad_files(tmp_path, capsys):
    good, bad = make_store(tmp_path / "good", chunks=(1, 1)), make_store(tmp_path / "bad", chunks=(1, 1))
    f = bad / BAD
    f.write_bytes(f.read_bytes()[:-4] + b"\x01\x02\x03\x04")
    assert main(["verify", str(good)]) == 0
    assert "✓ store is sound" in capsys.readouterr().out
    assert main(["verify", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"✗ {BAD}: sha256 mismatch" in out and out.count("✗ 1 problem(s)") == 1
    assert main(["verify", "--no-hash", str(bad)]) == 0  # a size-preserving flip needs the hash


def test_monitor_snapshot_progress_rate_and_state(tmp_path):
    meta = make_meta(tokens_target=41)  # shards get 21 and 20 tokens
    w = ShardWriter.open(tmp_path, meta, 0, 2)
    for i in range(2):
        w.write_chunk(*chunk_arrays(0, i, 5), sequences_done=i + 1, batches_done=i + 1)
    s0, s1 = monitor_snapshot(tmp_path)
    assert (s0.state, s0.tokens_done, s0.tokens_target, s0.chunks) == ("writing", 10, 21, 2)
    assert s0.tokens_per_s > 0 and s0.eta_s is not None and s0.disk_bytes > 0
    assert (s1.state, s1.tokens_done, s1.tokens_target) == ("not started", 0, 20)
    w.close()
    assert monitor_snapshot(tmp_path)[0].state == "stopped"
    ShardWriter.open(tmp_path, meta, 0, 2).finish()
    s0 = monitor_snapshot(tmp_path)[0]
    assert s0.state == "done" and s0.percent == pytest.approx(100 * 10 / 21)
    text = render_monitor(tmp_path, monitor_snapshot(tmp_path))
    assert "10 / 21 ( 47.6%)" in text and "not started" in text


def test_cli_monitor(tmp_path, capsys):
    make_store(tmp_path, chunks=(1, 1))
    assert main(["monitor", str(tmp_path)]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["monitor", str(tmp_path / "nope")]) == 2  # UsageError


def test_manifest_lists_every_file_with_sha(tmp_path):
    make_store(tmp_path, num_shards=1, chunks=(1,))
    man = json.loads((tmp_path / "shard_00000" / "manifest.json").read_text())
    files = man["chunks"][0]["files"]
    assert set(files) == {"tokens", "seqpos", HOOK}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
