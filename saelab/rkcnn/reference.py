"""The plain reference path of the RkCNN probe: one subset at a time with numpy SVD, slow and
obviously right. Same contract, subsets, row sample, labels and selection as `probe.probe` (all
dedup rules but deflation); tests/rkcnn/test_rkcnn_probe.py checks that both agree for every option.
"""
from __future__ import annotations

import numpy as np
import torch

from saelab.errors import UsageError
from saelab.rkcnn.probe import ProbeResult, Score, _check_args, _knn_rows, sample_subsets, usable_dims
from saelab.rkcnn.select import select


def probe_reference(X_ND: torch.Tensor, m: int, h: int, r: int, score: Score = "kurtosis",
                    labels: torch.Tensor | None = None, seed: int = 0, *, kurtosis: str = "coordinate_mean",
                    k_neighbors: int = 5, knn_rows: int | None = None, n_clusters: int = 10,
                    sampling: str = "random", dedup: str = "none", cos_cap: float = 0.5,
                    standardize: bool = False, exclude_massive: float = 0.0) -> ProbeResult:
    """Same contract as `probe` (every dedup but "deflation"), computed subset by subset with
    `numpy.linalg.svd`. Uses the same subsets, row subsample, cluster labels and selection rule."""
    _check_args(X_ND, m, h, r, score, labels, k_neighbors, kurtosis, sampling, dedup)
    if dedup == "deflation":
        raise UsageError("probe_reference has no deflation; compare the other dedup rules.")
    N, D = X_ND.shape
    X = X_ND.double().numpy()
    mu, sd = X.mean(0), X.std(0)
    s = np.where(sd > 1e-12, sd, 1e-12) if standardize else np.ones(D)
    Z = (X - mu) / s
    subsets_HM = sample_subsets(D, m, h, seed, usable_dims(torch.from_numpy(sd), exclude_massive), sampling)
    if score == "knn":
        rows, _, lab_t = _knn_rows(X_ND, labels, knn_rows, n_clusters, seed)
        Zs, lab = Z[rows.numpy()], lab_t.numpy()
    scores, dirs, lams = [], [], []
    for S in subsets_HM.numpy():
        A = Z[:, S]
        _, sing, Vt = np.linalg.svd(A, full_matrices=False)
        v = Vt[0] * (1.0 if Vt[0][np.argmax(np.abs(Vt[0]))] >= 0 else -1.0)
        lam = sing[0] ** 2 / N
        full = np.zeros(D)
        full[S] = v * s[S]
        dirs.append(full / np.linalg.norm(full))
        lams.append(lam)
        if score == "kurtosis" and kurtosis == "principal":
            p = A @ v
            scores.append(np.mean(p ** 4) / lam ** 2 - 3.0 if lam > 1e-20 else 0.0)
        elif score == "kurtosis":
            var = A.var(0)
            ok = var > 1e-20
            k = (A[:, ok] ** 4).mean(0) / var[ok] ** 2 - 3.0
            scores.append(float(k.mean()) if ok.any() else 0.0)
        elif score == "variance_ratio":
            var = A.var(0)
            scores.append(var.max() / max(var.mean(), 1e-30))
        else:
            k = min(k_neighbors, len(Zs) - 1)
            B = Zs[:, S]
            dist = np.sqrt(((B[:, None, :] - B[None, :, :]) ** 2).sum(-1))
            np.fill_diagonal(dist, np.inf)
            nn = np.argsort(dist, axis=1, kind="stable")[:, :k]
            scores.append(float((lab[nn] == lab[:, None]).mean()))
    scores_H = torch.tensor(scores, dtype=torch.float64)
    dirs_HD = torch.tensor(np.stack(dirs)).float()
    keep_R = select(scores_H, subsets_HM, dirs_HD, r, dedup, cos_cap)
    return ProbeResult(scores_H.float(), subsets_HM, keep_R, dirs_HD[keep_R], torch.tensor(lams)[keep_R].float(), score)
