"""The `jaxdiff` command: train | info (and the verbs registered below).

Config files are ml_collections files defining `get_config()`; any key can be
overridden as `--config.section.key=value`, and an unknown key is an error.
"""

from __future__ import annotations

import argparse
import logging
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of file `path` with `--config.a.b=v` overrides applied (types and keys checked)."""
    bad = [arg for arg in overrides if not arg.startswith("--config.")]
    if bad:
        raise SystemExit(f"jaxdiff: unrecognised arguments: {' '.join(bad)}")
    argv = ["jaxdiff", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as err:
        raise SystemExit(f"jaxdiff: bad config {path!r} or override: {err}") from None
    return values.config


def _train(args, extra) -> int:
    from jaxdiff import sharding
    from jaxdiff.training_run import train_and_evaluate

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    config = load_config(args.config, extra)
    result = train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change)
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.step}; workdir {args.workdir}")
    return 0


def _info(args, extra) -> int:
    from jaxdiff.config import validate
    from jaxdiff.models.summary import model_summary

    config = validate(load_config(args.config, extra))
    summary = model_summary(config.model)
    print(f"parameters: {summary['parameters']:,}")
    print(f"forward GFLOPs per image: {summary['gflops']:.2f} (every multiply-add of convolutions and matmuls)")
    print(f"XLA cost analysis GFLOPs: {summary['xla_gflops']:.2f} (omits convolution taps on zero padding)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdiff", description="Denoising diffusion models in JAX.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a model (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", required=True, help="config file, e.g. configs/cifar10.py")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even if the saved model/diffusion config differs")  # fmt: skip
    train.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")
    train.set_defaults(run=_train)

    info = verbs.add_parser("info", help="parameter count and forward GFLOPs per image of a config's model")
    info.add_argument("--config", required=True)
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
