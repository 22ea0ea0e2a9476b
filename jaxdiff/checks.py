"""Predicates and error messages shared by the checks of arguments, configs and model settings."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config key accepts. For tuples, `low`/`high` bound every item and `min_items` the length."""

    type: type  # bool, int, float, str or tuple (of ints)
    meaning: str
    choices: tuple = ()  # the allowed values, when they form a fixed set
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False  # `high` itself is not allowed
    min_items: int = 0
    infinite: bool = False  # floats: +inf is allowed too

    def allowed(self) -> str:
        """What the spec accepts, in words: "an int >= 1", "a float in (0, 1]", "one of ('a', 'b')"."""
        if self.choices:
            return f"one of {self.choices}"
        name = {bool: "a bool", int: "an int", float: "a number", str: "a string", tuple: "a tuple of ints"}[self.type]
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            bounds = ""
        if self.type is tuple:
            length = f", at least {self.min_items}" if self.min_items else ""
            return f"{name}{bounds}{length}"
        return name + bounds + (" or inf" if self.infinite else "")

    def accepts(self, value, *, numpy: bool = False) -> bool:
        """Whether `value` is allowed; `numpy` also takes NumPy numbers (see `is_int`, `is_real`)."""
        if self.choices:
            return value in self.choices
        if self.type is tuple:
            items = value if isinstance(value, (tuple, list)) else None
            return (
                items is not None and len(items) >= self.min_items
                and all(is_int(item, numpy=False) and self._in_range(item) for item in items)
            )  # fmt: skip
        if self.type is bool:
            return isinstance(value, bool)
        if self.type is int:
            return is_int(value, numpy=numpy) and self._in_range(value)
        if self.type is float:
            finite = is_real(value, finite=True, numpy=numpy) or (self.infinite and value == math.inf)
            return is_real(value, numpy=numpy) and finite and self._in_range(value)
        return isinstance(value, self.type)

    def _in_range(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


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
