"""Where a command's config comes from: `load_config` reads a config file or a recipe, applies the
`--config.a.b=v` overrides and validates the result.

A config file is Python: loading it runs it, as the user's own code (never point `--config` at a file you would not
run). Whatever it raises, `sys.exit` included, is a ConfigError naming the file, not an internal error."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import ml_collections

from jaxdiff.cli.errors import UsageError


def _run_config_file(source: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `source`, which is run as a module of its own (not added to sys.modules).
    ConfigError naming the file and, in one line, what it raised or returned."""
    from jaxdiff.config.specs import ConfigError

    loader = importlib.machinery.SourceFileLoader("jaxdiff_config_file", source)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    get_config = None
    try:
        loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        config = get_config() if callable(get_config) else None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the config file is the user's code: its errors are theirs
        message = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise ConfigError(f"bad config {source!r}: running it raised {message}") from None
    if not callable(get_config):
        raise ConfigError(f"bad config {source!r}: it defines no get_config()")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {source!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def load_config(source: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of file `source` (or recipe `source`) with `--config.a.b=v` overrides applied, validated.

    A file is run (see the module docstring) and must define `get_config()` returning a ConfigDict. Raises
    ConfigError (a ValueError) naming the file, key or value at fault.
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
    argv = ["jaxdiff", *overrides]
    if os.path.isfile(source):
        config = _run_config_file(source)
    elif source in RECIPES:
        config = recipe(source)
    elif os.path.exists(source):
        raise ConfigError(f"config {source!r} is not a file")
    else:
        raise ConfigError(f"config {source!r} is neither a config file nor a recipe; recipes: {', '.join(RECIPES)}")
    config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except Exception as err:  # noqa: BLE001 - an override absl or ml_collections cannot apply
        message = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise ConfigError(f"bad config {source!r} or override: {message}") from None
    return validate(values.config)
