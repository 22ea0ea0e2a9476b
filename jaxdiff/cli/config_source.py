"""Where a command's config comes from: `load_config` reads a config file or a recipe, applies the
`--config.a.b=v` overrides and validates the result."""

from __future__ import annotations

import os

import ml_collections

from jaxdiff.cli.errors import UsageError


def load_config(source: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of file `source` (or recipe `source`) with `--config.a.b=v` overrides applied, validated.

    Raises ConfigError (a ValueError) naming the file, key or value at fault.
    """
    from absl import flags
    from ml_collections import config_flags

    from jaxdiff.config.specs import ConfigError, flat_keys, unknown_key_error
    from jaxdiff.config.defaults import default_config
    from jaxdiff.config.validation import validate
    from jaxdiff.config.recipes import RECIPES, recipe

    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --config.seed=1)")
    known = flat_keys(default_config())
    for arg in overrides:
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in known:
            raise unknown_key_error(key)
    values = flags.FlagValues()
    if os.path.isfile(source):
        argv = ["jaxdiff", f"--config={source}", *overrides]
        config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    elif source in RECIPES:
        argv = ["jaxdiff", *overrides]
        config_flags.DEFINE_config_dict("config", recipe(source), flag_values=values, lock_config=True, sys_argv=argv)
    elif os.path.exists(source):
        raise ConfigError(f"config {source!r} is not a file")
    else:
        raise ConfigError(f"config {source!r} is neither a config file nor a recipe; recipes: {', '.join(RECIPES)}")
    try:
        values(argv)
        config = values.config
        config.to_dict()  # a file that failed to load yields a stand-in that raises its error here
    except Exception as err:  # noqa: BLE001 - the config file is the user's Python: whatever it raises is theirs
        message = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise ConfigError(f"bad config {source!r} or override: {message}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {source!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return validate(config)
