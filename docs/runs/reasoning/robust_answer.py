"""The robustness checks of docs/reasoning.md's answer-level claim (layer 9, seed 0, 200 controls):
how much the largest problem carries, and statistics no single problem decides, each computed for
the chosen set and for every control set alike.

    python docs/runs/reasoning/robust_answer.py docs/runs/reasoning/L9_s0_200controls/answer-0.safetensors

The file is the experiment's per-problem checkpoint: scores [problems, 1 + 1 + controls, 3] with
set 0 = clean, 1 = the chosen set, 2.. = matched controls; column 0 = log p(final answer).
"""
import sys

import numpy as np
from safetensors.numpy import load_file

sc = load_file(sys.argv[1])["scores"]
drop = sc[:, :1, 0] - sc[:, 1:, 0]  # [problems, sets]: clean - ablated, chosen set first


def pct(x, c):
    return 100 * ((c < x).sum() + 0.5 * (c == x).sum()) / len(c)


def p2(x, c):
    n = len(c)
    return min(1.0, 2 * min((1 + (c >= x).sum()) / (n + 1), (1 + (c <= x).sum()) / (n + 1)))


def report(name, stat):
    print(f"{name}: chosen {stat[0]:.3f}, percentile {pct(stat[0], stat[1:]):.1f}, two-sided p {p2(stat[0], stat[1:]):.3f}")


order = np.argsort(-drop[:, 0])
print("chosen set's drop per problem, largest first:", np.round(drop[order, 0], 2).tolist())
print(f"largest problem's share of the sum: {drop[order[0], 0] / drop[:, 0].sum():.2f}")
report("mean", drop.mean(0))
keep = np.ones(len(drop), bool)
keep[order[0]] = False
report("mean without the largest problem", drop[keep].mean(0))
k = int(0.1 * len(drop))
report("10%-trimmed mean", np.sort(drop, 0)[k:len(drop) - k].mean(0))
report("problems hurt more than the median control", (drop > np.median(drop[:, 1:], 1, keepdims=True)).sum(0).astype(float))
