"""The verbs that prepare files: `convert` (weights between jaxdiff, diffusers and the official formats) and
`data prepare` (a dataset for training and evaluation, without TensorFlow)."""

from __future__ import annotations

import os

from jaxdiff.cli.errors import UsageError, reject_extra
from jaxdiff.cli.paths import check_output_dir, check_weights, reading_weights


def run_convert(args, extra) -> int:
    from jaxdiff.convert.formats import convert

    reject_extra(extra)
    check_weights(args.src, "SRC")
    check_output_dir(args.dst, "DST")
    with reading_weights(args.src):
        out = convert(args.src, args.dst, source_format=args.source_format, target_format=args.target_format,
                      step=args.step, dataset=args.dataset)  # fmt: skip
    print(f"{args.src} ({args.source_format or 'detected'}) -> {out} ({args.target_format})")
    return 0


def run_data(args, extra) -> int:
    from jaxdiff.data import prepare_dataset

    reject_extra(extra)
    if args.source and not os.path.exists(args.source):
        raise UsageError(f"--source {args.source!r} does not exist")
    out = prepare_dataset(args.dataset, args.data_dir or None, source=args.source)
    print(f"prepared {args.dataset} in {out}")
    return 0
