"""Data-driven decoder initialisation for training: `--init rkcnn` directions, oriented to the tail.

`init_dirs(cfg, d_sae, x_ND)` returns the rows that `make_sae(..., init_dirs_FD=...)` puts on the
first latents; the RkCNN probe itself lives in `saelab.rkcnn`.
"""
from __future__ import annotations

import logging

import torch

from saelab.rkcnn import rkcnn_init

log = logging.getLogger(__name__)


def init_dirs(cfg, d_sae: int, x_ND: torch.Tensor) -> torch.Tensor | None:
    """Decoder directions for `cfg.init`, to pass as `make_sae(sae_cfg, init_dirs_FD=...)`.

    Any architecture takes them: the SAE puts the M rows on its first M latents (marking them in
    its `init_from_dirs_F` buffer), draws the other rows at random, and sets W_enc = W_dec^T as for
    a random init.

    Args:
        cfg: its init, seed and rkcnn_* fields are used.
        d_sae: number of latents F.
        x_ND: the initialisation sample (raw activations).
    Returns:
        None for --init random, else float32 [M, D] unit rows, M = min(round(fraction * d_sae),
        distinct subsets kept): the mined directions, best score first, each oriented towards the
        heavy tail of the data (`orient_heavy_tail`).
    """
    if cfg.init == "random":
        return None
    init = rkcnn_init(x_ND, d_sae, fraction=cfg.rkcnn_fraction, h=cfg.rkcnn_subsets, m=cfg.rkcnn_subset_size,
                      score=cfg.rkcnn_score, seed=cfg.seed)
    n = int(init.mined_mask_F.sum())
    if n:
        top = init.probe.scores_H[init.probe.top_idx_R]
        log.info("rkcnn init: %d of %d latents start at mined directions (%s score %.3g .. %.3g)",
                 n, d_sae, cfg.rkcnn_score, float(top[0]), float(top[n - 1]))
    # mined rows come first; the SAE draws the rest itself
    return orient_heavy_tail(x_ND, init.dirs_FD[init.mined_mask_F])


def orient_heavy_tail(x_ND: torch.Tensor, dirs_MD: torch.Tensor) -> torch.Tensor:
    """Flip each direction so the third moment of the data's projection on it is >= 0.

        p_nm = (x_n − mean(x)) · dirs_m,   dirs_m <- sign(mean_n p_nm³) dirs_m   (sign(0) = +1)

    A principal direction has no sign, but an SAE latent with W_enc = W_decᵀ only fires on positive
    projections: pointing it at the heavy (sparse-feature) tail lets it fire where the feature is.
    """
    if dirs_MD.shape[0] == 0:
        return dirs_MD
    x = x_ND.float()
    p_NM = (x - x.mean(0)) @ dirs_MD.T
    sign_M = torch.where(p_NM.double().pow(3).mean(0) < 0, -1.0, 1.0).to(dirs_MD.dtype)
    return dirs_MD * sign_M[:, None]
