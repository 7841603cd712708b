"""RkCNN: mine SAE decoder directions by scoring random coordinate subsets of activations (L1).

    probe.py    scores (kurtosis, knn, variance ratio) and the fast path; reference.py the plain loop
    select.py   which directions are kept: the method's top-r or a de-duplicated selection
    init.py     RkcnnConfig (the --rkcnn-* options) and the data-driven SAE inits (rkcnn, data rows,
                k-means, PCA)
"""
from saelab.rkcnn.init import (KINDS, InitResult, RkcnnConfig, RkcnnInit, data_init, orient_heavy_tail,
                               random_encoder_columns_, random_unit_rows, rkcnn_init)
from saelab.rkcnn.probe import (KURTOSES, SAMPLINGS, SCORES, ProbeResult, coordinate_kurtosis, embed, kmeans,
                                kmeans_labels, knn_scores, probe, sample_subsets, usable_dims)
from saelab.rkcnn.reference import probe_reference
from saelab.rkcnn.select import DEDUPS, select

__all__ = ["KINDS", "InitResult", "RkcnnConfig", "RkcnnInit", "data_init", "orient_heavy_tail",
           "random_encoder_columns_", "random_unit_rows", "rkcnn_init", "KURTOSES", "SAMPLINGS", "SCORES",
           "ProbeResult", "coordinate_kurtosis", "embed", "kmeans", "kmeans_labels", "knn_scores", "probe",
           "probe_reference", "sample_subsets", "usable_dims", "DEDUPS", "select"]
