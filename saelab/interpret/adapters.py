"""Where a LoRA SAE's features live: decoder norms per (layer, adapter type), and dashboard panels.

For a store collected at `lora:TYPES` (see saelab.models.lora for the slice map), feature f's
decoder row restricted to the coordinates of adapter (l, t):

    H_FLT[f, l, t] = || W_dec_FD[f, start_{l,t} : stop_{l,t}] ||_2          (NaN where no adapter)

Fast path: one matmul with the 0/1 coordinate -> slice matrix M_DS,  H_FS = sqrt(W_dec_FD**2 @ M_DS);
reference path: a loop over slices (`adapter_heatmap_reference`); tests compare them.
`lora_panels` turns those matrices into dashboard heatmap panels (rows = layers, cols = types).
Shapes: F features, D store width, S slices, L layers, T adapter types.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from saelab.errors import UsageError
from saelab.interpret.dashboard import HeatmapPanel
from saelab.models.lora import LORA_TYPES, LoraSlice, slices_from_json


class AdapterMap(NamedTuple):
    """Decoder norms of features over layer x adapter type."""

    values_FLT: torch.Tensor
    """H[f, l, t] = ||W_dec_FD[f, slice(l, t)]||_2; NaN where layer l has no adapter of type t."""
    layers: list[int]
    """Layer index of each row L."""
    types: list[str]
    """Adapter type of each column T (canonical order)."""


def _as_slices(slices) -> list[LoraSlice]:
    return [s if isinstance(s, LoraSlice) else slices_from_json([s])[0] for s in slices]


def _grid(sl: list[LoraSlice]) -> tuple[list[int], list[str]]:
    layers = sorted({s.layer for s in sl})
    types = [t for t in LORA_TYPES if any(s.type == t for s in sl)]
    return layers, types


def _check_width(W_dec_FD: torch.Tensor, sl: list[LoraSlice]) -> None:
    width = max((s.stop for s in sl), default=0)
    if W_dec_FD.shape[1] != width:
        raise UsageError(f"the SAE decodes to width {W_dec_FD.shape[1]}, but the store's LoRA slice map covers "
                         f"{width} coordinates: the SAE was not trained on this LoRA hook.")


@torch.no_grad()
def adapter_heatmap(W_dec_FD: torch.Tensor, slices) -> AdapterMap:
    """Fast path: H_FS = sqrt(W_dec_FD**2 @ M_DS), M_DS[d, s] = 1 if coordinate d is in slice s."""
    sl = _as_slices(slices)
    _check_width(W_dec_FD, sl)
    layers, types = _grid(sl)
    D = W_dec_FD.shape[1]
    coord_D = torch.full((D,), -1, dtype=torch.long)
    for i, s in enumerate(sl):
        coord_D[s.start:s.stop] = i
    assert (coord_D >= 0).all(), "LoRA slice map leaves coordinates uncovered: a corrupt store.json?"
    M_DS = torch.zeros(D, len(sl), dtype=torch.float32)
    M_DS[torch.arange(D), coord_D] = 1.0
    H_FS = (W_dec_FD.float().square() @ M_DS).sqrt()
    li = {l: i for i, l in enumerate(layers)}
    ti = {t: i for i, t in enumerate(types)}
    cell_S = torch.tensor([li[s.layer] * len(types) + ti[s.type] for s in sl], dtype=torch.long)
    F_ = W_dec_FD.shape[0]
    H = torch.full((F_, len(layers) * len(types)), float("nan"))
    H[:, cell_S] = H_FS
    return AdapterMap(H.view(F_, len(layers), len(types)), layers, types)


@torch.no_grad()
def adapter_heatmap_reference(W_dec_FD: torch.Tensor, slices) -> AdapterMap:
    """Reference path: one norm per (feature, slice), in plain loops."""
    sl = _as_slices(slices)
    _check_width(W_dec_FD, sl)
    layers, types = _grid(sl)
    H = torch.full((W_dec_FD.shape[0], len(layers), len(types)), float("nan"))
    for s in sl:
        for f in range(W_dec_FD.shape[0]):
            H[f, layers.index(s.layer), types.index(s.type)] = torch.linalg.vector_norm(W_dec_FD[f, s.start:s.stop].float())
    return AdapterMap(H, layers, types)


def store_slices(store_meta: dict, hook: str) -> list[LoraSlice] | None:
    """The LoRA slice map of `hook` in a store's store.json, or None for an ordinary hook."""
    entries = (store_meta.get("slices") or {}).get(hook)
    return slices_from_json(entries) if entries else None


def lora_panels(W_dec_FD: torch.Tensor, slices, feature_ids: list[int]) -> dict[int, list]:
    """feature -> [HeatmapPanel of its decoder norms over layer x adapter type] for the dashboard."""
    ids = list(feature_ids)
    amap = adapter_heatmap(W_dec_FD[ids], slices)
    rows = [f"L{l}" for l in amap.layers]
    out = {}
    for i, f in enumerate(ids):
        vals = [[None if math.isnan(v) else v for v in row] for row in amap.values_FLT[i].tolist()]
        out[f] = [HeatmapPanel(title="decoder norm by layer × adapter (where the feature lives)",
                               rows=rows, cols=list(amap.types), values=vals)]
    return out
