"""Continuous-time samplers and the ODE likelihood on this machine: evaluations, images/s, compile time.

The model is a tiny SongUNet with EDM's preconditioning, random weights (speed does not depend on them;
the ODE's adaptive step counts do, so its evaluations are those of this untrained network): 8×8×1
images, 32 channels, levels 8 and 4 pixels, one block each, attention at 4 (the `digits_edm` network).
Every sampler sees the same D(x; σ); the SDE samplers run on score_sde's VE process (σ in [0.01, 50],
1,000 steps, as score_sde), the others on EDM's (σ in [0.002, 80]).

  images/s      batch / median wall time of the jitted sampler over `--repeats` rounds; the samplers
                alternate within each round (after one warm-up call each), so all see the same load
  evaluations   denoiser calls per batch, as the sampler reports them (the ODE's: its solver's count)
  compile       trace+lower and XLA compile seconds of Heun with 18 and with 1,000 steps (one scan: flat)
  likelihood    `ode_log_likelihood` per image at batch `--likelihood-batch`: evaluations and seconds,
                Hutchinson (Rademacher) and the exact divergence (64 JVPs per evaluation at 8×8×1)

The machine's 1/5/15-minute load averages are printed before and after.

    python benchmarks/continuous_samplers.py [--batch 64] [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
from sampling import compile_seconds  # benchmarks/sampling.py: scripts here run with benchmarks/ on sys.path

from jaxdiff.diffusion.continuous import model_denoiser
from jaxdiff.evaluation.ode_likelihood import ode_log_likelihood
from jaxdiff.models import count_parameters, create_model, example_inputs
from jaxdiff.processes import make_process
from jaxdiff.config.recipes import recipe
from jaxdiff.samplers import sample_continuous

# (label, process, sampler, steps (None: the sampler's own), options)
RUNS = (
    ("pc reverse_diffusion+langevin", "ve", "pc", 1000, {"predictor": "reverse_diffusion", "corrector": "langevin"}),
    ("euler_maruyama", "ve", "euler_maruyama", 1000, {}),
    ("ode (tsit5, 1e-5)", "ve", "ode", None, {}),
    ("heun (edm)", "edm", "heun", 18, {}),
    ("edm_stochastic (churn 40)", "edm", "edm_stochastic", 18, {"s_churn": 40.0, "s_min": 0.05, "s_max": 50.0,
                                                                 "s_noise": 1.003}),
    ("dpm_solver++ (2M)", "edm", "dpm_solver++", 20, {}),
    ("ddim", "edm", "ddim", 50, {}),
)  # fmt: skip
COMPILE_STEPS = (18, 1000)
DIVERGENCES = ("rademacher", "exact")


def tiny_denoiser():
    """(config, parameter count, D(x; σ)) of the tiny SongUNet with EDM preconditioning (random weights)."""
    config = recipe("digits_edm")
    model = create_model(config.model)
    params = model.init({"params": jax.random.key(0)}, *example_inputs(config.model), train=False)["params"]
    denoiser = model_denoiser(config, model, params, make_process("edm"))
    return config, count_parameters(params), denoiser


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def sampler_table(denoiser, shape, repeats: int) -> list[dict]:
    """One row per entry of RUNS: evaluations per batch and median images/s, the samplers alternating."""
    rng = jax.random.key(1)
    runs = []
    for label, process_name, sampler, steps, options in RUNS:
        run = jax.jit(functools.partial(sample_continuous, denoiser, make_process(process_name), shape,
                                        sampler=sampler, steps=steps, return_nfe=True, **options))  # fmt: skip
        _, nfe = jax.block_until_ready(run(rng))  # warm-up: compiles
        runs.append((label, process_name, run, int(nfe)))
    seconds = {label: [] for label, *_ in runs}
    for _ in range(repeats):
        for label, _, run, _ in runs:
            seconds[label].append(timed(run, rng))
    rows = []
    for label, process_name, _, nfe in runs:
        median = statistics.median(seconds[label])
        rows.append(dict(sampler=label, process=process_name, evaluations=nfe, seconds=median,
                         images_per_second=shape[0] / median))  # fmt: skip
    return rows


def compile_table(denoiser, shape) -> list[dict]:
    rng = jax.random.key(2)
    rows = []
    for steps in COMPILE_STEPS:
        fn = functools.partial(sample_continuous, denoiser, make_process("edm"), shape, sampler="heun", steps=steps)
        traced, compiled = compile_seconds(fn, rng)
        rows.append(dict(sampler="heun", steps=steps, trace_lower_seconds=traced, compile_seconds=compiled))
    return rows


def likelihood_table(denoiser, shape, repeats: int) -> list[dict]:
    """ODE log-likelihood per image on the VE process (score_sde's likelihood setting), each divergence."""
    process = make_process("ve")
    x = jax.random.uniform(jax.random.key(3), shape, minval=-1.0, maxval=1.0)
    rng = jax.random.key(4)
    runs = []
    for divergence in DIVERGENCES:
        run = functools.partial(ode_log_likelihood, denoiser, process, divergence=divergence)
        _, nfe = jax.block_until_ready(run(x, rng))
        runs.append((divergence, run, int(nfe)))
    seconds = {divergence: [] for divergence, *_ in runs}
    for _ in range(repeats):
        for divergence, run, _ in runs:
            seconds[divergence].append(timed(run, x, rng))
    return [dict(divergence=divergence, batch=shape[0], evaluations_per_image=nfe,
                 seconds_per_image=statistics.median(seconds[divergence]) / shape[0])
            for divergence, _, nfe in runs]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per sampling batch")
    parser.add_argument("--likelihood-batch", type=int, default=16, help="images per likelihood batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    config, parameters, denoiser = tiny_denoiser()
    m = config.model
    shape = (args.batch, m.image_size, m.image_size, m.in_channels)
    result = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                  parameters=parameters, image_shape=list(shape[1:]), batch=args.batch, repeats=args.repeats,
                  load_before=load())  # fmt: skip
    print(f"jax {jax.__version__} on {result['device']} ({result['cpus']} CPUs); tiny SongUNet (EDM precond, random "
          f"weights), {parameters:,} parameters; {m.image_size}x{m.image_size}x{m.in_channels}")  # fmt: skip
    print(f"load average before: {result['load_before']}")

    result["samplers"] = sampler_table(denoiser, shape, args.repeats)
    print(f"batch {args.batch}, median of {args.repeats} alternating rounds")
    print(f"{'sampler':30s}{'process':>8s}{'evals':>7s}{'seconds':>9s}{'images/s':>10s}")
    for row in result["samplers"]:
        print(f"{row['sampler']:30s}{row['process']:>8s}{row['evaluations']:7d}{row['seconds']:9.3f}"
              f"{row['images_per_second']:10.1f}")  # fmt: skip

    result["compile"] = compile_table(denoiser, shape)
    print("compile time of heun, jax.jit(sample_continuous).lower(rng).compile():")
    for row in result["compile"]:
        print(f"  steps {row['steps']:5d}: trace+lower {row['trace_lower_seconds']:.2f} s, "
              f"compile {row['compile_seconds']:.2f} s")  # fmt: skip

    likelihood_shape = (args.likelihood_batch, *shape[1:])
    result["likelihood"] = likelihood_table(denoiser, likelihood_shape, args.repeats)
    print(f"ODE log-likelihood (VE process, tsit5, rtol = atol = 1e-5), batch {args.likelihood_batch}:")
    for row in result["likelihood"]:
        print(f"  {row['divergence']:11s} {row['evaluations_per_image']:6d} evaluations/image, "
              f"{row['seconds_per_image']:.3f} s/image")  # fmt: skip

    result["load_after"] = load()
    print(f"load average after: {result['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
