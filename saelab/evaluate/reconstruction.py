"""Reconstruction, sparsity and dictionary geometry of SAEs over a store: one streaming pass.

Every SAE on a hook sees the same batches; inputs and reconstructions are compared in raw
activation space (a saved SAE has its input normalisation folded into its weights). The sums and
every equation are in saelab.metrics; `EvalResult` holds what `saelab evaluate` reports per SAE.
Shapes: B tokens in a batch, D d_in, F d_sae.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab import metrics as M
from saelab.errors import UsageError
from saelab.evaluate.config import MIN_TOKENS
from saelab.store.batches import rows_in_order


@dataclass
class EvalResult:
    """Every number `saelab evaluate` reports for one SAE (also the rows of eval.json)."""

    name: str
    """Short label: the SAE directory name (made unique among the evaluated SAEs)."""
    path: str
    """Where the SAE was loaded from ('' for an in-memory SAE)."""
    architecture: str
    """relu, topk, batchtopk or jumprelu."""
    hook: str
    """Hook point the SAE reads and is spliced into."""
    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents."""
    split: str
    """Store split the reconstruction metrics were measured on."""
    n_tokens: int
    """Tokens the reconstruction and sparsity metrics average over."""
    mse: float
    """Mean over tokens and dimensions of (x - x_hat)^2, raw space."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the set."""
    explained_variance: float
    """1 - fvu."""
    cosine: float
    """Cosine similarity of x and x_hat per token, averaged over tokens."""
    rel_norm: float
    """||x_hat|| / ||x|| per token, averaged over tokens."""
    l0: float
    """Mean number of active latents per token."""
    dead: int
    """Latents never active on the evaluated tokens."""
    dead_frac: float
    """dead / d_sae."""
    dense: int
    """Latents active on more than 10% of the evaluated tokens."""
    dense_frac: float
    """dense / d_sae."""
    l0_hist: list[int]
    """l0_hist[k] = tokens with exactly k active latents (trailing zeros trimmed)."""
    density_hist: dict
    """Histogram of log10 firing frequency of live latents: edges, counts, dead."""
    decoder_norm_mean: float
    """Mean norm of the decoder directions (rows of W_dec_FD)."""
    decoder_norm_min: float
    """Smallest decoder-direction norm."""
    decoder_norm_max: float
    """Largest decoder-direction norm."""
    max_cos_mean: float
    """Mean over latents of the largest cosine similarity to any other decoder direction."""
    max_cos_max: float
    """Largest cosine similarity between two different decoder directions."""
    max_cos_hist: dict
    """Histogram of each latent's max cosine to the others: edges, counts."""
    ce_clean: float | None = None
    """Model's next-token cross-entropy without any splice (nats/token)."""
    ce_sae: float | None = None
    """Cross-entropy with the SAE reconstruction spliced in at `hook`."""
    ce_zero: float | None = None
    """Cross-entropy with `hook` zero-ablated."""
    ce_mean: float | None = None
    """Cross-entropy with `hook` replaced by the store's mean activation."""
    ce_recovered: float | None = None
    """(ce_zero - ce_sae) / (ce_zero - ce_clean): 1 = as good as the clean model."""
    ce_recovered_mean: float | None = None
    """(ce_mean - ce_sae) / (ce_mean - ce_clean): the same against mean-ablation."""
    kl: float | None = None
    """KL(clean || spliced) of next-token distributions, mean over tokens (nats)."""
    downstream_tokens: int | None = None
    """Token predictions the downstream numbers average over."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


class _Acc:
    """Running sums for one SAE."""

    def __init__(self):
        self.recon: M.ReconSums | None = None
        self.sparsity: M.SparsitySums | None = None


def _take(batches: Iterable[torch.Tensor], max_tokens: int | None) -> Iterator[torch.Tensor]:
    seen = 0
    for x_BD in batches:
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            x_BD = x_BD[: max_tokens - seen]
        seen += x_BD.shape[0]
        yield x_BD


def accumulate(saes: Sequence[torch.nn.Module], batches: Iterable[torch.Tensor], max_tokens: int | None = None,
               device: str = "cpu", quiet: bool = True, desc: str = "evaluate") -> list[tuple[M.ReconSums, M.SparsitySums]]:
    """Run every SAE over the same batches and sum the reconstruction and sparsity statistics.

    Args:
        saes: SAEs with `forward(x_BD) -> (x_hat_BD, f_BF)`, all of the same d_in.
        batches: float tensors x_BD (raw activations).
        max_tokens: stop after this many tokens (None: all).
    Returns:
        One (ReconSums, SparsitySums) per SAE; n = 0 when no batch came.
    """
    accs = [_Acc() for _ in saes]
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for x_BD in _take(batches, max_tokens):
            x_BD = x_BD.to(device=device, dtype=torch.float32)
            for sae, acc in zip(saes, accs):
                x_hat_BD, f_BF = sae(x_BD)
                acc.recon = M.add_recon(acc.recon, M.recon_sums(x_BD, x_hat_BD))
                acc.sparsity = M.add_sparsity(acc.sparsity, M.sparsity_sums(f_BF))
            bar.update(x_BD.shape[0])
    bar.close()
    out = []
    for sae, acc in zip(saes, accs):
        if acc.recon is None:
            d_in, d_sae = sae.W_dec_FD.shape[1], sae.W_dec_FD.shape[0]
            z = torch.zeros((), dtype=torch.float64)
            acc.recon = M.ReconSums(0, torch.zeros(d_in, dtype=torch.float64), z, z, z, z)
            acc.sparsity = M.SparsitySums(0, torch.zeros(d_sae, dtype=torch.int64),
                                          torch.zeros(d_sae + 1, dtype=torch.int64))
        out.append((acc.recon, acc.sparsity))
    return out


def dictionary_geometry(W_dec_FD: torch.Tensor) -> dict[str, Any]:
    """Decoder norms and max-cosine-to-others summary of one SAE (fields of EvalResult)."""
    norms_F = M.decoder_norms(W_dec_FD.detach())
    if W_dec_FD.shape[0] < 2:  # a single direction has no other to compare with
        return {"decoder_norm_mean": float(norms_F.mean()), "decoder_norm_min": float(norms_F.min()),
                "decoder_norm_max": float(norms_F.max()), "max_cos_mean": math.nan, "max_cos_max": math.nan,
                "max_cos_hist": M.histogram(torch.zeros(0), bins=50, lo=0.0, hi=1.0)}
    max_cos_F = M.max_cos_to_others(W_dec_FD.detach())
    return {
        "decoder_norm_mean": float(norms_F.mean()), "decoder_norm_min": float(norms_F.min()),
        "decoder_norm_max": float(norms_F.max()),
        "max_cos_mean": float(max_cos_F.mean()), "max_cos_max": float(max_cos_F.max()),
        "max_cos_hist": M.histogram(max_cos_F, bins=50, lo=0.0, hi=1.0),
    }


def summarise(name: str, path: str, sae, hook: str, split: str, recon: M.ReconSums,
              sparsity: M.SparsitySums) -> EvalResult:
    """Turn one SAE's sums into an EvalResult (no downstream numbers yet).

    Raises:
        UsageError: too few tokens, or activations that do not vary.
    """
    if recon.n < MIN_TOKENS:
        raise UsageError(
            f"only {recon.n} token(s) to evaluate {name} on (split {split!r}, hook {hook!r}); evaluation "
            f"needs at least {MIN_TOKENS}. Collect more tokens, or pass --split all to use the whole store."
        )
    try:
        r = M.reconstruction_metrics(recon)
    except ValueError as e:
        raise UsageError(f"cannot evaluate {name} on split {split!r} of hook {hook!r}: {e}. "
                         "Check that the store holds real activations (saelab verify STORE).") from None
    s = M.sparsity_metrics(sparsity)
    hist = sparsity.l0_hist.tolist()
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    return EvalResult(
        name=name, path=path, architecture=str(getattr(sae.cfg, "architecture", type(sae).__name__)),
        hook=hook, d_in=int(sae.W_dec_FD.shape[1]), d_sae=int(sae.W_dec_FD.shape[0]), split=split,
        n_tokens=recon.n, mse=r.mse, fvu=r.fvu, explained_variance=r.explained_variance,
        cosine=r.cosine, rel_norm=r.rel_norm, l0=s.l0, dead=s.dead, dead_frac=s.dead_frac,
        dense=s.dense, dense_frac=s.dense_frac, l0_hist=hist,
        density_hist=M.log10_density_histogram(s.freq_F), **dictionary_geometry(sae.W_dec_FD),
    )


def store_batches(st, hook: str, split: str, batch_size: int, val_fraction: float = 0.05,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """float32 batches x_BD of one hook over the chunks of `split`, in store order."""
    for _, x_BD in rows_in_order(st, hook, batch_size, st.select(split, val_fraction, seed)):
        yield x_BD
