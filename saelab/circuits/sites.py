"""Sites and nodes: where the circuit graph's nodes live and how they are named.

A *site* is one sparse dictionary placed in the model. Its latents and its reconstruction error are
the graph's nodes. For an SAE at hook h, with x_BSD the activation there and s its input scale (1 for
a saved SAE):

    f_BSF  = encode(x_BSD)                           latent nodes  (site, position, latent)
    e_BSD  = x_BSD - decode(f_BSF)                   error node    (site, position, ERROR)
    x_BSD  = decode(f_BSF) + e_BSD = f_BSF W_dec_FD / s + b_dec_D / s + e_BSD     (exact)

so the model with every site spliced in (error kept) computes exactly what the plain model does, and
a node's decoder row W_dec_FD[i] / s is d x / d f_i. A transcoder (an encoder reading an MLP's
input, a decoder writing its output) is the same kind of site with a read hook different from its
write hook; saelab has none yet, so `Site.hook` is both.

A node is a `NodeKey(site, position, index)`: `position` is the token position in the
left-aligned prompt (BOS = 0) or ALL (-1) when positions are summed; `index` is the latent or
ERROR (-1). Its string id, used in circuit.json and the HTML page, is `"{site}:{position}:{index}"`
with `*` for ALL and `err` for ERROR, e.g. `2:7:1534`, `0:*:err`; the metric node is `metric`.

Shapes: B prompts, S positions, D width of the hook, F latents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saelab.errors import UsageError

ERROR = -1
"""`NodeKey.index` of a site's error node."""
ALL = -1
"""`NodeKey.position` of a node summed over positions."""
METRIC = "metric"
"""Id of the metric node (the sink of the graph)."""


class NodeKey(NamedTuple):
    """A node: (site index, position or ALL, latent index or ERROR)."""

    site: int
    position: int
    index: int

    @property
    def is_error(self) -> bool:
        return self.index == ERROR

    def id(self) -> str:
        pos = "*" if self.position == ALL else str(self.position)
        idx = "err" if self.index == ERROR else str(self.index)
        return f"{self.site}:{pos}:{idx}"

    @staticmethod
    def parse(text: str) -> "NodeKey":
        try:
            site, pos, idx = text.split(":")
            return NodeKey(int(site), ALL if pos == "*" else int(pos), ERROR if idx == "err" else int(idx))
        except ValueError:
            raise UsageError(f"bad node id {text!r}: expected SITE:POSITION:LATENT such as 2:7:1534, "
                             "2:*:1534 (summed over positions) or 0:5:err (error node).") from None


@dataclass
class Site:
    """One sparse dictionary in the model: its latents and its error term are nodes."""

    name: str
    """Label shown in plots and the page (default: the hook name)."""
    hook: str
    """Hook point the decoder writes to (and, for an SAE, the encoder reads from)."""
    sae: Any = None
    """The dictionary: `encode(x_ND) -> f_NF`, `decode(f_NF) -> x_hat_ND`, `W_dec_FD`, `input_scale`."""

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec_FD.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.sae.W_dec_FD.shape[1])

    def decoder_rows(self) -> Tensor:
        """W_dec_FD / s = d x / d f_i for every latent i [F, D]."""
        return self.sae.W_dec_FD / self.sae.input_scale

    def encode(self, x_BSD: Tensor) -> Tensor:
        """f_BSF = encode(x) applied to every position."""
        B, S, D = x_BSD.shape
        return self.sae.encode(x_BSD.reshape(B * S, D).to(self.sae.W_dec_FD.dtype)).reshape(B, S, -1)

    def decode(self, f_BSF: Tensor) -> Tensor:
        """x_hat_BSD = decode(f)."""
        B, S, Fn = f_BSF.shape
        return self.sae.decode(f_BSF.reshape(B * S, Fn)).reshape(B, S, -1)

    def split(self, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
        """(f_BSF, e_BSD) with x = decode(f) + e."""
        f = self.encode(x_BSD)
        return f, x_BSD.to(f.dtype) - self.decode(f)


def make_sites(saes, hooks=None, names=None) -> list[Site]:
    """Sites for SAEs; each hook comes from `hooks[i]` or the SAE's metadata.json.

    Raises:
        UsageError: an SAE without a recorded hook, or two SAEs on one hook.
    """
    saes = list(saes)
    hooks = list(hooks) if hooks is not None else [None] * len(saes)
    problems, sites = [], []
    for i, (sae, hook) in enumerate(zip(saes, hooks)):
        hook = hook or (getattr(sae, "metadata", None) or {}).get("hook")
        if not hook:
            problems.append(f"SAE {i} records no hook point in its metadata.json; pass its hook explicitly "
                            "(CLI: --hook NAME, one per SAE)")
            continue
        sites.append(Site(name=names[i] if names else hook, hook=hook, sae=sae))
    seen: dict[str, int] = {}
    for i, s in enumerate(sites):
        if s.hook in seen:
            problems.append(f"SAEs {seen[s.hook]} and {i} are both at hook {s.hook!r}; a circuit takes one "
                            "dictionary per hook point")
        seen.setdefault(s.hook, i)
    if problems:
        raise UsageError("cannot build the circuit's sites:\n" + "\n".join(f"  - {p}" for p in problems))
    return sites


def node_values(grad_BSD: Tensor, delta_f_BSF: Tensor, delta_e_BSD: Tensor, rows_FD: Tensor) -> tuple[Tensor, Tensor]:
    """Linear node effects of one site, per prompt and position:

        latent_BSF = (grad_BSD W_dec_FD^T / s) * delta_f_BSF
        error_BS   = sum_D grad_BSD * delta_e_BSD

    With grad = d m / d x at the clean point this is attribution patching; with grad averaged along
    the straight path from clean to patched activations it is integrated gradients.
    """
    latent = torch.einsum("bsd,fd->bsf", grad_BSD, rows_FD) * delta_f_BSF
    return latent, (grad_BSD * delta_e_BSD).sum(-1)
