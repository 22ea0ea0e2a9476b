"""The verbs that prepare files: `convert` (weights between jaxdiff, diffusers and the official formats) and
`data prepare` (a dataset for training and evaluation, without TensorFlow)."""

from __future__ import annotations


from jaxdiff.cli.errors import reject_extra
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


