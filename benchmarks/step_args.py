"""The command line the training-step benchmarks share (profile_train_step.py, vs_diffusers.py): a config with
overrides, the batch size, timed and warm-up step counts. Free of PyTorch, so either script can import it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import ml_collections

from jaxdiff.cli import load_config
from jaxdiff.config import validate

ROOT = Path(__file__).resolve().parents[1]


def parse_step_args(argv: list[str], *, description: str, steps: int, steps_help: str, warmup: int,
                    warmup_help: str, more: Callable[[argparse.ArgumentParser], None] | None = None,
                    ) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:  # fmt: skip
    """(args, the validated config with training.batch_size = --batch-size); args.overrides holds the
    `--config.a.b=V` overrides; `steps`/`warmup` are the defaults; `more` adds a script's own options."""
    parser = argparse.ArgumentParser(description=description)
    if more is not None:
        more(parser)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10.py"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    args, overrides = parser.parse_known_args(argv)
    for name, minimum in (("batch_size", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {minimum}")
    args.overrides = overrides
    config = validate(load_config(args.config, overrides))
    config.training.batch_size = args.batch_size
    return args, config
