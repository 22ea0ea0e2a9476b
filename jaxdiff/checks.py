"""Predicates and error messages shared by the checks of arguments, configs and model settings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdiff.errors import ConfigError, UsageError


def is_int(value: Any, *, numpy: bool = True) -> bool:
    """An integer that is not a bool: a Python int, or (with `numpy`) also a NumPy integer.

    `numpy=False` is for values written to JSON (configs)."""
    kinds = (int, np.integer) if numpy else int
    return isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any, *, finite: bool = False, numpy: bool = True) -> bool:
    """A real number that is not a bool and not NaN; with `finite` not ±inf either. `numpy=False` takes
    Python ints and floats only (NumPy's float64 is one)."""
    kinds = numbers.Real if numpy else (int, float)
    if not isinstance(value, kinds) or isinstance(value, (bool, np.bool_)):
        return False
    return math.isfinite(value) if finite else not math.isnan(value)


def unsupported(owner: str, key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a setting outside what `owner` (e.g. "AutoencoderKL config") supports."""
    return ConfigError(f"{owner}: unsupported {key}={value!r}; allowed: {allowed}")


def prompt_list(prompts: str | Sequence[str], name: str, *, allow_empty: bool = False) -> list[str]:
    """One prompt or a sequence (list, tuple, NumPy array) of prompts -> list[str]; UsageError naming `name`."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    valid = isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts)
    if not valid or not (prompts or allow_empty):
        kind = "a list of strings" if allow_empty else "a non-empty list of strings"
        raise UsageError(f"{name} must be a string or {kind}, got {prompts!r}")
    return list(prompts)


def require_int(name: str, value: Any, minimum: int) -> None:
    """ConfigError unless `value` is a Python int (not a bool) >= minimum."""
    if not is_int(value, numpy=False) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


def require_bool(name: str, value: Any) -> None:
    """ConfigError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def require_choice(name: str, value: Any, allowed: tuple) -> None:
    """ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")
