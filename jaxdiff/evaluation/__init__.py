"""Evaluation: the FID Inception network and its weights, FID / IS / precision-recall, bits/dim.

`evaluate.evaluate` (the body of `jaxdiff eval`) imports the Pipeline, so it is not re-exported here. PyTorch weight
files are read by `jaxdiff.weights.torch_pickle` (`read_torch_file`, `UnsafePickleError`).
"""

_EXPORTS = {  # name -> the submodule defining it
    "ActivationStatistics": "fid", "frechet_distance": "fid", "inception_score": "fid", "load_statistics": "fid",
    "precision_recall": "fid", "save_statistics": "fid",
    "InceptionV3": "inception", "inception_features": "inception", "preprocess": "inception",
    "resize_tf1_bilinear": "inception",
    "bpd_terms": "likelihood", "evaluate_bpd": "likelihood", "stratified_bpd": "likelihood",
    "ode_log_likelihood": "ode_likelihood",
    "dataset_statistics": "reference", "load_reference": "reference",
    "HashMismatchError": "inception_weights", "find_weights": "inception_weights",
    "load_inception_params": "inception_weights", "load_npz": "inception_weights", "save_npz": "inception_weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Each name is imported from its module on first use, so that importing one submodule of this package
    # does not import all of them; code inside jaxdiff imports from the submodules themselves.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
