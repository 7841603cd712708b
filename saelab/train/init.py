"""Data-driven decoder initialisation for training: `--init rkcnn|data_rows|kmeans|pca`.

`init_dirs(cfg, d_sae, x_ND)` returns the rows that `make_sae(..., init_dirs_FD=...)` puts on the
first latents; `init_encoder_(sae, cfg)` then sets the encoder columns of those latents per
`cfg.rkcnn.rkcnn_init_encoder` (random, as the RkCNN method, or tied to W_dec). The probe and the
other inits live in `saelab.rkcnn`.
"""
from __future__ import annotations

import logging

import torch

from saelab.rkcnn import data_init, orient_heavy_tail, random_encoder_columns_

log = logging.getLogger(__name__)

__all__ = ["init_dirs", "init_encoder_", "orient_heavy_tail"]


def init_dirs(cfg, d_sae: int, x_ND: torch.Tensor) -> torch.Tensor | None:
    """Decoder directions for `cfg.init`, to pass as `make_sae(sae_cfg, init_dirs_FD=...)`.

    Any architecture takes them: the SAE puts the M rows on its first M latents (marking them in
    its `init_from_dirs_F` buffer) and draws the other rows at random.

    Args:
        cfg: a TrainConfig; its init, seed and rkcnn group are used.
        d_sae: number of latents F.
        x_ND: the initialisation sample (raw activations).
    Returns:
        None for --init random, else float32 [M, D] unit rows (`saelab.rkcnn.data_init`),
        M <= round(rkcnn_fraction * d_sae); for rkcnn the kept directions in selection order.
    """
    if cfg.init == "random":
        return None
    init = data_init(x_ND, d_sae, cfg.init, cfg.rkcnn, seed=cfg.seed)
    n = int(init.mined_mask_F.sum())
    if n and init.probe is not None:
        top = init.probe.scores_H[init.probe.top_idx_R]
        log.info("rkcnn init: %d of %d latents start at mined directions (%s score %.3g .. %.3g)",
                 n, d_sae, cfg.rkcnn.rkcnn_score, float(top[0]), float(top[n - 1]))
    return init.dirs_FD[init.mined_mask_F]  # data-driven rows come first; the SAE draws the rest itself


def init_encoder_(sae, cfg) -> None:
    """Encoder columns of the data-driven latents: re-drawn at random, or left tied to W_dec."""
    if cfg.init != "random" and not sae.cfg.tied and cfg.rkcnn.rkcnn_init_encoder == "random":
        random_encoder_columns_(sae.W_enc_DF.data, sae.init_from_dirs_F, cfg.seed)
