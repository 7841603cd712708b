"""Edges between nodes of different sites, and from nodes to the metric.

Following Marks et al. 2024 (eq. 5 and App. A.1), the edge from an upstream node u to a downstream
node d is the linear estimate of the effect on m of patching u only along paths through d:

    w(u -> d)      = (d m / d d) (d d / d u) delta_u
    w(u -> metric) = (d m / d u)|direct delta_u

with d m / d d the downstream node's gradient from the attribution pass (atp: at the clean point;
ig: the path average), and d d / d u the *direct* derivative: every site's output is cut from the
graph (replaced by a fresh leaf with the same value), so a path from u that runs through a third
site's nodes counts towards the edges through those nodes, not towards u -> d. For SAEs on the
residual stream only the next site downstream is reached directly; attention / MLP output sites are
skipped over by the residual stream. With the cut graph,

    sum over every downstream node d of w(u -> d) + w(u -> metric) = IE_atp(u)

exactly, per prompt (the chain rule through the first later site on each path), which the tests check.

A downstream node d is a scalar: f_k[b, t, i] for a latent, and (d m / d e_t) . e_k[b, t] for an
error (a vector node: its gradient-weighted sum). Summing d over prompts before the backward pass
gives every prompt's edges at once (prompts do not interact), so one backward pass per downstream
node yields its edges from every upstream node and prompt; the weight kept is the mean over prompts
(and, for nodes summed over positions, the sum over both positions).

Shapes: B prompts, S positions, D hook width, F latents.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.attribution import Attribution, frozen, spliced
from saelab.circuits.prompts import Batch, metric_forward
from saelab.circuits.sites import ALL, ERROR, METRIC, NodeKey, Site, node_values

log = logging.getLogger(__name__)


@torch.no_grad()
def _upstream_edges(grads, ups: list[int], attr: Attribution, sites, wanted: dict[int, list[NodeKey]],
                    down_id, out: dict) -> None:
    """Turn d(scalar)/d(leaf_j) into edge weights to the wanted upstream nodes of each site j."""
    for j, G in zip(ups, grads):
        if G is None or not wanted.get(j):
            continue
        st = attr.states[j]
        lat_BSF, err_BS = node_values(G.to(st.delta_f_BSF), st.delta_f_BSF, st.delta_e_BSD,
                                      sites[j].decoder_rows().to(st.delta_f_BSF))
        # one table [S + 1, F + 1]: column F holds the error, row S the sum over positions
        table = torch.cat([lat_BSF.mean(0), err_BS.mean(0)[:, None]], 1)
        table = torch.cat([table, table.sum(0, keepdim=True)], 0)
        rows = torch.tensor([u.position if u.position != ALL else table.shape[0] - 1 for u in wanted[j]])
        cols = torch.tensor([u.index if u.index != ERROR else table.shape[1] - 1 for u in wanted[j]])
        for u, w in zip(wanted[j], table[rows, cols].tolist()):
            out[(u, down_id)] = w


def _downstream_scalar(attr: Attribution, sites, k: int, d: NodeKey, fe) -> Tensor:
    """sum_b of the downstream node d's gradient-weighted value (module docstring)."""
    f_BSF, e_BSD = fe[k]
    st = attr.states[k]
    mask_BS = attr.node_mask_BS.to(e_BSD.dtype)
    if d.index == ERROR:
        v_BS = (st.grad_BSD * e_BSD).sum(-1) * mask_BS
    else:
        left_BS = st.grad_BSD @ sites[k].decoder_rows()[d.index].to(st.grad_BSD)
        v_BS = left_BS * f_BSF[:, :, d.index] * mask_BS
    return v_BS.sum() if d.position == ALL else v_BS[:, d.position].sum()


def compute_edges(model, sites: Sequence[Site], batch: Batch, attr: Attribution, nodes: Sequence[NodeKey],
                  quiet: bool = True) -> dict[tuple[NodeKey, NodeKey | str], float]:
    """Edge weights between `nodes` (of different sites) and from each of them to the metric.

    Returns:
        {(upstream, downstream or METRIC): weight}, mean over prompts. Pairs that cannot interact
        (same site, or an upstream site that runs later) are absent; pairs with no path are 0.
    """
    rank = {j: r for r, j in enumerate(attr.order)}
    by_site: dict[int, list[NodeKey]] = defaultdict(list)
    for n in nodes:
        by_site[n.site].append(n)
    out: dict[tuple[NodeKey, NodeKey | str], float] = {}
    downstream = [n for n in nodes if any(rank[j] < rank[n.site] for j in by_site)]
    with torch.inference_mode(False), torch.enable_grad(), frozen(model):
        leaves: dict[int, Tensor] = {}
        fe: dict[int, tuple[Tensor, Tensor]] = {}

        def make(j: int):
            def fn(x: Tensor) -> Tensor:
                fe[j] = sites[j].split(x)
                leaves[j] = x.detach().requires_grad_()
                return leaves[j]
            return fn

        with spliced(model, [(s.hook, make(j)) for j, s in enumerate(sites)]):
            m_B = metric_forward(model, batch)
        all_sites = sorted(leaves, key=rank.get)
        grads = torch.autograd.grad(m_B.sum(), [leaves[j] for j in all_sites], retain_graph=bool(downstream),
                                    allow_unused=True)
        _upstream_edges(grads, all_sites, attr, sites, by_site, METRIC, out)
        for d in tqdm(downstream, desc="edges", unit="node", disable=quiet):
            ups = [j for j in all_sites if rank[j] < rank[d.site] and by_site.get(j)]
            scalar = _downstream_scalar(attr, sites, d.site, d, fe)
            if not scalar.requires_grad:  # the node does not depend on any upstream site
                for j in ups:
                    for u in by_site[j]:
                        out[(u, d)] = 0.0
                continue
            g = torch.autograd.grad(scalar, [leaves[j] for j in ups], retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(leaves[j]) if x is None else x for j, x in zip(ups, g)]
            _upstream_edges(g, ups, attr, sites, by_site, d, out)
    return out
