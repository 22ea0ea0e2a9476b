"""The probability-flow ODE solved by diffrax (adaptive, compiled), and the solve shared with the likelihood."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff.checks import Spec
from jaxdiff.diffusion.denoisers import denoise_state, probability_flow_drift
from jaxdiff.errors import UsageError

Array = jax.Array

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
TOLERANCE = Spec(float, "tolerance", low=0, high=1, low_open=True, high_open=True)  # rtol, atol
STAGES_PER_STEP = 6  # both are 7-stage FSAL methods: 6 new evaluations per (accepted or rejected) step


def solve(vector_field, y0, t0, t1, *, rtol: float, atol: float, solver: str, max_steps: int):
    """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction) with a PID step controller.

    Returns (y1, nfe, ok, t_reached): nfe = 1 + 6·steps vector-field evaluations (int32), ok whether t1
    was reached within `max_steps`, t_reached the last time the solver accepted. Never throws, so it
    can run inside jit; `raise_if_failed` turns a concrete failure into an error.
    """
    saveat = diffrax.SaveAt(
        subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(steps=True, fn=lambda t, y, args: t)]
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
        SOLVERS[solver](),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    y1 = jax.tree.map(lambda leaf: leaf[0], sol.ys[0])
    times = sol.ys[1]
    finite = jnp.isfinite(times)
    lowest, highest = jnp.min(jnp.where(finite, times, jnp.inf)), jnp.max(jnp.where(finite, times, -jnp.inf))
    t_reached = jnp.where(jnp.any(finite), jnp.where(t1 < t0, lowest, highest), t0)
    nfe = 1 + STAGES_PER_STEP * sol.stats["num_steps"]
    return y1, nfe, sol.result == diffrax.RESULTS.successful, t_reached


def raise_if_failed(ok, t_reached, t1, max_steps: int, what: str) -> None:
    """Raises when a concrete `solve` did not reach t1 (inside jit there is nothing to check)."""
    if isinstance(ok, jax.core.Tracer):
        return
    if not bool(ok):
        raise RuntimeError(
            f"{what}: the ODE solver stopped at t={float(t_reached):.6g} before t={float(t1):.6g} "
            f"(max_steps={max_steps} reached or the step size collapsed); raise max_steps or loosen rtol/atol"
        )


def ode_sample(denoiser, process, x_T, noise_key, steps, *, rtol=1e-5, atol=1e-5, solver="tsit5", max_steps=4096):
    """The probability-flow ODE of the process from t_max to t_min, then x̂_0 = D at t_min.

    `steps` is unused (the solver is adaptive). Returns (x̂_0, nfe) with nfe = solver evaluations + 1.
    """
    del noise_key, steps
    t0, t1 = jnp.float32(process.t_max), jnp.float32(process.t_min)
    x_t, nfe, ok, t_reached = solve(
        lambda t, x: probability_flow_drift(denoiser, process, x, t),
        x_T, t0, t1, rtol=rtol, atol=atol, solver=solver, max_steps=max_steps,
    )  # fmt: skip
    raise_if_failed(ok, t_reached, process.t_min, max_steps, "sampler 'ode'")
    x0 = denoise_state(denoiser, process, x_t, t1)
    return jnp.where(ok, x0, jnp.nan), nfe + 1  # NaN, never a half-solved sample, when traced under jit


def check_solver(solver) -> None:
    if solver not in SOLVERS:
        raise UsageError(f"unknown ODE solver {solver!r}; expected one of {tuple(SOLVERS)}")


def check_tolerance(name: str, value) -> None:
    if not TOLERANCE.accepts(value, numpy=True):
        raise UsageError(f"{name}={value!r} must be {TOLERANCE.allowed()}")
