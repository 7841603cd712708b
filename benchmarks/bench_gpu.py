"""bench_train.py's ratios on a CUDA GPU, plus collect's tokens/s against the model's bare forward rate.

    .venv/bin/python benchmarks/bench_gpu.py [--batch 16384] [--d-in 2304] [--d-sae 36864] [--k 64]
        [--steps 10] [--model default] [--layer 15] [--collect-tokens 500k]

Not run on saelab's CPU-only machine (it exits with a message there): the figures in RESULTS.md that
come from it will be recorded on a GPU machine. Measured in one run, fp32 SAE steps (TF32 off, so
the matmul rate and the steps are in the same arithmetic), fused Adam, every step timed with a
device synchronize, the best of --steps interleaved repetitions:
  - the same steps and ratios as bench_train.py: saelab TopK / BatchTopK / TopK with 10% dead vs the
    dense-step bound = matmul rate / (10 d_in d_sae); saelab vs plain dense TopK and ReLU;
  - collect: `saelab collect --device cuda` tokens/s (model + store writes) and the bare forward
    pass over the same batches (`capture` up to the hook), as collect / forward.
The CUDA path uses torch ops only (the CPU path's numpy sorts are off it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import matmul_step, plain_step, saelab_step, timed_interleaved
from saelab.collect import CollectConfig, collect
from saelab.config import parse_int
from saelab.corpus import batch_sequences, open_corpus, pack_corpus
from saelab.models import capture, load_model, resolve_hooks, tokenizer_info


def synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def train_ratios(a) -> None:
    B, D, Fn, k = a.batch, a.d_in, a.d_sae, a.k
    x = torch.randn(B, D, device="cuda") * 3 + 0.5
    steps = {
        "matmul": matmul_step(B, D, Fn, "cuda"),
        "saelab topk": saelab_step("topk", x, d_in=D, d_sae=Fn, k=k),
        "saelab batchtopk": saelab_step("batchtopk", x, d_in=D, d_sae=Fn, k=k),
        "saelab topk, 10% dead": saelab_step("topk", x, dead_fraction=0.1, d_in=D, d_sae=Fn, k=k),
        "plain dense topk": plain_step("topk", x, D, Fn, k),
        "saelab relu": saelab_step("relu", x, d_in=D, d_sae=Fn),
        "plain dense relu": plain_step("relu", x, D, Fn, k),
    }
    t = timed_interleaved({name: synced(fn) for name, fn in steps.items()}, a.steps)
    rate = 2 * B * D * Fn / t.pop("matmul")
    bound = rate / (10 * D * Fn)
    print(f"{torch.cuda.get_device_name()}: fp32 matmul rate {rate / 1e12:.1f} TFLOP/s (TF32 off) -> dense-step "
          f"bound {bound:,.0f} tok/s (d_in={D} d_sae={Fn} k={k} batch={B}, Adam fused)")
    for name, sec in t.items():
        print(f"  {name + ' step':28s} {B / sec:12,.0f} tok/s   ({sec * 1e3:8.2f} ms/step)")
    print(f"saelab topk / dense-step bound      : {B / t['saelab topk'] / bound:.2f}x")
    print(f"saelab batchtopk / dense-step bound : {B / t['saelab batchtopk'] / bound:.2f}x")
    print(f"saelab topk 10% dead / bound        : {B / t['saelab topk, 10% dead'] / bound:.2f}x  (AuxK on)")
    print(f"saelab topk / plain dense topk      : {t['plain dense topk'] / t['saelab topk']:.2f}x")
    print(f"saelab relu / plain dense relu      : {t['plain dense relu'] / t['saelab relu']:.2f}x")


def collect_rate(a) -> None:
    tokens = parse_int(a.collect_tokens)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        cfg = CollectConfig(out=str(Path(tmp) / "store"), model=a.model, layer=[a.layer], corpus=a.corpus,
                            tokens=tokens, device="cuda", dtype="bfloat16", batch_size=a.collect_batch)
        t0 = time.perf_counter()
        res = collect(cfg, quiet=True)
        collect_s = time.perf_counter() - t0
    lm = load_model(a.model, dtype="bfloat16", device="cuda", quiet=True)
    hp = resolve_hooks(lm.model, [f"model.layers.{a.layer}"])
    tok = tokenizer_info(lm.tokenizer)
    seqs = pack_corpus(open_corpus(cfg.text), lm.tokenizer, tok, cfg.text)
    n, t0 = 0, time.perf_counter()
    for ids_BS, mask_BS, keep_BS, _ in batch_sequences(seqs, a.collect_batch):
        capture(lm.model, hp, ids_BS.cuda(), mask_BS.cuda(), stop_early=True)
        n += int(keep_BS.sum())
        if n >= tokens:
            break
    torch.cuda.synchronize()
    fwd = n / (time.perf_counter() - t0)
    print(f"collect {a.model} layer {a.layer}, bf16, batch {a.collect_batch} x {cfg.text.max_length}: "
          f"{res.tokens_per_second:,.0f} tok/s stored ({collect_s:.0f} s with loading); bare forward "
          f"{fwd:,.0f} tok/s; collect / forward = {res.tokens_per_second / fwd:.2f}x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=36864)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed repetitions of each step")
    p.add_argument("--model", default="default")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--corpus", default="sotu")
    p.add_argument("--collect-tokens", default="500k")
    p.add_argument("--collect-batch", type=int, default=32)
    p.add_argument("--no-collect", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (none here); bench_train.py measures the CPU path.")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    train_ratios(a)
    if not a.no_collect:
        collect_rate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
