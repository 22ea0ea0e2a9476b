"""The verbs that run a config: `train` (a model in a workdir, resumed from its latest checkpoint) and `info`
(the parameter count and forward GFLOPs of the config's model; for --pretrained folders `_unet_info` and
`jaxdiff.cli.flow_info`)."""

from __future__ import annotations

import logging
import os
import sys

from jaxdiff.cli.config_source import load_config
from jaxdiff.cli.errors import UsageError, reject_extra
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

    estimates = {"devices": 1, "height": 1024, "width": 1024, "dtype": "bfloat16"}  # flags' defaults
    given = {name: getattr(args, name) for name in estimates if getattr(args, name) is not None}
    if args.pretrained:
        from jaxdiff.cli.flow_info import flow_pipeline_info, flow_transformer_class

        if flow_transformer_class(args.pretrained):
            return flow_pipeline_info(args.pretrained, extra, **{**estimates, **given})
    if given:
        flags = ", ".join(f"--{name}" for name in given)
        raise UsageError(f"{flags}: only for --pretrained SD3 / Flux pipeline folders (memory estimates)")
    if args.pretrained:
        return _unet_info(args.pretrained, extra)
    config = load_config(args.config, extra)
    summary = model_summary(config.model)
    print(f"parameters: {summary['parameters']:,}")
    print(f"forward GFLOPs per image: {summary['gflops']:.2f} (every multiply-add of convolutions and matmuls)")
    print(f"XLA cost analysis GFLOPs: {summary['xla_gflops']:.2f} (omits convolution taps on zero padding)")
    return 0


def _unet_info(path: str, extra) -> int:
    """The parameter count of the U-Net of the diffusers folder `path` (or of `path` itself, a unet/ folder), from
    its config.json through `jax.eval_shape`: nothing is allocated and no weights are read."""
    import math
    import pathlib

    from jaxdiff.latent.component_weights import CONFIG_FILE, read_config
    from jaxdiff.latent.unet_weights import unet_condition_shapes
    from jaxdiff.models.unet_condition_config import config_from_diffusers

    reject_extra(extra)
    folder = pathlib.Path(path)
    folder = folder / "unet" if (folder / "unet" / CONFIG_FILE).is_file() else folder
    if not (folder / CONFIG_FILE).is_file():
        raise UsageError(f"--pretrained {path!r} holds neither unet/{CONFIG_FILE} nor {CONFIG_FILE}")
    shapes = unet_condition_shapes(read_config(folder, config_from_diffusers))
    print(f"U-Net parameters: {sum(math.prod(shape) for shape in shapes.values()):,}")
    return 0
