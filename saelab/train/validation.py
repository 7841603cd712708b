"""Validation of an SAE during and after training, on the split it never trained on.

Sums over the first eval_tokens of the val split (saelab.metrics equations):

    val_loss = sum_b B_b * loss_b / sum_b B_b     (loss_b = training_loss with sparsity_scale 1)
    val_mse, val_fvu, val_cosine, val_l0, val_dead_frac, val_dense_frac   from ReconSums/SparsitySums

`evaluate_checkpoint` measures a saved SAE on the validation split recorded in its metadata.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from saelab.errors import UsageError
from saelab.metrics import (ReconSums, SparsitySums, add_recon, empty_recon, empty_sparsity, add_sparsity, recon_sums, reconstruction_metrics,
                            sparsity_metrics, sparsity_sums)
from saelab.provenance import trained_split
from saelab.saes import load_sae
from saelab.train.sources import open_store, resolve_hook, val_batches


@torch.no_grad()
def evaluate_sae(sae, batches, device: torch.device, world: int = 1) -> dict[str, float]:
    """Validation metrics of `sae` over `batches` (iterable of x_BD); see the module docstring.
    Under DDP each rank passes its own batches; the sums are all-reduced."""
    was_training = sae.training
    sae.eval()
    rs = ss = None
    loss_sum = torch.zeros((), dtype=torch.float64)
    try:
        for x_BD in batches:
            if not bool(torch.isfinite(x_BD).all()):
                raise UsageError(f"a validation batch has {int((~torch.isfinite(x_BD)).sum())} NaN/inf values, so "
                                 "every validation metric would be NaN. Find the chunk with `saelab verify STORE`.")
            x_BD = x_BD.to(device)
            x_hat_BD, f_BF = sae(x_BD)
            loss_sum += float(sae.training_loss(x_BD, sparsity_scale=1.0).loss) * x_BD.shape[0]
            rs = add_recon(rs, recon_sums(x_BD.cpu(), x_hat_BD.float().cpu()))
            ss = add_sparsity(ss, sparsity_sums(f_BF.cpu()))
    finally:
        sae.train(was_training)
    if world > 1:
        rs, ss, loss_sum = _all_reduce_sums(rs, ss, loss_sum, sae.cfg.d_in, sae.cfg.d_sae)
    if rs is None or rs.n == 0:
        raise UsageError("the validation split is empty: raise --val-fraction or use a larger store.")
    rec, sp = reconstruction_metrics(rs), sparsity_metrics(ss)
    return {"val_loss": float(loss_sum) / rs.n, "val_mse": rec.mse, "val_fvu": rec.fvu,
            "val_rel_error": rec.rel_error, "val_cosine": rec.cosine, "val_l0": sp.l0, "val_dead_frac": sp.dead_frac,
            "val_dense_frac": sp.dense_frac}


def _all_reduce_sums(rs, ss, loss_sum, d_in: int, d_sae: int):
    if rs is None:  # this rank got no val batch
        rs, ss = empty_recon(d_in), empty_sparsity(d_sae)
    n = torch.tensor(float(rs.n), dtype=torch.float64)
    parts = [n, loss_sum.clone(), *(t.clone() for t in rs[1:]), ss.fired_F.clone(), ss.l0_hist.clone()]
    for t in parts:
        dist.all_reduce(t)
    n_all, k = int(parts[0]), len(rs)
    return (ReconSums(n_all, *parts[2:k + 1]), SparsitySums(n_all, parts[k + 1], parts[k + 2]), parts[1])


def evaluate_checkpoint(path: str | Path, data: str | None = None, hook: str | None = None,
                        batch_size: int = 4096, eval_tokens: int = 262_144,
                        device: str = "cpu") -> dict[str, float]:
    """Load a saved SAE and measure it on the validation split it was trained with (or of `data`)."""
    sae = load_sae(path, device=device)
    train_cfg = (sae.metadata or {}).get("training") or {}
    data = data or sae.metadata.get("store") or train_cfg.get("data")
    if data is None:
        raise UsageError(f"{path} does not record its store; pass --data STORE.")
    store = open_store(data)
    hook, _ = resolve_hook(store, hook or sae.metadata.get("hook"), None)
    val_fraction, seed = trained_split(sae.metadata)
    cfg = SimpleNamespace(batch_size=batch_size, eval_tokens=eval_tokens, seed=seed, val_fraction=val_fraction,
                          shuffle_chunks=train_cfg.get("shuffle_chunks", 8))
    return evaluate_sae(sae, val_batches(store, hook, cfg), torch.device(device))
