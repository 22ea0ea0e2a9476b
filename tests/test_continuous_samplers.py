"""Continuous samplers fed the exact denoiser of Gaussian and Gaussian-mixture data, the D(x; σ) adapters
against closed forms and NumPy, compile size flat in the steps, and bad input."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.denoisers import (
    continuous_eps_denoiser,
    discrete_eps_denoiser,
    edm_precond,
    score_from_denoiser,
    ve_precond,
    ve_score_denoiser,
    vp_precond,
)
from jaxdiff.processes import from_schedule, make_process
from jaxdiff.samplers import sample_continuous
from jaxdiff.schedule import make_schedule

MU, S = 0.5, 0.4
N, DIM = 1000, 2


def expand(sigma, x):
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def gaussian_denoiser(mu=MU, s=S):
    """The exact D(x; σ) = E[x_0 | x] for x_0 ~ N(mu, s²·I): (s²·x + σ²·mu)/(s² + σ²)."""

    def denoiser(x, sigma):
        sg = expand(sigma, x)
        return (s**2 * x + sg**2 * mu) / (s**2 + sg**2)

    return denoiser


def mixture_denoiser(weights, means, stds):
    """The exact D(x; σ) of a 1-D mixture Σ w_k N(m_k, s_k²): the posterior-weighted component means."""
    w, m, s = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

    def denoiser(x, sigma):
        sg = expand(sigma, x)[..., None]
        var = s**2 + sg**2
        log_resp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (x[..., None] - m) ** 2 / var
        resp = jax.nn.softmax(log_resp, axis=-1)
        return jnp.sum(resp * (s**2 * x[..., None] + sg**2 * m) / var, axis=-1)

    return denoiser


SCHEDULE = make_schedule("linear", 1000)
BETAS = np.linspace(1e-4, 0.02, 1000)
AC = np.cumprod(1 - BETAS)


def exact_discrete_eps(mu=MU, s=S):
    """E[ε | x_t] for x_0 ~ N(mu, s²) at step t (integer or real): sqrt(1−ᾱ)(x_t − sqrt(ᾱ)·mu)/(ᾱ·s² + 1 − ᾱ)."""
    process = from_schedule(SCHEDULE)  # ᾱ at integer steps, log(σ/α) linear between them

    def eps_fn(x_t, t):
        a = expand(process.alpha(t) ** 2, x_t)
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

    return eps_fn


PROCESSES = {
    "ve": (make_process("ve"), gaussian_denoiser()),
    "vp": (make_process("vp"), gaussian_denoiser()),
    "subvp": (make_process("subvp"), gaussian_denoiser()),
    "edm": (make_process("edm"), gaussian_denoiser()),
    "discrete": (from_schedule(SCHEDULE), discrete_eps_denoiser(exact_discrete_eps(), SCHEDULE)),
}
SAMPLER_CASES = [
    ("euler_maruyama", 400, {}),
    ("reverse_diffusion", 400, {}),
    ("ancestral", 400, {}),
    ("pc", 200, {"predictor": "ancestral", "corrector": "langevin"}),
    ("pc", 200, {"predictor": "euler_maruyama", "corrector": "ald"}),
    ("ode", None, {}),
    ("heun", 60, {}),
    ("edm_stochastic", 60, {"s_churn": 30.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003}),
    ("dpm_solver++", 60, {}),
    ("ddim", 100, {}),
    ("ddim", 200, {"eta": 1.0}),
]


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize("sampler, steps, options", SAMPLER_CASES, ids=lambda v: str(v))
def test_gaussian_data_statistics(process_name, sampler, steps, options):
    """Sample mean and spread of N(0.5, 0.4²) within 5 standard errors plus a small discretisation allowance."""
    if process_name == "edm" and sampler in ("euler_maruyama", "reverse_diffusion", "ancestral", "pc"):
        pytest.skip("the uniform time grid of the SDE samplers is unsuited to EDM's t = σ in [0.002, 80]")
    process, denoiser = PROCESSES[process_name]
    x = np.asarray(sample_continuous(denoiser, process, (N, DIM), jax.random.key(3), sampler=sampler, steps=steps, **options))
    assert x.dtype == np.float32 and x.shape == (N, DIM)
    se_mean = S / math.sqrt(N * DIM)
    assert abs(x.mean() - MU) < 5 * se_mean + 0.01, x.mean()
    assert abs(x.std() / S - 1) < 5 / math.sqrt(2 * N * DIM) + 0.04, x.std()


@pytest.mark.parametrize("sampler, steps", [("ode", None), ("heun", 40), ("pc", 300), ("ancestral", 300)])
@pytest.mark.parametrize("process_name", ["ve", "vp"])
def test_mixture_weights(process_name, sampler, steps):
    """A 1-D mixture 0.3·N(−1, 0.1²) + 0.7·N(1, 0.2²): the fraction of samples per mode within 4 standard errors."""
    denoiser = mixture_denoiser([0.3, 0.7], [-1.0, 1.0], [0.1, 0.2])
    x = np.asarray(sample_continuous(denoiser, PROCESSES[process_name][0], (2000, 1), jax.random.key(5), sampler=sampler, steps=steps))
    low = np.mean(x < 0)
    assert abs(low - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000), low
    np.testing.assert_allclose(x[x < 0].mean(), -1.0, atol=0.03)
    np.testing.assert_allclose(x[x > 0].std(), 0.2, rtol=0.1)


def test_ode_samplers_map_the_same_noise_to_the_same_output():
    process = make_process("vp")
    denoiser = mixture_denoiser([0.5, 0.5], [-1.0, 1.0], [0.3, 0.3])
    outputs = {
        name: np.asarray(sample_continuous(denoiser, process, (200, 1), jax.random.key(7), sampler=name, steps=steps))
        for name, steps in [("ode", None), ("heun", 100), ("dpm_solver++", 200), ("ddim", 400)]
    }
    for name, x in outputs.items():
        np.testing.assert_allclose(x, outputs["ode"], atol=0.03, err_msg=name)
    assert np.std(outputs["ode"]) > 0.5  # not collapsed


def test_nfe():
    process, denoiser = PROCESSES["vp"]
    run = lambda **kw: sample_continuous(denoiser, process, (4, 2), jax.random.key(0), return_nfe=True, **kw)[1]
    assert run(sampler="heun") == 35
    assert run(sampler="edm_stochastic", steps=10) == 19
    assert run(sampler="pc", steps=7, n_corrector=2) == 7 * 3 + 1
    assert run(sampler="dpm_solver++", steps=12) == 12
    nfe = int(run(sampler="ode"))
    assert 20 < nfe < 1000 and (nfe - 2) % 6 == 0  # 1 + 6·solver steps, + the final D


def counting(denoiser, calls):
    """The denoiser, adding 1 to calls[0] each time it runs (also inside scan, cond and diffrax loops)."""

    def counted(x, sigma):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1), ordered=False)
        return denoiser(x, sigma)

    return counted


@pytest.mark.parametrize("sampler, steps", [("ode", None), ("heun", 18), ("pc", 5), ("edm_stochastic", 6), ("ddim", 9)])
def test_reported_nfe_counts_the_calls(sampler, steps):
    process, denoiser = PROCESSES["vp"]
    calls = [0]
    x, nfe = sample_continuous(counting(denoiser, calls), process, (4, 2), jax.random.key(0), sampler=sampler, steps=steps, return_nfe=True)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert int(nfe) == calls[0]


@pytest.mark.parametrize("sampler", ["heun", "pc", "ode", "ddim"])
def test_jit_with_the_process_as_an_argument(sampler):
    process, denoiser = PROCESSES["vp"]
    steps = None if sampler == "ode" else 20
    run = lambda p, rng: sample_continuous(denoiser, p, (4, 2), rng, sampler=sampler, steps=steps)
    np.testing.assert_allclose(jax.jit(run)(process, jax.random.key(2)), run(process, jax.random.key(2)), rtol=1e-4, atol=1e-5)


def test_ode_failure_under_jit_is_nan_not_a_half_solved_sample():
    process, denoiser = PROCESSES["vp"]
    run = jax.jit(lambda rng: sample_continuous(denoiser, process, (4, 2), rng, sampler="ode", max_steps=3))
    assert np.all(np.isnan(run(jax.random.key(0))))


def test_ode_max_steps_is_an_error_naming_the_time():
    process, denoiser = PROCESSES["vp"]
    with pytest.raises(RuntimeError, match=r"stopped at t=0\.\d+ before t=0\.001"):
        sample_continuous(denoiser, process, (4, 2), jax.random.key(0), sampler="ode", max_steps=3)


@pytest.mark.parametrize("sampler", ["pc", "heun", "dpm_solver++", "ddim", "edm_stochastic"])
def test_program_size_does_not_grow_with_steps(sampler):
    process, denoiser = PROCESSES["vp"]

    def eqns(steps):
        fn = lambda rng: sample_continuous(denoiser, process, (2, 2), rng, sampler=sampler, steps=steps)
        return len(jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr.eqns)

    assert eqns(18) == eqns(1000)


def test_compile_time_for_18_and_1000_steps():
    """Measured, not asserted: compile times of heun with 18 and 1000 steps."""
    process, denoiser = PROCESSES["vp"]
    for steps in (18, 1000):
        fn = jax.jit(lambda rng: sample_continuous(denoiser, process, (2, 2), rng, sampler="heun", steps=steps))
        start = time.perf_counter()
        fn.lower(jax.random.key(0)).compile()
        print(f"heun steps={steps}: compiled in {time.perf_counter() - start:.2f}s")


def test_clip_denoised():
    process = make_process("vp")
    x = sample_continuous(gaussian_denoiser(mu=3.0, s=0.1), process, (8, 2), jax.random.key(0), sampler="heun", clip_denoised=True)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "dpm_solver"}, "unknown sampler 'dpm_solver'"),
        ({"sampler": "pc", "predictor": "heun"}, "unknown predictor 'heun'"),
        ({"sampler": "pc", "corrector": "gibbs"}, "unknown corrector 'gibbs'"),
        ({"sampler": "heun", "steps": 0}, "steps=0 must be an int in \\[1, 100000\\]"),
        ({"sampler": "heun", "eta": 0.5}, r"unknown option\(s\) \['eta'\]"),
        ({"sampler": "ddim", "eta": 1.5}, r"eta=1.5 must be a number in \[0, 1\]"),
        ({"sampler": "ode", "rtol": 0.0}, "rtol=0.0 must be a number in"),
        ({"sampler": "ode", "solver": "euler"}, "unknown ODE solver 'euler'"),
        ({"sampler": "ode", "steps": 10}, "sampler 'ode' chooses its own steps"),
        ({"sampler": "pc", "n_corrector": -1}, "n_corrector=-1"),
    ],
)
def test_bad_input(kwargs, message):
    process, denoiser = PROCESSES["vp"]
    with pytest.raises(ValueError, match=message):
        sample_continuous(denoiser, process, (2, 2), jax.random.key(0), **kwargs)


# ---------------------------------------------------------------- adapters


def test_discrete_eps_adapter_gives_the_exact_denoiser():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    exact = gaussian_denoiser()
    steps = np.array([0, 10, 500, 999])
    sigma = jnp.asarray(np.sqrt((1 - AC[steps]) / AC[steps]), jnp.float32)
    for interpolate in (False, True):
        denoiser = discrete_eps_denoiser(exact_discrete_eps(), SCHEDULE, interpolate=interpolate)
        np.testing.assert_allclose(denoiser(x * expand(sigma, x), sigma), exact(x * expand(sigma, x), sigma), rtol=2e-3, atol=2e-4)
    # Between trained steps: snapping uses the nearest step's ε, interpolation passes the fractional step.
    seen = []
    probe = discrete_eps_denoiser(lambda x_t, t: seen.append(t) or jnp.zeros_like(x_t), SCHEDULE)
    probe(x[:1], jnp.asarray([np.sqrt((1 - AC[200]) / AC[200]) * 1.0005], jnp.float32))
    assert seen[-1].dtype == jnp.int32 and int(seen[-1][0]) == 200
    probe = discrete_eps_denoiser(lambda x_t, t: seen.append(t) or jnp.zeros_like(x_t), SCHEDULE, interpolate=True)
    mid = np.exp(0.5 * (np.log((1 - AC[200]) / AC[200]) + np.log((1 - AC[201]) / AC[201])) / 2)
    probe(x[:1], jnp.asarray([mid], jnp.float32))
    np.testing.assert_allclose(seen[-1], [200.5], atol=1e-3)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_continuous_eps_adapter_gives_the_exact_denoiser(name):
    process = make_process(name)
    seen = []

    def eps_fn(x_t, label):
        """The exact ε of Gaussian data at t = label/999, as score_sde's continuous VP models see it."""
        seen.append(label)
        t = label / 999.0
        a, s = expand(process.alpha(t), x_t), expand(process.sigma(t), x_t)
        return s * (x_t - a * MU) / (a**2 * S**2 + s**2)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    t = jnp.asarray([0.01, 0.3, 0.9])
    sigma = process.noise_level(t)
    got = continuous_eps_denoiser(eps_fn, process)(x, sigma)
    np.testing.assert_allclose(got, gaussian_denoiser()(x, sigma), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(seen[-1], 999.0 * np.asarray(t), rtol=1e-4)


def test_ve_score_adapter_gives_the_exact_denoiser():
    score = lambda x, sigma: -(x - MU) / (S**2 + expand(sigma, x) ** 2)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2)) * 5, jnp.float32)
    sigma = jnp.asarray([0.01, 1.0, 50.0])
    np.testing.assert_allclose(ve_score_denoiser(score)(x, sigma), gaussian_denoiser()(x, sigma), rtol=1e-5, atol=1e-5)


def test_score_from_denoiser():
    process = make_process("vp")
    x_t = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2)), jnp.float32)
    t = jnp.asarray([0.05, 0.5, 1.0])
    a, s = np.asarray(process.alpha(t), np.float64)[:, None], np.asarray(process.sigma(t), np.float64)[:, None]
    expected = -(np.asarray(x_t, np.float64) - a * MU) / (a**2 * S**2 + s**2)
    np.testing.assert_allclose(score_from_denoiser(gaussian_denoiser(), process, x_t, t), expected, rtol=1e-4)


def test_edm_preconditioning_against_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 2, 2, 1)) * 3
    sigma = np.array([0.002, 0.5, 80.0])
    net_np = lambda v, c: np.tanh(v * 0.7 + c[:, None, None, None])
    net = lambda v, c: jnp.tanh(v * 0.7 + c[:, None, None, None])
    s = sigma[:, None, None, None]
    sd = 0.5
    edm = sd**2 / (s**2 + sd**2) * x + s * sd / np.sqrt(s**2 + sd**2) * net_np(x / np.sqrt(s**2 + sd**2), np.log(sigma) / 4)
    vp_t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log(1 + sigma**2)) - 0.1) / 19.9
    vp = x - s * net_np(x / np.sqrt(s**2 + 1), 999 * vp_t)
    ve = x + s * net_np(x, np.log(0.5 * sigma))
    xj, sj = jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32)
    np.testing.assert_allclose(edm_precond(net)(xj, sj), edm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vp_precond(net)(xj, sj), vp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ve_precond(net)(xj, sj), ve, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- float64 NumPy loops with the same noise


def toy(x, sigma, xp):
    """A nonlinear denoiser, the same in JAX and NumPy: tanh(x/sqrt(1 + σ²)) + 0.1·sin(σ)."""
    s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return xp.tanh(x / xp.sqrt(1 + s**2)) + 0.1 * xp.sin(s)


def draws(rng, shape, prior_std):
    """x_T and the noise of iteration i, sub-step j, as the samplers draw them, in float64."""
    init_key, noise_key = jax.random.split(rng)
    x_T = prior_std * np.asarray(jax.random.normal(init_key, shape, jnp.float32), np.float64)

    def noise(i, j=0):
        key = jax.random.fold_in(jax.random.fold_in(noise_key, i), j)
        return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)

    return x_T, noise


def ve_sigma(t):
    return 0.01 * 5000.0**t


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion", "ancestral"])
@pytest.mark.parametrize("corrector", ["none", "langevin", "ald"])
def test_pc_on_ve_matches_score_sde_formulas(predictor, corrector):
    """score_sde's VE predictors and correctors (σ_i on the grid, f = 0, g = σ·sqrt(2 ln(σ_max/σ_min)))."""
    steps, shape, snr = 6, (3, 2), 0.16
    got = sample_continuous(lambda x, s: toy(x, s, jnp), make_process("ve"), shape, jax.random.key(8),
                            sampler="pc", steps=steps, predictor=predictor, corrector=corrector)  # fmt: skip
    x, noise = draws(jax.random.key(8), shape, 50.0)
    grid = np.linspace(1.0, 1e-5, steps + 1)

    def score(x, t):
        return (toy(x, np.full(x.shape[0], ve_sigma(t)), np) - x) / ve_sigma(t) ** 2

    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        if corrector != "none":
            z, grad = noise(i, 1), score(x, t)
            if corrector == "langevin":
                norm = lambda v: np.mean(np.linalg.norm(v, axis=1))
                eps = 2 * (snr * norm(z) / norm(grad)) ** 2
            else:
                eps = 2 * (snr * ve_sigma(t)) ** 2
            x = x + eps * grad + np.sqrt(2 * eps) * z
        z = noise(i)
        if predictor == "euler_maruyama":
            g = ve_sigma(t) * np.sqrt(2 * np.log(5000.0))
            mean = x - g**2 * score(x, t) * (s - t)
            x = mean + g * np.sqrt(t - s) * z
        else:
            g2 = ve_sigma(t) ** 2 - ve_sigma(s) ** 2
            mean = x + g2 * score(x, t)
            std = np.sqrt(g2) if predictor == "reverse_diffusion" else np.sqrt(ve_sigma(s) ** 2 * g2 / ve_sigma(t) ** 2)
            x = mean + std * z
    expected = toy(mean, np.full(shape[0], ve_sigma(1e-5)), np)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def karras(sigma_min, sigma_max, steps, rho=7.0):
    u = np.linspace(0, 1, steps)
    return np.append((sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho, 0.0)


@pytest.mark.parametrize("s_churn", [0.0, 5.0])
def test_edm_samplers_match_algorithms_1_and_2(s_churn):
    steps, shape = 7, (3, 2)
    got = sample_continuous(lambda x, s: toy(x, s, jnp), make_process("edm"), shape, jax.random.key(9),
                            sampler="edm_stochastic", steps=steps, s_churn=s_churn, s_min=0.01, s_max=10.0)  # fmt: skip
    x, noise = draws(jax.random.key(9), shape, 80.0)
    levels = karras(0.002, 80.0, steps)
    d = lambda x, s: (x - toy(x, np.full(shape[0], s), np)) / s
    for i, (t, t_next) in enumerate(zip(levels[:-1], levels[1:])):
        gamma = min(s_churn / steps, np.sqrt(2) - 1) if 0.01 <= t <= 10.0 else 0.0
        t_hat = t * (1 + gamma)
        if s_churn:
            x = x + np.sqrt(t_hat**2 - t**2) * noise(i)
        slope = d(x, t_hat)
        euler = x + (t_next - t_hat) * slope
        x = euler if t_next == 0 else x + (t_next - t_hat) * 0.5 * (slope + d(euler, t_next))
    np.testing.assert_allclose(got, x, rtol=2e-4, atol=2e-4)


def test_dpm_solver_pp_and_ddim_match_numpy():
    steps, shape = 6, (3, 2)
    process = make_process("vp")
    levels = karras(float(process.noise_level(1e-3)), float(process.noise_level(1.0)), steps)
    alpha_max = float(process.alpha(1.0))
    denoise = lambda x, s: toy(x, np.full(shape[0], s), np)
    for sampler, options in [("dpm_solver++", {}), ("ddim", {"eta": 0.5})]:
        got = sample_continuous(lambda x, s: toy(x, s, jnp), process, shape, jax.random.key(10),
                                sampler=sampler, steps=steps, **options)  # fmt: skip
        x_T, noise = draws(jax.random.key(10), shape, 1.0)
        x, prev, h_prev = x_T / alpha_max, None, None
        for i, (s, s_next) in enumerate(zip(levels[:-1], levels[1:])):
            x0 = denoise(x, s)
            if sampler == "ddim":
                # DDIM in its own VP terms: ᾱ = 1/(1 + σ²), x_vp = sqrt(ᾱ)·x.
                ac, ac_next = 1 / (1 + s**2), 1 / (1 + s_next**2)
                eps = (np.sqrt(ac) * x - np.sqrt(ac) * x0) / np.sqrt(1 - ac)
                c = 0.5 * np.sqrt((1 - ac_next) / (1 - ac) * (1 - ac / ac_next))
                x_vp = np.sqrt(ac_next) * x0 + np.sqrt(1 - ac_next - c**2) * eps + c * noise(i)
                x = x_vp / np.sqrt(ac_next)
                continue
            h = np.log(s / s_next) if s_next > 0 else None
            d = x0 if prev is None or h is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * prev
            x = x0 if s_next == 0 else (s_next / s) * x + (1 - s_next / s) * d
            prev, h_prev = x0, h
        np.testing.assert_allclose(got, x, rtol=2e-4, atol=2e-4, err_msg=sampler)


def test_ancestral_on_a_discrete_schedule_is_ddpm_with_the_posterior_variance():
    """On `from_schedule` with steps = T − 1 the grid is the integer steps, and each ancestral step is
    DDPM's q(x_{t−1} | x_t, x̂_0) (mean coefficients and β̃_t of REFERENCE.md), then x̂_0 at t = 0."""
    T, shape = 20, (3, 2)
    betas = np.linspace(1e-4, 0.02, T)
    ac = np.cumprod(1 - betas)
    got = sample_continuous(lambda x, s: toy(x, s, jnp), from_schedule(make_schedule("linear", T)), shape,
                            jax.random.key(11), sampler="ancestral", steps=T - 1)  # fmt: skip
    x, noise = draws(jax.random.key(11), shape, 1.0)
    x0_of = lambda x, t: toy(x / np.sqrt(ac[t]), np.full(shape[0], np.sqrt((1 - ac[t]) / ac[t])), np)
    for i, t in enumerate(range(T - 1, 0, -1)):
        x0 = x0_of(x, t)
        coef1 = np.sqrt(ac[t - 1]) * betas[t] / (1 - ac[t])
        coef2 = np.sqrt(1 - betas[t]) * (1 - ac[t - 1]) / (1 - ac[t])
        variance = (1 - ac[t - 1]) / (1 - ac[t]) * betas[t]
        x = coef1 * x0 + coef2 * x + np.sqrt(variance) * noise(i)
        mean = x - np.sqrt(variance) * noise(i)
    np.testing.assert_allclose(got, x0_of(mean, 0), rtol=5e-4, atol=5e-4)
