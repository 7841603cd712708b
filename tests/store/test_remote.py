"""The store on object storage: s3:// URLs against a real S3 server (moto's) on 127.0.0.1.

Nothing of saelab is mocked: collect, train, evaluate, verify and monitor run on the tiny random
Llama and talk HTTP to the server, and every remote result is compared with the same run on local
disk (chunk files byte for byte, batches and trained weights exactly).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

moto_server = pytest.importorskip("moto.server", reason="the object-storage tests need moto[s3] and flask (dev extra)")
pytest.importorskip("s3fs", reason="the object-storage tests need s3fs (dev extra)")

from saelab.cli import main  # noqa: E402
from saelab.collect import collect  # noqa: E402
from saelab.errors import DataError, UsageError  # noqa: E402
from saelab.evaluate import evaluate_saes  # noqa: E402
from saelab.store import ShardWriter, load_store  # noqa: E402
from saelab.store.batches import rows_in_order  # noqa: E402
from saelab.store.lease import LEASE_FILE, Lease  # noqa: E402
from saelab.store.remote import RemotePath, location  # noqa: E402
from saelab.train import TrainConfig, train  # noqa: E402
from saelab.saes import load_sae  # noqa: E402
from tests.builders import make_text_corpus  # noqa: E402
from tests.builders import tiny_collect_cfg as cfg_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "model.layers.1"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port of 127.0.0.1, with the AWS_* variables pointing at it."""
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # a client made for another endpoint
        fs = fsspec.filesystem("s3", use_listings_cache=False)
        yield fs
        fsspec.get_filesystem_class("s3").clear_instance_cache()
    server.stop()


@pytest.fixture
def url(s3) -> str:
    """A store URL in a fresh bucket."""
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/stores/run"


def remote_files(fs, url: str) -> dict[str, bytes]:
    root = url.removeprefix("s3://")
    return {k[len(root) + 1:]: fs.cat_file(k) for k in fs.find(root)}


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def chunk_digest(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 of every chunk file, plus each manifest's chunk entries and progress without timestamps."""
    out = {}
    for name, data in files.items():
        if name.endswith(".npy"):
            out[name] = hashlib.sha256(data).hexdigest()
        elif name.endswith("manifest.json"):
            m = json.loads(data)
            out[name] = json.dumps([{k: v for k, v in c.items() if k != "written_at"} for c in m["chunks"]]
                                   + [m["sequences_done"], m["batches_done"], m["tokens_done"], m["done"]],
                                   sort_keys=True)
    return out


# ------------------------------------------------------------------------------------- URLs

def test_location_tells_urls_from_paths(s3):
    assert location("data/run") == Path("data/run")
    assert location("file:///tmp/a%20b/run") == Path("/tmp/a b/run")
    r = location("s3://bucket//a/run/")
    assert isinstance(r, RemotePath) and str(r) == "s3://bucket/a/run" and str(r / "store.json") == "s3://bucket/a/run/store.json"
    assert r.name == "run" and str(r.parent) == "s3://bucket/a"
    for bad, words in [("s3://", "names no bucket"), ("s3:/bucket/run", "one slash"),
                       ("nosuchfs://bucket/run", "knows no storage"), ("file://otherhost/x", "not this machine")]:
        with pytest.raises(UsageError, match=words):
            location(bad)


# ----------------------------------------------------------------- collect, verify, read, train

@pytest.fixture(scope="module")
def twin(s3, llama_dir, corpus_dir, tmp_path_factory):
    """The same collect into s3:// and into a local directory (about 320 tokens, 6 chunks)."""
    bucket = f"twin-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    local = tmp_path_factory.mktemp("twin") / "local"
    url = f"s3://{bucket}/run"
    collect(cfg_for(llama_dir, corpus_dir, local, tokens=320), quiet=True)
    res = collect(cfg_for(llama_dir, corpus_dir, url, tokens=320), quiet=True)
    assert str(res.out) == url and res.tokens >= 320
    return url, local


def test_collect_to_s3_writes_the_local_store_byte_for_byte(s3, twin, capsys):
    url, local = twin
    rem, loc = remote_files(s3, url), local_files(local)
    assert sorted(rem) == sorted(loc), "object names differ from the local file names (no tmp key or lease may remain)"
    assert chunk_digest(rem) == chunk_digest(loc)
    assert sum(n.endswith(".npy") for n in rem) >= 12
    capsys.readouterr()
    assert main(["verify", url]) == 0
    assert "✓ store is sound" in capsys.readouterr().out
    assert main(["monitor", url]) == 0
    table = capsys.readouterr().out
    assert table.startswith(url) and " done " in table and "/ 320 (" in table


def test_reads_equal_the_local_store_with_and_without_prefetch(twin):
    url, local = twin
    a, b = load_store(local), load_store(url)
    assert b.remote and not a.remote and [c.num_tokens for c in a.chunks] == [c.num_tokens for c in b.chunks]
    want = list(a.batches(HOOK, 16, seed=3, epochs=2, shuffle_chunks=2))
    for prefetch in (0, 1, 3):
        got = list(b.batches(HOOK, 16, seed=3, epochs=2, shuffle_chunks=2, prefetch=prefetch))
        assert len(got) == len(want) and all(torch.equal(x, y) for x, y in zip(got, want)), prefetch
    rows_a = list(rows_in_order(a, HOOK, 25, positions=True))
    rows_b = list(rows_in_order(b, HOOK, 25, positions=True))
    assert [r.offset for r in rows_a] == [r.offset for r in rows_b]
    assert all(torch.equal(x.x_BD, y.x_BD) and torch.equal(x.position_B, y.position_B) for x, y in zip(rows_a, rows_b))
    np.testing.assert_array_equal(a.read_tokens(2), b.read_tokens(2))


def test_a_batch_stream_resumed_from_its_state_continues_the_same(twin):
    url, _ = twin
    store = load_store(url)
    full = list(store.batches(HOOK, 16, seed=1, shuffle_chunks=2))
    it = store.batches(HOOK, 16, seed=1, shuffle_chunks=2)
    first = [x for _, x in zip(range(5), it)]
    again = store.batches(HOOK, 16, seed=1, shuffle_chunks=2)
    again.load_state_dict(json.loads(json.dumps(it.state_dict())))
    rest = list(again)
    assert all(torch.equal(x, y) for x, y in zip(first + rest, full)) and len(first + rest) == len(full)


def test_parallel_writers_into_s3_equal_two_local_shards(s3, llama_dir, corpus_dir, url, tmp_path, capsys):
    """`collect --parallel 2` to a bucket: two writer processes, each with its own lease, write the
    chunks two hand-started local writers (--shard 0/1 --num-shards 2) write, and the store verifies."""
    import dataclasses

    for s in range(2):
        collect(cfg_for(llama_dir, corpus_dir, tmp_path / "seq", tokens=320, shard=s, num_shards=2), quiet=True)
    res = collect(dataclasses.replace(cfg_for(llama_dir, corpus_dir, url, tokens=320), parallel=2), quiet=True)
    rem, loc = remote_files(s3, url), local_files(tmp_path / "seq")
    assert sorted(rem) == sorted(loc) and any(n.startswith("shard_00001/") for n in rem)
    assert chunk_digest(rem) == chunk_digest(loc)
    assert res.tokens == load_store(tmp_path / "seq").num_tokens  # the progress count reads the bucket too
    capsys.readouterr()
    assert main(["verify", url]) == 0
    assert "✓ store is sound" in capsys.readouterr().out


def test_train_and_evaluate_from_s3_equal_the_local_runs(twin, tmp_path):
    url, local = twin
    runs = {}
    for name, data in (("local", str(local)), ("s3", url)):
        cfg = TrainConfig(data=data, out=str(tmp_path / name), batch_size=32, tokens=32 * 12, expansion_factor=[2],
                          k=[4], eval_every=6, eval_tokens=64, checkpoint_every=0, warmup_steps=2, init_tokens=64,
                          log_every=6, shuffle_chunks=2, val_fraction=0.2, lr=3e-3)
        runs[name] = train(cfg, quiet=True)
    sa, sb = load_sae(runs["local"].final_dir), load_sae(runs["s3"].final_dir)
    for (k, va), (_, vb) in zip(sorted(sa.state_dict().items()), sorted(sb.state_dict().items())):
        assert torch.equal(va, vb), k
    ea = evaluate_saes([runs["local"].final_dir], str(local), split="all", batch_size=50, quiet=True)[0]
    eb = evaluate_saes([runs["s3"].final_dir], url, split="all", batch_size=50, quiet=True)[0]
    assert ea.n_tokens == eb.n_tokens > 0 and ea.fvu == eb.fvu


def test_a_store_copied_to_a_bucket_verifies_and_interprets_as_the_local_one(s3, url, tmp_path):
    from saelab.interpret.data import check_pair, load_or_compute_stats
    from saelab.interpret.examples import feature_examples
    from saelab.interpret.stats import PassConfig
    from tests.builders import planted_words

    c = planted_words(tmp_path)
    s3.put(str(c.store), url.removeprefix("s3://"), recursive=True)  # any sync tool would do (.lock included)
    assert main(["verify", url]) == 0
    sae = load_sae(c.sae)
    out = {}
    for name, where in (("local", c.store), ("s3", url)):
        store = load_store(where)
        hook = check_pair(sae, store)
        res = load_or_compute_stats(sae, store, hook, PassConfig(top_k=4, reservoir=8, batch_size=16),
                                    cache_dir=tmp_path / f"cache_{name}")
        ex = feature_examples(sae, store, hook, res.stats, [0, 1, 2], top_k=4, context=3)
        out[name] = (res.stats.top_index_FK, res.stats.count_F,
                     [[(e.index, e.value, e.context_ids) for e in ex[f]["top"]] for f in (0, 1, 2)])
    assert torch.equal(out["local"][0], out["s3"][0]) and torch.equal(out["local"][1], out["s3"][1])
    assert out["local"][2] == out["s3"][2] and out["s3"][2][0], "no examples to compare"
    s3.pipe_file(url.removeprefix("s3://") + "/store.json.tmp-" + "ab" * 16, b"{}")  # a failed upload's key
    assert main(["verify", url]) == 1


def test_the_local_cache_serves_later_reads_drops_a_damaged_copy_and_holds_its_cap(s3, url, tmp_path, monkeypatch):
    """SAELAB_STORE_CACHE: the first read of a remote chunk keeps it on disk by sha256; later reads
    map that copy (they work with the bucket's object gone); a damaged copy is dropped and fetched
    again; SAELAB_STORE_CACHE_GB evicts the least recently read copies."""
    from tests.builders import planted_words

    c = planted_words(tmp_path)
    s3.put(str(c.store), url.removeprefix("s3://"), recursive=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAELAB_STORE_CACHE", str(cache))
    local, remote = load_store(c.store), load_store(url)
    hook = local.hooks[0]
    want = [np.asarray(local.read_activations(ch, hook)) for ch in local.chunks]
    assert len(want) >= 3
    for ch, w in zip(remote.chunks, want):
        assert np.array_equal(remote.read_activations(ch, hook), w)
    copies = {p.name for p in cache.rglob("*.npy")}
    assert copies == {ch.files[hook]["sha256"] + ".npy" for ch in remote.chunks}

    # a damaged copy is refused by its sha256, dropped and fetched again from the bucket
    first = remote.chunks[0].files[hook]
    damaged = cache / first["sha256"][:2] / f"{first['sha256']}.npy"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    assert np.array_equal(load_store(url).read_activations(0, hook), want[0])
    assert damaged.read_bytes() == (c.store / shard_dir(remote.chunks[0]) / first["file"]).read_bytes()

    # with the bucket's activation objects gone, a new reader still gets every chunk, mapped from disk
    for ch in remote.chunks:
        s3.rm(f"{url.removeprefix('s3://')}/{shard_dir(ch)}/{ch.files[hook]['file']}")
    again = load_store(url)
    for ch, w in zip(again.chunks, want):
        got = again.read_activations(ch, hook)
        assert isinstance(got, np.memmap) and np.array_equal(got, w)

    # the cap: room for two chunks and a tokens file; the least recently read go first
    size = damaged.stat().st_size
    again.read_activations(0, hook)  # chunk 0: now the most recently read
    monkeypatch.setenv("SAELAB_STORE_CACHE_GB", str(2.5 * size / 1e9))
    load_store(url).read_tokens(0)  # a new file: writing it holds the cap
    left = {p.name for p in cache.rglob("*.npy")}
    newest = [remote.chunks[-1].files[hook], first, remote.chunks[0].files["tokens"]]  # chunks 1.. were read before
    assert left == {e["sha256"] + ".npy" for e in newest}
    assert sum(p.stat().st_size for p in cache.rglob("*.npy")) <= 2.5 * size
    monkeypatch.setenv("SAELAB_STORE_CACHE_GB", "lots")
    with pytest.raises(UsageError, match="SAELAB_STORE_CACHE_GB"):
        load_store(url).read_tokens(remote.chunks[2])


def shard_dir(chunk) -> str:
    return f"shard_{chunk.shard:05d}"


# ------------------------------------------------------------------------------ faults

def test_a_corrupted_remote_chunk_is_caught_by_verify_and_by_reading(s3, llama_dir, corpus_dir, url, capsys):
    collect(cfg_for(llama_dir, corpus_dir, url, tokens=130), quiet=True)
    key = f"{url.removeprefix('s3://')}/shard_00000/chunk_000001.{HOOK}.npy"
    data = bytearray(s3.cat_file(key))
    data[-3] ^= 0x40  # one flipped bit in the last row: same size, valid header
    s3.pipe_file(key, bytes(data))
    capsys.readouterr()
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"shard_00000/chunk_000001.{HOOK}.npy: sha256 mismatch" in out
    store = load_store(url)
    with pytest.raises(DataError, match="sha256 mismatch"):
        store.read_activations(store.chunks[1], HOOK)
    with pytest.raises(DataError, match="chunk_000001"):  # raised in the prefetch thread, re-raised here
        list(store.batches(HOOK, 8, split="all", shuffle=False, prefetch=2))
    s3.pipe_file(key, bytes(data[:-64]))
    with pytest.raises(DataError, match="truncated"):
        load_store(url).read_activations(1, HOOK)


def test_a_lost_remote_manifest_is_refused_then_rebuilt_from_the_chunks(s3, llama_dir, corpus_dir, url):
    collect(cfg_for(llama_dir, corpus_dir, url, tokens=130), quiet=True)
    mkey = f"{url.removeprefix('s3://')}/shard_00000/manifest.json"
    original = json.loads(s3.cat_file(mkey))
    before = chunk_digest({k: v for k, v in remote_files(s3, url).items() if k.endswith(".npy")})
    s3.rm_file(mkey)
    with pytest.raises(DataError, match="rebuild-manifest"):
        collect(cfg_for(llama_dir, corpus_dir, url, tokens=130), quiet=True)
    assert main(["verify", "--rebuild-manifest", url]) == 0
    rebuilt = json.loads(s3.cat_file(mkey))
    same = lambda c: {k: v for k, v in c.items() if k != "written_at"}  # noqa: E731
    assert [same(c) for c in rebuilt["chunks"]] == [same(c) for c in original["chunks"]] and len(original["chunks"]) >= 2
    assert (rebuilt["sequences_done"], rebuilt["batches_done"]) == (original["sequences_done"], original["batches_done"])
    collect(cfg_for(llama_dir, corpus_dir, url, tokens=130), quiet=True)  # complete: nothing to redo
    assert chunk_digest({k: v for k, v in remote_files(s3, url).items() if k.endswith(".npy")}) == before


def _cli(*args) -> subprocess.Popen:
    env = dict(os.environ, SAELAB_TORCH_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "saelab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_during_collect_then_resume_equals_the_uninterrupted_store(s3, llama_dir, url, tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus", n_docs=40, seed=1)
    args = ["collect", "--model", str(llama_dir), "--layer", "1", "--corpus", str(corpus), "--out", url,
            "--tokens", "640", "--chunk-tokens", "64", "--max-length", "16", "--batch-size", "2", "--quiet"]
    collect(cfg_for(llama_dir, corpus, url + "-full", tokens=640, chunk_tokens=64), quiet=True)
    manifest = f"{url.removeprefix('s3://')}/shard_00000/manifest.json"
    victim = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if s3.exists(manifest) and json.loads(s3.cat_file(manifest))["chunks"]:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed; raise --tokens"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    partial = json.loads(s3.cat_file(manifest))
    assert not partial["done"] and 1 <= len(partial["chunks"])
    assert LEASE_FILE in {k.rsplit("/", 1)[-1] for k in s3.find(url.removeprefix("s3://"))}, "the killed writer's lease"
    stray = f"{url.removeprefix('s3://')}/shard_00000/chunk_000999.tokens.npy.tmp-{uuid.uuid4().hex}"
    s3.pipe_file(stray, b"an upload a crash left behind")

    assert main(args) == 0  # the same command (in this process: same host, dead pid, so the lease is stale at once)
    files = remote_files(s3, url)
    assert not [n for n in files if ".tmp" in n or n.endswith(LEASE_FILE)], "tmp keys or the lease remain"
    full = chunk_digest(remote_files(s3, url + "-full"))
    assert chunk_digest(files) == full and len(full) > 2 * 3 + 1


def test_a_second_writer_on_a_shard_is_refused_naming_the_first(url):
    meta = {"hooks": [{"name": "h", "width": 4}], "tokens_target": 10}
    first = ShardWriter.open(url, meta, shard=0, num_shards=1)
    with pytest.raises(UsageError) as e:
        ShardWriter.open(url, meta, shard=0, num_shards=1)
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "another process" in msg and f"{url}/shard_00000/{LEASE_FILE}" in msg
    x = np.ones((3, 4), np.float32)
    first.write_chunk(np.arange(3), np.zeros((3, 2), np.int32), {"h": x}, sequences_done=1, batches_done=1)
    first.finish()
    again = ShardWriter.open(url, meta, shard=0, num_shards=1)  # released: the next writer gets it
    assert again.chunks_done == 1
    again.close()


def test_a_writer_that_lost_its_lease_publishes_nothing(s3, url):
    meta = {"hooks": [{"name": "h", "width": 4}]}
    w = ShardWriter.open(url, meta, shard=0, num_shards=1)
    lease = f"{url.removeprefix('s3://')}/shard_00000/{LEASE_FILE}"
    s3.pipe_file(lease, json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "heartbeat_at": time.time(),
                                    "ttl_s": 300}).encode())
    with pytest.raises(UsageError, match="lost the lease of shard 0.*pid 1 on host elsewhere"):
        w.write_chunk(np.arange(3), np.zeros((3, 2), np.int32), {"h": np.ones((3, 4))}, 1, 1)
    names = {k.rsplit("/", 1)[-1] for k in s3.find(url.removeprefix("s3://"))}
    assert not any(n.startswith("chunk_") for n in names), names
    assert json.loads(s3.cat_file(f"{url.removeprefix('s3://')}/shard_00000/manifest.json"))["chunks"] == []
    w.close()
    assert s3.exists(lease), "close() deleted a lease that is not its own"
    # a stale lease (no heartbeat for longer than its ttl) is taken over
    s3.pipe_file(lease, json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "heartbeat_at": time.time() - 1000,
                                    "ttl_s": 300}).encode())
    ShardWriter.open(url, meta, shard=0, num_shards=1).close()


def test_of_writers_racing_for_a_free_or_a_stale_lease_exactly_one_wins(s3, url):
    shard_dir = location(url) / "shard_00000"
    for stale in (False, True):
        if stale:
            s3.pipe_file(f"{shard_dir.key}/{LEASE_FILE}", json.dumps(
                {"host": "elsewhere", "pid": 1, "token": "old", "heartbeat_at": 0.0, "ttl_s": 300}).encode())
        won, refused, go = [], [], threading.Barrier(4)

        def race():
            go.wait()
            try:
                won.append(Lease.acquire(shard_dir, 0, url))
            except UsageError as e:
                refused.append(str(e))

        threads = [threading.Thread(target=race) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 3, (stale, refused)
        assert all("another process" in m for m in refused)
        assert json.loads(s3.cat_file(f"{shard_dir.key}/{LEASE_FILE}"))["token"] == won[0].token
        won[0].release()
        assert not s3.exists(f"{shard_dir.key}/{LEASE_FILE}")


def test_bad_urls_and_a_missing_backend_exit_2_without_traceback(s3, llama_dir, corpus_dir, capsys, url):
    cases = [(["verify", "nosuchfs://bucket/run"], "knows no storage"),
             (["verify", "s3://"], "names no bucket"),
             (["monitor", url], "no store.json"),
             (["collect", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", "s3://no-such-bucket-x/run"],
              "bucket s3://no-such-bucket-x does not exist")]
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # the real missing-backend case: gs:// without the gcs extra
        cases.append((["verify", "gs://bucket/run"], "pip install 'saelab[gcs]'"))
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    p = _cli("collect", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", "s3:/bucket/run")
    assert p.wait(timeout=120) == 2
    err = p.stderr.read()
    assert "s3://bucket/run" in err and "Traceback" not in err
