"""Benchmark: the vectorised RkCNN probe against a naive per-subset loop, on the same data.

    python benchmarks/bench_rkcnn.py                      # h=600, m=24, 100k x 576 (the issue's size)
    python benchmarks/bench_rkcnn.py --rows 20000         # quicker

Data: Gaussian noise plus 20 planted sparse directions, each on 24 random dims. Both paths use the
kurtosis score (the one that needs every subset's principal direction). The naive loop is
`saelab.rkcnn.probe_reference` (numpy SVD of each centred X[:, S_i]); `--naive-subsets` times it
on the first H' subsets only and extrapolates linearly (said so in the output).
Prints absolute times, the speed-up and whether both paths kept the same subsets.
"""
from __future__ import annotations

import argparse
import time

import torch

from saelab.rkcnn import probe, probe_reference


def make_data(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X_ND = torch.randn(rows, d, generator=g)
    for _ in range(20):
        S = torch.randperm(d, generator=g)[:24]
        v = torch.randn(24, generator=g)
        active = (torch.rand(rows, generator=g) < 0.02) * 5.0
        X_ND[:, S] += active[:, None] * (v / v.norm())
    return X_ND


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--h", type=int, default=600)
    ap.add_argument("--m", type=int, default=24)
    ap.add_argument("--r", type=int, default=50)
    ap.add_argument("--naive-subsets", type=int, default=None,
                    help="time the naive loop on this many subsets and extrapolate (default: all h)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    X = make_data(args.rows, args.d)
    print(f"data {args.rows} x {args.d}, h={args.h}, m={args.m}, r={args.r}, score=kurtosis, "
          f"threads={args.threads}")

    t0 = time.perf_counter()
    fast = probe(X, m=args.m, h=args.h, r=args.r, score="kurtosis", seed=0)
    t_fast = time.perf_counter() - t0
    print(f"vectorised probe: {t_fast:.2f} s")

    h_naive = min(args.naive_subsets or args.h, args.h)
    t0 = time.perf_counter()
    ref = probe_reference(X, m=args.m, h=h_naive, r=min(args.r, h_naive), score="kurtosis", seed=0)
    t_naive = (time.perf_counter() - t0) * args.h / h_naive
    note = "" if h_naive == args.h else f" (measured on {h_naive} subsets, scaled to {args.h})"
    print(f"naive loop (numpy SVD per subset): {t_naive:.2f} s{note}")
    print(f"speed-up: {t_naive / t_fast:.1f}x")

    same = torch.allclose(fast.scores_H[:h_naive], ref.scores_H, rtol=1e-3, atol=1e-3)
    print(f"scores agree on the {h_naive} common subsets: {same}")


if __name__ == "__main__":
    main()
