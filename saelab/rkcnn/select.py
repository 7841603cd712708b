"""Which scored directions RkCNN keeps: the method's top-r, or a de-duplicated selection.

Given scores_H, the sampled subsets_HM and their unit directions dirs_HD (x space), every rule walks
the subsets in score order (highest first; ties keep the lower index) and accepts until r are kept:

    none       accept everything: the top r subsets, repeats and near-duplicates included (the
               method's code: argsort(scores)[:r])
    subsets    skip a subset whose dim set was already accepted
    cos_cap    skip a direction whose |cos| with an accepted one exceeds cos_cap
               (greedy; afterwards max_{i≠j} |cos(d_i, d_j)| ≤ cos_cap over the kept set)
    dominant   skip a direction whose dominant coordinate argmax_j |d_j| already has one
    deflation  handled by probe.py (rounds of cos_cap blocks on deflated data)

Why de-duplicate: random subsets overlap, one heavy-tailed coordinate raises the score of every
subset that contains it, and the principal axis of each of those subsets is nearly that coordinate
axis, so the top-r list of the method is full of near-copies of a few coordinate directions.

Not here: scoring (probe.py), SAE initialisation (init.py).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DEDUPS: tuple[str, ...] = ("none", "subsets", "cos_cap", "dominant", "deflation")


def select(scores_H: torch.Tensor, subsets_HM: torch.Tensor, dirs_HD: torch.Tensor, r: int, dedup: str,
           cos_cap: float = 0.5, exclude: list[int] | None = None) -> torch.Tensor:
    """Indices into H of the kept directions, in acceptance order: int64 [R], R <= r.

    Args:
        scores_H: score per subset (higher first; -inf never accepted).
        subsets_HM: the subsets (for "subsets").
        dirs_HD: unit directions (for "cos_cap" and "dominant").
        r: how many to keep.
        dedup: one of DEDUPS but "deflation" (module docstring).
        cos_cap: the |cos| cap of "cos_cap".
        exclude: indices already taken (never accepted again; cos_cap does not compare against them).
    """
    order = torch.sort(scores_H.double(), descending=True, stable=True).indices
    order = order[torch.isfinite(scores_H.double()[order])]
    banned = set(exclude or ())
    if dedup == "none":
        keep = [i for i in order.tolist() if i not in banned][:r]
        return torch.tensor(keep, dtype=torch.int64)
    keep: list[int] = []
    seen: set = set()
    acc_KD = torch.zeros(0, dirs_HD.shape[1], dtype=torch.float64)
    dirs64 = dirs_HD.double()
    dominant_H = dirs_HD.abs().argmax(dim=1)
    for i in order.tolist():
        if i in banned:
            continue
        if dedup == "subsets":
            key = tuple(subsets_HM[i].tolist())
        elif dedup == "dominant":
            key = int(dominant_H[i])
        else:
            key = None
            if acc_KD.shape[0] and float((acc_KD @ dirs64[i]).abs().max()) > cos_cap:
                continue
            acc_KD = torch.cat([acc_KD, dirs64[i:i + 1]])
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        keep.append(i)
        if len(keep) == r:
            break
    if len(keep) < r:
        log.info("rkcnn select (%s): only %d of %d sampled subsets pass; keeping %d, not r=%d",
                 dedup, len(keep), len(order), len(keep), r)
    return torch.tensor(keep, dtype=torch.int64)
