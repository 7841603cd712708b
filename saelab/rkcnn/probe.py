"""RkCNN probing: score many random coordinate subsets of the activations, keep the best directions.

RkCNN (Random k Conditional Nearest Neighbor) looks at h small random coordinate subsets of the
activations, scores how much structure each one holds, and keeps r of them; each kept subset gives
one direction, its principal axis. This module takes a matrix and returns tensors; it knows no SAE,
no store and no model. Shapes: N rows (tokens), D width, H sampled subsets, M dims per subset,
R kept directions, U usable dims.

With X_ND the activations, mu_D their mean and sigma_D their standard deviation:

    work space   z_n = (x_n − mu) / s,  s = sigma (standardize) or 1
    usable dims  U = {j : sigma_j ≤ exclude_massive · median(sigma)}   (all dims when 0)
    S_i ⊂ U, |S_i| = M, i = 1..H      sampling "random": each subset uniform without replacement;
                                       "partition": shuffle U, cut into ⌊|U|/M⌋ disjoint subsets, repeat
    C_i = cov(z[:, S_i])               [M, M], a gather of the one [D, D] covariance
    v_i = top eigenvector of C_i       (= first right singular vector of the centred z[:, S_i]), sign
                                       fixed so its largest-|·| entry is positive; lam_i its eigenvalue
    score_i:
      kurtosis "coordinate_mean"  = mean_{j ∈ S_i} ( mean_n z_nj⁴ / (mean_n z_nj²)² − 3 )
                                    (the method's code: per-coordinate excess kurtosis, averaged;
                                    constant coordinates left out)
      kurtosis "principal"        = mean_n p_ni⁴ / lam_i² − 3,  p_ni = z_n[S_i] · v_i
      variance_ratio              = max_{j∈S_i} Var(z_j) / mean_{j∈S_i} Var(z_j)
      knn                         = mean_q (1/k) Σ_{n ∈ kNN_k(q; S_i)} [label_n = label_q]
                                    queries q = every row used (all rows, or `knn_rows` sampled),
                                    neighbours among the same rows in dims S_i only, q excluded;
                                    labels given, or k-means clusters of the full space
    direction_i = unit( s ⊙ embed(v_i) )   v_i on the dims S_i, zeros elsewhere, mapped back to x space
    keep r directions in score order (`select.py`: none / subsets / cos_cap / dominant), or with
    "deflation": keep a block, project the kept directions out of z (z ← z − z Q Qᵀ, Q an
    orthonormal basis of the kept ones), score every subset again, repeat

Fast path: one pass over row chunks builds mu and the [D, D] covariance with a GEMM; every C_i is a
gather of it and one batched `eigh` gives all v_i. The principal kurtosis needs a second pass
(projections of every row on all H directions: one GEMM per chunk). `probe_reference` is the plain
per-subset loop (numpy SVD, reference.py) that the fast path is tested against.

Not here: the selection rules (select.py), SAE initialisation (init.py), training, plots.
"""
from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import torch

from saelab.errors import UsageError
from saelab.rkcnn.select import DEDUPS, select

log = logging.getLogger(__name__)

Score = Literal["kurtosis", "knn", "variance_ratio"]
SCORES: tuple[str, ...] = ("kurtosis", "knn", "variance_ratio")
KURTOSES: tuple[str, ...] = ("coordinate_mean", "principal")
SAMPLINGS: tuple[str, ...] = ("random", "partition")


class ProbeResult(NamedTuple):
    """What `probe` found."""

    scores_H: torch.Tensor
    """float32 [H]: the first-round score of every sampled subset (higher = more structure)."""
    subsets_HM: torch.Tensor
    """int64 [H, M]: the dims of each sampled subset, sorted ascending."""
    top_idx_R: torch.Tensor
    """int64 [R]: indices into H of the kept subsets, in the order kept (best first); R < r when the
    selection rule runs out of candidates."""
    directions_RD: torch.Tensor
    """float32 [R, D]: unit direction of each kept subset (x space), zeros off its dims."""
    variance_R: torch.Tensor
    """float32 [R]: variance of the (work-space, possibly deflated) data along each kept direction."""
    score: str
    """Which score ranked the subsets."""


# ---------------------------------------------------------------------------------------------
# checks and small helpers


def _check_args(X_ND, m: int, h: int, r: int, score: str, labels, k_neighbors: int, kurtosis: str,
                sampling: str, dedup: str) -> None:
    if not isinstance(X_ND, torch.Tensor) or X_ND.ndim != 2:
        shape = tuple(X_ND.shape) if hasattr(X_ND, "shape") else type(X_ND).__name__
        raise UsageError(f"rkcnn probe: X must be a 2-D tensor [rows, dims], got {shape}.")
    N, D = X_ND.shape
    p = []
    if not 1 <= m <= D:
        p.append(f"subset size m={m} must be between 1 and the activation width {D} (try m=√D ≈ {max(1, round(math.sqrt(D)))})")
    if h < 1:
        p.append(f"number of subsets h={h} must be at least 1")
    if r < 1:
        p.append(f"kept subsets r={r} must be at least 1")
    for name, value, allowed in (("score", score, SCORES), ("kurtosis", kurtosis, KURTOSES),
                                 ("sampling", sampling, SAMPLINGS), ("dedup", dedup, DEDUPS)):
        if value not in allowed:
            p.append(f"{name} {value!r} is not one of {', '.join(allowed)}")
    if N < 2:
        p.append(f"need at least 2 rows of activations, got {N}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != N):
        p.append(f"labels must be 1-D with one entry per row ({N}), got shape {tuple(labels.shape)}")
    if score == "knn" and k_neighbors < 1:
        p.append(f"k_neighbors={k_neighbors} must be at least 1")
    if not torch.isfinite(X_ND).all():
        p.append("X holds NaN or inf values; clean the activations first")
    if p:
        raise UsageError("rkcnn probe: " + "; ".join(p) + ".")


def sample_subsets(D: int, m: int, h: int, seed: int, dims_U: torch.Tensor | None = None,
                   sampling: str = "random") -> torch.Tensor:
    """h subsets of m distinct dims drawn from `dims_U` (default all D), each sorted: int64 [H, M].

    "random": every subset independently uniform; "partition": shuffle the dims, cut them into
    ⌊U/m⌋ disjoint subsets, reshuffle and repeat until h subsets. Deterministic for a seed.
    """
    dims_U = torch.arange(D) if dims_U is None else dims_U
    U = dims_U.numel()
    if m > U:
        raise UsageError(f"rkcnn probe: subset size m={m} exceeds the {U} usable dims; lower m or "
                         "raise exclude_massive.")
    g = torch.Generator().manual_seed(seed)
    if sampling == "random":
        idx_HM = torch.rand(h, U, generator=g).argsort(dim=1)[:, :m]
    else:
        per = U // m
        rounds = -(-h // per)
        idx_HM = torch.cat([torch.randperm(U, generator=g)[: per * m].view(per, m) for _ in range(rounds)])[:h]
    return dims_U[idx_HM].sort(dim=1).values


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


# ---------------------------------------------------------------------------------------------
# statistics of the data (one or two passes over row chunks)


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


def _work_rows(X_ND, mu_D, s_D, Q_DK, i, batch) -> torch.Tensor:
    """Rows i .. i+batch in work space, deflated: z − z Q Qᵀ (float32)."""
    z = (X_ND[i:i + batch].float() - mu_D.float()) / s_D.float()
    if Q_DK is None:
        return z
    Q = Q_DK.float()
    return z - (z @ Q) @ Q.T


def coordinate_kurtosis(X_ND, mu_D, s_D, Q_DK, batch: int) -> torch.Tensor:
    """Excess kurtosis of every work-space coordinate, float64 [D]; NaN for a constant coordinate."""
    N, D = X_ND.shape
    m2_D = torch.zeros(D, dtype=torch.float64)
    m4_D = torch.zeros(D, dtype=torch.float64)
    for i in range(0, N, batch):
        z = _work_rows(X_ND, mu_D, s_D, Q_DK, i, batch).double()
        z = z * z
        m2_D += z.sum(0)
        m4_D += (z * z).sum(0)
    m2_D, m4_D = m2_D / N, m4_D / N
    return torch.where(m2_D > 1e-20, m4_D / m2_D.clamp_min(1e-20) ** 2 - 3.0, torch.full_like(m2_D, math.nan))


def _principal_kurtosis(X_ND, mu_D, s_D, Q_DK, w_HD: torch.Tensor, lam_H: torch.Tensor, batch: int) -> torch.Tensor:
    """Excess kurtosis of the projections z_n · w_i for every (work-space) direction: float64 [H]."""
    N = X_ND.shape[0]
    m4_H = torch.zeros(w_HD.shape[0], dtype=torch.float64)
    w32_DH = w_HD.float().T.contiguous()
    for i in range(0, N, batch):
        p_NH = _work_rows(X_ND, mu_D, s_D, Q_DK, i, batch) @ w32_DH
        m4_H += (p_NH.double() ** 4).sum(0)
    m4_H /= N
    return torch.where(lam_H > 1e-20, m4_H / lam_H.clamp_min(1e-20) ** 2 - 3.0, torch.zeros_like(m4_H))


def _principal(C_DD: torch.Tensor, subsets_HM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpair of every subset covariance C[S_i][:, S_i]: (v_HM float64, lam_H float64)."""
    C_HMM = C_DD[subsets_HM[:, :, None], subsets_HM[:, None, :]]
    evals_HM, evecs_HMM = torch.linalg.eigh(C_HMM)
    return _fix_sign(evecs_HMM[:, :, -1]), evals_HM[:, -1].clamp_min(0)


def kmeans_labels(X_ND: torch.Tensor, n_clusters: int, seed: int, iters: int = 20) -> torch.Tensor:
    """Cheap k-means (k-means++ seeding, `iters` Lloyd steps) in the full space: int64 labels [N]."""
    return kmeans(X_ND, n_clusters, seed, iters)[1]


def kmeans(X_ND: torch.Tensor, n_clusters: int, seed: int, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then `iters` Lloyd steps: (centres_KD float32, labels_N int64). Deterministic."""
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
    return C_KD, labels_N


def knn_scores(Xs_ND: torch.Tensor, labels_N: torch.Tensor, subsets_HM: torch.Tensor, k: int,
               max_elems: int = 1 << 24) -> torch.Tensor:
    """kNN label consistency of every subset on the rows given (all of them are queries): [H].

    For each query row, the fraction of its k nearest other rows (Euclidean, dims S_i only) that
    share its label, averaged over rows. Batched over subsets and query blocks, so a distance block
    stays under `max_elems` entries. Ties in distance go to the lower row index.
    """
    N = Xs_ND.shape[0]
    k = min(k, N - 1)
    X = Xs_ND.float()
    H = subsets_HM.shape[0]
    out_H = torch.zeros(H, dtype=torch.float64)
    q_block = max(1, min(N, max_elems // N))
    step = max(1, max_elems // (q_block * N))
    for a in range(0, H, step):
        Xg_hNM = X[:, subsets_HM[a:a + step]].permute(1, 0, 2).contiguous()
        for q0 in range(0, N, q_block):
            q = slice(q0, min(N, q0 + q_block))
            d_hQN = torch.cdist(Xg_hNM[:, q], Xg_hNM)
            rows = torch.arange(q.start, q.stop)
            d_hQN[:, rows - q0, rows] = float("inf")
            nn_hQk = d_hQN.topk(k, dim=2, largest=False, sorted=True).indices
            agree = labels_N[nn_hQk] == labels_N[q][None, :, None]
            out_H[a:a + step] += agree.double().sum(dim=(1, 2))
    return out_H / (N * k)


def _knn_rows(Z_ND: torch.Tensor, labels, knn_rows: int | None, n_clusters: int, seed: int):
    N = Z_ND.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(N, generator=g)[:knn_rows].sort().values if knn_rows and N > knn_rows else torch.arange(N)
    Zs = Z_ND[rows].float()
    if labels is None:
        lab = kmeans_labels(Zs, n_clusters, seed)
        log.info("rkcnn knn: no labels given; using %d k-means clusters of %d rows", n_clusters, len(rows))
    else:
        lab = torch.as_tensor(labels)[rows].long()
    return rows, Zs, lab


# ---------------------------------------------------------------------------------------------
# the probe


def _round(X_ND, mu_D, s_D, C_DD, Q_DK, subsets_HM, score, kurtosis, knn_data, k_neighbors, batch):
    """One scoring round on the (deflated) work-space data: (scores_H, w_HD work-space dirs, lam_H)."""
    D = X_ND.shape[1]
    if Q_DK is not None:
        P_DD = torch.eye(D, dtype=torch.float64) - Q_DK @ Q_DK.T
        C_DD = P_DD @ C_DD @ P_DD
    v_HM, lam_H = _principal(C_DD, subsets_HM)
    w_HD = embed(v_HM, subsets_HM, D)
    if score == "kurtosis" and kurtosis == "principal":
        scores_H = _principal_kurtosis(X_ND, mu_D, s_D, Q_DK, w_HD, lam_H, batch)
    elif score == "kurtosis":
        kurt_D = coordinate_kurtosis(X_ND, mu_D, s_D, Q_DK, batch)
        kurt_HM = kurt_D[subsets_HM]
        ok_HM = ~torch.isnan(kurt_HM)
        scores_H = torch.where(ok_HM, kurt_HM, 0.0).sum(1) / ok_HM.sum(1).clamp_min(1)
    elif score == "variance_ratio":
        var_HM = C_DD.diagonal()[subsets_HM]
        scores_H = var_HM.max(1).values / var_HM.mean(1).clamp_min(1e-30)
    else:
        Zs, lab = knn_data
        if Q_DK is not None:
            Zs = Zs - (Zs @ Q_DK.float()) @ Q_DK.float().T
        uniq_GM, inverse_H = torch.unique(subsets_HM, dim=0, return_inverse=True)  # repeated subsets: once
        scores_H = knn_scores(Zs, lab, uniq_GM, k_neighbors)[inverse_H]
    return scores_H, w_HD, lam_H


def usable_dims(sigma_D: torch.Tensor, exclude_massive: float) -> torch.Tensor:
    """Dims whose standard deviation is at most exclude_massive × the median one (all when 0): [U]."""
    if exclude_massive <= 0:
        return torch.arange(sigma_D.numel())
    return (sigma_D <= exclude_massive * sigma_D.median()).nonzero().squeeze(1)


def probe(X_ND: torch.Tensor, m: int, h: int, r: int, score: Score = "kurtosis",
          labels: torch.Tensor | None = None, seed: int = 0, *, kurtosis: str = "coordinate_mean",
          k_neighbors: int = 5, knn_rows: int | None = None, n_clusters: int = 10, sampling: str = "random",
          dedup: str = "none", cos_cap: float = 0.5, standardize: bool = False, exclude_massive: float = 0.0,
          batch: int = 8192) -> ProbeResult:
    """Score h random m-dim subsets of the activations and keep r directions (module docstring).

    Args:
        X_ND: activations, one row per token (any float dtype; computed in float32/float64).
        m: dims per subset (RkCNN's default is √D).
        h: number of subsets.
        r: number of directions to keep.
        score: "kurtosis", "knn" or "variance_ratio".
        labels: int [N] labels for the knn score; None = k-means cluster labels.
        seed: makes subsets, row subsample and clustering deterministic.
        kurtosis: "coordinate_mean" (the method's code) or "principal" (of the projection on v_i).
        k_neighbors: k of the knn score.
        knn_rows: rows sampled for the knn score; None = all rows (distances are N² per subset).
        n_clusters: k-means clusters used as labels when `labels` is None.
        sampling: "random" or "partition" (disjoint subsets, reshuffled each round).
        dedup: "none" (the method), "subsets", "cos_cap", "dominant" or "deflation" (select.py).
        cos_cap: largest |cos| allowed between two kept directions ("cos_cap"; also inside a
            deflation block).
        standardize: probe the coordinates scaled to unit variance.
        exclude_massive: leave out dims whose std exceeds this × the median std (0: keep all).
        batch: rows per chunk in the passes over X.
    Returns:
        ProbeResult(scores_H, subsets_HM, top_idx_R, directions_RD, variance_R, score).
    Raises:
        UsageError: bad shapes, sizes or option names.
    """
    _check_args(X_ND, m, h, r, score, labels, k_neighbors, kurtosis, sampling, dedup)
    N, D = X_ND.shape
    mu_D, C_DD = _mean_and_cov(X_ND, batch)
    sigma_D = C_DD.diagonal().clamp_min(0).sqrt()
    s_D = sigma_D.clamp_min(1e-12) if standardize else torch.ones(D, dtype=torch.float64)
    C_DD = C_DD / (s_D[:, None] * s_D[None, :])
    subsets_HM = sample_subsets(D, m, h, seed, usable_dims(sigma_D, exclude_massive), sampling)
    knn_data = None
    if score == "knn":
        rows, _, lab = _knn_rows(X_ND, labels, knn_rows, n_clusters, seed)
        knn_data = (((X_ND[rows].double() - mu_D) / s_D).float(), lab)

    def to_x(w_HD):  # work-space direction -> unit x-space direction
        d = w_HD * s_D
        return (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()

    scores_H, w_HD, lam_H = _round(X_ND, mu_D, s_D, C_DD, None, subsets_HM, score, kurtosis, knn_data,
                                   k_neighbors, batch)
    if dedup != "deflation":
        dirs_HD = to_x(w_HD)
        keep_R = select(scores_H, subsets_HM, dirs_HD, r, dedup, cos_cap)
        return ProbeResult(scores_H.float(), subsets_HM, keep_R, dirs_HD[keep_R], lam_H[keep_R].float(), score)

    # deflation: accept a block per round (greedy, |cos| cap inside the block), project it out, re-score
    block = max(1, math.ceil(r / 20))
    kept: list[int] = []
    dirs, lams, acc_w = [], [], []
    Q_DK = None
    first_scores_H = scores_H
    while len(kept) < r:
        dirs_HD = to_x(w_HD)
        s = scores_H.clone()
        if kept:
            s[torch.tensor(kept)] = -math.inf
        new = select(s, subsets_HM, dirs_HD, min(block, r - len(kept)), "cos_cap", cos_cap, exclude=kept)
        if new.numel() == 0:
            break
        kept += new.tolist()
        dirs.append(dirs_HD[new])
        lams.append(lam_H[new])
        acc_w.append(w_HD[new].double())
        Q_DK = torch.linalg.qr(torch.cat(acc_w).T).Q  # orthonormal basis of all kept so far (work space)
        if len(kept) >= D:
            log.warning("rkcnn deflation: %d directions span all %d dims; stopping at %d, not r=%d", len(kept), D, len(kept), r)
            break
        if len(kept) < r:
            scores_H, w_HD, lam_H = _round(X_ND, mu_D, s_D, C_DD, Q_DK, subsets_HM, score, kurtosis, knn_data,
                                           k_neighbors, batch)
    keep_R = torch.tensor(kept, dtype=torch.int64)
    return ProbeResult(first_scores_H.float(), subsets_HM, keep_R,
                       torch.cat(dirs) if dirs else torch.zeros(0, D),
                       torch.cat(lams).float() if lams else torch.zeros(0), score)
