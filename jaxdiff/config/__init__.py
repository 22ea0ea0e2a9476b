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
checks of a whole config; every public name is importable from `jaxdiff.config` itself.
"""

from jaxdiff.config.defaults import DATASETS, TASKS, default_config
from jaxdiff.config.specs import (
    SPECS,
    ConfigError,
    Spec,
    flat_keys,
    keys_without_spec,
    spec_of,
    unknown_key_error,
)
from jaxdiff.config.validation import config_from_dict, validate

__all__ = [
    "DATASETS",
    "SPECS",
    "TASKS",
    "ConfigError",
    "Spec",
    "config_from_dict",
    "default_config",
    "flat_keys",
    "keys_without_spec",
    "spec_of",
    "unknown_key_error",
    "validate",
]
