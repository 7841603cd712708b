"""Training from a store on object storage, with and without prefetch, against the same store on local disk.

    .venv/bin/python benchmarks/bench_remote.py [--chunks 12] [--rows 8192] [--width 576] [--batch 1024]
        [--expansion 4] [--k 32] [--rounds 2]

One run writes the same store (fp16, one hook) to a local directory and to s3:// on moto's S3
server, started as a separate process on 127.0.0.1 (so its Python threads do not share this
process's interpreter lock). Then, for each source, one epoch of `store.batches(...)` is consumed
three ways: reading only; TopK training steps on this CPU (training_loss + backward + fused Adam);
and a consumer that sleeps --gpu-step-ms per batch, a stand-in for a GPU training step, which
leaves the CPU free for the fetches (the case prefetch is for):

    local                memory-mapped chunks, sha256 once per file (the reference)
    s3, prefetch 0       every chunk fetched whole + sha256-checked in the training thread
    s3, prefetch 2       the next 2 chunks fetched + checked in a background thread

Printed: tokens/s of each and the ratio to local, best of --rounds interleaved rounds. moto is a
Python server on the same 2 cores, so its absolute bandwidth is far below a real S3 endpoint's, and
its fetches cost CPU where a real endpoint's cost mostly waiting; what carries over is how much of
the fetch time prefetch hides behind the consumer's work.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from saelab.saes import REGISTRY, make_sae
from saelab.store import ShardWriter, load_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto's server did not start")


def write_store(root, chunks: int, rows: int, width: int) -> None:
    rng = np.random.default_rng(0)
    meta = {"model": {"sha256": "bench"}, "hooks": [{"name": "h", "width": width}], "max_length": 1024,
            "tokenizer": {"vocab_size": 1}, "corpus": {"fingerprint": "bench"}, "keep_special": False,
            "batch_size": 8, "chunk_tokens": rows, "tokens_target": rows * chunks}
    with ShardWriter.open(root, meta, 0, 1) as w:
        for c in range(chunks):
            x = rng.standard_normal((rows, width), dtype=np.float32)
            w.write_chunk(np.zeros(rows, np.int32), np.stack([np.arange(rows) // 64 + c * rows, np.arange(rows) % 64], 1),
                          {"h": x}, sequences_done=(c + 1) * rows // 64, batches_done=c + 1)
        w.finish()


def epoch_seconds(store, batch: int, prefetch: int, sae=None, sleep_s: float = 0.0) -> tuple[float, int]:
    """(seconds, tokens) of one epoch of batches, with a training step per batch if `sae` is given,
    or a sleep of `sleep_s` per batch."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True) if sae is not None else None
    t0, n = time.perf_counter(), 0
    for x_BD in store.batches("h", batch, split="all", seed=0, shuffle_chunks=2, prefetch=prefetch):
        n += x_BD.shape[0]
        if sleep_s:
            time.sleep(sleep_s)
        if sae is not None:
            opt.zero_grad(set_to_none=True)
            sae.training_loss(x_BD).loss.backward()
            sae.before_optimizer_step_()
            opt.step()
            sae.after_optimizer_step_()
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gpu-step-ms", type=float, default=20.0, help="sleep per batch of the GPU stand-in")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    server = start_moto()
    try:
        import fsspec

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3", use_listings_cache=False).mkdir(bucket)
        local, url = Path(tempfile.mkdtemp(prefix="bench_remote_")) / "store", f"s3://{bucket}/store"
        t = time.perf_counter()
        write_store(local, a.chunks, a.rows, a.width)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        write_store(url, a.chunks, a.rows, a.width)
        t_remote = time.perf_counter() - t
        mb = a.chunks * a.rows * a.width * 2 / 2**20
        print(f"store: {a.chunks} chunks x {a.rows} rows x {a.width} fp16 ({mb:.0f} MiB); "
              f"write local {mb / t_local:.0f} MiB/s, s3 {mb / t_remote:.0f} MiB/s (moto on 127.0.0.1)")
        sources = {"local": (load_store(local), 0), "s3, prefetch 0": (load_store(url), 0),
                   "s3, prefetch 2": (load_store(url), 2)}
        cfg = REGISTRY["topk"][1](d_in=a.width, d_sae=a.expansion * a.width, k=a.k)
        for st, pf in sources.values():  # warm-up: imports, the page cache, connections, allocator, fused Adam
            epoch_seconds(st, a.batch, pf)
            epoch_seconds(st, a.batch, pf, make_sae(cfg))
        modes = {"reading only": {}, f"TopK training on the CPU, d_sae={a.expansion * a.width} k={a.k} batch={a.batch}":
                 {"sae": True}, f"GPU stand-in: {a.gpu_step_ms:g} ms sleep per batch of {a.batch}":
                 {"sleep_s": a.gpu_step_ms / 1e3}}
        best = {(name, mode): 0.0 for name in sources for mode in modes}
        names = list(sources)
        for r in range(a.rounds):  # interleaved, order rotated, best of each: fair on a shared machine
            for mode, kw in modes.items():
                for name in names[r % 3:] + names[:r % 3]:
                    st, pf = sources[name]
                    torch.manual_seed(0)
                    sae = make_sae(cfg) if kw.get("sae") else None
                    s, n = epoch_seconds(st, a.batch, pf, sae, kw.get("sleep_s", 0.0))
                    best[(name, mode)] = max(best[(name, mode)], n / s)
        print(f"threads={torch.get_num_threads()}  best of {a.rounds} rounds; one epoch each")
        for mode in modes:
            print(f"{mode}:")
            ref = best[("local", mode)]
            for name in sources:
                r = best[(name, mode)]
                print(f"  {name:<15} {r:10.0f} tok/s   {r / ref:5.2f}x local")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
