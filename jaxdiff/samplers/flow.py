"""Samplers in the time t of a process: the flow processes' own samplers (euler, heun, midpoint, SiT's SDE), and
the same ODE steps on the other processes' probability-flow drift.

On a flow process (`jaxdiff.processes.FlowProcess`, x_t = α·x_0 + σ·ε, t = 1 noise) a sampler sees the model as
a velocity field u(x_t, t) (`jaxdiff.diffusion.flow.velocity_field`: a `FlowModel`'s own, exact at t = 1 and
t = 0, or one derived from a plain D(x; σ), evaluated at t clipped to [t_min, t_max]) and integrates from x_T
~ N(0, I) at t = 1 to t = 0 on the grid
  `flow_time_grid`: steps + 1 times shift(1 − i/steps), i = 0..steps (the last 0), shift(t) = s·t/(1 + (s − 1)·t)
  (`flow.shift_time`; s = 1: uniform). This is diffusers' FlowMatchEulerDiscreteScheduler's grid with
  `set_timesteps(sigmas=linspace(1, 1/steps, steps))` (Flux's pipeline) and `shift` s, or `use_dynamic_shifting`
  with s = exp(μ); its default `set_timesteps(steps)` (SD3's pipeline) ends the linspace at its shifted
  σ_min = shift(1/num_train_timesteps) before shifting (`flow_time_grid(..., t_last=...)`).
Each step from t to t' (dt = t' − t < 0):
  euler     x' = x + dt·u(x, t)                                      (steps evaluations; = diffusers' step)
  heun      x̃ = x + dt·u(x, t);  x' = x + dt/2·(u(x, t) + u(x̃, t'))   (2·steps)
  midpoint  x' = x + dt·u(x + dt/2·u(x, t), t + dt/2)                 (2·steps)
  euler_maruyama  SiT's SDE sampler (transport.Sampler.sample_sde, its time reversed: SiT's τ = 1 − t): with
            w(t) the diffusion coefficient and the score s = −ε̂/σ (ε̂ from u and x_t),
              x' = x + dt·(u − w·s) + sqrt(2·w·|dt|)·z
            on shift(linspace(1, h, steps)), then one last step from t = h' (its last time) to 0:
              mean     x + (−h')·(u − w·s)          (the SDE's drift without noise; SiT's default)
              euler    x + (−h')·u                  (the probability-flow ODE's)
              tweedie  x̂_0 = (σ'·x − σ·u)/(ασ' − σα')   (the denoised state)
              none     x itself (h = 0: the grid ends at 0, steps − 1 evaluations)
            w(t) (`diffusion_form`, SiT's names, scaled by `diffusion_norm` = c): constant c; sigma c·σ(t);
            linear c·t; decreasing ¼(1 − c·cos πt)²; increasing-decreasing c·sin²(πt). SiT's "SBDM"
            (½g(t)², the score SDE's own) is infinite at t = 1 on both interpolants, where SiT starts its
            velocity models, so it is not offered. Defaults are SiT's sample.py: sigma, 1, mean, h = 0.04,
            250 steps (= evaluations). Step i draws z from `grids.step_noise(noise_key, i, x)`.
On the other processes `euler` and `midpoint` run the same ODE steps on the probability-flow drift
dx_t/dt = f − ½g²·∇log p_t over `grids.time_grid` (t_max to t_min, uniform, as the SDE samplers), then
x̂_0 = D at t_min (one more evaluation); `heun` and `euler_maruyama` keep their σ-based runs there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.denoisers import denoise_state, probability_flow_drift
from jaxdiff.diffusion.flow import coefficients, shift_time, to_x0_eps, velocity_field
from jaxdiff.errors import UsageError
from jaxdiff.samplers.grids import batch, scan_steps, step_noise, time_grid

Array = jax.Array

ODE_METHODS = {"euler": 1, "heun": 2, "midpoint": 2}  # method -> evaluations per step
DIFFUSION_FORMS = ("constant", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "euler", "tweedie", "none")


def flow_time_grid(steps: int, shift: float = 1.0, t_last: float | None = None) -> Array:
    """float32 [steps + 1]: shift(linspace(1, t_last, steps)) then 0, computed in float64; t_last None is 1/steps
    (the uniform grid 1, 1 − 1/steps, ..., 0 before the shift)."""
    base = np.linspace(1.0, 1.0 / steps if t_last is None else t_last, steps)
    return jnp.asarray(np.append(shift_time(base, shift), 0.0), jnp.float32)


def ode_steps(velocity, x: Array, times: Array, method: str = "euler") -> Array:
    """x at times[-1] from x at times[0] by `method` (euler, heun, midpoint) on the grid `times` [N + 1], with
    `velocity(x, t [B]) -> dx/dt`."""

    def step(carry, row):
        x, extra = carry
        t, t_next = row["t"], row["t_next"]
        dt = t_next - t
        slope = velocity(x, batch(t, x))
        if method == "euler":
            return x + dt * slope, extra
        if method == "heun":
            return x + 0.5 * dt * (slope + velocity(x + dt * slope, batch(t_next, x))), extra
        return x + dt * velocity(x + 0.5 * dt * slope, batch(t + 0.5 * dt, x)), extra

    (x, _), _ = scan_steps(step, (x, ()), {"t": times[:-1], "t_next": times[1:]})
    return x


def flow_ode_sample(denoiser, process, x_T, noise_key, steps, *, method, shift=1.0):
    """The flow run of euler/heun/midpoint: (x_0, ODE_METHODS[method]·steps) from x_T at t = 1."""
    del noise_key
    x0 = ode_steps(velocity_field(denoiser, process), x_T, flow_time_grid(steps, shift), method)
    return x0, ODE_METHODS[method] * steps


def time_ode_sample(denoiser, process, x_T, noise_key, steps, *, method):
    """euler/midpoint on a σ-based process: the probability-flow ODE from t_max to t_min on `time_grid`, then
    x̂_0 = D at t_min: (x̂_0, ODE_METHODS[method]·steps + 1)."""
    del noise_key

    def drift(x, t):
        return probability_flow_drift(denoiser, process, x, t)

    x = ode_steps(drift, x_T, time_grid(process, steps), method)
    return denoise_state(denoiser, process, x, process.t_min), ODE_METHODS[method] * steps + 1


def diffusion_coefficient(form: str, norm: float, process, t: Array) -> Array:
    """SiT's w(t) of `form` (module docstring) at t [B]."""
    if form == "constant":
        return jnp.full_like(t, norm)
    if form == "sigma":
        return norm * process.sigma(t)
    if form == "linear":
        return norm * t
    if form == "decreasing":
        return 0.25 * (1.0 - norm * jnp.cos(jnp.pi * t)) ** 2
    return norm * jnp.sin(jnp.pi * t) ** 2


def sit_sde_sample(denoiser, process, x_T, noise_key, steps, *, shift=1.0, diffusion_form="sigma",
                   diffusion_norm=1.0, last_step="mean", last_step_size=0.04):  # fmt: skip
    """SiT's Euler–Maruyama sampler (module docstring): (x_0, steps evaluations, steps − 1 with last_step none)."""
    if steps < 2:
        raise UsageError(f"steps={steps} must be >= 2 for sampler 'euler_maruyama' on a flow process (SiT's grid "
                         "has steps times: steps − 1 SDE steps, then the last step)")  # fmt: skip
    velocity = velocity_field(denoiser, process)
    last = 0.0 if last_step == "none" else last_step_size
    times = jnp.asarray(shift_time(np.linspace(1.0, last, steps), shift), jnp.float32)

    def drift(x, t):
        """(the SDE's drift in t: u − w·score, u)."""
        u = velocity(x, t)
        c = coefficients(process, t, x)
        _, eps = to_x0_eps("velocity", u, x, c)
        w = jnp.reshape(diffusion_coefficient(diffusion_form, diffusion_norm, process, t), c.alpha.shape)
        return u + w * eps / c.sigma, u, w

    def step(carry, row):
        x, extra = carry
        t = batch(row["t"], x)
        dt = row["t_next"] - row["t"]
        sde_drift, _, w = drift(x, t)
        return x + dt * sde_drift + jnp.sqrt(-2.0 * w * dt) * step_noise(noise_key, row["i"], x), extra

    (x, _), _ = scan_steps(step, (x_T, ()), {"t": times[:-1], "t_next": times[1:]})
    if last_step == "none":
        return x, steps - 1
    t = batch(times[-1], x)
    sde_drift, u, _ = drift(x, t)
    if last_step == "mean":
        x0 = x - times[-1] * sde_drift
    elif last_step == "euler":
        x0 = x - times[-1] * u
    else:
        c = coefficients(process, t, x)
        x0 = to_x0_eps("velocity", u, x, c)[0]
    return x0, steps

