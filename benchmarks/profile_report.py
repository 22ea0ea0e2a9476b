"""The report the per-op profile benchmarks share (profile_train_step.py, profile_diffusers_step.py): a few
header lines, a table of milliseconds per step by category, then one line `JSON {...}`."""

from __future__ import annotations

import argparse
import json


def print_profile(args: argparse.Namespace, *, header: list[str], load: tuple[float, float], step_seconds: float,
                  columns: dict[str, tuple[str, dict[str, float]]], facts: dict) -> None:  # fmt: skip
    """`columns`: {title: (JSON key, {category: seconds per step})}; the share column is of the first one's
    total. `facts` (versions, counts) open the JSON line; `args` is `step_args.parse_step_args`'s."""
    for line in header:
        print(line)
    (first, (_, totals)), *_ = columns.items()
    summed = sum(totals.values())
    print(f"{'category':<20}" + "".join(f"{title:>{max(10, len(title) + 2)}}" for title in columns) + f"{'share':>8}")
    for kind in totals:
        cells = "".join(f"{values[kind] * 1e3:>{max(10, len(title) + 2)}.1f}" for title, (_, values) in columns.items())
        print(f"{kind:<20}{cells}{totals[kind] / summed:>8.1%}")
    summary = {
        **facts,
        "config": args.config,
        "overrides": args.overrides,
        "batch_size": args.batch_size,
        "load": list(load),
        "step_ms": step_seconds * 1e3,
        **{key: {kind: seconds * 1e3 for kind, seconds in values.items()} for key, values in columns.values()},
    }
    print("JSON " + json.dumps(summary))
