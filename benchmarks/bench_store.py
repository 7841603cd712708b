"""Store throughput against plain-numpy references measured in the same run.

    write:  ShardWriter.write_chunk (fp16 clamp, tmp + fsync + rename, sha256, manifest)
            vs  np.save of the same fp16 array (no fsync, no hash)
    read:   store.batches (shuffle buffer of K chunks, float32 torch batches, sha256 once)
            vs  np.load of each whole chunk + a random permutation per chunk, no checks

Run: .venv/bin/python benchmarks/bench_store.py [--chunks 8 --rows 65536 --width 576]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saelab.store import ShardWriter, load_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_store_"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    tok, sp = np.zeros(args.rows, np.int32), np.zeros((args.rows, 2), np.int32)
    meta = {"model": {"sha256": "bench"}, "hooks": [{"name": "h", "width": args.width}], "max_length": 1024,
            "tokenizer": {"vocab_size": 1}, "corpus": {"fingerprint": "bench"}, "keep_special": False,
            "batch_size": 8, "chunk_tokens": args.rows, "tokens_target": args.rows * args.chunks}
    total = args.rows * args.chunks
    try:
        t = time.perf_counter()
        with ShardWriter.open(root / "store", meta, 0, 1) as w:
            for i in range(args.chunks):
                w.write_chunk(tok, sp, {"h": x}, i + 1, i + 1)
        t_store_w = time.perf_counter() - t
        (root / "ref").mkdir()
        t = time.perf_counter()
        for i in range(args.chunks):
            np.save(root / "ref" / f"c{i}.npy", x.astype(np.float16))
            np.save(root / "ref" / f"t{i}.npy", tok)
        t_ref_w = time.perf_counter() - t

        s = load_store(root / "store")
        t = time.perf_counter()
        n = sum(len(b) for b in s.batches("h", args.batch, split="all", shuffle_chunks=4))
        t_store_r = time.perf_counter() - t
        t = time.perf_counter()
        m = 0
        for i in range(args.chunks):
            a = np.load(root / "ref" / f"c{i}.npy")
            perm = rng.permutation(len(a))
            for j in range(0, len(a) - args.batch + 1, args.batch):
                m += len(torch.from_numpy(a[perm[j:j + args.batch]].astype(np.float32)))
        t_ref_r = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"store: {args.chunks} chunks x {args.rows:,} rows x {args.width} (fp16 {total * args.width * 2 / 2**20:,.0f} MiB)")
    print(f"write  saelab {total / t_store_w:>12,.0f} rows/s   np.save {total / t_ref_w:>12,.0f} rows/s   "
          f"ratio {t_ref_w / t_store_w:.2f}x")
    print(f"read   saelab {n / t_store_r:>12,.0f} rows/s   np.load {m / t_ref_r:>12,.0f} rows/s   "
          f"ratio {t_ref_r / t_store_r:.2f}x")


if __name__ == "__main__":
    main()
