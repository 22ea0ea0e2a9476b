"""The sampler flags that `sample` and `eval` share: declaring them on a verb's parser, and turning them into
the sampler and the model's sampling settings, checked before any work."""

from __future__ import annotations

import argparse

from jaxdiff.cli.errors import UsageError

# Options of the continuous samplers: flag attribute -> config.sampling key.
SAMPLER_OPTIONS = {
    "predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_corrector": "n_corrector", "rtol": "rtol",
    "atol": "atol", "s_churn": "s_churn", "s_min": "s_min", "s_max": "s_max", "s_noise": "s_noise",
}  # fmt: skip


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", help="discrete models: ddpm (default) | ddim | dpm_solver++ | heun; continuous "
                        "models: euler_maruyama | reverse_diffusion | ancestral | pc | ode | heun | edm_stochastic | "
                        "dpm_solver++ | ddim (default: the config's)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="sampling steps (default: all T for ddpm/ddim; the sampler's)")
    parser.add_argument("--predictor", help="pc: euler_maruyama | reverse_diffusion | ancestral")
    parser.add_argument("--corrector", help="pc: langevin | ald | none")
    parser.add_argument("--snr", type=float, help="pc: corrector signal-to-noise ratio")
    parser.add_argument("--n-corrector", type=int, help="pc: corrector steps per predictor step")
    parser.add_argument("--rtol", type=float, help="ode (and the ODE bits/dim of eval): relative tolerance")
    parser.add_argument("--atol", type=float, help="ode (and the ODE bits/dim of eval): absolute tolerance")
    parser.add_argument("--s-churn", type=float, help="edm_stochastic: S_churn")
    parser.add_argument("--s-min", type=float, help="edm_stochastic: S_min")
    parser.add_argument("--s-max", type=float, help="edm_stochastic: S_max")
    parser.add_argument("--s-noise", type=float, help="edm_stochastic: S_noise")


def sampler_settings(pipe, args) -> str:
    """The sampler to use; the continuous sampler options given as flags become the model's sampling settings.

    Every setting is checked here, before any work (a bad one is a ValueError).
    """
    options = {key: getattr(args, flag) for flag, key in SAMPLER_OPTIONS.items() if getattr(args, flag) is not None}
    if options and not pipe.continuous:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in SAMPLER_OPTIONS if getattr(args, flag) is not None)
        raise UsageError(f"{flags}: options of the continuous-time samplers; this model has the discrete schedule")
    sampler, _, _ = pipe.sampling_settings(args.sampler, args.steps, eta=getattr(args, "eta", 0.0),
                                           spacing=getattr(args, "spacing", None), **options)  # fmt: skip
    pipe.config.sampling.update(options)
    return sampler
