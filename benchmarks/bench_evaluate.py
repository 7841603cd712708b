"""Evaluation throughput against the bare SAE encode+decode on the same tokens, in the same run.

    python benchmarks/bench_evaluate.py [--tokens 16384] [--d-in 576] [--d-sae 4608] [--k 32] [--repeats 3]

Reference: `sae(x_BD)` (encode + decode) over the batches, nothing else.
Measured:  `saelab.evaluate.accumulate` over the same batches: the SAE plus every streaming sum
           (reconstruction float64 sums, firing counts, L0 histogram).
Also shown: the bookkeeping timed inside the same loop as the forward (robust on a shared machine),
           and the blocked max-cosine over the decoder (run once per SAE, not per token).
Target: overhead = t_eval / t_bare - 1 <= 25%. Best of `--repeats` for each, interleaved.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arch", default="topk")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from saelab import metrics as M
    from saelab.evaluate import accumulate
    from saelab.saes import REGISTRY

    torch.manual_seed(0)
    cls, cfg_cls = REGISTRY[args.arch]
    extra = {"k": args.k} if "topk" in args.arch else {}
    sae = cls(cfg_cls(d_in=args.d_in, d_sae=args.d_sae, **extra)).eval()
    x_ND = torch.randn(args.tokens, args.d_in) * 2 + 0.5
    batches = list(x_ND.split(args.batch_size))

    def bare():
        with torch.inference_mode():
            for x_BD in batches:
                sae(x_BD)

    def evaluated():
        accumulate([sae], batches)

    bare()  # warm-up
    evaluated()
    t_bare, t_eval = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluated()
        t_eval.append(time.perf_counter() - t0)
    tb, te = min(t_bare), min(t_eval)
    # Split timing inside one loop: immune to load drifting between the two loops above.
    t_fwd = t_book = 0.0
    with torch.inference_mode():
        for _ in range(args.repeats):
            for x_BD in batches:
                t0 = time.perf_counter()
                x_hat_BD, f_BF = sae(x_BD)
                t1 = time.perf_counter()
                M.recon_sums(x_BD, x_hat_BD)
                M.sparsity_sums(f_BF)
                t_book += time.perf_counter() - t1
                t_fwd += t1 - t0
    t0 = time.perf_counter()
    M.max_cos_to_others(sae.W_dec_FD.detach())
    t_geom = time.perf_counter() - t0

    print(f"{args.arch} d_in={args.d_in} d_sae={args.d_sae} k={args.k}, {args.tokens:,} tokens, "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"bare encode+decode : {args.tokens / tb:12,.0f} tok/s  ({tb:.3f} s)")
    print(f"evaluate (metrics) : {args.tokens / te:12,.0f} tok/s  ({te:.3f} s)")
    print(f"overhead           : {te / tb - 1:+.1%}  (target <= +25%)")
    print(f"in-loop split      : bookkeeping / encode+decode = {t_book / t_fwd:.1%}  (same batches, same loop)")
    print(f"max-cos geometry   : {t_geom:.3f} s once per SAE (d_sae={args.d_sae})")


if __name__ == "__main__":
    main()
