"""Sample-quality evaluation: the FID Inception network, its weights, FID / IS / precision-recall."""

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
