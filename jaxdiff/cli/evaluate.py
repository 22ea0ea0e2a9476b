"""The `eval` verb: FID / IS / precision-recall / bits-per-dim of a trained model, or (`eval stats`) a
dataset split's Inception statistics, cached."""

from __future__ import annotations

from jaxdiff.cli.errors import UsageError, reject_extra
from jaxdiff.cli.paths import check_output_dir, check_weights, load_pipeline
from jaxdiff.cli.sampler_flags import checked_sampler, saved_run
from jaxdiff.samplers.registry import config_options

# The ODE bits/dim's tolerances, which `--rtol` / `--atol` set (also those of the `ode` sampler where it draws).
LIKELIHOOD_FLAGS = ("rtol", "atol")


def _inception(path: str | None):
    """(params, SHA-256 of the weights file) of the FID Inception network."""
    from jaxdiff.evaluation.inception_weights import (
        file_sha256,
        find_weights,
        load_inception_params,
    )

    found = find_weights(path)
    return load_inception_params(found), file_sha256(found)


def _likelihood_tolerances(family, args, metrics) -> dict:
    """The `--rtol` / `--atol` given for the ODE bits/dim of a continuous model. They are taken off `args` where the
    sampler does not take them, so its check does not refuse them; elsewhere they stay the sampler's too."""
    if "bpd" not in metrics or family.likelihood != "ode":
        return {}
    given = {name: getattr(args, name) for name in LIKELIHOOD_FLAGS if getattr(args, name) is not None}
    sampler = args.sampler or family.default_sampler
    for name in given:
        if sampler not in config_options()[name][2]:
            setattr(args, name, None)
    return given


def _checked_flags(args, metrics, family, source) -> tuple[str, dict]:
    """(the sampler, the config.sampling settings the flags give) for a model of `family` whose samplers `source`
    checks; a bad flag is a ValueError."""
    likelihood = _likelihood_tolerances(family, args, metrics)
    sampler, options = checked_sampler(source, family, args)
    if args.bpd_num_t and family.likelihood != "vlb":
        raise UsageError("--bpd-num-t is for discrete-schedule models; continuous-time ones use the ODE likelihood")
    return sampler, {**options, **likelihood}


def _not_pixel_space(workdir: str) -> UsageError:
    """The refusal of evaluating a text-to-image run (`workdir`)."""
    return UsageError(f"eval scores pixel-space models; {workdir!r} is a text-to-image model (sample it with jaxdiff "
                      "sample --prompt)")  # fmt: skip


def run_eval(args, extra) -> int:
    reject_extra(extra)
    if args.what == "stats":
        from jaxdiff.evaluation.reference import dataset_statistics

        if not args.dataset:
            raise UsageError("eval stats needs --dataset")
        params, _ = _inception(args.inception_weights)
        mu, _ = dataset_statistics(args.dataset, args.split or "train", inception_params=params,
                                   data_dir=args.data_dir, batch_size=args.inception_batch_size)  # fmt: skip
        print(f"{args.dataset} {args.split or 'train'}: Inception statistics of dimension {mu.shape[0]} cached")
        return 0
    from jaxdiff.evaluation.evaluate import evaluate, parse_metrics
    from jaxdiff.latent.pipeline import LatentPipeline

    if not args.workdir:
        raise UsageError("eval needs --workdir")
    metrics = parse_metrics(args.metrics)
    check_weights(args.workdir)
    check_output_dir(args.workdir, "--workdir")
    if args.samples:
        check_output_dir(args.samples, "--samples")
    task, family = saved_run(args.workdir, args.step)  # the flags are checked before the parameters are read
    if task == "latent":
        raise _not_pixel_space(args.workdir)
    checked = None if family is None else _checked_flags(args, metrics, family, family)
    pipe = load_pipeline(args.workdir, args.step)
    if isinstance(pipe, LatentPipeline):
        raise _not_pixel_space(args.workdir)
    sampler, settings = checked or _checked_flags(args, metrics, pipe.family, pipe.sampler_source)
    pipe.config.sampling.update(settings)
    params, sha = _inception(args.inception_weights) if set(metrics) - {"bpd"} else (None, None)
    report = evaluate(
        pipe, args.workdir, metrics=metrics, num_samples=args.num_samples, sampler=sampler, steps=args.steps,
        seed=args.seed, shard_size=args.shard_size, samples_dir=args.samples, inception_params=params,
        inception_weights_sha256=sha, reference_path=args.reference, data_dir=args.data_dir,
        inception_batch=args.inception_batch_size, bpd_split=args.split,
        bpd_batch_size=args.bpd_batch_size, bpd_num_images=args.bpd_images, bpd_num_t=args.bpd_num_t,
    )  # fmt: skip
    for name, value in report["results"].items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0
