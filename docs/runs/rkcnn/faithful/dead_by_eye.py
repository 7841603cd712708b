"""Which latents die in the faithful phase 2: per seed, the dead sets of the three arms' final SAEs
over the store's first 1M tokens, split into the first 600 latents (mined / data rows / random in
the baseline) and the 4,008 others (the same random start in all three arms of a seed), with the
overlap of the arms' dead sets among the others, and how rarely the living latents fire.

    python docs/runs/rkcnn/faithful/dead_by_eye.py RUNS_DIR STORE SEED [SEED ...]
"""
import sys
import time

import numpy as np
import torch

from saelab.saes import load_sae
from saelab.store import load_store

HOOK, N = "model.layers.15.mlp", 1_000_000
runs, store = sys.argv[1], load_store(sys.argv[2])
torch.set_num_threads(1)
for seed in map(int, sys.argv[3:]):
    t0 = time.time()
    saes = {a: load_sae(f"{runs}/{a}_s{seed}/final").eval() for a in ("baseline-relu", "rkcnn-seed", "data_rows-seed")}
    counts = {a: torch.zeros(4608, dtype=torch.int64) for a in saes}
    n = 0
    with torch.no_grad():
        for chunk in store.select("all"):
            X = torch.from_numpy(np.array(store.read_activations(chunk, HOOK)))
            for i in range(0, X.shape[0], 4096):
                x = X[i:i + 4096].float()[: N - n]
                for a, sae in saes.items():
                    counts[a] += (sae.encode(x) > 0).sum(0)
                n += x.shape[0]
                if n >= N:
                    break
            if n >= N:
                break
    dead = {a: c == 0 for a, c in counts.items()}
    print(f"seed {seed} ({n} tokens, {time.time() - t0:.0f} s)")
    for a, d in dead.items():
        first, rest = int(d[:600].sum()), int(d[600:].sum())
        alive = counts[a][~d].double()
        rare = int(((counts[a] > 0) & (counts[a] < 10)).sum())
        print(f"  {a:15s} dead {int(d.sum()):3d} (first 600: {first}, others: {rest}); alive firing <10 times: {rare}; "
              f"median firings of the living {float(alive.median()):.0f}")
    o = {a: set(np.flatnonzero(d[600:].numpy()) + 600) for a, d in dead.items()}
    for a, b in (("baseline-relu", "rkcnn-seed"), ("baseline-relu", "data_rows-seed"), ("rkcnn-seed", "data_rows-seed")):
        inter = len(o[a] & o[b])
        print(f"  others dead in both {a} and {b}: {inter} of {len(o[a])} and {len(o[b])} "
              f"(Jaccard {inter / max(1, len(o[a] | o[b])):.2f}; two random sets this size share ~{len(o[a]) * len(o[b]) / 4008:.1f})")
