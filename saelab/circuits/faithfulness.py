"""How well a circuit explains the metric, and how well the linear scores predict real ablations.

Circuit metric m(C): every site is spliced in at once; at each site the latents and the error of the
nodes in C keep their values, every other node (at a node position) is set to its mean over the
prompts at that position (mean ablation, Marks et al. 2024, section 3):

    f'_ti = f_ti if (t, i) in C else mean_b f_bti          e'_t = e_t if (t, err) in C else mean_b e_bt
    x'    = decode(f') + e'          (computed from the site's input, so upstream ablations propagate)

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))      m(M) = the model (every node kept)
    completeness    = faithfulness of the complement M \\ C        (near 0 for a complete circuit)

With every node kept x' = decode(f) + x - decode(f) = x, so m(M) equals the clean metric up to
rounding: that is what the error nodes buy (tests check it).

Validation of the linear scores: for each of the top nodes, the real effect of patching that node
alone (to the attribution baseline; other nodes and downstream sites as in the model) per prompt,
against its per-prompt attribution; Spearman's rho between their means over prompts, with a
percentile bootstrap interval that resamples prompts (the unit the estimates vary over).

Shapes: B prompts, S positions, D hook width, F latents, N nodes.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.attribution import Attribution, site_scores, spliced
from saelab.circuits.prompts import Batch, metric_forward
from saelab.circuits.sites import ALL, ERROR, NodeKey, Site
from saelab.statistics import CI, rankdata


def keep_masks(attr: Attribution, sites: Sequence[Site], nodes: Iterable[NodeKey]) -> list[tuple[Tensor, Tensor]]:
    """Per site (keep_SF, keep_S): which latent / error nodes are in the circuit."""
    S = attr.node_mask_BS.shape[1]
    masks = [(torch.zeros(S, s.d_sae, dtype=torch.bool), torch.zeros(S, dtype=torch.bool)) for s in sites]
    for n in nodes:
        lat, err = masks[n.site]
        pos = slice(None) if n.position == ALL else n.position
        if n.index == ERROR:
            err[pos] = True
        else:
            lat[pos, n.index] = True
    return masks


@torch.no_grad()
def circuit_metric(model, sites: Sequence[Site], batch: Batch, attr: Attribution,
                   masks: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """m_B with every node outside the circuit mean-ablated (module docstring)."""
    node_BS = attr.node_mask_BS

    def make(j: int):
        keep_SF, keep_S = masks[j]
        st = attr.states[j]

        def fn(x: Tensor) -> Tensor:
            f, e = sites[j].split(x)
            ablate_BS = node_BS.to(x.device)
            keep_f = keep_SF.to(x.device)[None] | ~ablate_BS[..., None]
            keep_e = (keep_S.to(x.device)[None] | ~ablate_BS)[..., None]
            f2 = torch.where(keep_f, f, st.mean_f_SF.to(f)[None])
            e2 = torch.where(keep_e, e, st.mean_e_SD.to(e)[None])
            return (sites[j].decode(f2) + e2).to(x.dtype)
        return fn

    with torch.inference_mode(), spliced(model, [(s.hook, make(j)) for j, s in enumerate(sites)]):
        return metric_forward(model, batch)


class CurvePoint(NamedTuple):
    """One circuit size on the faithfulness curve."""

    n_features: int
    """Latent nodes in the circuit."""
    n_errors: int
    """Error nodes in the circuit (those ranked above the last latent kept)."""
    threshold: float
    """|score| of the last node kept."""
    metric: float
    """m(C), mean over prompts."""
    faithfulness: float
    """(m(C) - m(empty)) / (m(M) - m(empty))."""


def prefix_for_features(ranked: Sequence[NodeKey], n_features: int) -> list[NodeKey]:
    """The shortest prefix of the ranking that holds n_features latent nodes (errors above them included)."""
    out, k = [], 0
    for n in ranked:
        if k >= n_features:
            break
        out.append(n)
        k += not n.is_error
    return out


def faithfulness_curve(model, sites, batch, attr, ranked: Sequence[NodeKey], scores: dict[NodeKey, float],
                       sizes: Sequence[int], m_full: float, m_empty: float, quiet: bool = True) -> list[CurvePoint]:
    """m(C) for the top-n latent nodes of `ranked` (plus the error nodes ranked above them), n in sizes."""
    out = []
    for n in tqdm(sizes, desc="faithfulness", unit="circuit", disable=quiet):
        nodes = prefix_for_features(ranked, n)
        m = float(circuit_metric(model, sites, batch, attr, keep_masks(attr, sites, nodes)).mean())
        thr = abs(scores[nodes[-1]]) if nodes else float("inf")
        out.append(CurvePoint(sum(not x.is_error for x in nodes), sum(x.is_error for x in nodes), thr, m,
                              faithfulness(m, m_full, m_empty)))
    return out


def faithfulness(m: float, m_full: float, m_empty: float) -> float:
    denom = m_full - m_empty
    return float("nan") if denom == 0 else (m - m_empty) / denom


@torch.no_grad()
def node_estimates(attr: Attribution, sites: Sequence[Site], nodes: Sequence[NodeKey]) -> Tensor:
    """Per-prompt attribution of each node [B, N]."""
    cols, cache = [], {}
    for n in nodes:
        if n.site not in cache:
            cache[n.site] = site_scores(attr, sites, n.site)
        lat_BSF, err_BS = cache[n.site]
        v_BS = err_BS if n.index == ERROR else lat_BSF[:, :, n.index]
        cols.append(v_BS.sum(1) if n.position == ALL else v_BS[:, n.position])
    return torch.stack(cols, 1) if cols else torch.zeros(attr.metric_B.shape[0], 0)


@torch.no_grad()
def node_ablation_effects(model, sites: Sequence[Site], batch: Batch, attr: Attribution, nodes: Sequence[NodeKey],
                          quiet: bool = True) -> Tensor:
    """Real effect per prompt of patching each node alone to its baseline value, m_b(patched) - m_b [B, N].

    Only the node's site changes: x' = x + delta_f_ti W_dec[i] / s (a latent) or x + delta_e_t (the
    error); upstream is clean, so the other nodes of the site keep their clean values.
    """
    cols = []
    for n in tqdm(nodes, desc="single-node ablations", unit="node", disable=quiet):
        st, site = attr.states[n.site], sites[n.site]
        if n.index == ERROR:
            dx_BSD = st.delta_e_BSD.clone()
        else:
            dx_BSD = st.delta_f_BSF[:, :, n.index, None] * site.decoder_rows()[n.index].to(st.delta_f_BSF)
        if n.position != ALL:
            keep = torch.zeros(dx_BSD.shape[1], dtype=torch.bool)
            keep[n.position] = True
            dx_BSD = dx_BSD * keep[None, :, None].to(dx_BSD)
        with torch.inference_mode(), spliced(model, [(site.hook, lambda x, d=dx_BSD: x + d.to(x))]):
            m_B = metric_forward(model, batch)
            cols.append((m_B - attr.metric_B.to(m_B)).cpu())
    return torch.stack(cols, 1) if cols else torch.zeros(attr.metric_B.shape[0], 0)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    d = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float("nan") if d == 0 else float((rx * ry).sum() / d)


def spearman_bootstrap(est_BN, eff_BN, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> CI:
    """Spearman rho between per-node means of estimate and effect, CI by resampling prompts (rows)."""
    est, eff = np.asarray(est_BN, dtype=np.float64), np.asarray(eff_BN, dtype=np.float64)
    if est.shape[1] < 3:
        return CI(float("nan"), float("nan"), float("nan"))
    rho = _spearman(est.mean(0), eff.mean(0))
    rng = np.random.default_rng(seed)
    B = est.shape[0]
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, B, B)
        r = _spearman(est[idx].mean(0), eff[idx].mean(0))
        if np.isfinite(r):
            boots.append(r)
    if not boots:
        return CI(rho, float("nan"), float("nan"))
    a = 1 - level
    lo, hi = np.quantile(boots, [a / 2, 1 - a / 2])
    return CI(rho, float(lo), float(hi))
