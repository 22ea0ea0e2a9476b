"""The configuration schema: every key a run can set, with the DDPM CIFAR-10 recipe as defaults.

Files in `configs/` start from `default_config()` and override what differs.
The returned ConfigDict is locked, so setting a key that does not exist
(a typo in a config file or on the command line) raises an error naming it.
`SPECS` gives each key its type, allowed values and meaning; `validate`
checks a whole config against it before a run starts.

`task` says what a run trains (`jaxdiff.training.tasks`). Sections only some tasks read are ignored by the
others: the diffusion model reads `model` and `diffusion`, the autoencoder `autoencoder` and
`autoencoder_loss`; every task reads `seed`, `data`, `training` and `sampling` (where they apply).

`defaults` holds the keys and their default values, `specs` what each key accepts, and `validation` the
checks of a whole config; every public name is importable from `jaxdiff.config` itself (on first use).
"""

_EXPORTS = {  # name -> the submodule defining it
    "DATASETS": "defaults", "TASKS": "defaults", "default_config": "defaults",
    "SPECS": "specs", "ConfigError": "specs", "Spec": "specs", "flat_keys": "specs", "keys_without_spec": "specs",
    "spec_of": "specs", "unknown_key_error": "specs",
    "config_from_dict": "validation", "validate": "validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Each name is imported from its module on first use, so that importing one submodule of this package
    # does not import all of them; code inside jaxdiff imports from the submodules themselves.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
