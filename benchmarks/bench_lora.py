"""Benchmark: LoRA hook overhead, and context extraction for the top examples of LoRA SAE features.

1. Hook overhead, on the embedded SmolLM2-135M-Instruct with a rank-1 adapter on all seven types
   (random A and B, so the adapter is not a no-op), same token batch, best of --reps:
       plain      model(ids) with the adapter, no hooks                              (the reference)
       hooked     the same full forward with the 210 `lora:gate,up,down,q,k,v,o` hooks recording
       collect    capture(...) as `saelab collect` runs it (stops after the last LoRA module, so
                  the final norm and the LM head are skipped)
   Printed: hooked / plain time (target <= 1.15) and collect / plain.
2. Context extraction (+-10 tokens) for the top examples of many features, on a store of real
   token ids (a built-in corpus packed with the SmolLM2 tokenizer) with random 210-wide activations
   and a BatchTopK SAE (expansion 16, k 50, random weights):
       saelab     interpret.examples.build_examples: one batched pass, each needed row encoded once
       naive      per example: decode its sequence's tokens to text, re-tokenise it, cut +-10 tokens,
                  read those rows and encode them with the SAE (one call per example)
   Printed: examples/s of both and the speed-up.

    .venv/bin/python benchmarks/bench_lora.py [--batch 2] [--seq 128] [--reps 3] [--features 200]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saelab.models import capture, load_model, load_tokenizer, tokenizer_info  # noqa: E402
from saelab.models.lora import LORA_TYPES, resolve_lora_hook  # noqa: E402

HOOK = "lora:gate,up,down,q,k,v,o"


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_hooks(args) -> None:
    from peft import LoraConfig, get_peft_model

    lm = load_model("default", quiet=True)
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=[p.split(".")[-1] for p in LORA_TYPES.values()]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.eval()
    hp = resolve_lora_hook(model, HOOK)
    ids = torch.randint(10, 49000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    plain()  # warm-up
    runs = {"plain": plain, "hooked": lambda: capture(model, [hp], ids, stop_early=False),
            "collect": lambda: capture(model, [hp], ids, stop_early=True)}
    times = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved, so a burst of load on the shared machine hits all three
        for k, fn in runs.items():
            times[k].append(best(fn, 1))
    t_plain, t_hooked, t_collect = (min(times[k]) for k in runs)
    n = ids.numel()
    print(f"[hooks] {hp.width}-wide LoRA vector ({len(hp.parts)} lora_A modules), batch {args.batch} x {args.seq}, "
          f"best of {args.reps}")
    print(f"  plain forward (adapter, no hooks) {n / t_plain:8.1f} tok/s   1.00")
    print(f"  + LoRA hooks, full forward        {n / t_hooked:8.1f} tok/s   time ratio {t_hooked / t_plain:.3f} "
          f"(target <= 1.15)")
    print(f"  capture as collect runs it        {n / t_collect:8.1f} tok/s   time ratio {t_collect / t_plain:.3f}")


def make_store(root: Path, tokens: int, corpus: str, width: int, seq: int = 256):
    from saelab.corpus import pack_sequences, resolve_corpus
    from saelab.store import ShardWriter

    tok = load_tokenizer("default")
    tk = tokenizer_info(tok)
    packed = pack_sequences(resolve_corpus(corpus).documents(), tok, seq, tk["bos_id"], tk["eos_id"], tk["pad_id"])
    meta = {"model": {"spec": "default", "name": "synthetic", "sha256": "0" * 64},
            "hooks": [{"name": HOOK, "width": width}], "tokenizer": tk, "batch_size": 1, "chunk_tokens": 8192}
    w = ShardWriter.open(root, meta, 0, 1)
    g = np.random.default_rng(0)
    done = 0
    for i, batch in enumerate(iter(lambda: list(itertools.islice(packed, 32)), [])):
        ids = np.concatenate([s.input_ids[s.keep_mask] for s in batch]).astype(np.int32)
        seqpos = np.concatenate([np.stack([np.full(s.keep_mask.sum(), s.index), np.nonzero(s.keep_mask)[0]], 1)
                                 for s in batch]).astype(np.int32)
        x = g.standard_normal((len(ids), width), dtype=np.float32)
        w.write_chunk(ids, seqpos, {HOOK: x}, sequences_done=32 * (i + 1), batches_done=i + 1)
        done += len(ids)
        if done >= tokens:
            break
    w.finish()
    return tok


@torch.no_grad()
def naive_examples(sae, store, tok, requests, context: int):
    """Per example: re-tokenise its sequence's text, cut the window, encode its rows one example at a time."""
    chunks = sorted(store.chunks, key=lambda c: c.offset)
    starts = np.array([c.offset for c in chunks])
    out = []
    for f, g in requests:
        c = chunks[int(np.searchsorted(starts, g, side="right") - 1)]
        tokens, seqpos = np.asarray(store.read_tokens(c)), np.asarray(store.read_seqpos(c))
        row = g - c.offset
        same = np.nonzero(seqpos[:, 0] == seqpos[row, 0])[0]
        text = tok.decode(tokens[same].tolist())
        ids = tok(text, add_special_tokens=False)["input_ids"]
        k = int(np.searchsorted(same, row))
        lo, hi = max(0, k - context), min(len(same), k + context + 1)
        x = torch.from_numpy(np.asarray(store.read_activations(c, HOOK)[same[lo:hi]], dtype=np.float32))
        out.append((ids[lo:hi], sae.encode(x)[:, f].tolist()))
    return out


def bench_contexts(args) -> None:
    from saelab.interpret.examples import build_examples
    from saelab.saes import REGISTRY, make_sae
    from saelab.store import load_store

    width = 30 * 7
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_store(Path(tmp) / "store", args.tokens, args.corpus, width)
        store = load_store(Path(tmp) / "store")
        torch.manual_seed(0)
        sae = make_sae(REGISTRY["batchtopk"][1](d_in=width, d_sae=16 * width, k=50)).eval()
        sae.threshold.fill_(0.5)  # as after training: a fixed threshold, so encode is per token
        g = np.random.default_rng(1)
        feats = g.choice(sae.cfg.d_sae, args.features, replace=False)
        requests = [(int(f), int(i)) for f in feats for i in g.choice(store.num_tokens, args.top_k, replace=False)]
        t_fast = best(lambda: build_examples(sae, store, HOOK, requests, context=10), 2)
        sub = requests[: args.naive_examples]
        t_naive = best(lambda: naive_examples(sae, store, tok, sub, 10), 1) / len(sub) * len(requests)
        fast = build_examples(sae, store, HOOK, sub, context=10)
        naive = naive_examples(sae, store, tok, sub, 10)
        diff = max(max(abs(a - b) for a, b in zip(e.context_acts, n[1])) for e, n in zip(fast, naive))
    print(f"\n[contexts] store {store.num_tokens:,} tokens of {args.corpus} (width {width}), BatchTopK d_sae "
          f"{sae.cfg.d_sae}, {len(requests):,} examples (+-10 tokens)")
    print(f"  saelab build_examples   {len(requests) / t_fast:10,.0f} examples/s")
    print(f"  naive re-tokenisation   {len(requests) / t_naive:10,.0f} examples/s  (timed on {len(sub)})")
    print(f"  speed-up {t_naive / t_fast:.0f}x; max |activation difference| on the shared examples {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=65_536, help="store rows for the context benchmark")
    ap.add_argument("--corpus", default="champ-cot")
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--naive-examples", type=int, default=200)
    ap.add_argument("--skip-hooks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.skip_hooks:
        bench_hooks(args)
    bench_contexts(args)


if __name__ == "__main__":
    main()
