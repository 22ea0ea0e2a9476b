"""The flow samplers fed the exact velocity / D(x; σ) of Gaussian and Gaussian-mixture data: the data statistics,
determinism, the ODE likelihood against the analytic density, euler against diffusers' FlowMatchEulerDiscreteScheduler,
euler_maruyama against SiT's SDE loop written in NumPy in SiT's own time, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import flow
from jaxdiff.errors import UsageError
from jaxdiff.evaluation import ode_log_likelihood
from jaxdiff.processes import make_process
from jaxdiff.samplers import sample_continuous
from jaxdiff.samplers.flow import flow_time_grid, ode_steps
from jaxdiff.samplers.registry import check_options

MU, S = 0.5, 0.4
N, DIM = 1000, 2


def gaussian_velocity(process, mu=MU, s=S):
    """u(x_t, t) = α'·E[x_0|x_t] + σ'·E[ε|x_t] for x_0 ~ N(mu, s²): regular on all of [0, 1]."""

    def velocity(x_t, t):
        c = flow.coefficients(process, t, x_t)
        r = (x_t - c.alpha * mu) / (c.alpha**2 * s**2 + c.sigma**2)
        return c.d_alpha * (mu + c.alpha * s**2 * r) + c.d_sigma * c.sigma * r

    return velocity


def gaussian_denoiser(x, sigma):
    sg = sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
    return (S**2 * x + sg**2 * MU) / (S**2 + sg**2)


def mixture_velocity(process, weights, means, stds):
    """The exact velocity of the 1-D mixture Σ w_k N(m_k, s_k²): responsibilities times each component's."""
    w, m, s = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

    def velocity(x_t, t):
        c = flow.coefficients(process, t, x_t)
        a, sg = c.alpha[..., None], c.sigma[..., None]
        var = a**2 * s**2 + sg**2
        resp = jax.nn.softmax(jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (x_t[..., None] - a * m) ** 2 / var, axis=-1)
        r = (x_t[..., None] - a * m) / var
        u = c.d_alpha[..., None] * (m + a * s**2 * r) + c.d_sigma[..., None] * sg * r
        return jnp.sum(resp * u, axis=-1)

    return velocity


def model(process, kind="native"):
    """The Gaussian model as a FlowModel (its velocity) or as a plain D(x; σ)."""
    return flow.FlowModel(gaussian_velocity(process), process) if kind == "native" else gaussian_denoiser


CASES = [
    ("euler", 100, {}),
    ("euler", 100, {"shift": 3.0}),
    ("heun", 30, {}),
    ("midpoint", 30, {"shift": 0.5}),
    ("ode", None, {}),
    ("euler_maruyama", 250, {}),
    ("euler_maruyama", 250, {"last_step": "tweedie", "diffusion_form": "linear"}),
    ("euler_maruyama", 250, {"last_step": "euler", "diffusion_form": "constant", "shift": 2.0}),
    ("euler_maruyama", 300, {"last_step": "none", "diffusion_form": "decreasing", "diffusion_norm": 0.5}),
    ("euler_maruyama", 250, {"diffusion_form": "increasing-decreasing", "last_step_size": 0.02}),
]


@pytest.mark.parametrize("name", ["flow", "gvp"])
@pytest.mark.parametrize("kind", ["native", "denoiser"])
@pytest.mark.parametrize("sampler, steps, options", CASES, ids=lambda v: str(v))
def test_gaussian_data_statistics(name, kind, sampler, steps, options):
    """Mean and spread of N(0.5, 0.4²) within 5 standard errors plus a small discretisation allowance."""
    process = make_process(name)
    x = np.asarray(sample_continuous(model(process, kind), process, (N, DIM), jax.random.key(3), sampler=sampler,
                                     steps=steps, **options))  # fmt: skip
    assert x.dtype == np.float32 and x.shape == (N, DIM)
    assert abs(x.mean() - MU) < 5 * S / math.sqrt(N * DIM) + 0.01, x.mean()
    assert abs(x.std() / S - 1) < 5 / math.sqrt(2 * N * DIM) + 0.03, x.std()


@pytest.mark.parametrize("name", ["flow", "gvp"])
@pytest.mark.parametrize("sampler, steps, options", [("heun", 40, {}), ("euler_maruyama", 250, {"last_step_size": 0.01}),
                                                     ("ode", None, {})])  # fmt: skip
def test_mixture_weights(name, sampler, steps, options):
    """0.3·N(−1, 0.1²) + 0.7·N(1, 0.2²): the fraction of samples per mode within 4 standard errors. (SiT's default
    last step, a deterministic step from t = 0.04, leaves these narrow modes ~10% too narrow: a smaller one here.)"""
    process = make_process(name)
    velocity = flow.FlowModel(mixture_velocity(process, [0.3, 0.7], [-1.0, 1.0], [0.1, 0.2]), process)
    x = np.asarray(sample_continuous(velocity, process, (2000, 1), jax.random.key(5), sampler=sampler, steps=steps,
                                     **options))  # fmt: skip
    low = np.mean(x < 0)
    assert abs(low - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000), low
    np.testing.assert_allclose(x[x < 0].mean(), -1.0, atol=0.03)
    np.testing.assert_allclose(x[x > 0].std(), 0.2, rtol=0.1)


def test_ode_samplers_are_deterministic_and_agree():
    """Same noise, same output, bit for bit; euler/heun/midpoint/ode map the noise to the same points."""
    process = make_process("flow")
    velocity = flow.FlowModel(mixture_velocity(process, [0.5, 0.5], [-1.0, 1.0], [0.3, 0.3]), process)
    out = {}
    for sampler, steps in [("ode", None), ("euler", 400), ("heun", 50), ("midpoint", 50)]:
        run = lambda: np.asarray(sample_continuous(velocity, process, (200, 1), jax.random.key(7), sampler=sampler,  # noqa: E731
                                                   steps=steps))  # fmt: skip
        out[sampler] = run()
        np.testing.assert_array_equal(out[sampler], run())
    for sampler, x in out.items():
        np.testing.assert_allclose(x, out["ode"], atol=0.03, err_msg=sampler)
    assert np.std(out["ode"]) > 0.5


def test_model_calls():
    process = make_process("gvp")
    for sampler, steps, options, calls in [("euler", 7, {}, 7), ("heun", 7, {}, 14), ("midpoint", 7, {}, 14),
                                           ("euler_maruyama", 7, {}, 7),
                                           ("euler_maruyama", 7, {"last_step": "none"}, 6),
                                           ("euler", None, {}, 50), ("heun", None, {}, 50),
                                           ("euler_maruyama", None, {}, 250)]:  # fmt: skip
        _, nfe = sample_continuous(gaussian_denoiser, process, (2, 1), jax.random.key(0), sampler=sampler, steps=steps,
                                   return_nfe=True, **options)  # fmt: skip
        assert nfe == calls, (sampler, options)
    # on the σ processes euler and midpoint integrate the probability-flow ODE in t, then denoise at t_min
    _, nfe = sample_continuous(gaussian_denoiser, make_process("vp"), (2, 1), jax.random.key(0), sampler="midpoint",
                               steps=5, return_nfe=True)  # fmt: skip
    assert nfe == 11


# --------------------------------------------------------------------------- likelihood

MU2, S2 = np.array([0.5, -0.3]), np.array([0.4, 0.7])


def diag_gaussian_denoiser(x, sigma):
    s2, sg2 = jnp.asarray(S2**2, jnp.float32), sigma[:, None] ** 2
    return (s2 * x + sg2 * jnp.asarray(MU2, jnp.float32)) / (s2 + sg2)


def diag_velocity(process):
    return gaussian_velocity(process, jnp.asarray(MU2, jnp.float32), jnp.asarray(S2, jnp.float32))


def analytic_log_p(process, x):
    """What the ODE computes with the exact field (as tests/test_ode_likelihood.py): log p_{t_min}(x) + log prior(x_T)
    − log p_{t_max}(x_T), with x_T the affine image of x."""

    def marginal(t):
        a, s = float(process.alpha(t)), float(process.sigma(t))
        return a * MU2, a**2 * S2**2 + s**2

    def log_normal(y, mean, var):
        return np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * (y - mean) ** 2 / var, axis=1)

    m0, v0 = marginal(process.t_min)
    m1, v1 = marginal(process.t_max)
    x_T = m1 + (x - m0) * np.sqrt(v1 / v0)
    return log_normal(x, m0, v0) + log_normal(x_T, 0.0, 1.0) - log_normal(x_T, m1, v1)


@pytest.mark.parametrize("name", ["flow", "gvp"])
def test_exact_divergence_likelihood_equals_the_analytic_density(name):
    process = make_process(name, t_min=1e-4, t_max=1 - 1e-4)
    x = np.random.default_rng(0).normal(size=(6, 2)) * S2 + MU2
    native = flow.FlowModel(diag_velocity(process), process)
    for denoiser in (diag_gaussian_denoiser, native):
        log_p, nfe = ode_log_likelihood(denoiser, process, jnp.asarray(x, jnp.float32), jax.random.key(0),
                                        divergence="exact")  # fmt: skip
        np.testing.assert_allclose(log_p, analytic_log_p(process, x), atol=2e-3)
        # the prior's stand-in error at t_max is small: the true data density within 1e-2
        true = np.sum(-0.5 * np.log(2 * np.pi * S2**2) - 0.5 * (x - MU2) ** 2 / S2**2, axis=1)
        np.testing.assert_allclose(log_p, true, atol=1e-2)
        assert int(nfe) > 0 and int(nfe) % 3 == 0


# --------------------------------------------------------------------------- diffusers' FlowMatchEulerDiscreteScheduler


def torch_velocity(torch, process_name):
    """The Gaussian velocity of the flow process in float32 torch, at t = timestep/1000."""
    assert process_name == "flow"

    def velocity(x_t, timestep):
        t = timestep / 1000.0
        a, s = 1 - t, t
        r = (x_t - a * MU) / (a**2 * S**2 + s**2)
        return -(MU + a * S**2 * r) + s * r

    return velocity


def diffusers_euler(torch, scheduler, x_T, **set_timesteps):
    scheduler.set_timesteps(**set_timesteps)
    velocity = torch_velocity(torch, "flow")
    x = torch.from_numpy(np.array(x_T))
    for timestep in scheduler.timesteps:
        x = scheduler.step(velocity(x, timestep), timestep, x).prev_sample
    return scheduler, x.numpy()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_equals_diffusers_flow_match_euler(torch, diffusers, shift):
    """sample_continuous(euler, shift=s) = FlowMatchEulerDiscreteScheduler(shift=s) on the grid linspace(1, 1/N, N)
    (Flux's pipeline passes it): timesteps, sigmas and the final sample, from the same x_T."""
    steps, shape, rng = 8, (64, 3), jax.random.key(11)
    process = make_process("flow")
    got = sample_continuous(flow.FlowModel(gaussian_velocity(process), process), process, shape, rng, sampler="euler",
                            steps=steps, shift=shift)  # fmt: skip
    x_T = process.prior_sample(jax.random.split(rng)[0], shape)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler, want = diffusers_euler(torch, scheduler, x_T, sigmas=np.linspace(1.0, 1.0 / steps, steps))
    grid = np.asarray(flow_time_grid(steps, shift))
    np.testing.assert_allclose(grid, scheduler.sigmas.numpy(), rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(1000 * grid[:-1], scheduler.timesteps.numpy(), rtol=2e-7)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - np.asarray(x_T)).max() > 0.5  # it moved


def test_euler_equals_diffusers_with_its_default_and_dynamic_grids(torch, diffusers):
    """SD3's pipeline: set_timesteps(N) ends the linspace at the shifted σ_min (`t_last`); Flux's dynamic shifting
    with μ is the shift exp(μ)."""
    steps, process = 6, make_process("flow")
    x_T = process.prior_sample(jax.random.key(2), (32, 2))
    velocity = flow.FlowModel(gaussian_velocity(process), process).velocity
    scheduler, want = diffusers_euler(torch, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), x_T,
                                      num_inference_steps=steps)  # fmt: skip
    grid = flow_time_grid(steps, 3.0, t_last=scheduler.sigma_min)
    np.testing.assert_allclose(np.asarray(grid), scheduler.sigmas.numpy(), rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ode_steps(velocity, x_T, grid)), want, rtol=1e-5, atol=1e-6)

    mu = flow.resolution_mu(1024)
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic, want = diffusers_euler(torch, dynamic, x_T, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    grid = flow_time_grid(steps, math.exp(mu))
    np.testing.assert_allclose(np.asarray(grid), dynamic.sigmas.numpy(), rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ode_steps(velocity, x_T, grid)), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- SiT's SDE sampler


def sit_paths(name):
    """SiT's path in its own time τ = 1 − t (τ = 1 data): (α_τ, α'_τ, σ_τ, σ'_τ) of ICPlan / GVPCPlan."""
    if name == "flow":
        return lambda tau: (tau, np.ones_like(tau), 1 - tau, -np.ones_like(tau))
    h = np.pi / 2
    return lambda tau: (np.sin(h * tau), h * np.cos(h * tau), np.cos(h * tau), -h * np.sin(h * tau))


def sit_diffusion(form, norm, tau, sigma):
    """SiT's path.compute_diffusion in τ."""
    return {"constant": norm * np.ones_like(tau), "sigma": norm * sigma, "linear": norm * (1 - tau),
            "decreasing": 0.25 * (norm * np.cos(np.pi * tau) + 1) ** 2,
            "increasing-decreasing": norm * np.sin(np.pi * tau) ** 2}[form]  # fmt: skip


def sit_sde_numpy(name, x, noises, steps, form, norm, last_step, last_step_size):
    """SiT's Sampler.sample_sde (Euler–Maruyama) in float64, in τ: drift v_τ + w·score, score from the velocity by
    get_score_from_velocity, the velocity in τ being −u of jaxdiff's t = 1 − τ."""
    path = sit_paths(name)

    def u_of(x, t):  # jaxdiff's velocity (in t) of the Gaussian data, float64
        a, s = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
        da, ds = -np.pi / 2 * s, np.pi / 2 * a
        if name == "flow":
            a, s, da, ds = 1 - t, t, -1.0, 1.0
        r = (x - a * MU) / (a**2 * S**2 + s**2)
        return da * (MU + a * S**2 * r) + ds * s * r

    def parts(x, tau):
        alpha, d_alpha, sigma, d_sigma = path(np.asarray(tau))
        v = -u_of(x, 1 - tau)
        ratio = alpha / d_alpha
        score = (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)
        w = sit_diffusion(form, norm, tau, sigma)
        return v, score, w, alpha, sigma

    if last_step == "none":
        last_step_size = 0.0
    taus = np.linspace(0.0, 1.0 - last_step_size, steps)
    dt = taus[1] - taus[0]
    for i, tau in enumerate(taus[:-1]):
        v, score, w, _, _ = parts(x, tau)
        x = x + (v + w * score) * dt + np.sqrt(2 * w) * noises[i] * np.sqrt(dt)
    if last_step == "none":
        return x
    v, score, w, alpha, sigma = parts(x, taus[-1])
    return {"mean": x + (v + w * score) * last_step_size, "euler": x + v * last_step_size,
            "tweedie": x / alpha + sigma**2 / alpha * score}[last_step]  # fmt: skip


@pytest.mark.parametrize(
    "name, form, norm, last_step, size",
    [
        ("flow", "sigma", 1.0, "mean", 0.04),
        ("flow", "linear", 0.5, "tweedie", 0.1),
        ("gvp", "constant", 1.0, "euler", 0.04),
        ("gvp", "decreasing", 2.0, "mean", 0.2),
        ("flow", "increasing-decreasing", 1.0, "none", 0.04),
    ],
)
def test_euler_maruyama_is_sits_sde_sampler(name, form, norm, last_step, size):
    """The same noise through SiT's loop (NumPy, τ-time, its score formula) and ours."""
    steps, shape, rng = 12, (16, 2), jax.random.key(9)
    process = make_process(name)
    got = sample_continuous(flow.FlowModel(gaussian_velocity(process), process), process, shape, rng,
                            sampler="euler_maruyama", steps=steps, diffusion_form=form, diffusion_norm=norm,
                            last_step=last_step, last_step_size=size)  # fmt: skip
    init_key, noise_key = jax.random.split(rng)
    x_T = np.asarray(process.prior_sample(init_key, shape), np.float64)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(noise_key, i), 0), shape),
                         np.float64) for i in range(steps - 1)]  # fmt: skip
    want = sit_sde_numpy(name, x_T, noises, steps, form, norm, last_step, size)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "sampler, steps, options, message",
    [
        ("euler", 10, {"rho": 7.0}, "unknown option(s) ['rho'] for sampler 'euler'; allowed: ['shift']"),
        ("heun", 10, {"shift": 0.0}, "shift=0.0 must be a number > 0"),
        ("euler_maruyama", 10, {"diffusion_form": "SBDM"}, "unknown diffusion form 'SBDM'; expected one of "
                                                           "('constant', 'sigma', 'linear', 'decreasing', "
                                                           "'increasing-decreasing')"),
        ("euler_maruyama", 10, {"last_step": "Tweedie"}, "unknown last step 'Tweedie'; expected one of ('mean', "
                                                         "'euler', 'tweedie', 'none')"),
        ("euler_maruyama", 10, {"last_step_size": 1.0}, "last_step_size=1.0 must be a number in (0, 1)"),
        ("euler_maruyama", 10, {"diffusion_norm": -1.0}, "diffusion_norm=-1.0 must be a number >= 0"),
        ("euler_maruyama", 1, {}, "steps=1 must be >= 2 for sampler 'euler_maruyama' on a flow process"),
        ("midpoint", 0, {}, "steps=0 must be an int in [1, 100000]"),
        ("ode", 10, {}, "steps=10: sampler 'ode' chooses its own steps"),
        ("flow_euler", 10, {}, "unknown sampler 'flow_euler'; expected one of ("),
    ],
)
def test_bad_sampler_settings_are_one_line_usage_errors(sampler, steps, options, message):
    calls = []
    with pytest.raises(UsageError) as err:
        sample_continuous(lambda x, s: calls.append(1) or x, make_process("flow"), (2, 1), jax.random.key(0),
                          sampler=sampler, steps=steps, **options)  # fmt: skip
    assert str(err.value).startswith(message) and "\n" not in str(err.value) and not calls


def test_flow_options_belong_to_flow_processes():
    """On the σ processes euler and midpoint take no shift, euler_maruyama no SiT option, heun its rho."""
    with pytest.raises(UsageError, match=r"^unknown option\(s\) \['shift'\] for sampler 'euler'; allowed: \[\]$"):
        sample_continuous(gaussian_denoiser, make_process("ve"), (2, 1), jax.random.key(0), sampler="euler", shift=2.0)
    with pytest.raises(UsageError, match=r"^unknown option\(s\) \['last_step'\] for sampler 'euler_maruyama'"):
        check_options("euler_maruyama", {"last_step": "mean"}, make_process("vp"))
    assert check_options("heun", {}, make_process("edm")) == {"rho": 7.0}
    assert check_options("heun", {}, make_process("gvp")) == {"shift": 1.0}
