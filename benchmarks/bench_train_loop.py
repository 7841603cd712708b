"""Overhead of saelab's training loop, and what a k-sweep saves by sharing reads.

    .venv/bin/python benchmarks/bench_train_loop.py [--d-in 256] [--expansion 8] [--k 32] [--batch 2048] [--steps 20]
        [--rounds 3] [--no-sweep]

Measured in one run on a synthetic store (fp16 chunks on disk), fp32, TopK, Adam:
  - bare:  training_loss + backward + before/after_optimizer_step_ + Adam (fused, as the loop) on
           batches already in RAM
  - loop:  `saelab.train.train` (store reading and shuffling, NaN/inf checks, dead-latent counts,
           metrics.jsonl + TensorBoard every 10 steps; evaluation and checkpoints off)
  - sweep: one `train` with --k k/2,k,2k  against three single-k `train` runs
Ratios printed: loop / bare tokens/s (1.0 = no overhead), best of --rounds; the same from the median
time per step (loop: the gap between consecutive `step_` ends, so data reads, checks and logging
count); and 3 separate runs' time / sweep time.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import statistics
import time
from pathlib import Path

import torch

from saelab.saes import REGISTRY, make_sae
from saelab.train import TrainConfig, train
from saelab.train import loop as loop_module
from saelab.store.synthetic import make_synthetic_store


STEP_ENDS: list[float] = []
"""perf_counter() after every `step_` of the loop being timed (the median gap = one loop iteration)."""


def _timed_step(*args, **kwargs):
    out = _real_step(*args, **kwargs)
    STEP_ENDS.append(time.perf_counter())
    return out


_real_step, loop_module.step_ = loop_module.step_, _timed_step


def bare_seconds(x_chunks: list[torch.Tensor], d_in: int, d_sae: int, k: int) -> tuple[float, float]:
    """(total seconds, median seconds per step) of the bare loop."""
    sae = make_sae(REGISTRY["topk"][1](d_in=d_in, d_sae=d_sae, k=k))
    sae.init_from_data_(x_chunks[0])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # the loop's optimizer
    t0 = time.perf_counter()
    per_step = []
    for x in x_chunks:
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sae.training_loss(x).loss.backward()
        sae.before_optimizer_step_()
        opt.step()
        sae.after_optimizer_step_()
        per_step.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, statistics.median(per_step)


def loop_seconds(store: Path, out: Path, d_in: int, expansion: int, ks: list[int], batch: int, steps: int) -> float:
    """Wall time of a whole `train` call (setup, loop, final evaluation, saves, plot)."""
    cfg = TrainConfig(data=str(store), out=str(out), batch_size=batch, tokens=batch * steps, expansion_factor=[expansion],
                      k=ks, eval_every=0, eval_tokens=batch, checkpoint_every=0, warmup_steps=1, init_tokens=batch,
                      log_every=10, shuffle_chunks=4, val_fraction=0.05)
    t0 = time.perf_counter()
    train(cfg, quiet=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="bare/loop pairs, interleaved; the best of each counts")
    p.add_argument("--no-sweep", action="store_true", help="skip the k-sweep comparison")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_loop_"))
    chunk = 4096
    n_tokens = int(a.batch * a.steps * 1.3) // chunk * chunk + 4 * chunk
    store = make_synthetic_store(tmp / "store", d_in=a.d_in, n_tokens=n_tokens, chunk_tokens=chunk,
                                 n_features=4 * a.d_in, active=16)
    from saelab.store import load_store
    st = load_store(store)
    x_all = torch.cat([torch.from_numpy(st.read_activations(c, "model.layers.0").astype("float32"))
                       for c in st.chunks[: a.batch * a.steps // chunk + 1]])
    xs = [x_all[i * a.batch:(i + 1) * a.batch] for i in range(a.steps)]
    d_sae = a.expansion * a.d_in
    tokens = a.batch * a.steps
    loop_seconds(store, tmp / "warm", a.d_in, a.expansion, [a.k], a.batch, 2)  # imports, caches
    bare, loop_rate, loop_total = float("inf"), 0.0, float("inf")
    bare_med, loop_med = [], []
    for i in range(a.rounds):  # interleaved, best of each: fair on a machine shared with other jobs
        total_s, med_s = bare_seconds(xs, a.d_in, d_sae, a.k)
        bare = min(bare, total_s)
        bare_med.append(med_s)
        STEP_ENDS.clear()
        loop_total = min(loop_total, loop_seconds(store, tmp / f"loop{i}", a.d_in, a.expansion, [a.k], a.batch, a.steps))
        rows = [json.loads(ln) for ln in (tmp / f"loop{i}" / "metrics.jsonl").read_text().splitlines()]
        loop_rate = max(loop_rate, [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1])  # the loop alone
        loop_med.append(statistics.median(b - a_ for a_, b in zip(STEP_ENDS, STEP_ENDS[1:])))
    print(f"TopK d_in={a.d_in} d_sae={d_sae} k={a.k} batch={a.batch} steps={a.steps} threads={torch.get_num_threads()} "
          f"(best of {a.rounds} interleaved rounds; both use fused Adam)")
    print(f"bare step loop : {tokens / bare:10.0f} tok/s")
    print(f"saelab loop    : {loop_rate:10.0f} tok/s   loop/bare = {loop_rate * bare / tokens:.2f}x  (target >= 0.9; "
          f"whole train() call incl. setup, final eval, saves: {loop_total:.1f} s)")
    bm, lm = statistics.median(bare_med), statistics.median(loop_med)
    print(f"median per step: bare {bm * 1e3:.0f} ms, loop iteration (read + checks + step + logging) "
          f"{lm * 1e3:.0f} ms   loop/bare = {bm / lm:.2f}x  (medians resist load spikes)")
    if a.no_sweep:
        return
    ks = [max(1, a.k // 2), a.k, 2 * a.k]
    sweep = loop_seconds(store, tmp / "sweep", a.d_in, a.expansion, ks, a.batch, a.steps)
    separate = sum(loop_seconds(store, tmp / f"sep{k}", a.d_in, a.expansion, [k], a.batch, a.steps) for k in ks)
    print(f"sweep k={ks}: {sweep:.1f} s   three separate runs: {separate:.1f} s   separate/sweep = {separate / sweep:.2f}x")


if __name__ == "__main__":
    main()
