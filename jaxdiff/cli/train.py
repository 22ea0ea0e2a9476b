"""The verbs that run a config: `train` (a model in a workdir, resumed from its latest checkpoint) and `info`
(the parameter count and forward GFLOPs of the config's model)."""

from __future__ import annotations

import logging
import os
import sys

from jaxdiff.cli.config_source import load_config
from jaxdiff.cli.paths import check_output_dir


def run_train(args, extra) -> int:
    from jaxdiff import sharding
    from jaxdiff.training.loop import train_and_evaluate

    config = load_config(args.config, extra)
    check_output_dir(args.workdir, "--workdir")
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    result = train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change,
                                verbose=args.verbose)  # fmt: skip
    print(result.summary)
    if result.abandoned:  # a compilation a stop left running: exit now rather than when it ends
        sys.stdout.flush()
        logging.shutdown()
        os._exit(0)
    return 0


def run_info(args, extra) -> int:
    from jaxdiff.models.summary import model_summary

    config = load_config(args.config, extra)
    summary = model_summary(config.model)
    print(f"parameters: {summary['parameters']:,}")
    print(f"forward GFLOPs per image: {summary['gflops']:.2f} (every multiply-add of convolutions and matmuls)")
    print(f"XLA cost analysis GFLOPs: {summary['xla_gflops']:.2f} (omits convolution taps on zero padding)")
    return 0
