"""Pairing our parameters with the tensors of a foreign file, with one error that lists every problem."""

from __future__ import annotations

from collections.abc import Mapping

from jaxdiff.errors import WeightsError

ParamPath = tuple[str, ...]  # our parameter's path in the params tree
Shape = tuple[int, ...]

MAX_LISTED = 40  # per kind of problem; the count is always given

def _listing(kind: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {len(items)} {kind}:\n" + "\n".join(f"    {item}" for item in shown) + more


def match_names(
    wanted: Mapping[ParamPath, tuple[tuple[str, ...], Shape]],
    available: Mapping[str, Shape],
    *,
    source: str,
) -> dict[ParamPath, str]:
    """For each of our parameters, the first candidate name present in `available` (source name -> shape).

    `wanted` maps our path to (candidate names, shape the source tensor must have). Raises one
    ValueError listing every missing tensor, every shape mismatch and every source tensor left over.
    """
    found, missing, mismatched = {}, [], []
    for path, (candidates, shape) in wanted.items():
        name = next((n for n in candidates if n in available), None)
        if name is None:
            missing.append(" or ".join(candidates))
            continue
        found[path] = name
        if tuple(available[name]) != tuple(shape):
            mismatched.append(f"{name}: shape {tuple(available[name])}, expected {tuple(shape)}")
    used = set(found.values())
    unexpected = sorted(name for name in available if name not in used)
    problems = [
        _listing(kind, items)
        for kind, items in (("missing", missing), ("with the wrong shape", mismatched), ("unexpected", unexpected))
        if items
    ]
    if problems:
        raise WeightsError(f"{source} does not fit the model:\n" + "\n".join(problems))
    return found
