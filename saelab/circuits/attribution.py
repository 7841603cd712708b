"""Node attributions: the linear effect on the metric of patching each latent and each error node.

For every site (sites.py) at hook h, position t and prompt b, with x the clean activation, the patch
values f' / e' (zero, the per-position mean over prompts, or a counterfactual prompt's values) and
delta_f = f' - f, delta_e = e' - e:

    attribution patching (atp):   IE(f_i) = (d m / d x_t . W_dec[i] / s) delta_f_ti
                                  IE(e)   =  d m / d x_t . delta_e_t
    integrated gradients (ig):    the same with d m / d x replaced by its mean over N points of
                                  the straight path from clean to patched values of the site,
                                  x(a) = x + a (delta_f W_dec / s + delta_e),  a = (k + 1/2) / N

Both need only d m / d x at each hook: with the site spliced in and its error kept, x = decode(f) + e
holds exactly, so d m / d f_i = d m / d x . W_dec[i] / s and d m / d e = d m / d x (the gradient
through the SAE's encoder and through e = x - decode(f) cancel, which is the pass-through gradient of
Marks et al. 2024). So one forward + backward of the plain model gives every node's atp score; ig
costs N forward + backward passes per site, in which only that site is interpolated (the other
sites stay clean and the model downstream runs as usual).

Positions that carry no node: padding, and BOS (position 0, the same in every prompt) unless
`include_bos`; their deltas are 0. `SiteState.grad_BSD` is what edges.py multiplies with.

Shapes: B prompts, S positions, D hook width, F latents.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.prompts import Batch, metric_forward
from saelab.circuits.sites import Site, node_values
from saelab.models import capture, splice

log = logging.getLogger(__name__)

Method = Literal["atp", "ig"]
Baseline = Literal["mean", "zero", "corrupted"]


class SiteState(NamedTuple):
    """Everything the circuit needs about one site, on the clean prompts."""

    f_BSF: Tensor
    """Clean latent activations."""
    e_BSD: Tensor
    """Clean error term x - decode(f)."""
    delta_f_BSF: Tensor
    """Patch minus clean latents (0 where no node)."""
    delta_e_BSD: Tensor
    """Patch minus clean error."""
    grad_BSD: Tensor
    """d m_b / d x: at the clean point (atp) or averaged along the path (ig)."""
    mean_f_SF: Tensor
    """Mean over prompts of the latents at each position (mean ablation)."""
    mean_e_SD: Tensor
    """Mean over prompts of the error at each position."""


class Attribution(NamedTuple):
    """Result of `attribute`."""

    states: list[SiteState]
    """One per site, in the order of `sites`."""
    order: list[int]
    """Site indices in execution order (upstream first)."""
    metric_B: Tensor
    """Clean metric per prompt."""
    patched_metric_B: Tensor | None
    """Metric on the counterfactual prompts (baseline corrupted), else None."""
    node_mask_BS: Tensor
    """bool: positions that carry nodes."""
    method: str
    baseline: str


@contextlib.contextmanager
def spliced(model, fns: Sequence[tuple[str, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """Splice several (hook, fn) pairs at once."""
    with contextlib.ExitStack() as stack:
        for hook, fn in fns:
            stack.enter_context(splice(model, hook, fn))
        yield


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Parameters stop requiring grad inside the block (only activations are differentiated)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in flags:
            p.requires_grad_(r)


def node_mask(batch: Batch, include_bos: bool = False) -> Tensor:
    """bool [B, S]: real tokens, minus position 0 (BOS) unless include_bos."""
    mask = batch.attention_mask_BS.bool().clone()
    if not include_bos:
        mask[:, 0] = False
    return mask


def grad_pass(model, sites: Sequence[Site], batch: Batch,
              replace: dict[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor], list[int]]:
    """One forward + backward: (m_B, x_BSD per site, d m_b / d x per site, execution order).

    `replace[j]` (a tensor [B, S, D]) is used instead of site j's activation (for ig).
    """
    xs: dict[int, Tensor] = {}
    order: list[int] = []

    def make(j: int):
        def fn(x: Tensor) -> Tensor:
            if replace and j in replace:
                y = replace[j].detach().to(x.dtype).requires_grad_()
            else:  # keep the graph to upstream sites: d m / d x is the total derivative
                y = x if x.requires_grad else x.detach().requires_grad_()
            xs[j] = y
            order.append(j)
            return y
        return fn

    with torch.inference_mode(False), torch.enable_grad(), frozen(model), \
            spliced(model, [(s.hook, make(j)) for j, s in enumerate(sites)]):
        m_B = metric_forward(model, batch)
        missing = [sites[j].hook for j in range(len(sites)) if j not in xs]
        if missing:
            raise AssertionError(f"hooks {missing} did not run in the forward pass")
        grads = torch.autograd.grad(m_B.sum(), [xs[j] for j in range(len(sites))], allow_unused=True)
    gs = [torch.zeros_like(xs[j]) if g is None else g.detach() for j, g in enumerate(grads)]
    return m_B.detach(), [xs[j].detach() for j in range(len(sites))], gs, order


def _masked_mean(v_BSX: Tensor, mask_BS: Tensor) -> Tensor:
    w = mask_BS.to(v_BSX.dtype)[..., None]
    return (v_BSX * w).sum(0) / w.sum(0).clamp_min(1.0)


@torch.no_grad()
def _patch_values(model, sites, batch, states_fe, mask_BS, baseline: Baseline):
    """(f', e') per site and the counterfactual metric (or None)."""
    if baseline == "zero":
        return [(torch.zeros_like(f), torch.zeros_like(e)) for f, e in states_fe], None
    if baseline == "mean":
        return [(_masked_mean(f, mask_BS).expand_as(f), _masked_mean(e, mask_BS).expand_as(e))
                for f, e in states_fe], None
    if batch.corrupted_ids_BS is None:
        raise ValueError("baseline 'corrupted' needs prompts with a `corrupted` field")
    acts = capture(model, [s.hook for s in sites], batch.corrupted_ids_BS, batch.attention_mask_BS)
    out = []
    for s in sites:
        out.append(s.split(acts[s.hook]))
    with torch.inference_mode():
        m_patch = metric_forward(model, batch, batch.corrupted_ids_BS)
    return out, m_patch


def attribute(model, sites: Sequence[Site], batch: Batch, method: Method = "atp", ig_steps: int = 10,
              baseline: Baseline = "mean", include_bos: bool = False, quiet: bool = True) -> Attribution:
    """Gradients, clean values and patch deltas of every site (see the module docstring).

    Args:
        model: the causal LM.
        sites: the dictionaries and their hooks.
        batch: tokenised prompts (prompts.tokenize).
        method: `atp` (one forward + backward) or `ig` (ig_steps per site).
        baseline: patch values: `mean` (per position, over the prompts), `zero`, or `corrupted`.
        include_bos: make position 0 a node position too.
    """
    m_B, xs, grads, order = grad_pass(model, sites, batch)
    mask_BS = node_mask(batch, include_bos)
    with torch.no_grad():
        fe = [s.split(x) for s, x in zip(sites, xs)]
    patch, m_patch = _patch_values(model, sites, batch, fe, mask_BS, baseline)
    w_BS1 = mask_BS[..., None]
    deltas = [((fp - f) * w_BS1.to(f), (ep - e) * w_BS1.to(e)) for (f, e), (fp, ep) in zip(fe, patch)]
    if method == "ig":
        grads = []
        bar = tqdm(total=len(sites) * ig_steps, desc="integrated gradients", unit="pass", disable=quiet)
        for j, s in enumerate(sites):
            df, de = deltas[j]
            dx_BSD = (s.decode(df) - s.decode(torch.zeros_like(df)) + de).to(xs[j].dtype)
            acc = torch.zeros_like(xs[j])
            for k in range(ig_steps):
                a = (k + 0.5) / ig_steps
                _, _, g, _ = grad_pass(model, sites, batch, replace={j: xs[j] + a * dx_BSD})
                acc += g[j]
                bar.update(1)
            grads.append(acc / ig_steps)
        bar.close()
    elif method != "atp":
        raise ValueError(f"unknown attribution method {method!r}; use atp or ig")
    states = [SiteState(f, e, df, de, g, _masked_mean(f, mask_BS), _masked_mean(e, mask_BS))
              for (f, e), (df, de), g in zip(fe, deltas, grads)]
    return Attribution(states, order, m_B, m_patch, mask_BS, method, baseline)


@torch.no_grad()
def site_scores(attr: Attribution, sites: Sequence[Site], j: int) -> tuple[Tensor, Tensor]:
    """Per-prompt node attributions of site j: (latent_BSF, error_BS)."""
    st = attr.states[j]
    return node_values(st.grad_BSD, st.delta_f_BSF, st.delta_e_BSD, sites[j].decoder_rows().to(st.grad_BSD))
