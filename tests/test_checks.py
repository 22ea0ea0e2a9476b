"""jaxdiff.checks: the predicates every argument and config check shares."""

import math

import numpy as np
import pytest

from jaxdiff.checks import is_int, is_real, prompt_list, require_bool, require_choice, require_int, unsupported


@pytest.mark.parametrize(
    "value, expected, python_only",
    [(3, True, True), (-1, True, True), (np.int64(3), True, False), (np.uint8(3), True, False),
     (True, False, False), (np.bool_(True), False, False), (3.0, False, False), ("3", False, False),
     (None, False, False)],
)  # fmt: skip
def test_is_int(value, expected, python_only):
    assert is_int(value) is expected
    assert is_int(value, numpy=False) is python_only


@pytest.mark.parametrize(
    "value, real, finite, python_only",
    [(1.5, True, True, True), (2, True, True, True), (np.float32(1.5), True, True, False),
     (np.float64(1.5), True, True, True),  # NumPy's float64 is a Python float
     (np.int64(2), True, True, False), (math.inf, True, False, True), (-math.inf, True, False, True),
     (math.nan, False, False, False), (np.float32("nan"), False, False, False), (False, False, False, False),
     ("1.5", False, False, False), (1j, False, False, False)],
)  # fmt: skip
def test_is_real(value, real, finite, python_only):
    assert is_real(value) is real
    assert is_real(value, finite=True) is finite
    assert is_real(value, numpy=False) is python_only


def test_prompt_list():
    assert prompt_list("a red circle", "prompts") == ["a red circle"]
    assert prompt_list(("a", "b"), "prompts") == ["a", "b"]
    assert prompt_list(np.array(["a", "b"]), "prompts") == ["a", "b"]
    assert prompt_list([], "captions", allow_empty=True) == []
    with pytest.raises(ValueError, match=r"^prompts must be a string or a non-empty list of strings, got \[\]$"):
        prompt_list([], "prompts")
    with pytest.raises(ValueError, match=r"^prompts must be a string or a list of strings, got \['a', 3\]$"):
        prompt_list(["a", 3], "prompts", allow_empty=True)
    with pytest.raises(ValueError, match="negative_prompts must be"):
        prompt_list(b"bytes", "negative_prompts")


def test_requirements_and_messages():
    require_int("steps", 1, 1)
    require_bool("remat", False)
    require_choice("kind", "a", ("a", "b"))
    for call, message in [
        (lambda: require_int("steps", 0, 1), r"^steps=0 must be an int >= 1$"),
        (lambda: require_int("steps", True, 0), r"^steps=True must be an int >= 0$"),
        (lambda: require_int("steps", np.int64(2), 1), r"^steps=np\.int64\(2\) must be an int >= 1$"),
        (lambda: require_bool("remat", 1), r"^remat=1 must be true or false$"),
        (lambda: require_choice("kind", "c", ("a", "b")), r"^kind='c' is not one of \('a', 'b'\)$"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    err = unsupported("CLIP text config", "hidden_act", "relu", "'gelu' or 'quick_gelu'")
    assert str(err) == "CLIP text config: unsupported hidden_act='relu'; allowed: 'gelu' or 'quick_gelu'"
