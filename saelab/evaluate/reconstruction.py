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
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from saelab import metrics as M
from saelab.errors import UsageError
from saelab.evaluate.config import MIN_TOKENS
from saelab.store.batches import RowBatch, rows_in_order


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
    rel_error: float
    """Per-token relative error ||x - x_hat|| / ||x||, averaged over tokens: each token counts once,
    so a few massive rows cannot decide it (the headline reconstruction number)."""
    fvu_with_outliers: float
    """FVU over every row, the ones collect flagged as massive activations included."""
    flagged: int
    """Rows flagged as massive activations in the evaluated split (left out of the other numbers
    unless --keep-outliers)."""
    variance_share_top: dict
    """Share of the variance of the rows used held by their top 0.1%, 0.5% and 1% (keys "0.001", ...)."""
    rel_error_by_position: list
    """Mean per-token relative error at each position of the packed window (None where no row was
    evaluated, e.g. position 0, BOS; [] when positions are unknown)."""
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
    downstream_left: int | None = None
    """Positions the splice left unedited because their norm marks them as massive activations
    (like BOS, which is never spliced); 0 with --keep-outliers."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


class PassSums(NamedTuple):
    """One SAE's sums over an evaluation pass."""

    recon: M.ReconSums
    """Reconstruction sums over the rows used (flagged rows left out unless keep_outliers)."""
    sparsity: M.SparsitySums
    """Sparsity sums over the same rows."""
    recon_all: M.ReconSums
    """Reconstruction sums over every row, flagged ones included."""
    rel_err_by_pos: torch.Tensor
    """float64 [P, 2]: (sum of per-token relative error, rows) at each window position (P = 0 if unknown)."""


class RowStats(NamedTuple):
    """What the pass learns about the rows themselves (the same for every SAE)."""

    flagged: int
    """Rows collect flagged as massive activations (left out unless keep_outliers)."""
    dev_N: torch.Tensor
    """||x_n - mean||^2 of each used row about the used rows' mean (float64), for concentration checks."""


def _as_row_batch(b) -> RowBatch:
    if isinstance(b, RowBatch):
        return b
    return RowBatch(0, b, torch.zeros(b.shape[0], dtype=torch.bool), torch.zeros(0, dtype=torch.int64))


def _take(batches: Iterable, max_tokens: int | None) -> Iterator[RowBatch]:
    seen = 0
    for b in map(_as_row_batch, batches):
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            n = max_tokens - seen
            b = RowBatch(b.offset, b.x_BD[:n], b.flagged_B[:n], b.position_B[:n])
        seen += b.x_BD.shape[0]
        yield b


def accumulate(saes: Sequence[torch.nn.Module], batches: Iterable, max_tokens: int | None = None,
               device: str = "cpu", quiet: bool = True, desc: str = "evaluate", keep_outliers: bool = False,
               mean_D: torch.Tensor | None = None) -> tuple[list[PassSums], RowStats]:
    """Run every SAE over the same batches and sum reconstruction and sparsity statistics.

    Args:
        saes: SAEs with `forward(x_BD) -> (x_hat_BD, f_BF)`, all of the same d_in.
        batches: float tensors x_BD (raw activations), or `store.batches.RowBatch`es (which say
            which rows are flagged and where in their window each row sits).
        max_tokens: stop after this many rows (None: all).
        keep_outliers: use flagged rows in the main sums too.
        mean_D: the used rows' mean, for RowStats.dev_N (None: no deviations are kept).
    Returns:
        One PassSums per SAE (n = 0 when no batch came), and the RowStats.
    """
    d_in, n_pos = int(saes[0].W_dec_FD.shape[1]), 0
    recon = [M.empty_recon(d_in) for _ in saes]
    recon_all = [M.empty_recon(d_in) for _ in saes]
    sparsity = [M.empty_sparsity(int(s.W_dec_FD.shape[0])) for s in saes]
    by_pos = [torch.zeros(0, 2, dtype=torch.float64) for _ in saes]
    flagged, devs = 0, []
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for b in _take(batches, max_tokens):
            x_BD = b.x_BD.to(device=device, dtype=torch.float32)
            use_B = torch.ones_like(b.flagged_B) if keep_outliers else ~b.flagged_B
            flagged += int(b.flagged_B.sum())
            x_used = x_BD[use_B.to(x_BD.device)]
            if mean_D is not None:
                devs.append((x_used.double() - mean_D.to(x_used.device)).pow(2).sum(-1).cpu())
            for i, sae in enumerate(saes):
                x_hat_BD, f_BF = sae(x_BD)
                recon_all[i] = M.add_recon(recon_all[i], M.recon_sums(x_BD, x_hat_BD))
                u = use_B.to(x_BD.device)
                recon[i] = M.add_recon(recon[i], M.recon_sums(x_BD[u], x_hat_BD[u]))
                sparsity[i] = M.add_sparsity(sparsity[i], M.sparsity_sums(f_BF[u]))
                if b.position_B.numel():
                    pos = b.position_B[use_B]
                    err = ((x_BD - x_hat_BD).norm(dim=-1) / x_BD.norm(dim=-1).clamp_min(1e-12))[u].double().cpu()
                    n_pos = max(n_pos, int(pos.max()) + 1 if len(pos) else 0)
                    if by_pos[i].shape[0] < n_pos:
                        by_pos[i] = torch.cat([by_pos[i], torch.zeros(n_pos - by_pos[i].shape[0], 2, dtype=torch.float64)])
                    by_pos[i][:, 0].index_add_(0, pos, err)
                    by_pos[i][:, 1].index_add_(0, pos, torch.ones_like(err))
            bar.update(x_BD.shape[0])
    bar.close()
    sums = [PassSums(r, s, ra, bp) for r, s, ra, bp in zip(recon, sparsity, recon_all, by_pos)]
    return sums, RowStats(flagged, torch.cat(devs) if devs else torch.zeros(0, dtype=torch.float64))


def mean_of_rows(batches: Iterable, max_tokens: int | None = None, keep_outliers: bool = False) -> torch.Tensor | None:
    """The mean float64 [D] of the rows `accumulate` would use (a cheap first pass), or None if none."""
    total, n = None, 0
    for b in _take(batches, max_tokens):
        x = b.x_BD if keep_outliers else b.x_BD[~b.flagged_B]
        s = x.double().sum(0)
        total, n = (s if total is None else total + s), n + x.shape[0]
    return None if not n else total / n


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


TOP_FRACTIONS = (0.001, 0.005, 0.01)


def summarise(name: str, path: str, sae, hook: str, split: str, sums: PassSums, rows: RowStats) -> EvalResult:
    """Turn one SAE's sums into an EvalResult (no downstream numbers yet).

    Raises:
        UsageError: too few tokens, or activations that do not vary.
    """
    recon, sparsity = sums.recon, sums.sparsity
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
    fvu_all = M.reconstruction_metrics(sums.recon_all).fvu if sums.recon_all.n >= MIN_TOKENS else math.nan
    by_pos = sums.rel_err_by_pos
    err_by_pos = [s / c if c else None for s, c in by_pos.tolist()]  # None: no row at that position (BOS)
    hist = sparsity.l0_hist.tolist()
    while len(hist) > 1 and hist[-1] == 0:
        hist.pop()
    return EvalResult(
        name=name, path=path, architecture=str(getattr(sae.cfg, "architecture", type(sae).__name__)),
        hook=hook, d_in=int(sae.W_dec_FD.shape[1]), d_sae=int(sae.W_dec_FD.shape[0]), split=split,
        n_tokens=recon.n, rel_error=r.rel_error, fvu_with_outliers=fvu_all, flagged=rows.flagged,
        variance_share_top={str(f): M.variance_share_of_top(rows.dev_N, f) for f in TOP_FRACTIONS},
        rel_error_by_position=err_by_pos, mse=r.mse, fvu=r.fvu, explained_variance=r.explained_variance,
        cosine=r.cosine, rel_norm=r.rel_norm, l0=s.l0, dead=s.dead, dead_frac=s.dead_frac,
        dense=s.dense, dense_frac=s.dense_frac, l0_hist=hist,
        density_hist=M.log10_density_histogram(s.freq_F), **dictionary_geometry(sae.W_dec_FD),
    )


def store_batches(st, hook: str, split: str, batch_size: int, val_fraction: float = 0.05,
                  seed: int = 0, positions: bool = False) -> Iterator[RowBatch]:
    """RowBatches of one hook over the chunks of `split`, in store order."""
    return rows_in_order(st, hook, batch_size, st.select(split, val_fraction, seed), positions=positions)
