"""The activation store: writer atomicity and resume, identity checks, fp16 clamping, checked reads,
and the batch stream (determinism, coverage, resume, splits, bounded memory)."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.errors import UsageError
from saelab.store import ChunkInfo, ShardWriter, hook_key, load_store
from tests.builders import ID_HOOK as HOOK, chunk_arrays, id_store as make_store, id_store_meta as make_meta

REPO = Path(__file__).resolve().parents[2]


def test_hook_key_is_filename_safe():
    assert hook_key("model.layers.3.self_attn.o_proj:input") == "model.layers.3.self_attn.o_proj@input"
    assert hook_key("model.layers.15") == "model.layers.15"


def test_roundtrip_values_offsets_and_resume_point(tmp_path):
    make_store(tmp_path, chunks=(3, 2))
    s = load_store(tmp_path)
    assert s.hooks == [HOOK] and s.width(HOOK) == 4
    assert [(c.shard, c.index, c.num_tokens, c.offset) for c in s.chunks] == [
        (0, 0, 5, 0), (0, 1, 7, 5), (0, 2, 6, 12), (1, 0, 5, 18), (1, 1, 7, 23)]
    assert s.num_tokens == 30
    for c in s.chunks:
        x = s.read_activations(c, HOOK)
        assert isinstance(x, np.memmap) and x.dtype == np.float16 and x.shape == (c.num_tokens, 4)
        np.testing.assert_array_equal(x[:, 0], np.arange(c.offset, c.offset + c.num_tokens))
        np.testing.assert_array_equal(s.read_tokens(c), np.arange(c.offset, c.offset + c.num_tokens) % 256)
        assert (s.read_seqpos(c)[:, 0] == c.shard).all()
    w = ShardWriter.open(tmp_path, make_meta(), 0, 2)
    assert (w.chunks_done, w.tokens_done, w.sequences_done, w.batches_done, w.done) == (3, 18, 3, 3, True)
    w.close()


def test_batch_by_batch_builder_writes_the_same_bytes_as_write_chunk(tmp_path):
    tokens, seqpos, acts = chunk_arrays(0, 0, 9)
    with ShardWriter.open(tmp_path / "a", make_meta(), 0, 1) as w:
        w.write_chunk(tokens, seqpos, acts, 1, 1)
    with ShardWriter.open(tmp_path / "b", make_meta(), 0, 1) as w:
        b = w.begin_chunk()
        for sl in (slice(0, 4), slice(4, 9)):
            b.append(torch.from_numpy(tokens[sl]), seqpos[sl], {HOOK: torch.from_numpy(acts[HOOK][sl])})
        b.commit(1, 1)
    for f in sorted((tmp_path / "a" / "shard_00000").glob("chunk_*")):
        assert f.read_bytes() == (tmp_path / "b" / "shard_00000" / f.name).read_bytes(), f.name


def test_wrong_arrays_are_refused_and_leave_nothing(tmp_path):
    tokens, seqpos, acts = chunk_arrays(0, 0, 5)
    with ShardWriter.open(tmp_path, make_meta(), 0, 1) as w:
        with pytest.raises(UsageError, match=r"expected \[5, 4\]"):
            w.write_chunk(tokens, seqpos, {HOOK: acts[HOOK][:, :3]}, 1, 1)
        with pytest.raises(UsageError, match="the store holds"):
            w.write_chunk(tokens, seqpos, {"model.layers.0": acts[HOOK]}, 1, 1)
    assert sorted(p.name for p in (tmp_path / "shard_00000").iterdir()) == [".lock", "manifest.json"]


def test_fp16_overflow_is_clamped_counted_and_logged(tmp_path, caplog):
    tokens, seqpos, acts = chunk_arrays(0, 0, 4)
    x = acts[HOOK]
    x[0, 1], x[1, 2], x[2, 3], x[3, 1] = 1e6, -7e4, 65504.0, np.nan
    with caplog.at_level(logging.WARNING, logger="saelab.store.writer"):
        with ShardWriter.open(tmp_path, make_meta(), 0, 1) as w:
            entry = w.write_chunk(tokens, seqpos, acts, 1, 1, overflow={HOOK: 3})
    assert entry.overflow == {HOOK: 2 + 3} and entry.nan == {HOOK: 1}
    assert "beyond the fp16 range" in caplog.text
    stored = load_store(tmp_path).read_activations(0, HOOK)
    assert stored[0, 1] == 65504 and stored[1, 2] == -65504 and stored[2, 3] == 65504
    assert np.isnan(stored[3, 1]) and not np.isinf(stored).any()


def test_identity_mismatch_names_field_and_both_values(tmp_path):
    make_store(tmp_path, chunks=(1, 1))
    with pytest.raises(UsageError, match=r"max_length=16; this run asks for 512\. Use another --out"):
        ShardWriter.open(tmp_path, make_meta(max_length=512), 0, 2)
    with pytest.raises(UsageError, match=r"model\.sha256=m0; this run asks for m1"):
        ShardWriter.open(tmp_path, make_meta(model={"sha256": "m1"}), 0, 2)
    with pytest.raises(UsageError, match=r"hooks=.*model.layers.1.*model.layers.2"):
        ShardWriter.open(tmp_path, make_meta(hooks=[{"name": "model.layers.2", "width": 4}]), 1, 2)
    with pytest.raises(UsageError, match=r"num_shards=2; this run asks for 3"):
        ShardWriter.open(tmp_path, make_meta(), 0, 3)
    with pytest.raises(UsageError) as e:  # every difference at once
        ShardWriter.open(tmp_path, make_meta(dtype="bfloat16", tokenizer={"vocab_size": 9}), 0, 2)
    assert "dtype=float16" in str(e.value) and "tokenizer.vocab_size=256" in str(e.value)
    ShardWriter.open(tmp_path, make_meta(tokens_target=5000), 0, 2).close()  # not an identity field


def test_one_writer_per_shard(tmp_path):
    with ShardWriter.open(tmp_path, make_meta(), 0, 2):
        with pytest.raises(UsageError, match="being written by another process"):
            ShardWriter.open(tmp_path, make_meta(), 0, 2)
        ShardWriter.open(tmp_path, make_meta(), 1, 2).close()
    ShardWriter.open(tmp_path, make_meta(), 0, 2).close()


def _open_shard(root, shard, num_shards, barrier, max_length, q):
    barrier.wait()
    try:
        ShardWriter.open(root, make_meta(max_length=max_length), shard, num_shards).close()
        q.put((shard, "ok"))
    except UsageError as e:
        q.put((shard, str(e)))


def test_concurrent_open_on_a_fresh_dir_first_wins(tmp_path):
    ctx = mp.get_context("fork")
    n = 4
    barrier, q = ctx.Barrier(n), ctx.Queue()
    lengths = [16, 16, 16, 32]  # the odd one out either wins or is refused, never both
    procs = [ctx.Process(target=_open_shard, args=(tmp_path, i, n, barrier, lengths[i], q)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = dict(q.get(timeout=5) for _ in range(n))
    winner = json.loads((tmp_path / "store.json").read_text())["max_length"]
    for shard, msg in results.items():
        assert (msg == "ok") == (lengths[shard] == winner), (shard, msg)
    assert not list(tmp_path.glob("*.tmp"))


def test_crash_mid_chunk_leaves_no_visible_partial_chunk_and_tmp_is_cleaned(tmp_path):
    make_store(tmp_path, num_shards=1, chunks=(2,), finish=False)
    w = ShardWriter.open(tmp_path, make_meta(), 0, 1)
    b = w.begin_chunk()
    b.append(*chunk_arrays(0, 2, 6))
    w.close()  # the process "dies" before commit
    sdir = tmp_path / "shard_00000"
    # and a chunk file renamed into place whose manifest entry never got written
    (sdir / "chunk_000002.tokens.npy").write_bytes((sdir / "chunk_000000.tokens.npy").read_bytes())
    assert list(sdir.glob("*.tmp"))
    s = load_store(tmp_path)
    assert [c.index for c in s.chunks] == [0, 1]
    s.read_activations(1, HOOK)
    w = ShardWriter.open(tmp_path, make_meta(), 0, 1)
    assert not list(sdir.glob("*.tmp")) and not list(sdir.glob("chunk_000002.*"))
    assert w.chunks_done == 2
    w.close()


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from saelab.store import ShardWriter
    HOOK = {hook!r}
    root, n_chunks = sys.argv[1], int(sys.argv[2])
    w = ShardWriter.open(root, json.loads({meta!r}), 0, 1)
    for i in range(w.chunks_done, n_chunks):
        x = np.random.default_rng(i).standard_normal((20000, 4)).astype(np.float32)
        w.write_chunk(np.full(20000, i, np.int32), np.zeros((20000, 2), np.int32), {{HOOK: x}}, i + 1, i + 1)
        print(i, flush=True)
    w.finish()
""")


def test_sigkill_then_resume_is_byte_identical_to_uninterrupted(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT.format(hook=HOOK, meta=json.dumps(make_meta())))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda root: subprocess.run([sys.executable, str(script), str(root), "6"], env=env, check=True,  # noqa: E731
                                      capture_output=True)
    run(tmp_path / "full")
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), "6"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "0"
    p.send_signal(signal.SIGKILL)  # somewhere inside chunk 1 or 2
    p.wait()
    assert len(load_store(tmp_path / "killed").chunks) < 6
    run(tmp_path / "killed")
    full, killed = tmp_path / "full" / "shard_00000", tmp_path / "killed" / "shard_00000"
    names = sorted(f.name for f in full.glob("chunk_*"))
    assert names == sorted(f.name for f in killed.glob("chunk_*")) and len(names) == 18
    for name in names:
        assert (full / name).read_bytes() == (killed / name).read_bytes(), name
    assert not list(killed.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_reader_refuses_damaged_chunk_naming_the_file(tmp_path, damage):
    make_store(tmp_path, chunks=(2, 1))
    f = tmp_path / "shard_00000" / f"chunk_000001.{HOOK}.npy"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40
    elif damage == "truncate":
        data = data[:-8]
    else:
        data += b"\0" * 16
    f.write_bytes(bytes(data))
    s = load_store(tmp_path)
    with pytest.raises(UsageError, match=rf"chunk_000001\.{HOOK}\.npy.*(corrupted|truncated|padded)"):
        s.read_activations(s.chunks[1], HOOK)
    s.read_activations(s.chunks[0], HOOK)  # its neighbours are fine
    with pytest.raises(UsageError, match="corrupted|truncated|padded"):
        list(s.batches(HOOK, 2, split="all"))


def test_load_store_errors_for_a_person(tmp_path):
    with pytest.raises(UsageError, match="not an activation store.*saelab collect"):
        load_store(tmp_path)
    make_store(tmp_path, chunks=(1, 1))
    with pytest.raises(UsageError, match='not in store.*Did you mean "model.layers.1"'):
        load_store(tmp_path).read_activations(0, "model.layers.11")


def _rows(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(int)


def test_batches_are_float32_deterministic_and_seed_dependent(tmp_path):
    s = load_store(make_store(tmp_path, chunks=(4, 4)))
    a = list(s.batches(HOOK, 4, split="all", seed=1, shuffle_chunks=2))
    b = list(s.batches(HOOK, 4, split="all", seed=1, shuffle_chunks=2))
    c = list(s.batches(HOOK, 4, split="all", seed=2, shuffle_chunks=2))
    assert a[0].dtype == torch.float32 and a[0].shape == (4, 4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not np.array_equal(_rows(a), _rows(c))
    assert not np.array_equal(_rows(a), np.sort(_rows(a)))  # actually shuffled


@pytest.mark.parametrize("batch_size,shuffle_chunks", [(4, 1), (5, 2), (7, 3), (46, 100), (50, 2)])
def test_every_row_exactly_once_per_epoch(tmp_path, batch_size, shuffle_chunks):
    s = load_store(make_store(tmp_path, chunks=(4, 4)))
    R = s.num_tokens
    assert R == 46
    it = s.batches(HOOK, batch_size, split="all", shuffle_chunks=shuffle_chunks, epochs=2, drop_last=False)
    rows = _rows(it)
    assert len(it) == 2 * -(-R // batch_size)
    for epoch in (rows[:R], rows[R:]):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(R))
    if batch_size > R:
        with pytest.raises(UsageError, match="larger than the 46 rows"):
            s.batches(HOOK, batch_size, split="all", epochs=None)
        return
    dropped = _rows(s.batches(HOOK, batch_size, split="all", shuffle_chunks=shuffle_chunks, epochs=1))
    assert len(dropped) == R // batch_size * batch_size and len(set(dropped)) == len(dropped)


@pytest.mark.parametrize("stop", [1, 3, 5, 11, 13])
def test_resume_from_state_dict_equals_uninterrupted(tmp_path, stop):
    s = load_store(make_store(tmp_path, chunks=(4, 4)))
    kw = dict(split="all", seed=3, shuffle_chunks=3, epochs=2)
    full = _rows(s.batches(HOOK, 5, **kw))
    it = s.batches(HOOK, 5, **kw)
    first = [b for _, b in zip(range(stop), it)]
    state = json.loads(json.dumps(it.state_dict()))
    resumed = load_store(tmp_path).batches(HOOK, 5, **kw)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([_rows(first), _rows(resumed)]), full)
    other = s.batches(HOOK, 6, **kw)
    with pytest.raises(UsageError, match="batch_size: saved 5, now 6"):
        other.load_state_dict(state)


def test_endless_stream_keeps_going(tmp_path):
    s = load_store(make_store(tmp_path, chunks=(1, 1)))  # 10 rows
    it = s.batches(HOOK, 4, split="all", epochs=None)
    assert len([b for _, b in zip(range(20), it)]) == 20


def test_train_val_split_by_chunk(tmp_path):
    s = load_store(make_store(tmp_path, chunks=(5, 5)))
    train, val = s.split_chunks(val_fraction=0.2, seed=0)
    assert val and train and not set(train) & set(val) and set(train) | set(val) == set(s.chunks)
    assert s.split_chunks(0.2, 0) == (train, val)
    assert s.split_chunks(0.01, 0)[1]  # at least one val chunk
    tr_rows = _rows(s.batches(HOOK, 1, split="train", val_fraction=0.2, drop_last=False))
    va_rows = _rows(s.batches(HOOK, 1, split="val", val_fraction=0.2, drop_last=False))
    assert not set(tr_rows) & set(va_rows) and len(tr_rows) + len(va_rows) == s.num_tokens
    # a chunk's side does not change when the store grows
    with ShardWriter.open(tmp_path, make_meta(), 1, 2) as w:
        w.write_chunk(*chunk_arrays(1, 5, 3, first_row=1000), sequences_done=6, batches_done=6)
    grown_train, grown_val = load_store(tmp_path).split_chunks(0.2, 0)
    key = lambda cs: {(c.shard, c.index) for c in cs}  # noqa: E731
    assert key(val) <= key(grown_val) and key(train) <= key(grown_train)


def test_rank_split_and_shard_subset_are_disjoint(tmp_path):
    s = load_store(make_store(tmp_path, chunks=(3, 4)))
    parts = [set(_rows(s.batches(HOOK, 1, split="all", rank=r, world_size=3, drop_last=False))) for r in range(3)]
    assert all(not parts[i] & parts[j] for i in range(3) for j in range(i + 1, 3))
    assert set().union(*parts) == set(range(s.num_tokens))
    sub = s.subset(shards=[1])
    assert {c.shard for c in sub.chunks} == {1} and sub.num_tokens == 5 + 7 + 6 + 5
    rows = _rows(s.batches(HOOK, 1, split="all", shards=[1], drop_last=False))
    assert set(rows) == set(range(18, 18 + 23))
    with pytest.raises(UsageError, match="out of range"):
        s.subset(shards=[2])
    with pytest.raises(UsageError, match="no chunks to read for rank 7"):
        s.batches(HOOK, 1, split="all", rank=7, world_size=8)


_MEM_SCRIPT = textwrap.dedent("""
    import sys
    from saelab.store import load_store
    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    s = load_store(sys.argv[1])
    it = s.batches("h", 1024, split="all", shuffle_chunks=2, epochs=2)
    next(iter(it))
    base = peak = rss_anon()
    for b in it:
        peak = max(peak, rss_anon())
    print(peak - base, s.num_tokens * s.width("h") * 2)
    print(peak - base, file=sys.stderr)
""")


def test_memory_is_bounded_by_the_buffer_not_the_store(tmp_path):
    meta = make_meta(hooks=[{"name": "h", "width": 256}])
    rows = 8192  # 4 MiB fp16 per chunk; buffer of 2 chunks; 16 chunks = 64 MiB store
    x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float16)
    with ShardWriter.open(tmp_path, meta, 0, 1) as w:
        for i in range(16):
            w.write_chunk(np.zeros(rows, np.int32), np.zeros((rows, 2), np.int32), {"h": x}, i + 1, i + 1)
    script = tmp_path / "mem.py"
    script.write_text(_MEM_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    growth, store_bytes = map(int, out.stdout.split())
    assert store_bytes == 16 * rows * 256 * 2
    assert growth < 24 * 2**20, f"RssAnon grew by {growth / 2**20:.1f} MiB iterating a {store_bytes / 2**20:.0f} MiB store"


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_resume_works_after_freeing_space(small_tmpfs):
    root = small_tmpfs / "store"
    meta = make_meta(hooks=[{"name": HOOK, "width": 256}])
    x = np.random.default_rng(0).standard_normal((1000, 256)).astype(np.float32)  # ~0.5 MB per chunk
    tok, sp = np.zeros(1000, np.int32), np.zeros((1000, 2), np.int32)
    w = ShardWriter.open(root, meta, 0, 1)
    with pytest.raises(UsageError, match=r"disk is full.*completed chunk is intact.*re-run the same command"):
        for i in range(8):
            w.write_chunk(tok, sp, {HOOK: x}, i + 1, i + 1)
    w.close()
    done = len(load_store(root).chunks)
    assert 1 <= done < 8
    for c in load_store(root).chunks:
        load_store(root).read_activations(c, HOOK)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    w = ShardWriter.open(root, meta, 0, 1)
    assert w.chunks_done == done and not list((root / "shard_00000").glob("*.tmp"))
    for i in range(done, 8):
        w.write_chunk(tok, sp, {HOOK: x}, i + 1, i + 1)
    w.finish()
    from saelab.store.check import verify_store
    assert verify_store(root).ok and len(load_store(root).chunks) == 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_permission_denied_is_a_clear_error(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            ShardWriter.open(root / "store", make_meta(), 0, 1)
    finally:
        root.chmod(0o700)


def test_saelab_load_store_is_lazy_and_torch_free_at_import():
    code = "import sys, saelab; assert 'torch' not in sys.modules; assert saelab.load_store.__module__ == 'saelab.store.reader'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_chunkinfo_names():
    assert ChunkInfo(1, 3, 10, 0, {}).name == "shard_00001/chunk_000003"


# ---------------------------------------------------------------------------------------------------
# Massive activations: flagged at write time, left out of batches on request, reported by verify


def _store_with_massive_rows(root, ratio=10.0):
    """2 chunks x 50 rows of N(0, 1) in 8 dims; rows 7 and 60 scaled by 100 (massive activations)."""
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    x[[7, 60]] *= 100
    meta = make_meta(hooks=[{"name": HOOK, "width": 8}], outlier_ratio=ratio)
    with ShardWriter.open(root, meta, 0, 1) as w:
        for c in range(2):
            rows = np.arange(50 * c, 50 * (c + 1))
            w.write_chunk(rows.astype(np.int32), np.stack([rows // 10, rows % 10], 1).astype(np.int32),
                          {HOOK: x[rows]}, sequences_done=c + 1, batches_done=c + 1)
        w.finish()
    return x


def test_massive_rows_are_flagged_and_skipped(tmp_path):
    x = _store_with_massive_rows(tmp_path)
    s = load_store(tmp_path)
    assert [c.flagged_rows(HOOK).tolist() for c in s.chunks] == [[7], [10]]  # row 60 is row 10 of chunk 1
    assert s.flagged_count(HOOK) == 2
    med = np.median(np.linalg.norm(x[:50].astype(np.float16).astype(np.float32), axis=1))
    assert s.chunks[0].norms[HOOK]["median"] == pytest.approx(med, rel=1e-5)
    got = np.concatenate([b.numpy() for b in s.batches(HOOK, 7, split="all", drop_last=False, skip_flagged=True)])
    assert len(got) == 98 and np.abs(got).max() < 50  # both massive rows left out, every other row served
    every = np.concatenate([b.numpy() for b in s.batches(HOOK, 7, split="all", drop_last=False)])
    assert len(every) == 100 and np.abs(every).max() > 50


def test_verify_and_monitor_report_flagged_share_and_concentration(tmp_path):
    from saelab.store.check import monitor_snapshot, render_monitor, render_verify, verify_store

    x = _store_with_massive_rows(tmp_path)
    sq = np.sort(np.linalg.norm(x.astype(np.float16).astype(np.float32), axis=1) ** 2)[::-1]
    share = sq[:1].sum() / sq.sum()  # the top 0.1% of 100 rows is one row
    text = render_verify(verify_store(tmp_path))
    assert "2 of 100 rows (2.000%) flagged" in text and f"hold {100 * share:.1f}% of the summed" in text
    assert "2 of 100 rows" in render_monitor(tmp_path, monitor_snapshot(tmp_path))
