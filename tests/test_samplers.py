"""The samplers against float64 NumPy loops, the exact denoiser of Gaussian data, and bad input."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.guidance import guided_denoiser
from jaxdiff.samplers import SAMPLERS, sample, sampling_timesteps
from jaxdiff.schedule import make_schedule

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
AC = np.cumprod(1.0 - BETAS)
SIGMAS = np.sqrt((1.0 - AC) / AC)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", T)


# ---------------------------------------------------------------- denoisers


def gaussian_eps(mu, s):
    """The exact ε-predictor E[ε | x_t] for x_0 ~ N(mu_c, s_c²) independently per pixel (float32, JAX).

    E[ε | x_t] = sqrt(1 − ᾱ_t)·(x_t − sqrt(ᾱ_t)·μ) / (ᾱ_t·s² + 1 − ᾱ_t); tables computed in float64.
    """
    mu, s = np.asarray(mu, np.float64), np.asarray(s, np.float64)
    gain = jnp.asarray(np.sqrt(1 - AC)[:, None] / (AC[:, None] * s**2 + 1 - AC[:, None]), jnp.float32)
    offset = jnp.asarray(np.sqrt(AC)[:, None] * mu, jnp.float32)
    return lambda x, t: gain[t][:, None, None, :] * (x - offset[t][:, None, None, :])


def toy_model(x, t, xp, *, learned=False):
    """A nonlinear, t-dependent model output (ε, then a learned_range variance part if `learned`)."""
    c = xp.cos(0.01 * t)[:, None, None, None]
    eps = xp.tanh(0.7 * x + 0.5 * c)
    return xp.concatenate([eps, xp.tanh(0.5 * x - c)], axis=-1) if learned else eps


def toy_denoiser(learned=False):
    return lambda x, t: toy_model(x, t, jnp, learned=learned)


def toy_reference(learned=False):
    return lambda x, t: toy_model(x, np.full(x.shape[0], t, np.float64), np, learned=learned)


def initial_noise(seed, shape):
    """The sampler's documented x_T, normal(split(key(seed))[0], shape), as float64."""
    init_key, _ = jax.random.split(jax.random.key(seed))
    return np.asarray(jax.random.normal(init_key, shape, jnp.float32), np.float64)


@functools.lru_cache
def step_noise(seed, shape):
    """The sampler's documented noise of steps i = 0..T-1: normal(fold_in(split(key(seed))[1], i), shape)."""
    _, noise_key = jax.random.split(jax.random.key(seed))

    def draw(i):
        return jax.random.normal(jax.random.fold_in(noise_key, i), shape, jnp.float32)

    return np.asarray(jax.vmap(draw)(jnp.arange(T)), np.float64)


# ---------------------------------------------------------------- float64 reference loops (return every state)


def x0_from_eps(x, ac, eps, clip):
    x0 = (x - np.sqrt(1 - ac) * eps) / np.sqrt(ac)
    return np.clip(x0, -1, 1) if clip else x0


def ref_ddpm(model, timesteps, x, noise, *, var_type, clip):
    """Ancestral sampling on the respaced betas 1 − ᾱ[t_k]/ᾱ[t_{k-1}] (the full schedule for all T steps)."""
    ac = AC[timesteps]
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_var = {
        "fixedlarge": np.log(np.append(post_var[1], betas[1:])),
        "fixedsmall": np.log(np.append(post_var[1], post_var[1:])),
    }
    channels = x.shape[-1]
    states = []
    for i, k in enumerate(reversed(range(len(timesteps)))):
        out = model(x, timesteps[k])
        x0 = x0_from_eps(x, ac[k], out[..., :channels], clip)
        coef1 = betas[k] * np.sqrt(ac_prev[k]) / (1 - ac[k])
        coef2 = (1 - ac_prev[k]) * np.sqrt(1 - betas[k]) / (1 - ac[k])
        mean = coef1 * x0 + coef2 * x
        if var_type == "learned_range":
            frac = (out[..., channels:] + 1) / 2
            lv = frac * np.log(betas[k]) + (1 - frac) * np.log(np.append(post_var[1], post_var[1:]))[k]
        else:
            lv = log_var[var_type][k]
        x = mean + (k > 0) * np.exp(0.5 * lv) * noise[i]
        states.append(x)
    return states


def ref_ddim(model, timesteps, x, noise, *, eta, clip):
    states = []
    t_desc = timesteps[::-1]
    for i, t in enumerate(t_desc):
        ac = AC[t]
        ac_prev = AC[t_desc[i + 1]] if i + 1 < len(t_desc) else 1.0
        x0 = x0_from_eps(x, ac, model(x, t), clip)
        eps = (x - np.sqrt(ac) * x0) / np.sqrt(1 - ac)
        sigma = eta * np.sqrt((1 - ac_prev) / (1 - ac)) * np.sqrt(1 - ac / ac_prev)
        x = np.sqrt(ac_prev) * x0 + np.sqrt(1 - ac_prev - sigma**2) * eps + sigma * noise[i]
        states.append(x)
    return states


def ref_dpm_solver_pp(model, timesteps, x, *, clip):
    """DPM-Solver++(2M) as in Lu et al. (2022), Algorithm 2, then a first-order step to σ = 0."""
    t_desc = timesteps[::-1]
    alpha, sigma = np.sqrt(AC[t_desc]), np.sqrt(1 - AC[t_desc])
    lam = np.log(alpha / sigma)
    states, prev_x0, prev_h = [], None, None
    for i, t in enumerate(t_desc):
        x0 = x0_from_eps(x, AC[t], model(x, t), clip)
        if i == len(t_desc) - 1:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            if prev_x0 is None:
                d = x0
            else:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d
            prev_x0, prev_h = x0, h
        states.append(x)
    return states


def ref_heun(model, timesteps, x, *, clip):
    """EDM Algorithm 1 without churn on x_σ = x_t·sqrt(1 + σ²); states reported in the VP scale."""
    t_desc = timesteps[::-1]
    sig = np.append(SIGMAS[t_desc], 0.0)

    def denoised(x_sigma, i):
        t = t_desc[i]
        return x0_from_eps(x_sigma * np.sqrt(AC[t]), AC[t], model(x_sigma * np.sqrt(AC[t]), t), clip)

    x = x / np.sqrt(AC[t_desc[0]])
    states = []
    for i in range(len(t_desc)):
        d = (x - denoised(x, i)) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0:
            d_next = (x_next - denoised(x_next, i + 1)) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * 0.5 * (d + d_next)
        x = x_next
        states.append(x / np.sqrt(1 + sig[i + 1] ** 2))
    return states


def karras_reference(steps, rho=7.0):
    """The ρ = 7 σ grid between σ(0) and σ(T-1), each snapped to the step nearest in log σ, increasing."""
    ramp = np.linspace(0, 1, steps)
    grid = (SIGMAS[-1] ** (1 / rho) + ramp * (SIGMAS[0] ** (1 / rho) - SIGMAS[-1] ** (1 / rho))) ** rho
    return np.array(sorted(int(np.argmin(np.abs(np.log(SIGMAS) - np.log(g)))) for g in grid))


# ---------------------------------------------------------------- the scan samplers equal the loops

SHAPE = (3, 2, 2, 2)

LOOP_CASES = [
    ("ddpm", dict(steps=T, var_type="fixedlarge", clip_denoised=True)),
    ("ddpm", dict(steps=50, var_type="fixedsmall", clip_denoised=False)),
    ("ddpm", dict(steps=37, var_type="learned_range", spacing="quadratic", clip_denoised=True)),
    ("ddim", dict(steps=50, eta=0.0, clip_denoised=True)),
    ("ddim", dict(steps=40, eta=0.7, spacing="quadratic", clip_denoised=False)),
    ("dpm_solver++", dict(steps=20, clip_denoised=True)),
    ("dpm_solver++", dict(steps=15, spacing="uniform", clip_denoised=False)),
    ("heun", dict(steps=18, clip_denoised=True)),
    ("heun", dict(steps=12, spacing="quadratic", clip_denoised=False)),
]


def reference_states(schedule, sampler, kwargs, seed, shape):
    default_spacing = "karras" if sampler in ("dpm_solver++", "heun") else "uniform"
    timesteps = sampling_timesteps(schedule, kwargs["steps"], kwargs.get("spacing", default_spacing))
    x_T = initial_noise(seed, shape)
    clip = kwargs["clip_denoised"]
    learned = kwargs.get("var_type") == "learned_range"
    model = toy_reference(learned)
    if sampler == "ddpm":
        return ref_ddpm(model, timesteps, x_T, step_noise(seed, shape), var_type=kwargs["var_type"], clip=clip)
    if sampler == "ddim":
        return ref_ddim(model, timesteps, x_T, step_noise(seed, shape), eta=kwargs["eta"], clip=clip)
    if sampler == "dpm_solver++":
        return ref_dpm_solver_pp(model, timesteps, x_T, clip=clip)
    return ref_heun(model, timesteps, x_T, clip=clip)


def assert_close(got, want, tol=2e-4):
    """Agreement to `tol` relative to the reference's largest magnitude (at least 1)."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


def case_id(value):
    """Test ids: strings as they are, keyword dicts as k=v joined by '-', anything else pytest's default."""
    if isinstance(value, str):
        return value
    return "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) and value else None


@pytest.mark.parametrize("sampler,kwargs", LOOP_CASES, ids=case_id)
def test_scan_equals_python_loop(schedule, sampler, kwargs):
    learned = kwargs.get("var_type") == "learned_range"
    got = sample(toy_denoiser(learned), schedule, SHAPE, jax.random.key(11), sampler=sampler, **kwargs)
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    assert_close(got, reference_states(schedule, sampler, kwargs, 11, SHAPE)[-1])


def test_trajectory_records_states_every_k_steps(schedule):
    kwargs = dict(steps=10, eta=0.0, clip_denoised=True)
    samples, trajectory = sample(
        toy_denoiser(), schedule, SHAPE, jax.random.key(3),
        sampler="ddim", return_trajectory=True, trajectory_every=3, **kwargs,
    )  # fmt: skip
    states = reference_states(schedule, "ddim", kwargs, 3, SHAPE)
    assert trajectory.shape == (4,) + SHAPE  # after steps 2, 5, 8 and the last, 9
    for frame, step in zip(trajectory, (2, 5, 8, 9)):
        assert_close(frame, states[step])
    np.testing.assert_array_equal(trajectory[-1], samples)


def test_trajectory_default_and_clipping(schedule):
    rng = jax.random.key(4)
    fn = gaussian_eps([0.9], [0.5])  # puts mass outside [-1, 1]
    shape = SHAPE[:3] + (1,)
    samples, trajectory = sample(fn, schedule, shape, rng, sampler="heun", return_trajectory=True)
    assert trajectory.shape == (9,) + shape  # 18 steps, every ceil(18/10) = 2
    np.testing.assert_array_equal(trajectory[-1], samples)
    unclipped = sample(fn, schedule, shape, rng, sampler="heun", clip_denoised=False)
    assert np.any(np.asarray(unclipped) > 1)
    # Two compiled programs: equal up to how XLA:CPU's code generators round them.
    np.testing.assert_allclose(samples, np.clip(unclipped, -1, 1), rtol=0, atol=1e-6)


def test_ddim_eta_one_is_ddpm_with_posterior_variance(schedule):
    """DDIM(η = 1) and ancestral sampling with σ² = β̃ on the same respaced steps are the same process."""
    rng = jax.random.key(5)
    ddim = sample(toy_denoiser(), schedule, SHAPE, rng, sampler="ddim", steps=50, eta=1.0)
    ddpm = sample(toy_denoiser(), schedule, SHAPE, rng, sampler="ddpm", steps=50, var_type="fixedsmall")
    np.testing.assert_allclose(ddim, ddpm, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- exact denoiser of Gaussian data

# Channel 0: μ = 0.3, s = 0.2; channels 1-3: per-channel μ and s. Pixels are independent, so
# each channel has 1000·4·4 = 16,000 draws.
MU = np.array([0.3, -0.5, 0.1, 0.6])
STD = np.array([0.2, 0.3, 0.5, 0.2])
MOMENT_SHAPE = (1000, 4, 4, 4)
# (sampler, kwargs, allowed |var − s²| / s² from discretisation): about 1.5x the largest bias
# measured over these channels with 160,000 draws each: ddpm T steps 1.3 %, ddpm 100 quadratic 6.1 %,
# ddim 100 quadratic 4.6 % (eta 0) / 5.5 % (eta 0.5), dpm_solver++ 20 karras 11.3 %,
# heun 30 karras 5.5 %. Mean biases were all below 0.004·s.
MOMENT_CASES = [
    ("ddpm", dict(), 0.03),
    ("ddpm", dict(steps=100, spacing="quadratic"), 0.10),
    ("ddim", dict(steps=100, spacing="quadratic"), 0.08),
    ("ddim", dict(steps=100, spacing="quadratic", eta=0.5), 0.09),
    ("dpm_solver++", dict(steps=20), 0.17),
    ("heun", dict(steps=30), 0.09),
]


@pytest.mark.parametrize("sampler,kwargs,allowance", MOMENT_CASES, ids=case_id)
def test_gaussian_data_moments(schedule, sampler, kwargs, allowance):
    fn = gaussian_eps(MU, STD)
    x = sample(fn, schedule, MOMENT_SHAPE, jax.random.key(21), sampler=sampler, clip_denoised=False, **kwargs)
    x = np.asarray(x, np.float64).reshape(-1, MU.size)
    n = x.shape[0]
    mean_tol = 5 * STD / math.sqrt(n) + 0.01 * STD
    var_tol = (5 * math.sqrt(2 / (n - 1)) + allowance) * STD**2
    np.testing.assert_array_less(np.abs(x.mean(axis=0) - MU), mean_tol)
    np.testing.assert_array_less(np.abs(x.var(axis=0, ddof=1) - STD**2), var_tol)


def exact_gaussian_output(z, mu, s):
    """What an exact ODE solver returns for x_T = z: the flow from t = T-1 to t = 0, then x̂_0 at t = 0."""
    a_end, a_0 = AC[-1], AC[0]
    z_data = (z - np.sqrt(a_end) * mu) / np.sqrt(a_end * s**2 + 1 - a_end)  # the standardised x_{T-1}
    x_at_0 = np.sqrt(a_0) * mu + np.sqrt(a_0 * s**2 + 1 - a_0) * z_data
    return mu + np.sqrt(a_0) * s**2 / (a_0 * s**2 + 1 - a_0) * (x_at_0 - np.sqrt(a_0) * mu)


@pytest.mark.parametrize(
    "sampler,spacing,order", [("ddim", "quadratic", 1), ("dpm_solver++", "karras", 2), ("heun", "karras", 2)]
)
def test_ode_samplers_converge_at_their_order(schedule, sampler, spacing, order):
    """Max error against the exact flow map falls like steps^-order (measured orders 1.0, 2.0, 2.1)."""
    mu, s, shape = 0.3, 0.2, (500, 1, 1, 1)
    want = exact_gaussian_output(initial_noise(8, shape), mu, s)
    fn = gaussian_eps([mu], [s])
    errors = []
    for steps in (20, 80):
        got = sample(
            fn, schedule, shape, jax.random.key(8), sampler=sampler, steps=steps, spacing=spacing, clip_denoised=False
        )
        errors.append(np.max(np.abs(np.asarray(got, np.float64) - want)))
    measured_order = math.log(errors[0] / errors[1]) / math.log(4)
    assert errors[1] < (0.02 if order == 1 else 0.003)
    assert order - 0.25 < measured_order < order + 0.4


MEAN_TYPE_CASES = [("ddpm", dict(steps=50)), ("ddim", dict(steps=30)), ("dpm_solver++", {}), ("heun", {})]


@pytest.mark.parametrize("sampler,kwargs", MEAN_TYPE_CASES, ids=case_id)
def test_mean_types_give_the_same_samples(schedule, sampler, kwargs):
    """The exact denoiser as ε, x_0 or v output, with a learned_range variance part (only ddpm reads it)."""
    eps_fn = gaussian_eps([0.3, -0.2], [0.4, 0.3])
    sa, s1 = (jnp.asarray(v, jnp.float32) for v in (np.sqrt(AC), np.sqrt(1 - AC)))

    def as_type(mean_type):
        def fn(x, t):
            eps = eps_fn(x, t)
            a, b = sa[t][:, None, None, None], s1[t][:, None, None, None]
            x0 = (x - b * eps) / a
            out = {"eps": eps, "x_start": x0, "v": a * eps - b * x0}[mean_type]
            return jnp.concatenate([out, 0.5 * jnp.tanh(x)], axis=-1)

        return fn

    kwargs = dict(kwargs, sampler=sampler, var_type="learned_range")
    results = {
        m: np.asarray(sample(as_type(m), schedule, (4, 3, 3, 2), jax.random.key(2), mean_type=m, **kwargs))
        for m in ("eps", "x_start", "v")
    }
    for m in ("x_start", "v"):
        np.testing.assert_allclose(results[m], results["eps"], rtol=0, atol=1e-3)


# ---------------------------------------------------------------- determinism, tracing, jit


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_deterministic_samplers_repeat_bitwise(schedule, sampler):
    fn = gaussian_eps([0.3], [0.2])
    run = functools.partial(sample, fn, schedule, (8, 2, 2, 1), sampler=sampler, steps=15)
    first, second, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(first, second)
    assert np.all(np.asarray(first) != np.asarray(other))
    jitted = jax.jit(run)(jax.random.key(0))
    np.testing.assert_allclose(jitted, first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_denoiser_traced_a_bounded_number_of_times(schedule, sampler):
    """The loop body is traced once: the number of denoiser traces does not grow with steps."""
    counts = []
    for steps in (10, 1000):
        calls = []

        def fn(x, t):
            calls.append(t.shape)
            return toy_model(x, t, jnp)

        jax.eval_shape(lambda key: sample(fn, schedule, SHAPE, key, sampler=sampler, steps=steps), jax.random.key(0))
        counts.append(len(calls))
    assert counts[0] == counts[1] == (2 if sampler == "heun" else 1)


def test_default_steps_and_spacing(schedule):
    fn = gaussian_eps([0.3], [0.2])
    default = sample(fn, schedule, (2, 2, 2, 1), jax.random.key(0), sampler="dpm_solver++")
    explicit = sample(fn, schedule, (2, 2, 2, 1), jax.random.key(0), sampler="dpm_solver++", steps=20, spacing="karras")
    np.testing.assert_array_equal(default, explicit)


def test_traced_schedule_is_refused(schedule):
    run = jax.jit(lambda sched, key: sample(toy_denoiser(), sched, SHAPE, key, sampler="ddim", steps=5))
    with pytest.raises(ValueError, match="schedule is traced"):
        run(schedule, jax.random.key(0))


# ---------------------------------------------------------------- step grids


def test_sampling_timesteps_values(schedule):
    np.testing.assert_array_equal(sampling_timesteps(make_schedule("linear", 10), 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sampling_timesteps(schedule, 5), [0, 250, 500, 749, 999])
    np.testing.assert_array_equal(sampling_timesteps(schedule, 5, "quadratic"), [0, 62, 250, 562, 999])
    np.testing.assert_array_equal(
        sampling_timesteps(schedule, 18, "karras"),
        [0, 5, 21, 55, 120, 221, 342, 455, 551, 631, 699, 757, 809, 854, 895, 933, 967, 999],
    )
    for steps in (10, 25, 50):
        np.testing.assert_array_equal(sampling_timesteps(schedule, steps, "karras"), karras_reference(steps))
    dense = sampling_timesteps(schedule, 200, "karras")  # the grid's low end is denser than the steps
    np.testing.assert_array_equal(dense[:27], np.arange(27))
    assert np.all(dense >= karras_reference(200))


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 100, 700, T])
def test_sampling_timesteps_are_distinct_and_span_the_schedule(schedule, spacing, steps):
    t = sampling_timesteps(schedule, steps, spacing)
    assert t.shape == (steps,) and t[-1] == T - 1 and (steps == 1 or t[0] == 0)
    assert np.all(np.diff(t) > 0)
    if spacing == "quadratic":  # rounding collisions only ever move steps up
        u = np.linspace(0, 1, steps) if steps > 1 else np.ones(1)
        assert np.all(t >= np.floor(u**2 * (T - 1) + 0.5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sampler="euler"), "unknown sampler 'euler'"),
        (dict(steps=0), "steps=0"),
        (dict(steps=T + 1), "steps=1001"),
        (dict(steps=2.5), "steps=2.5"),
        (dict(sampler="ddim", eta=-0.1), "eta=-0.1"),
        (dict(sampler="ddim", spacing="cosine"), "unknown spacing 'cosine'"),
        (dict(sampler="ddpm", eta=0.5), "eta=0.5 applies only to sampler 'ddim', not 'ddpm'"),
        (dict(sampler="heun", eta=1.0), "eta=1.0 applies only to sampler 'ddim', not 'heun'"),
        (dict(sampler="dpm_solver++", eta=0.2), "eta=0.2"),
        (dict(var_type="learnt"), "unknown var_type 'learnt'"),
        (dict(mean_type="score"), "unknown mean_type 'score'"),
        (dict(return_trajectory=True, trajectory_every=0), "trajectory_every=0"),
        (dict(sampler="ddim", steps=10, eta=3.0), "eta=3.0 is too large"),
    ],
)
def test_bad_arguments_raise_before_any_work(schedule, kwargs, message):
    calls = []

    def fn(x, t):
        calls.append(1)
        return x

    with pytest.raises(ValueError, match=re.escape(message)):
        sample(fn, schedule, SHAPE, jax.random.key(0), **kwargs)
    assert not calls


@pytest.mark.parametrize("shape", [(2, 4, 4), (2, 4, 4, 3, 1), (2, 0, 4, 3)])
def test_bad_shape(schedule, shape):
    with pytest.raises(ValueError, match="NHWC"):
        sample(toy_denoiser(), schedule, shape, jax.random.key(0))


@pytest.mark.parametrize("kwargs", [dict(sampler="ddim"), dict(sampler="heun"), dict(sampler="ddpm", spacing="karras")])
def test_schedule_without_signal_at_the_end(kwargs):
    """The jsd schedule has ᾱ_(T-1) = 0, so σ_(T-1) and λ_(T-1) are infinite."""
    with pytest.raises(ValueError, match=r"needs ᾱ_t > 0 at every step"):
        sample(toy_denoiser(), make_schedule("jsd", 10), SHAPE, jax.random.key(0), **kwargs)


def test_model_output_with_wrong_channels(schedule):
    with pytest.raises(ValueError, match="does not fit var_type 'learned'"):
        sample(toy_denoiser(), schedule, SHAPE, jax.random.key(0), sampler="ddim", steps=3, var_type="learned")


# ---------------------------------------------------------------- classifier-free guidance

NULL = 4


def toy_apply(calls):
    """A label-conditional model: out = 0.5·[x, −x] + emb[y] + 0.001·t, recording each batch size."""

    def apply_fn(params, x, t, y):
        calls.append(x.shape[0])
        base = jnp.concatenate([x, -x], axis=-1)[..., : params["emb"].shape[1]]
        return 0.5 * base + jnp.asarray(params["emb"])[y][:, None, None, :] + 0.001 * t[:, None, None, None]

    return apply_fn


def toy_apply_reference(params, x, t, y):
    base = np.concatenate([x, -x], axis=-1)[..., : params["emb"].shape[1]]
    return 0.5 * base + params["emb"][y][:, None, None, :] + 0.001 * t[:, None, None, None]


@pytest.mark.parametrize("out_channels", [2, 4])
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_guided_denoiser(out_channels, w):
    rng = np.random.default_rng(0)
    params = {"emb": rng.standard_normal((NULL + 1, out_channels))}
    x = rng.standard_normal((3, 2, 2, 2))
    t = np.array([0, 500, 999])
    labels = np.array([1, 3, 0])
    calls = []
    got = guided_denoiser(toy_apply(calls), params, labels, guidance=w, null_label=NULL)(
        jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32)
    )
    cond = toy_apply_reference(params, x, t, labels)
    uncond = toy_apply_reference(params, x, t, np.full(3, NULL))
    want = cond.copy()
    want[..., :2] = (1 + w) * cond[..., :2] - w * uncond[..., :2]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    assert calls == ([3] if w == 0 else [6])  # one forward; guided: both halves in one batch


def test_guided_sampling_runs_one_doubled_forward_per_step(schedule):
    params = {"emb": np.random.default_rng(1).standard_normal((NULL + 1, 2))}
    labels = jnp.array([0, 1, 2])
    calls = []
    fn = guided_denoiser(toy_apply(calls), params, labels, guidance=2.0, null_label=NULL)
    got = sample(fn, schedule, SHAPE, jax.random.key(0), sampler="ddim", steps=10)
    assert calls == [6]  # traced once, batch 2·B

    def manual(x, t):
        cond = toy_apply([])(params, x, t, labels)
        return 3.0 * cond - 2.0 * toy_apply([])(params, x, t, jnp.full((3,), NULL))

    want = sample(manual, schedule, SHAPE, jax.random.key(0), sampler="ddim", steps=10)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(guidance=-1.0), "guidance=-1.0"),
        (dict(guidance=float("nan")), "guidance=nan"),
        (dict(guidance="2"), "guidance='2'"),
        (dict(null_label=1.5), "null_label=1.5"),
        (dict(labels=np.zeros((3, 1), np.int32)), "labels must be a 1-D int array"),
        (dict(labels=np.zeros(3, np.float32)), "labels must be a 1-D int array"),
    ],
)
def test_guided_denoiser_bad_input(kwargs, message):
    args = dict(labels=np.zeros(3, np.int32), guidance=1.0, null_label=NULL) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        guided_denoiser(toy_apply([]), {"emb": np.zeros((NULL + 1, 2))}, args.pop("labels"), **args)


def test_guided_denoiser_batch_mismatch():
    params = {"emb": np.zeros((NULL + 1, 2))}
    fn = guided_denoiser(toy_apply([]), params, np.zeros(2, np.int32), guidance=1.0, null_label=NULL)
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        fn(jnp.zeros((3, 2, 2, 2)), jnp.zeros(3, jnp.int32))


def test_guidance_on_a_conditional_model_without_a_null_label_is_refused_before_any_evaluation():
    from types import SimpleNamespace

    from jaxdiff.diffusion.denoisers import model_denoiser

    calls = []
    model = SimpleNamespace(num_classes=10, null_label=False, apply=lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"guidance=2.0 needs a null label.*null_label=False"):
        model_denoiser(model, {}, labels=np.zeros(2, np.int32), guidance=2.0)
    model_denoiser(model, {}, labels=np.zeros(2, np.int32), guidance=0.0)  # conditional sampling still works
    assert calls == []
