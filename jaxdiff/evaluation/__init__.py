"""Evaluation: the FID Inception network and its weights, FID / IS / precision-recall, bits/dim.

`evaluate.evaluate` (the body of `jaxdiff eval`) imports the Pipeline, so it is not re-exported here.
"""

from jaxdiff.evaluation.fid import (
    ActivationStatistics,
    frechet_distance,
    inception_score,
    load_statistics,
    precision_recall,
    save_statistics,
)
from jaxdiff.evaluation.inception import (
    InceptionV3,
    inception_features,
    preprocess,
    resize_tf1_bilinear,
)
from jaxdiff.evaluation.likelihood import bpd_terms, evaluate_bpd, stratified_bpd
from jaxdiff.evaluation.ode_likelihood import ode_log_likelihood
from jaxdiff.evaluation.reference import dataset_statistics, load_reference
from jaxdiff.evaluation.inception_weights import (
    HashMismatchError,
    UnsafePickleError,
    find_weights,
    load_inception_params,
    load_npz,
    read_torch_file,
    save_npz,
)

__all__ = [
    "ActivationStatistics",
    "bpd_terms",
    "dataset_statistics",
    "evaluate_bpd",
    "load_reference",
    "ode_log_likelihood",
    "stratified_bpd",
    "HashMismatchError",
    "InceptionV3",
    "UnsafePickleError",
    "find_weights",
    "frechet_distance",
    "inception_features",
    "inception_score",
    "load_inception_params",
    "load_npz",
    "load_statistics",
    "precision_recall",
    "preprocess",
    "read_torch_file",
    "resize_tf1_bilinear",
    "save_npz",
    "save_statistics",
]
