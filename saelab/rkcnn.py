"""RkCNN probing: mine candidate feature directions from activations by scoring random subspaces.

RkCNN (Random k Conditional Nearest Neighbor) looks at many small random coordinate subspaces of
the activations, scores how much structure each one holds, and keeps the best. saelab uses the
kept subspaces' principal directions to initialise SAE decoders (`rkcnn_init`). This module takes a
matrix of activations and returns tensors; it knows no SAE class, no store and no model.

Shapes: N rows (tokens), D activation width, H sampled subsets, M dims per subset, R kept subsets,
F SAE latents (d_sae).

The method, with X_ND the activations and mu_D their mean:

    S_i ⊂ {0..D-1}, |S_i| = M, i = 1..H           uniform without replacement inside a subset
    C_i = (1/N) Σ_n (x_n[S_i] − mu[S_i])(x_n[S_i] − mu[S_i])ᵀ      [M, M] covariance of the subset
    v_i = top eigenvector of C_i  (= first right singular vector of the centred X[:, S_i]),
          sign fixed so its largest-|·| entry is positive
    p_ni = (x_n[S_i] − mu[S_i]) · v_i              projection onto the principal direction
    score_i:
      kurtosis        = mean_n p_ni⁴ / (mean_n p_ni²)² − 3        (excess kurtosis: peaked and
                        heavy-tailed projections are what a sparse feature looks like)
      variance_ratio  = max_{j∈S_i} Var(x_j) / mean_{j∈S_i} Var(x_j)
      knn             = mean_q (1/k) Σ_{n ∈ kNN_k(q; S_i)} [label_n = label_q]
                        over query rows q of a row subsample, neighbours found in the same subsample
                        with Euclidean distance restricted to S_i, q itself excluded
    keep the R distinct subsets with the highest score (ties: lower index first)
    direction_r = embed(v_r): v_r on the dims S_r, zeros elsewhere; ‖direction_r‖ = 1

Fast path: one pass over row chunks builds the full D×D covariance with a GEMM; every C_i is then
a gather of it, and a batched `eigh` gives all v_i at once. Kurtosis needs a second chunked pass:
the projections of every row on every v_i are one GEMM with the embedded directions [H, D].
Memory is O(D²) for the covariance plus O(chunk·H) for projections. `probe_reference` is the plain
per-subset loop (numpy SVD per subset) that the fast path is tested against.

Without labels, the knn score uses cluster labels from a cheap k-means (k-means++ seeding, a few
Lloyd iterations) on the row subsample in the full D-dimensional space: a subspace then scores
high when it keeps the clusters of the full space apart.

Not here: training with the mined directions (train.py), SAE construction (saes/), plots.
"""
from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import numpy as np
import torch

from saelab.errors import UsageError

log = logging.getLogger(__name__)

Score = Literal["kurtosis", "knn", "variance_ratio"]
SCORES: tuple[str, ...] = ("kurtosis", "knn", "variance_ratio")


class ProbeResult(NamedTuple):
    """What `probe` found."""

    scores_H: torch.Tensor
    """float32 [H]: the score of every sampled subset (higher = more structure)."""
    subsets_HM: torch.Tensor
    """int64 [H, M]: the dims of each sampled subset, sorted ascending."""
    top_idx_R: torch.Tensor
    """int64 [R]: indices into H of the kept subsets, best first; duplicate subsets are skipped, so
    R < r when fewer than r distinct subsets were sampled."""
    directions_RD: torch.Tensor
    """float32 [R, D]: unit principal direction of each kept subset, zeros off its dims."""
    variance_R: torch.Tensor
    """float32 [R]: variance of the data along each kept direction (top eigenvalue of C_i)."""
    score: str
    """Which score ranked the subsets."""


class RkcnnInit(NamedTuple):
    """Decoder directions for an SAE, from `rkcnn_init`."""

    dirs_FD: torch.Tensor
    """float32 [F, D]: unit-norm rows; mined directions first, then random unit vectors."""
    mined_mask_F: torch.Tensor
    """bool [F]: True where the row is a mined direction."""
    probe: ProbeResult
    """The probe that produced the mined rows."""


# ---------------------------------------------------------------------------------------------
# checks and small helpers


def _check_args(X_ND: torch.Tensor, m: int, h: int, r: int, score: str, labels, k_neighbors: int) -> None:
    problems = []
    if not isinstance(X_ND, torch.Tensor) or X_ND.ndim != 2:
        shape = tuple(X_ND.shape) if hasattr(X_ND, "shape") else type(X_ND).__name__
        problems.append(f"X must be a 2-D tensor [rows, dims], got {shape}")
        raise UsageError("rkcnn probe: " + problems[0])
    N, D = X_ND.shape
    if not 1 <= m <= D:
        problems.append(f"subset size m={m} must be between 1 and the activation width {D} (try m=√D ≈ {max(1, round(math.sqrt(D)))})")
    if h < 1:
        problems.append(f"number of subsets h={h} must be at least 1")
    if r < 1:
        problems.append(f"kept subsets r={r} must be at least 1")
    if score not in SCORES:
        problems.append(f"score {score!r} is not one of {', '.join(SCORES)}")
    if N < 2:
        problems.append(f"need at least 2 rows of activations, got {N}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != N):
        problems.append(f"labels must be 1-D with one entry per row ({N}), got shape {tuple(labels.shape)}")
    if score == "knn" and k_neighbors < 1:
        problems.append(f"k_neighbors={k_neighbors} must be at least 1")
    if not torch.isfinite(X_ND).all():
        problems.append("X holds NaN or inf values; clean the activations first")
    if problems:
        raise UsageError("rkcnn probe: " + "; ".join(problems) + ".")


def sample_subsets(D: int, m: int, h: int, seed: int) -> torch.Tensor:
    """h random subsets of m distinct dims out of D, each sorted: int64 [H, M]. Deterministic."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, D, generator=g).argsort(dim=1)[:, :m].sort(dim=1).values


def _fix_sign(v_HM: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude is positive (eigenvectors have no sign)."""
    idx = v_HM.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(v_HM.gather(1, idx))
    sign[sign == 0] = 1
    return v_HM * sign


def embed(v_HM: torch.Tensor, subsets_HM: torch.Tensor, D: int) -> torch.Tensor:
    """Put each subset direction back into D dims (zeros elsewhere) and normalise: [H, D]."""
    out_HD = torch.zeros(v_HM.shape[0], D, dtype=v_HM.dtype)
    out_HD.scatter_(1, subsets_HM, v_HM)
    return out_HD / out_HD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _top_distinct(scores_H: torch.Tensor, subsets_HM: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the r best-scoring distinct subsets, best first (stable: ties keep index order)."""
    order = torch.sort(scores_H, descending=True, stable=True).indices
    seen, keep = set(), []
    for i in order.tolist():
        key = tuple(subsets_HM[i].tolist())
        if key in seen:
            continue
        seen.add(key)
        keep.append(i)
        if len(keep) == r:
            break
    if len(keep) < r:
        log.info("rkcnn: only %d distinct subsets among %d sampled; keeping %d, not r=%d",
                 len(seen), len(order), len(keep), r)
    return torch.tensor(keep, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# fast path


def _mean_and_cov(X_ND: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_D and the population covariance C_DD (float64), one GEMM per row chunk."""
    N, D = X_ND.shape
    sum_D = torch.zeros(D, dtype=torch.float64)
    for i in range(0, N, batch):
        sum_D += X_ND[i:i + batch].double().sum(0)
    mu_D = sum_D / N
    mu32_D = mu_D.float()
    C_DD = torch.zeros(D, D, dtype=torch.float64)
    for i in range(0, N, batch):
        c_ND = X_ND[i:i + batch].float() - mu32_D
        C_DD += (c_ND.T @ c_ND).double()
    return mu_D, C_DD / N


def _mean_and_var(X_ND: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = X_ND.shape
    sum_D = torch.zeros(D, dtype=torch.float64)
    for i in range(0, N, batch):
        sum_D += X_ND[i:i + batch].double().sum(0)
    mu_D = sum_D / N
    sq_D = torch.zeros(D, dtype=torch.float64)
    for i in range(0, N, batch):
        sq_D += ((X_ND[i:i + batch].double() - mu_D) ** 2).sum(0)
    return mu_D, sq_D / N


def _principal(C_DD: torch.Tensor, subsets_HM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpair of every subset covariance C[S_i][:, S_i]: (v_HM float64, lam_H float64)."""
    C_HMM = C_DD[subsets_HM[:, :, None], subsets_HM[:, None, :]]
    evals_HM, evecs_HMM = torch.linalg.eigh(C_HMM)
    return _fix_sign(evecs_HMM[:, :, -1]), evals_HM[:, -1].clamp_min(0)


def _kurtosis(X_ND: torch.Tensor, mu_D: torch.Tensor, dirs_HD: torch.Tensor, var_H: torch.Tensor,
              batch: int) -> torch.Tensor:
    """Excess kurtosis of the projections (x − mu)·dir for every direction: float64 [H]."""
    N = X_ND.shape[0]
    mu32_D, dirs32_HD = mu_D.float(), dirs_HD.float()
    m4_H = torch.zeros(dirs_HD.shape[0], dtype=torch.float64)
    for i in range(0, N, batch):
        p_NH = (X_ND[i:i + batch].float() - mu32_D) @ dirs32_HD.T
        m4_H += (p_NH.double() ** 4).sum(0)
    m4_H /= N
    return torch.where(var_H > 1e-20, m4_H / var_H.clamp_min(1e-20) ** 2 - 3.0, torch.zeros_like(m4_H))


def kmeans_labels(X_ND: torch.Tensor, n_clusters: int, seed: int, iters: int = 20) -> torch.Tensor:
    """Cheap k-means (k-means++ seeding, `iters` Lloyd steps) in the full space: int64 labels [N]."""
    g = torch.Generator().manual_seed(seed)
    X = X_ND.float()
    N = X.shape[0]
    n_clusters = min(n_clusters, N)
    centres = [X[torch.randint(N, (1,), generator=g)].squeeze(0)]
    d2_N = ((X - centres[0]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        probs = d2_N / d2_N.sum() if d2_N.sum() > 0 else torch.full_like(d2_N, 1.0 / N)
        nxt = X[torch.multinomial(probs, 1, generator=g)].squeeze(0)
        centres.append(nxt)
        d2_N = torch.minimum(d2_N, ((X - nxt) ** 2).sum(1))
    C_KD = torch.stack(centres)
    labels_N = torch.cdist(X, C_KD).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(C_KD).index_add_(0, labels_N, X)
        counts = torch.bincount(labels_N, minlength=n_clusters).float()
        C_KD = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C_KD)
        new = torch.cdist(X, C_KD).argmin(1)
        if torch.equal(new, labels_N):
            break
        labels_N = new
    return labels_N


def knn_scores(Xs_ND: torch.Tensor, labels_N: torch.Tensor, subsets_HM: torch.Tensor, k: int,
               max_elems: int = 1 << 24) -> torch.Tensor:
    """kNN label consistency of every subset on the rows given (all of them are queries): [H].

    For each query row, the fraction of its k nearest other rows (Euclidean, dims S_i only) that
    share its label, averaged over rows. Batched over subsets, chunked so a distance block stays
    under `max_elems` entries.
    """
    N = Xs_ND.shape[0]
    k = min(k, N - 1)
    X = Xs_ND.float()
    H = subsets_HM.shape[0]
    out_H = torch.empty(H, dtype=torch.float64)
    step = max(1, max_elems // (N * N))
    eye_NN = torch.eye(N, dtype=torch.bool)
    same_lab = labels_N[None, :, None]
    for a in range(0, H, step):
        Xg_hNM = X[:, subsets_HM[a:a + step]].permute(1, 0, 2).contiguous()
        d_hNN = torch.cdist(Xg_hNM, Xg_hNM)
        d_hNN.masked_fill_(eye_NN, float("inf"))
        nn_hNk = d_hNN.topk(k, dim=2, largest=False).indices
        agree_hNk = labels_N[nn_hNk] == same_lab
        out_H[a:a + step] = agree_hNk.double().mean(dim=(1, 2))
    return out_H


def _knn_rows(X_ND: torch.Tensor, labels, knn_rows: int, n_clusters: int, seed: int):
    N = X_ND.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(N, generator=g)[:knn_rows].sort().values if N > knn_rows else torch.arange(N)
    Xs = X_ND[rows].float()
    if labels is None:
        lab = kmeans_labels(Xs, n_clusters, seed)
        log.info("rkcnn knn: no labels given; using %d k-means clusters of %d rows", n_clusters, len(rows))
    else:
        lab = torch.as_tensor(labels)[rows].long()
    return Xs, lab


def probe(X_ND: torch.Tensor, m: int, h: int, r: int, score: Score = "kurtosis",
          labels: torch.Tensor | None = None, seed: int = 0, k_neighbors: int = 10,
          batch: int = 8192, knn_rows: int = 2000, n_clusters: int = 10) -> ProbeResult:
    """Score h random m-dim subsets of the activations and return the best r principal directions.

    See the module docstring for the equations.

    Args:
        X_ND: activations, one row per token (any float dtype; computed in float32/float64).
        m: dims per subset (RkCNN's default is √D).
        h: number of random subsets.
        r: number of subsets (and directions) to keep.
        score: "kurtosis", "knn" or "variance_ratio".
        labels: int [N] labels for the knn score; None = k-means cluster labels (module docstring).
        seed: makes subsets, row subsample and clustering deterministic.
        k_neighbors: k of the knn score.
        batch: rows per chunk in the passes over X.
        knn_rows: rows subsampled for the knn score (distances are knn_rows² per subset).
        n_clusters: k-means clusters used as labels when `labels` is None.
    Returns:
        ProbeResult(scores_H, subsets_HM, top_idx_R, directions_RD, variance_R, score).
    Raises:
        UsageError: bad shapes, sizes or score name.
    """
    _check_args(X_ND, m, h, r, score, labels, k_neighbors)
    N, D = X_ND.shape
    subsets_HM = sample_subsets(D, m, h, seed)
    if score == "kurtosis":
        mu_D, C_DD = _mean_and_cov(X_ND, batch)
        v_HM, lam_H = _principal(C_DD, subsets_HM)
        dirs_HD = embed(v_HM, subsets_HM, D)
        scores_H = _kurtosis(X_ND, mu_D, dirs_HD, lam_H, batch)
        top_R = _top_distinct(scores_H, subsets_HM, r)
        return ProbeResult(scores_H.float(), subsets_HM, top_R, dirs_HD[top_R].float(),
                           lam_H[top_R].float(), score)
    if score == "variance_ratio":
        _, var_D = _mean_and_var(X_ND, batch)
        var_HM = var_D[subsets_HM]
        scores_H = var_HM.max(1).values / var_HM.mean(1).clamp_min(1e-30)
    else:
        Xs, lab = _knn_rows(X_ND, labels, knn_rows, n_clusters, seed)
        scores_H = knn_scores(Xs, lab, subsets_HM, k_neighbors)
    top_R = _top_distinct(scores_H, subsets_HM, r)
    # Directions only for the kept subsets: the covariance restricted to the dims they use.
    used = torch.unique(subsets_HM[top_R])
    _, C_UU = _mean_and_cov(X_ND[:, used], batch)
    local_RM = torch.searchsorted(used, subsets_HM[top_R])
    v_RM, lam_R = _principal(C_UU, local_RM)
    dirs_RD = embed(v_RM, subsets_HM[top_R], D)
    return ProbeResult(scores_H.float(), subsets_HM, top_R, dirs_RD.float(), lam_R.float(), score)


# ---------------------------------------------------------------------------------------------
# reference path: one subset at a time, numpy SVD; slow and obviously right


def probe_reference(X_ND: torch.Tensor, m: int, h: int, r: int, score: Score = "kurtosis",
                    labels: torch.Tensor | None = None, seed: int = 0, k_neighbors: int = 10,
                    knn_rows: int = 2000, n_clusters: int = 10) -> ProbeResult:
    """Same contract as `probe`, computed subset by subset with `numpy.linalg.svd` (for tests and
    the benchmark). Uses the same subsets, row subsample and cluster labels as `probe`."""
    _check_args(X_ND, m, h, r, score, labels, k_neighbors)
    N, D = X_ND.shape
    subsets_HM = sample_subsets(D, m, h, seed)
    X = X_ND.double().numpy()
    mu = X.mean(0)
    if score == "knn":
        Xs_t, lab_t = _knn_rows(X_ND, labels, knn_rows, n_clusters, seed)
        Xs, lab = Xs_t.double().numpy(), lab_t.numpy()
    scores, dirs, lams = [], [], []
    for S in subsets_HM.numpy():
        Z = X[:, S] - mu[S]
        _, sing, Vt = np.linalg.svd(Z, full_matrices=False)
        v = Vt[0]
        v = v * (1.0 if v[np.argmax(np.abs(v))] >= 0 else -1.0)
        lam = sing[0] ** 2 / N
        full = np.zeros(D)
        full[S] = v
        dirs.append(full / np.linalg.norm(full))
        lams.append(lam)
        if score == "kurtosis":
            p = Z @ v
            scores.append(np.mean(p ** 4) / lam ** 2 - 3.0 if lam > 1e-20 else 0.0)
        elif score == "variance_ratio":
            var = Z.var(0)
            scores.append(var.max() / max(var.mean(), 1e-30))
        else:
            k = min(k_neighbors, len(Xs) - 1)
            A = Xs[:, S]
            dist = np.sqrt(((A[:, None, :] - A[None, :, :]) ** 2).sum(-1))
            np.fill_diagonal(dist, np.inf)
            nn = np.argsort(dist, axis=1, kind="stable")[:, :k]
            scores.append(float((lab[nn] == lab[:, None]).mean()))
    scores_H = torch.tensor(scores, dtype=torch.float64)
    top_R = _top_distinct(scores_H, subsets_HM, r)
    dirs_HD = torch.tensor(np.stack(dirs))
    return ProbeResult(scores_H.float(), subsets_HM, top_R, dirs_HD[top_R].float(),
                       torch.tensor(lams)[top_R].float(), score)


# ---------------------------------------------------------------------------------------------
# SAE decoder initialisation


def random_unit_rows(n: int, D: int, seed: int) -> torch.Tensor:
    """n random unit vectors in D dims (Gaussian, normalised): float32 [n, D]."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, D, generator=g)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rkcnn_init(X_ND: torch.Tensor, d_sae: int, fraction: float = 0.5, h: int = 600,
               m: int | None = None, score: Score = "kurtosis", seed: int = 0,
               labels: torch.Tensor | None = None, **probe_kwargs) -> RkcnnInit:
    """Decoder directions for an SAE: `fraction` of the latents mined by `probe`, the rest random.

        n_mined = min(round(fraction · d_sae), distinct subsets kept)   (a probe keeps ≤ h)
        dirs_FD[:n_mined] = probe(X, m, h, r=n_mined).directions_RD
        dirs_FD[n_mined:] = random unit vectors

    Args:
        X_ND: activations the SAE will be trained on (a sample is enough).
        d_sae: number of latents F.
        fraction: share of latents to mine, in [0, 1].
        h: subsets sampled; at most h latents can be mined (a warning says when fewer are).
        m: dims per subset; None = round(√D).
        score, seed, labels, probe_kwargs: passed to `probe`.
    Returns:
        RkcnnInit(dirs_FD, mined_mask_F, probe): mined rows first.
    Raises:
        UsageError: fraction outside [0, 1], d_sae < 1, or a bad probe argument.
    """
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"rkcnn fraction={fraction} must be between 0 and 1 (the share of latents "
                         "initialised from mined directions); e.g. --rkcnn-fraction 0.5.")
    if d_sae < 1:
        raise UsageError(f"d_sae={d_sae} must be at least 1.")
    D = X_ND.shape[1]
    m = m if m is not None else max(1, round(math.sqrt(D)))
    want = round(fraction * d_sae)
    dirs_FD = random_unit_rows(d_sae, D, seed + 7919)
    mined_F = torch.zeros(d_sae, dtype=torch.bool)
    res = probe(X_ND, m=m, h=h, r=max(want, 1), score=score, labels=labels, seed=seed, **probe_kwargs)
    if want == 0:
        return RkcnnInit(dirs_FD, mined_F, res)
    n = res.directions_RD.shape[0]
    if n < want:
        log.warning("rkcnn init: asked to mine %d latents (fraction %.2f of %d) but the probe kept "
                    "only %d distinct subsets (h=%d); the other %d latents start random. "
                    "Raise h to mine more.", want, fraction, d_sae, n, h, d_sae - n)
    dirs_FD[:n] = res.directions_RD
    mined_F[:n] = True
    return RkcnnInit(dirs_FD, mined_F, res)
