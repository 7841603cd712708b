"""Per-feature statistics for every SAE feature, gathered in one streaming pass (computing only).

Owns the accumulator that sees each batch of feature activations once and keeps, per feature:

    count_F       = #{t : f_tF > 0}                      (firing count; frequency = count_F / T)
    sum_F         = Σ_t f_tF                             (mean when active = sum_F / count_F)
    max_F         = max_t f_tF
    hist_FH[f, h] = #{t : f_tF > 0, bin(f_tF) = h}       bin(v) = clamp(⌊(log10 v − lo) · H / (hi − lo)⌋, 0, H−1)
    top_FK        = the K largest f_tF with their global token index t
    sample_FR     = a uniform sample of R active tokens:  the R largest random keys u_tF ~ U(0, 1)
                    among {t : f_tF > 0}  (priority / bottom-k reservoir sampling)

so Σ_h hist_FH[f, h] = count_F exactly (values outside [10^lo, 10^hi] land in the end bins).

Quantile examples (`quantile_examples`) come from the uniform sample: sorted ascending, band b of
Q covers the sample ranks [⌊n·b/Q⌋, ⌈n·(b+1)/Q⌉) — the b-th activation-quantile band of the
feature's active distribution as estimated by its sample — and `per_band` examples are taken at
evenly spaced ranks inside each band. Top-k shows the extremes; these show typical activations.

Fast path vs reference: `FeatureAccumulator.update_` works on the non-zeros of f_BF only; a
non-zero is a candidate when it beats its feature's current K-th value (or R-th key), and the
candidates are merged by one padded torch.topk over the touched features (no loop over features).
As the pass goes on, fewer values beat the thresholds, so the merge cost falls towards zero.
`topk_reference_` is the plain dense merge (concatenate the running top-k with the batch's
torch.topk over dim 0, topk again); tests check both give the same answer.

Left out: anything about stores, SAEs or tokens (see `examples.py`) and rendering (`dashboard.py`).

Shapes: B batch rows, F features (d_sae), K top-k, R reservoir size, H histogram bins, Q bands,
J examples per band.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import UsageError

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1


@dataclass
class PassConfig:
    """What the streaming pass keeps per feature; part of the cache key."""

    top_k: int = 20
    """Top-activating examples kept per feature."""
    reservoir: int = 32
    """Uniformly sampled active tokens kept per feature (the source of the quantile examples)."""
    hist_bins: int = 48
    """Log-spaced histogram bins between 10^hist_log_min and 10^hist_log_max."""
    hist_log_min: float = -3.0
    """log10 of the lowest histogram edge (smaller activations count in the first bin)."""
    hist_log_max: float = 3.0
    """log10 of the highest histogram edge (larger activations count in the last bin)."""
    batch_size: int = 4096
    """Store rows encoded per step."""
    seed: int = 0
    """Seed of the reservoir's random keys (same seed + same store = same sample)."""
    keep_outliers: bool = False
    """Also read the rows collect flagged as massive activations (left out by default, as train and
    evaluate leave them out: one such row can set a feature's max and its top examples)."""

    def __post_init__(self):
        problems = []
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.reservoir < 0:
            problems.append(f"reservoir must be >= 0, got {self.reservoir}")
        if self.hist_bins < 1:
            problems.append(f"hist_bins must be >= 1, got {self.hist_bins}")
        if not self.hist_log_min < self.hist_log_max:
            problems.append(f"hist_log_min ({self.hist_log_min}) must be below hist_log_max ({self.hist_log_max})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise UsageError("invalid interpretation settings:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class FeatureStats:
    """Everything the pass keeps, per feature. Tensors on CPU; index -1 marks an empty slot."""

    num_tokens: int
    """T: store rows seen."""
    count_F: torch.Tensor
    """int64: tokens on which the feature fired (f > 0)."""
    sum_F: torch.Tensor
    """float64: sum of the feature's activations."""
    max_F: torch.Tensor
    """float32: largest activation (0 for a dead feature)."""
    hist_FH: torch.Tensor
    """int64: counts of active values per log-spaced bin; rows sum to count_F."""
    hist_edges_H1: torch.Tensor
    """float64 [H+1]: bin edges (the end bins also take values beyond them)."""
    top_values_FK: torch.Tensor
    """float32: the K largest activations, descending (0 where fewer than K tokens fired)."""
    top_index_FK: torch.Tensor
    """int64: their global token indices (-1 for empty slots)."""
    sample_values_FR: torch.Tensor
    """float32: a uniform sample of active values, ascending with empty slots (+inf) last."""
    sample_index_FR: torch.Tensor
    """int64: their global token indices (-1 for empty slots)."""

    @property
    def d_sae(self) -> int:
        return int(self.count_F.shape[0])

    @property
    def frequency_F(self) -> torch.Tensor:
        """Firing frequency count_F / T."""
        return self.count_F.double() / max(self.num_tokens, 1)

    @property
    def mean_F(self) -> torch.Tensor:
        """Mean activation when active, sum_F / count_F (0 for dead features)."""
        return torch.where(self.count_F > 0, self.sum_F / self.count_F.clamp(min=1), torch.zeros_like(self.sum_F))

    @property
    def dead_F(self) -> torch.Tensor:
        return self.count_F == 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def hist_edges(cfg: PassConfig) -> torch.Tensor:
    """The H+1 log-spaced histogram edges, float64."""
    return torch.logspace(cfg.hist_log_min, cfg.hist_log_max, cfg.hist_bins + 1, dtype=torch.float64)


def hist_bin(values: torch.Tensor, cfg: PassConfig) -> torch.Tensor:
    """bin(v) = clamp(⌊(log10 v − lo) · H / (hi − lo)⌋, 0, H−1) for positive values; int64."""
    scale = cfg.hist_bins / (cfg.hist_log_max - cfg.hist_log_min)
    # float32 log2 is ~2x faster than float64 log10; a value within float32 rounding of an edge
    # may land in either neighbouring bin, which a histogram tolerates
    b = torch.log2(values.float()).mul_(math.log10(2.0) * scale).sub_(cfg.hist_log_min * scale).floor_()
    return b.clamp_(0, cfg.hist_bins - 1).long()


def _segmented_merge_(
    keys_FK: torch.Tensor, vals_FK: torch.Tensor, idx_FK: torch.Tensor,
    feat_C: torch.Tensor, key_C: torch.Tensor, val_C: torch.Tensor, idx_C: torch.Tensor,
) -> None:
    """Merge candidates into per-feature running lists kept sorted by key, descending.

    Only the U features with a candidate are touched: their K current entries and their candidates
    (grouped by feature, padded with -inf) form a [U, K + C_max] matrix, and torch.topk over dim 1
    keeps the K largest keys. Ties between equal keys are kept in no particular order.
    """
    if feat_C.numel() == 0:
        return
    K = keys_FK.shape[1]
    order = torch.argsort(feat_C, stable=True)
    feat_s = feat_C[order]
    feats_U, counts_U = torch.unique_consecutive(feat_s, return_counts=True)
    U, C_max = feats_U.numel(), int(counts_U.max())
    seg_C = torch.repeat_interleave(torch.arange(U), counts_U)
    rank_C = torch.arange(feat_s.numel()) - (torch.cumsum(counts_U, 0) - counts_U)[seg_C]
    pk = torch.full((U, K + C_max), -math.inf, dtype=keys_FK.dtype)
    pv = torch.zeros((U, K + C_max), dtype=vals_FK.dtype)
    pi = torch.full((U, K + C_max), -1, dtype=idx_FK.dtype)
    pk[:, :K], pv[:, :K], pi[:, :K] = keys_FK[feats_U], vals_FK[feats_U], idx_FK[feats_U]
    pk[seg_C, K + rank_C] = key_C[order]
    pv[seg_C, K + rank_C] = val_C[order]
    pi[seg_C, K + rank_C] = idx_C[order]
    top = torch.topk(pk, K, dim=1)
    keys_FK[feats_U] = top.values
    vals_FK[feats_U] = pv.gather(1, top.indices)
    idx_FK[feats_U] = pi.gather(1, top.indices)


class FeatureAccumulator:
    """Running per-feature statistics; feed it f_BF batch by batch with `update_`, then `result()`."""

    def __init__(self, d_sae: int, cfg: PassConfig | None = None):
        self.cfg = cfg = cfg or PassConfig()
        F, K, R = d_sae, cfg.top_k, cfg.reservoir
        self.num_tokens = 0
        self.sum_F = torch.zeros(F, dtype=torch.float64)
        self.max_F = torch.zeros(F, dtype=torch.float32)
        self.hist_FH = torch.zeros(F, cfg.hist_bins, dtype=torch.int64)
        self.top_values_FK = torch.full((F, K), -math.inf, dtype=torch.float32)
        self.top_index_FK = torch.full((F, K), -1, dtype=torch.int64)
        self.res_keys_FR = torch.full((F, R), -1.0, dtype=torch.float32)
        self.res_values_FR = torch.zeros(F, R, dtype=torch.float32)
        self.res_index_FR = torch.full((F, R), -1, dtype=torch.int64)
        self._gen = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def update_(self, f_BF: torch.Tensor, offset: int, keep_B: torch.Tensor | None = None) -> None:
        """Fold in one batch whose row b is global token `offset + b`; rows with keep_B False are
        left out (not counted in num_tokens, never an example).

        Works on the non-zeros only: sum/max/histogram by scatter (count_F is the histogram's row
        sum), and merges into top-k / reservoir only the candidates that beat their feature's
        current threshold.
        """
        f_BF = f_BF.detach().float().cpu()
        B, F = f_BF.shape
        if keep_B is not None:
            keep_B = keep_B.to(torch.bool).cpu()
            f_BF = f_BF * keep_B[:, None]
            B = int(keep_B.sum())
        H = self.cfg.hist_bins
        assert F * H == self.hist_FH.numel(), f"batch has {F} features, accumulator {self.hist_FH.shape[0]}"
        rows_N, feat_N = f_BF.nonzero(as_tuple=True)  # saves a compare pass over f_BF
        val_N = f_BF[rows_N, feat_N]
        if (val_N < 0).any():  # no saelab architecture emits negative activations, but be exact
            pos = val_N > 0
            rows_N, feat_N, val_N = rows_N[pos], feat_N[pos], val_N[pos]
        self.num_tokens += B
        self.sum_F.scatter_add_(0, feat_N, val_N.double())
        self.max_F.scatter_reduce_(0, feat_N, val_N, reduce="amax")
        self.hist_FH.view(-1).scatter_add_(0, feat_N * H + hist_bin(val_N, self.cfg), torch.ones_like(feat_N))

        cand = val_N > self.top_values_FK[:, -1].contiguous()[feat_N]
        if cand.any():
            _segmented_merge_(self.top_values_FK, self.top_values_FK, self.top_index_FK,
                              feat_N[cand], val_N[cand], val_N[cand], rows_N[cand] + offset)
        if self.cfg.reservoir > 0 and val_N.numel():
            key_N = torch.rand(val_N.numel(), generator=self._gen)
            cand = key_N > self.res_keys_FR[:, -1].contiguous()[feat_N]
            if cand.any():
                _segmented_merge_(self.res_keys_FR, self.res_values_FR, self.res_index_FR,
                                  feat_N[cand], key_N[cand], val_N[cand], rows_N[cand] + offset)

    def result(self) -> FeatureStats:
        """The statistics so far (copies; the accumulator can keep going)."""
        top_ok = self.top_index_FK >= 0
        top_v = torch.where(top_ok, self.top_values_FK, torch.zeros_like(self.top_values_FK))
        ok = self.res_index_FR >= 0
        sv = torch.where(ok, self.res_values_FR, torch.full_like(self.res_values_FR, math.inf))
        sv, order = torch.sort(sv, dim=1, stable=True)
        si = self.res_index_FR.gather(1, order)
        return FeatureStats(
            num_tokens=self.num_tokens, count_F=self.hist_FH.sum(1), sum_F=self.sum_F.clone(),
            max_F=self.max_F.clone(), hist_FH=self.hist_FH.clone(), hist_edges_H1=hist_edges(self.cfg),
            top_values_FK=top_v, top_index_FK=self.top_index_FK.clone(),
            sample_values_FR=sv, sample_index_FR=si,
        )


@torch.no_grad()
def topk_reference_(top_values_KF: torch.Tensor, top_index_KF: torch.Tensor, f_BF: torch.Tensor,
                    offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference running top-k: cat(current top-k, batch top-k over dim 0) → topk over dim 0.

    Start from values -inf and indices -1 ([K, F]); returns the new (values_KF, index_KF).
    Entries with value <= 0 are not activations: callers mask them (as `result()` does).
    """
    K = top_values_KF.shape[0]
    v_kF, i_kF = torch.topk(f_BF.float(), min(K, f_BF.shape[0]), dim=0)
    cat_v = torch.cat([top_values_KF, v_kF])
    cat_i = torch.cat([top_index_KF, i_kF + offset])
    v_KF, pos_KF = torch.topk(cat_v, K, dim=0)
    return v_KF, cat_i.gather(0, pos_KF)


@dataclass
class QuantileBands:
    """Examples from activation-quantile bands of each feature's uniform sample."""

    edges_FQ2: torch.Tensor
    """float32: (lowest, highest) sampled value in each band (nan where the band is empty)."""
    values_FQJ: torch.Tensor
    """float32: chosen example values (nan where there is none)."""
    index_FQJ: torch.Tensor
    """int64: their global token indices (-1 where there is none; repeats are removed)."""


def quantile_examples(stats: FeatureStats, bands: int = 4, per_band: int = 2) -> QuantileBands:
    """Pick `per_band` examples at evenly spaced ranks in each of `bands` quantile bands (see module doc).

    Band b of a feature with n sampled values covers sorted ranks [⌊n·b/Q⌋, ⌈n·(b+1)/Q⌉); example j
    sits at rank lo + ⌊(hi − lo)·(j + ½)/J⌋. With n < Q·J some picks coincide and are dropped.
    """
    if bands < 1 or per_band < 1:
        raise UsageError(f"quantile bands and examples per band must be >= 1, got {bands} and {per_band}")
    sv_FR, si_FR = stats.sample_values_FR, stats.sample_index_FR
    F, R = sv_FR.shape
    n_F = (si_FR >= 0).sum(1)  # valid samples are first (sorted ascending, empties +inf last)
    b_Q = torch.arange(bands)
    lo_FQ = torch.div(n_F[:, None] * b_Q, bands, rounding_mode="floor")
    hi_FQ = -torch.div(-n_F[:, None] * (b_Q + 1), bands, rounding_mode="floor")  # ceil
    j_J = torch.arange(per_band, dtype=torch.float64)
    rank_FQJ = lo_FQ[..., None] + torch.floor((hi_FQ - lo_FQ)[..., None] * (j_J + 0.5) / per_band).long()
    valid_FQJ = rank_FQJ < hi_FQ[..., None]
    safe_FQJ = rank_FQJ.clamp(0, max(R - 1, 0))
    if R == 0:
        empty = torch.full((F, bands, per_band), -1, dtype=torch.int64)
        return QuantileBands(torch.full((F, bands, 2), math.nan), torch.full((F, bands, per_band), math.nan), empty)
    values = sv_FR.gather(1, safe_FQJ.view(F, -1)).view(F, bands, per_band)
    index = si_FR.gather(1, safe_FQJ.view(F, -1)).view(F, bands, per_band)
    # drop repeated ranks (only happens when n < Q·J): keep the first occurrence in rank order
    flat_rank = torch.where(valid_FQJ, rank_FQJ, torch.full_like(rank_FQJ, -1)).view(F, -1)
    dup = torch.zeros_like(flat_rank, dtype=torch.bool)
    dup[:, 1:] = (flat_rank[:, 1:] == flat_rank[:, :-1]) & (flat_rank[:, 1:] >= 0)
    valid_FQJ = valid_FQJ & ~dup.view(F, bands, per_band)
    values = torch.where(valid_FQJ, values, torch.full_like(values, math.nan))
    index = torch.where(valid_FQJ, index, torch.full_like(index, -1))
    band_ok = hi_FQ > lo_FQ
    lo_v = sv_FR.gather(1, lo_FQ.clamp(0, R - 1))
    hi_v = sv_FR.gather(1, (hi_FQ - 1).clamp(0, R - 1))
    edges = torch.stack([lo_v, hi_v], dim=-1)
    edges = torch.where(band_ok[..., None], edges, torch.full_like(edges, math.nan))
    return QuantileBands(edges_FQ2=edges, values_FQJ=values, index_FQJ=index)


# --- cache: safetensors + JSON -----------------------------------------------------------------

def save_stats(stats: FeatureStats, directory: str | Path, meta: dict) -> None:
    """Write `stats.safetensors` + `stats.json` (meta: cache key, SAE/store ids, PassConfig)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "stats.safetensors.tmp"
    save_file(stats.tensors(), str(tmp))
    tmp.replace(d / "stats.safetensors")
    info = dict(meta, format_version=STATS_FORMAT_VERSION, num_tokens=stats.num_tokens)
    tmp = d / "stats.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(d / "stats.json")


def load_stats(directory: str | Path) -> tuple[FeatureStats, dict]:
    """Read what `save_stats` wrote. Raises UsageError for a missing, newer or incomplete cache."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "stats.json").is_file() or not (d / "stats.safetensors").is_file():
        raise UsageError(f"no feature statistics in {d} (expected stats.json and stats.safetensors).")
    info = json.loads((d / "stats.json").read_text())
    if info.get("format_version", 0) > STATS_FORMAT_VERSION:
        raise UsageError(f"{d}/stats.json has format_version {info['format_version']}; this saelab reads "
                         f"<= {STATS_FORMAT_VERSION}. Upgrade saelab or delete the cache directory.")
    t = load_file(str(d / "stats.safetensors"))
    names = [k for k in FeatureStats.__dataclass_fields__ if k != "num_tokens"]
    missing = [k for k in names if k not in t]
    if missing:
        raise UsageError(f"{d}/stats.safetensors lacks {', '.join(missing)}; delete {d} to recompute.")
    return FeatureStats(num_tokens=int(info["num_tokens"]), **{k: t[k] for k in names}), info
