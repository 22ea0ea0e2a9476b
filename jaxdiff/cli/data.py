"""The `data` verb: `data prepare` (CIFAR-10 as TFDS files, without TensorFlow: `jaxdiff.data.prepare_dataset`) and
`data encode` (a config's dataset encoded once by its `latent.autoencoder` into a latent cache, read by training
with `data.latent_cache=DIR`: `jaxdiff.training.tasks.class_latent.encode_latent_cache`)."""

from __future__ import annotations

import os

from jaxdiff.cli.config_source import load_config
from jaxdiff.cli.errors import UsageError, reject_extra
from jaxdiff.cli.paths import check_output_dir


def run_data(args, extra) -> int:
    """`data prepare DATASET` or `data encode --config CFG --out DIR [--config.a.b=V ...]`; each refuses the other's
    arguments in one line."""
    if args.action == "prepare":
        if args.dataset is None:
            raise UsageError("data prepare needs the dataset to prepare: cifar10")
        given = [flag for flag, value in (("--config", args.config), ("--out", args.out)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: flags of `data encode`, not of `data prepare`")
        return run_prepare(args, extra)
    return run_encode(args, extra)


def run_prepare(args, extra) -> int:
    from jaxdiff.data import prepare_dataset

    reject_extra(extra)
    if args.source and not os.path.exists(args.source):
        raise UsageError(f"--source {args.source!r} does not exist")
    out = prepare_dataset(args.dataset, args.data_dir or None, source=args.source)
    print(f"prepared {args.dataset} in {out}")
    return 0


def run_encode(args, extra) -> int:
    from jaxdiff.training.tasks.class_latent import encode_latent_cache

    if args.dataset is not None or args.source or args.data_dir:
        raise UsageError("data encode reads the dataset of --config (data.dataset, data.data_dir); give no dataset, "
                         "--source or --data-dir")  # fmt: skip
    if args.config is None or args.out is None:
        raise UsageError("data encode needs --config CFG (its data and latent.autoencoder) and --out DIR")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
    config = load_config(args.config, extra)
    check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    out, header = encode_latent_cache(config, args.out, batch_size=args.batch_size)
    dataset, autoencoder = header["dataset"], header["autoencoder"]
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    print(f"encoded {dataset['num_examples']} images ({len(dataset['class_names'])} classes, {header['flips']} "
          f"orientation{'s' if header['flips'] == 2 else ''}) of {dataset['dataset']} {dataset['data_dir']} through "
          f"{autoencoder['path']} (sha256 {autoencoder['sha256'][:12]}) -> {out} ({size / 2**20:.1f} MiB)")
    return 0
