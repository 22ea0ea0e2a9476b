"""The sampler flags that `sample` and `eval` share: declaring them on a verb's parser, and turning them into
the sampler and the model's sampling settings, checked before any work."""

from __future__ import annotations

import argparse
import os

from jaxdiff.cli.errors import UsageError
from jaxdiff.samplers.registry import config_options, flow_config_options, samplers_for

# Options of the continuous samplers, from the sampler registry: flag attribute -> config.sampling key. (eta, which
# the discrete schedule takes too, is `sample`'s --eta, declared with --spacing in `parser`.)
SAMPLER_OPTIONS = {name: name for name in config_options() if name != "eta"}
# Options of those samplers' runs on the flow processes (shift; SiT's SDE settings), read by the flow family only.
FLOW_OPTIONS = {name: name for name in flow_config_options()}
FLOW_FAMILY = "flow"
# The tasks whose workdirs `Pipeline.from_checkpoint` samples with the family's own samplers, so that their flags
# can be checked on the saved config before the parameters are read.
FAMILY_SAMPLED_TASKS = ("diffusion", "class_latent")


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    families = {"discrete models": ("discrete", "ddpm"), "continuous models": ("continuous", "the config's"),
                "Stable Diffusion (--pretrained, --prompt)": ("latent", "the folder's scheduler class")}  # fmt: skip
    parser.add_argument("--sampler", help="; ".join(f"{who}: {' | '.join(samplers_for(family))} (default: {default})"
                                                    for who, (family, default) in families.items()))  # fmt: skip
    parser.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim; the sampler's)")
    declared = [(name, config_options()[name], "") for name in SAMPLER_OPTIONS]
    declared += [(name, flow_config_options()[name], "flow processes, ") for name in FLOW_OPTIONS]
    for name, (_, spec, users), where in declared:
        what = " | ".join(spec.choices) if spec.choices else spec.meaning
        parser.add_argument("--" + name.replace("_", "-"), type=spec.type, help=f"{where}{', '.join(users)}: {what}")


def checked_sampler(source, family, args) -> tuple[str, dict]:
    """(the sampler, the config.sampling options given as flags) for a model of `family` whose samplers `source`
    checks (`sampling_settings`: the family itself, or a diffusers scheduler's steps); the options become the
    model's `config.sampling`. Every setting is checked here, before any work (a bad one is a ValueError); needs no
    parameters, so it runs before a model is read as well."""
    flags = {**SAMPLER_OPTIONS, **FLOW_OPTIONS}
    options = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag) is not None}
    users = config_options()  # config key -> (default, spec, the samplers that take it)
    refused = [flag for flag, key in SAMPLER_OPTIONS.items()
               if key in options and not set(users[key][2]) & set(family.samplers)]  # fmt: skip
    _refuse(refused, "options of the continuous-time samplers", family)
    refused = [flag for flag, key in FLOW_OPTIONS.items() if key in options and family.name != FLOW_FAMILY]
    _refuse(refused, "options of the flow processes' samplers (flow, gvp)", family)
    sampler, _, _ = source.sampling_settings(args.sampler, args.steps, eta=getattr(args, "eta", None) or 0.0,
                                             spacing=getattr(args, "spacing", None), **options)  # fmt: skip
    return sampler, options


def saved_run(workdir: str, step: int | None) -> tuple[str | None, object | None]:
    """(task, family) of a jaxdiff workdir from its saved config alone, before its parameters are read: the family
    for the tasks sampled with their family's own samplers (`FAMILY_SAMPLED_TASKS`), else None; (None, None) for
    weights of other formats and when no step's config reads (loading then says why)."""
    from jaxdiff.families import family_of
    from jaxdiff.readers.formats import detect_format
    from jaxdiff.training.checkpoint import checkpoint_dir
    from jaxdiff.training.runs import run_config

    if not os.path.isdir(checkpoint_dir(workdir)) or detect_format(workdir) != "jaxdiff":
        return None, None  # not a workdir, or weights of another format: loading reads or refuses them
    config = run_config(workdir, step=step)
    if config is None:
        return None, None
    return config.task, family_of(config) if config.task in FAMILY_SAMPLED_TASKS else None


def _refuse(flags: list[str], what: str, family) -> None:
    """A UsageError naming the `flags` (attribute names) given, when there are any: `what` they are, which no
    sampler of the model's `family` takes."""
    if flags:
        given = ", ".join("--" + flag.replace("_", "-") for flag in flags)
        raise UsageError(f"{given}: {what}; no sampler of this model's family ({family.name}) takes them")
