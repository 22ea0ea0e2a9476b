"""Flow matching's math against float64 NumPy: the parameterisations and their round trips through D(x; σ), the
flow model and velocity adapters, guidance in a t interval, the training-time distributions and shifts, the loss
value, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import flow
from jaxdiff.diffusion.losses import flow_matching_loss
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.processes import make_process

KINDS = flow.PARAMETERIZATIONS
MU, S = 0.5, 0.4


def coefficients64(name, t):
    """(α, σ, α', σ') float64 [B, 1]."""
    t = np.asarray(t, np.float64)[:, None]
    if name == "flow":
        return 1 - t, t, -np.ones_like(t), np.ones_like(t)
    h = np.pi / 2
    return np.cos(h * t), np.sin(h * t), -h * np.sin(h * t), h * np.cos(h * t)


def prediction64(kind, x0, eps, c):
    a, s, da, ds = c
    return {"velocity": da * x0 + ds * eps, "x0": x0, "eps": eps, "v": a * eps - s * x0}[kind]


def posterior64(name, x_t, t):
    """E[x_0 | x_t], E[ε | x_t] of x_0 ~ N(MU, S²) in float64."""
    a, s, _, _ = coefficients64(name, t)
    r = (x_t - a * MU) / (a**2 * S**2 + s**2)
    return MU + a * S**2 * r, s * r


def exact_output(name, kind, process):
    """The network that predicts `kind` exactly for Gaussian data, in jnp: output_fn(x_t, t)."""

    def output_fn(x_t, t):
        c = flow.coefficients(process, t, x_t)
        r = (x_t - c.alpha * MU) / (c.alpha**2 * S**2 + c.sigma**2)
        return flow.prediction(kind, MU + c.alpha * S**2 * r, c.sigma * r, c)

    return output_fn


def gaussian_denoiser(x, sigma):
    sg = sigma[:, None]
    return (S**2 * x + sg**2 * MU) / (S**2 + sg**2)


T = np.float32([0.02, 0.3, 0.7, 0.95]).astype(np.float64)
RNG = np.random.default_rng(0)
X0, EPS = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))


@pytest.mark.parametrize("name", ["flow", "gvp"])
@pytest.mark.parametrize("kind", KINDS)
def test_parameterisations_round_trip(name, kind):
    """kind -> (x̂_0, ε̂) -> kind, against the float64 definitions (u = α'x_0 + σ'ε, v = αε − σx_0)."""
    process = make_process(name)
    c64 = coefficients64(name, T)
    x_t = c64[0] * X0 + c64[1] * EPS
    want = prediction64(kind, X0, EPS, c64)
    c = flow.coefficients(process, jnp.asarray(T, jnp.float32), jnp.zeros((4, 3)))
    np.testing.assert_allclose(flow.prediction(kind, jnp.asarray(X0, jnp.float32), jnp.asarray(EPS, jnp.float32), c),
                               want, rtol=1e-5, atol=1e-6)  # fmt: skip
    x0, eps = flow.to_x0_eps(kind, jnp.asarray(want, jnp.float32), jnp.asarray(x_t, jnp.float32), c)
    np.testing.assert_allclose(x0, X0, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(eps, EPS, rtol=1e-4, atol=2e-5)
    if name == "flow" and kind == "velocity":
        np.testing.assert_allclose(want, EPS - X0, rtol=1e-12)


@pytest.mark.parametrize("name", ["flow", "gvp"])
@pytest.mark.parametrize("kind", KINDS)
def test_flow_model_as_denoiser_and_velocity(name, kind):
    """A model of any kind, exact for Gaussian data: its D(x; σ) is the Gaussian posterior mean of x = x_0 + σn, and
    its velocity (and that derived from the plain D) is α'·E[x_0|x_t] + σ'·E[ε|x_t]."""
    process = make_process(name)
    model = flow.FlowModel(exact_output(name, kind, process), process, kind)
    c64 = coefficients64(name, T)
    level = (c64[1] / c64[0])[:, 0]
    x = RNG.normal(size=(4, 3)) * np.sqrt(S**2 + level[:, None] ** 2) + MU
    want = (S**2 * x + level[:, None] ** 2 * MU) / (S**2 + level[:, None] ** 2)
    np.testing.assert_allclose(model(jnp.asarray(x, jnp.float32), jnp.asarray(level, jnp.float32)), want, rtol=2e-4,
                               atol=2e-5)  # fmt: skip
    x_t = c64[0] * X0 + c64[1] * EPS
    x0, eps = posterior64(name, x_t, T)
    u = c64[2] * x0 + c64[3] * eps
    t32 = jnp.asarray(T, jnp.float32)
    np.testing.assert_allclose(model.velocity(jnp.asarray(x_t, jnp.float32), t32), u, rtol=2e-4, atol=2e-5)
    derived = flow.velocity_field(gaussian_denoiser, process)
    np.testing.assert_allclose(derived(jnp.asarray(x_t, jnp.float32), t32), u, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["flow", "gvp"])
def test_velocity_at_the_ends(name):
    """Velocity and v models are evaluated at t = 1 and t = 0 themselves; x0 models at t_min instead of 0, eps models
    at t_max instead of 1, and a plain D(x; σ) within [t_min, t_max]."""
    process = make_process(name)
    x_t = jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)
    for end, t_eval in [(1.0, {"eps": process.t_max}), (0.0, {"x0": process.t_min})]:
        t = jnp.full((2,), end, jnp.float32)
        for kind in KINDS:
            got = flow.FlowModel(exact_output(name, kind, process), process, kind).velocity(x_t, t)
            c64 = coefficients64(name, np.full(2, t_eval.get(kind, end)))
            x0, eps = posterior64(name, np.asarray(x_t, np.float64), np.full(2, t_eval.get(kind, end)))
            # x0 and eps models near their singular end: their float32 output's rounding is amplified by 1/σ or
            # 1/α (≈ 1000 at t_min, t_max)
            atol = 5e-4 if kind in t_eval else 2e-5
            np.testing.assert_allclose(got, c64[2] * x0 + c64[3] * eps, rtol=2e-4, atol=atol, err_msg=kind)
        derived = flow.velocity_field(gaussian_denoiser, process)(x_t, t)
        clipped = jnp.full((2,), min(max(end, process.t_min), process.t_max), jnp.float32)
        np.testing.assert_allclose(derived, flow.velocity_field(gaussian_denoiser, process)(x_t, clipped), rtol=1e-6)
        assert np.all(np.isfinite(derived))


def test_clipped_model_and_wrapping():
    """Clipping bounds every x̂_0 (D and the velocity's), and a wrapped model calls its wrapper."""
    process = make_process("flow")
    model = flow.FlowModel(lambda x_t, t: 3.0 * x_t, process, "x0")
    clipped = flow.clipped_denoiser(model, -1.0, 1.0)
    assert isinstance(clipped, flow.FlowModel) and clipped.clip == (-1.0, 1.0)
    x = jnp.asarray([[2.0, -0.1]], jnp.float32)
    np.testing.assert_allclose(clipped(x, jnp.asarray([1.0])), [[1.0, -0.15]], rtol=1e-6)  # x_t = x/2, x̂_0 = 3x_t
    # the velocity combines the clipped x̂_0 with the model's ε̂ = (x_t − α·x̂_0)/σ: u = ε̂ − x̂_0
    u = clipped.velocity(x, jnp.asarray([0.5]))
    x0 = 3.0 * np.asarray(x)  # the model's x̂_0 at the state x_t = x
    eps = (np.asarray(x) - 0.5 * x0) / 0.5
    np.testing.assert_allclose(u, eps - np.clip(x0, -1, 1), rtol=1e-6)
    plain = flow.clipped_denoiser(gaussian_denoiser, -0.1, 0.1)
    np.testing.assert_allclose(plain(x, jnp.asarray([1.0])), [[0.1, 0.1]])
    calls = []
    wrapped = model.wrapped(lambda fn: lambda x_t, t: calls.append(1) or fn(x_t, t))
    np.testing.assert_allclose(wrapped.velocity(x, jnp.asarray([0.5])), model.velocity(x, jnp.asarray([0.5])))
    assert calls == [1] and wrapped.parameterization == "x0"


def test_guidance_interval():
    """`guided` where t_low <= t <= t_high, `plain` elsewhere, example by example."""
    output = flow.guidance_interval(lambda x, t: x + 1.0, lambda x, t: x, 0.2, 0.6)
    x = jnp.zeros((4, 2))
    np.testing.assert_array_equal(output(x, jnp.asarray([0.1, 0.2, 0.6, 0.7])), [[0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_array_equal(jax.jit(output)(x, jnp.full(4, 0.4)), np.ones((4, 2)))
    np.testing.assert_array_equal(jax.jit(output)(x, jnp.full(4, 0.9)), np.zeros((4, 2)))


# --------------------------------------------------------------------------- time sampling and shifts


def test_shifts_against_numpy_and_diffusers_formulas():
    t = np.linspace(0.0, 1.0, 11)
    for shift in (0.5, 1.0, 3.0):
        want = shift * t / (1 + (shift - 1) * t)
        np.testing.assert_allclose(flow.shift_time(t, shift), want, rtol=1e-15)
        np.testing.assert_allclose(flow.shift_time(jnp.asarray(t, jnp.float32), shift), want, rtol=1e-6, atol=1e-7)
    # Flux: μ linear in the sequence length, and its exponential shift e^μ/(e^μ + 1/t − 1) is shift_time(t, e^μ)
    for seq_len, mu in [(256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840), (64, 0.5 - 0.65 * 192 / 3840)]:
        assert flow.resolution_mu(seq_len) == pytest.approx(mu, rel=1e-12)
    mu = flow.resolution_mu(2048, base_seq_len=128, max_seq_len=8192, base_shift=0.3, max_shift=1.5)
    assert mu == pytest.approx(0.3 + 1.2 * (2048 - 128) / (8192 - 128), rel=1e-12)
    inner = t[1:]
    np.testing.assert_allclose(flow.shift_time(inner, math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / inner - 1),
                               rtol=1e-14)  # fmt: skip


def test_shift_matches_diffusers_calculate_shift(diffusers):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (64, 256, 1000, 4096, 9000):
        assert flow.resolution_mu(seq_len) == pytest.approx(calculate_shift(seq_len), rel=1e-12)


def test_logit_normal_times():
    """logit t ~ N(m, s²) (then shifted): the mean and standard deviation of logit t."""
    t = np.asarray(flow.sample_t(jax.random.key(0), 200_000, t_sampling="logit_normal", logit_mean=0.5,
                                 logit_std=0.8), np.float64)  # fmt: skip
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 5 * 0.8 / math.sqrt(t.size) and abs(logit.std() / 0.8 - 1) < 0.01
    shifted = np.asarray(flow.sample_t(jax.random.key(0), 200_000, t_sampling="logit_normal", logit_mean=0.5,
                                       logit_std=0.8, shift=3.0), np.float64)  # fmt: skip
    np.testing.assert_allclose(shifted, 3 * t / (1 + 2 * t), rtol=2e-6)


def test_uniform_and_mode_times_are_the_formula_on_the_same_uniforms():
    """mode: t = 1 − u − scale·(cos²(πu/2) − 1 + u) of u ~ U[0, 1) (SD3), drawn with the key's own uniforms."""
    key = jax.random.key(3)
    u = np.asarray(jax.random.uniform(key, (1000,), jnp.float32), np.float64)
    np.testing.assert_array_equal(flow.sample_t(key, 1000), u.astype(np.float32))
    want = 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    np.testing.assert_allclose(flow.sample_t(key, 1000, t_sampling="mode"), want, rtol=1e-5, atol=1e-6)
    # the density puts more mass at mid t than uniform for scale > 0 (SD3's heavy-middle mode)
    t = np.asarray(flow.sample_t(jax.random.key(4), 100_000, t_sampling="mode", mode_scale=1.29))
    assert np.mean(np.abs(t - 0.5) < 0.25) > 0.6 and 0 <= t.min() and t.max() <= 1


# --------------------------------------------------------------------------- the loss


def linear_network(kind):
    """A stand-in network with parameters: output = w·x_t + b·t."""

    def apply_fn(params, x_t, t):
        return params["w"] * x_t + params["b"] * t[:, None, None, None]

    return apply_fn


PARAMS = {"w": jnp.float32(0.7), "b": jnp.float32(-0.3)}


@pytest.mark.parametrize(
    "name, kind, options",
    [
        ("flow", "velocity", {}),
        ("flow", "velocity", {"t_sampling": "logit_normal", "logit_mean": 0.2, "logit_std": 1.3, "shift": 3.0}),
        ("gvp", "velocity", {"t_sampling": "mode", "mode_scale": 0.8, "reduce_mean": False}),
        ("flow", "x0", {"weighting": "edm", "sigma_data": 0.5}),
        ("gvp", "eps", {"weights": [1.0, 0.5, 2.0, 0.0]}),
        ("flow", "v", {"weighting": "edm", "sigma_data": 0.3, "shift": 0.5}),
        ("flow", "velocity", {"t_max": 0.999}),  # RectifiedFlow's τ = 1 − t ~ U[1e-3, 1]
        ("gvp", "eps", {"t_max": 0.5}),
    ],
)
def test_loss_against_numpy(name, kind, options):
    """‖û − u‖² of the velocity, per-example mean (or sum), EDM weight w(t) = (σ² + σ_d²α²)/(σ_d·(ασ' − σα'))²,
    per-example weights, batch mean — recomputed in float64 from the loss's own draws."""
    process = make_process(name)
    x0 = np.random.default_rng(1).uniform(-1, 1, (4, 3, 3, 2))
    rng = jax.random.key(5)
    got = flow_matching_loss(linear_network(kind), PARAMS, process, jnp.asarray(x0, jnp.float32), rng,
                             parameterization=kind, **options)  # fmt: skip

    t_key, noise_key = jax.random.split(rng)
    draw = {key: options[key] for key in ("t_sampling", "logit_mean", "logit_std", "mode_scale", "shift") if key in options}
    t = np.asarray(flow.sample_t(t_key, 4, **draw), np.float64)
    low, high = {"x0": (process.t_min, 1.0), "eps": (0.0, process.t_max)}.get(kind, (0.0, 1.0))
    high = min(high, options.get("t_max", 1.0))
    t = low + (high - low) * t
    eps = np.asarray(jax.random.normal(noise_key, x0.shape, jnp.float32), np.float64)
    a, s, da, ds = (v.reshape(4, 1, 1, 1) for v in coefficients64(name, t))
    x_t = a * x0 + s * eps
    output = 0.7 * x_t - 0.3 * t.reshape(4, 1, 1, 1)
    det = a * ds - s * da
    if kind == "velocity":
        u_hat = output
    else:
        if kind == "x0":
            x0_hat, eps_hat = output, (x_t - a * output) / s
        elif kind == "eps":
            x0_hat, eps_hat = (x_t - s * output) / a, output
        else:
            x0_hat, eps_hat = (a * x_t - s * output) / (a**2 + s**2), (s * x_t + a * output) / (a**2 + s**2)
        u_hat = da * x0_hat + ds * eps_hat
    per = (u_hat - (da * x0 + ds * eps)) ** 2
    if options.get("weighting") == "edm":
        sd = options["sigma_data"]
        per = per * (s**2 + sd**2 * a**2) / (sd * det) ** 2
        # = EDM's λ(σ/α)·‖x̂_0 − x_0‖² (x̂_0 of the same prediction)
        level = s / a
        lam = (level**2 + sd**2) / (level * sd) ** 2
        np.testing.assert_allclose(per, lam * (x0_hat - x0) ** 2, rtol=1e-8)
    if "weights" in options:
        per = per * np.asarray(options["weights"]).reshape(4, 1, 1, 1)
    per = per.reshape(4, -1)
    want = np.mean(per.mean(1) if options.get("reduce_mean", True) else per.sum(1))
    assert float(got) == pytest.approx(want, rel=2e-4)


def test_velocity_loss_of_the_exact_velocity_is_the_conditional_variance():
    """With û the exact E[u | x_t] for Gaussian data the loss is the irreducible E‖u − E[u|x_t]‖² > 0, and
    any other network scores higher."""
    process = make_process("flow")
    x0 = jnp.asarray(MU + S * np.random.default_rng(2).normal(size=(4096, 2)), jnp.float32)
    exact = exact_output("flow", "velocity", process)
    best = float(flow_matching_loss(lambda p, x_t, t: exact(x_t, t), None, process, x0, jax.random.key(0)))
    worse = float(flow_matching_loss(lambda p, x_t, t: 1.1 * exact(x_t, t), None, process, x0, jax.random.key(0)))
    # u = ε − x_0 = (x_t − x_0)/t, so Var[u | x_t] = Var[x_0 | x_t]/t² = S²/((1 − t)²S² + t²) per dimension,
    # averaged over t ~ U[0, 1]
    t = np.linspace(0, 1, 200_001)
    conditional_variance = np.mean(S**2 / ((1 - t) ** 2 * S**2 + t**2))
    assert best == pytest.approx(conditional_variance, rel=0.05) and worse > best


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"t_sampling": "cosmap"}, "unknown t sampling 'cosmap'; expected one of ('uniform', 'logit_normal', 'mode')"),
        ({"t_sampling": "logit_normal", "logit_std": 0.0}, "logit_std=0.0 must be a number > 0"),
        ({"t_sampling": "logit_normal", "logit_std": -1.0}, "logit_std=-1.0 must be a number > 0"),
        ({"t_sampling": "mode", "mode_scale": 2.0}, "mode_scale=2.0 must be a number in [-1, 1.7519] (2/(π − 2))"),
        ({"shift": 0.0}, "shift=0.0 must be a number > 0"),
        ({"shift": -3.0}, "shift=-3.0 must be a number > 0"),
        ({"parameterization": "score"}, "unknown flow parameterization 'score'; expected one of ('velocity', 'x0', "
                                        "'eps', 'v')"),
        ({"weighting": "sigma_sqrt"}, "unknown flow loss weighting 'sigma_sqrt'; expected one of ('none', 'edm')"),
        ({"weighting": "edm", "sigma_data": 0.0}, "sigma_data=0.0 must be a number > 0"),
        ({"t_max": 0.0}, "t_max=0.0 must be a number in (0, 1]"),
        ({"t_max": 1.5}, "t_max=1.5 must be a number in (0, 1]"),
        ({"t_max": 0.0005, "parameterization": "x0"}, "t_max=0.0005 leaves no training times above the 'x0' model's "
                                                      "t_min=0.001"),
    ],
)
def test_bad_loss_settings_are_one_line_usage_errors(kwargs, message):
    calls = []
    with pytest.raises(UsageError) as err:
        flow_matching_loss(lambda p, x_t, t: calls.append(1) or x_t, None, make_process("flow"), jnp.zeros((2, 3)),
                           jax.random.key(0), **kwargs)  # fmt: skip
    assert str(err.value) == message and not calls


def test_bad_processes_and_models():
    with pytest.raises(UsageError, match=r"^flow_matching_loss needs a flow process \('flow' or 'gvp'\), got VPProcess$"):
        flow_matching_loss(lambda p, x_t, t: x_t, None, make_process("vp"), jnp.zeros((2, 3)), jax.random.key(0))
    with pytest.raises(ConfigError, match="unknown process 'linear'"):
        make_process("linear")
    with pytest.raises(UsageError, match=r"^FlowModel needs a flow process \('flow' or 'gvp'\), got EDMProcess$"):
        flow.FlowModel(lambda x_t, t: x_t, make_process("edm"))
    with pytest.raises(UsageError, match=r"^unknown flow parameterization 'score'"):
        flow.FlowModel(lambda x_t, t: x_t, make_process("flow"), "score")
    with pytest.raises(UsageError, match=r"^a FlowModel of GVPProcess cannot sample FlowProcess$"):
        flow.velocity_field(flow.FlowModel(lambda x_t, t: x_t, make_process("gvp")), make_process("flow"))
