"""The sampler flags that `sample` and `eval` share: declaring them on a verb's parser, and turning them into
the sampler and the model's sampling settings, checked before any work."""

from __future__ import annotations

import argparse

from jaxdiff.cli.errors import UsageError
from jaxdiff.samplers.registry import config_options, samplers_for

# Options of the continuous samplers, from the sampler registry: flag attribute -> config.sampling key. (eta, which
# the discrete schedule takes too, is `sample`'s --eta, declared with --spacing in `parser`.)
SAMPLER_OPTIONS = {name: name for name in config_options() if name != "eta"}


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    families = {"discrete models": ("discrete", "ddpm"), "continuous models": ("continuous", "the config's"),
                "Stable Diffusion (--pretrained, --prompt)": ("latent", "ddim")}  # fmt: skip
    parser.add_argument("--sampler", help="; ".join(f"{who}: {' | '.join(samplers_for(family))} (default: {default})"
                                                    for who, (family, default) in families.items()))  # fmt: skip
    parser.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim; the sampler's)")
    options = config_options()
    for name in SAMPLER_OPTIONS:
        _, spec, users = options[name]
        what = " | ".join(spec.choices) if spec.choices else spec.meaning
        parser.add_argument("--" + name.replace("_", "-"), type=spec.type, help=f"{', '.join(users)}: {what}")


def sampler_settings(pipe, args) -> str:
    """The sampler to use; the continuous sampler options given as flags become the model's sampling settings.

    Every setting is checked here, before any work (a bad one is a ValueError).
    """
    options = {key: getattr(args, flag) for flag, key in SAMPLER_OPTIONS.items() if getattr(args, flag) is not None}
    users = config_options()  # config key -> (default, spec, the samplers that take it)
    refused = [flag for flag, key in SAMPLER_OPTIONS.items()
               if key in options and not set(users[key][2]) & set(pipe.family.samplers)]  # fmt: skip
    if refused:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in refused)
        raise UsageError(f"{flags}: options of the continuous-time samplers; no sampler of this model's family "
                         f"({pipe.family.name}) takes them")  # fmt: skip
    sampler, _, _ = pipe.sampling_settings(args.sampler, args.steps, eta=getattr(args, "eta", None) or 0.0,
                                           spacing=getattr(args, "spacing", None), **options)  # fmt: skip
    pipe.config.sampling.update(options)
    return sampler
