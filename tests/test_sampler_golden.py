"""Golden outputs of every sampler × family on fixed seeds and tiny shapes, recorded from the code before the
sampler registry refactor (DDIM, DPM-Solver++ and Heun written once on σ grids): the refactored samplers must
reproduce them at float32 tolerance.

Record them again (only when a sampler's output is meant to change) with
`JAXDIFF_WRITE_GOLDEN=1 python -m pytest -q tests/test_sampler_golden.py`, which writes
tests/data/sampler_golden.npz instead of comparing.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.latent.schedulers import (
    LATENT_SAMPLERS,
    SIGMA_SAMPLERS,
    KARRAS_SAMPLERS,
    denoise,
    denoise_on_levels,
    initial_scale,
    pndm_points,
    sampler_levels,
    sampler_scheduler,
    step_plan,
    visited_timesteps,
)
from jaxdiff.processes import make_process
from jaxdiff.samplers import CONTINUOUS_SAMPLERS, SPACINGS, sample, sample_continuous
from jaxdiff.schedule import make_schedule

GOLDEN = pathlib.Path(__file__).parent / "data" / "sampler_golden.npz"
WRITE = os.environ.get("JAXDIFF_WRITE_GOLDEN") == "1"
# Float32 rounding in a state of magnitude m is about m·2⁻²⁴ per operation and accumulates over the steps, so the
# absolute tolerance scales with the output's largest magnitude (σ up to 80 leaves EDM and VE outputs at tens):
# XLA:CPU's two code generators (its fusion emitters and its loop emitters) round differently by up to 2e-5 there.
RTOL = ATOL = 1e-5
# The adaptive ODE sampler (rtol = atol = 1e-5 per step) accepts different step sizes when another XLA version
# rounds differently: its outputs move by up to 7e-5 between JAX 0.10 and 0.12, far below what a wrong step
# rule gives, so its golden tolerance is 1e-3.
ADAPTIVE_TOL = 1e-3
MU, S = 0.5, 0.4  # the data: x_0 ~ N(MU, S²·I)
SHAPE = (2, 4, 4, 1)
SCHEDULE = make_schedule("linear", 100)
AC = np.cumprod(1.0 - np.asarray(SCHEDULE.betas, np.float64))
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def _expand(v, x):
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def gaussian_denoiser(x, sigma):
    """The exact D(x; σ) = E[x_0 | x_0 + σ·n = x] for x_0 ~ N(MU, S²·I)."""
    s = _expand(sigma, x)
    return (S**2 * x + s**2 * MU) / (S**2 + s**2)


def eps_model(alphas_cumprod):
    """E[ε | x_t] at integer step t of a schedule with ᾱ `alphas_cumprod`: the exact ε-model of the Gaussian data."""
    table = jnp.asarray(alphas_cumprod, jnp.float32)

    def eps_fn(x_t, t):
        a = _expand(table[t], x_t)
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

    return eps_fn


def _key(seed=0):
    return jax.random.PRNGKey(seed)


# --------------------------------------------------------------------------- cases: name -> () -> array


def _discrete_cases():
    cases = {}
    eps_fn = eps_model(AC)
    for spacing in SPACINGS:
        for name, kw in [("ddpm", {}), ("ddim", {}), ("ddim-eta0.5", {"eta": 0.5}), ("dpm_solver++", {}),
                         ("heun", {})]:  # fmt: skip
            sampler = name.split("-")[0]
            cases[f"discrete/{name}/{spacing}"] = lambda s=sampler, sp=spacing, kw=kw: sample(
                eps_fn, SCHEDULE, SHAPE, _key(1), sampler=s, steps=8, spacing=sp, **kw)  # fmt: skip
    for sampler in ("ddpm", "ddim", "dpm_solver++", "heun"):
        cases[f"discrete/{sampler}/default-steps"] = lambda s=sampler: sample(eps_fn, SCHEDULE, SHAPE, _key(2),
                                                                             sampler=s)  # fmt: skip
        cases[f"discrete/{sampler}/one-step"] = lambda s=sampler: sample(eps_fn, SCHEDULE, SHAPE, _key(3),
                                                                        sampler=s, steps=1)  # fmt: skip

    # the x0 and v parameterisations, unclipped, and the trajectory (the latent DDIM reads its frames)
    def x0_fn(x_t, t):
        a = _expand(jnp.asarray(AC, jnp.float32)[t], x_t)
        return (x_t - jnp.sqrt(1 - a) * eps_fn(x_t, t)) / jnp.sqrt(a)

    def v_fn(x_t, t):
        a = _expand(jnp.asarray(AC, jnp.float32)[t], x_t)
        return jnp.sqrt(a) * eps_fn(x_t, t) - jnp.sqrt(1 - a) * x0_fn(x_t, t)

    for sampler in ("ddim", "dpm_solver++", "heun"):
        cases[f"discrete/{sampler}/x0-unclipped"] = lambda s=sampler: sample(
            x0_fn, SCHEDULE, SHAPE, _key(4), sampler=s, steps=6, mean_type="x_start", clip_denoised=False)  # fmt: skip
        cases[f"discrete/{sampler}/v"] = lambda s=sampler: sample(v_fn, SCHEDULE, SHAPE, _key(5), sampler=s, steps=6,
                                                                  mean_type="v")  # fmt: skip
        cases[f"discrete/{sampler}/trajectory"] = lambda s=sampler: jnp.concatenate(sample(
            eps_fn, SCHEDULE, SHAPE, _key(6), sampler=s, steps=7, return_trajectory=True, trajectory_every=3)[1])  # fmt: skip
    cases["discrete/ddim-eta0.5/trajectory"] = lambda: jnp.concatenate(sample(
        eps_fn, SCHEDULE, SHAPE, _key(6), sampler="ddim", steps=7, eta=0.5, return_trajectory=True,
        trajectory_every=2)[1])  # fmt: skip
    return cases


CONTINUOUS_STEPS = {"euler_maruyama": 20, "reverse_diffusion": 20, "ancestral": 20, "pc": 10, "ode": None,
                    "heun": 6, "edm_stochastic": 6, "dpm_solver++": 7, "ddim": 7, "euler": 8, "midpoint": 6}  # fmt: skip
CONTINUOUS_OPTIONS = {"edm_stochastic": {"s_churn": 10.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003},
                      "pc": {"corrector": "ald"}}  # fmt: skip


def _continuous_cases():
    cases = {}
    for process_name in ("ve", "vp", "edm"):
        process = make_process(process_name)
        for sampler in CONTINUOUS_SAMPLERS:
            cases[f"continuous/{sampler}/{process_name}"] = lambda s=sampler, p=process: sample_continuous(
                gaussian_denoiser, p, SHAPE, _key(7), sampler=s, steps=CONTINUOUS_STEPS[s],
                **CONTINUOUS_OPTIONS.get(s, {}))  # fmt: skip
        cases[f"continuous/ddim-eta0.5/{process_name}"] = lambda p=process: sample_continuous(
            gaussian_denoiser, p, SHAPE, _key(8), sampler="ddim", steps=7, eta=0.5)  # fmt: skip
        cases[f"continuous/pc-langevin/{process_name}"] = lambda p=process: sample_continuous(
            gaussian_denoiser, p, SHAPE, _key(9), sampler="pc", steps=10, clip_denoised=True)  # fmt: skip
    return cases


def _latent_cases():
    """The latent step code on diffusers' grids of SD 1.x's scheduler, with the exact Gaussian model (no U-Net)."""
    settings = scheduler_settings(SD1_SCHEDULER, "golden")
    ac = np.asarray(settings.schedule.alphas_cumprod, np.float64)
    x_start = jax.random.normal(_key(10), SHAPE, jnp.float32)
    cases = {}
    for sampler in LATENT_SAMPLERS:
        for karras in (False, True) if sampler in KARRAS_SAMPLERS else (False,):
            name = f"latent/{sampler}{'-karras' if karras else ''}"
            if sampler in SIGMA_SAMPLERS:

                def run(sampler=sampler, karras=karras):
                    scheduler = sampler_scheduler(settings, sampler)
                    levels = sampler_levels(scheduler, 5, sampler=sampler, karras=karras)
                    x = x_start * initial_scale(scheduler, sampler, levels[0])
                    return denoise_on_levels(gaussian_denoiser, levels, x, sampler=sampler, scheduler=scheduler,
                                             rng=_key(11))  # fmt: skip
            else:

                def run(sampler=sampler):
                    scheduler = sampler_scheduler(settings, sampler)
                    if sampler == "pndm":  # the plan of PNDM's model calls (and its stride), as diffusers runs them
                        points = pndm_points(scheduler, 5)
                        plan = step_plan(scheduler, points, sampler)
                        return denoise(eps_model(ac[points[::-1]]), plan, x_start, _key(11), sampler=sampler)
                    plan = step_plan(scheduler, visited_timesteps(scheduler, 5))
                    return denoise(eps_model(ac[plan.timesteps[::-1]]), plan, x_start, _key(11), sampler=sampler)

            cases[name] = run
    return cases


CASES = {**_discrete_cases(), **_continuous_cases(), **_latent_cases()}


@pytest.fixture(scope="module")
def golden():
    if WRITE:
        written = dict(np.load(GOLDEN)) if GOLDEN.exists() else {}
        yield written
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez(GOLDEN, **written)
    else:
        if not GOLDEN.exists():
            pytest.fail(f"{GOLDEN} is missing: record it with JAXDIFF_WRITE_GOLDEN=1")
        yield dict(np.load(GOLDEN))


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_its_golden_output(golden, name):
    out = np.asarray(CASES[name]())
    assert np.all(np.isfinite(out)), name
    if WRITE:
        golden[name] = out
        return
    assert name in golden, f"no golden output for {name}: record it with JAXDIFF_WRITE_GOLDEN=1"
    scale = max(1.0, float(np.max(np.abs(golden[name]))))
    tol = ADAPTIVE_TOL if "/ode/" in name else None
    np.testing.assert_allclose(out, golden[name], rtol=tol or RTOL, atol=tol or ATOL * scale, err_msg=name)
