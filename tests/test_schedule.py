"""Noise schedules against REFERENCE.md's golden values and a float64 NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.schedule import BETA_SCHEDULES, beta_schedule, make_schedule, respace, schedule_from_betas

# REFERENCE.md, linear schedule, float64.
GOLDEN = {
    0: (0.9999, 0.0, -9.81672513529567, 1.0, 0.0),
    1: (0.9997800920720721, 5.4531876613021935e-05, -9.81672513529567, 0.5452914995102903, 0.4547084989905303),
    487: (0.0885857323205931, 0.00979157198569004, -4.6262332647792235, 0.0032164385528130487, 0.9941301128045488),
    999: (4.035829765375676e-05, 0.01999998352656061, -3.912023829100455, 0.00012835148717224682, 0.9899486782675173),
}
GOLDEN_FIELDS = (
    "alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def reference_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The tables written out independently in float64, element by element."""
    T = len(betas)
    ac = np.empty(T)
    running = 1.0
    for i, b in enumerate(betas):
        running *= 1.0 - b
        ac[i] = running
    prev = np.array([1.0] + list(ac[:-1]))
    pv = np.array([betas[i] * (1 - prev[i]) / (1 - ac[i]) for i in range(T)])
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
        "log_one_minus_alphas_cumprod": np.log(1 - ac),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - ac) / ac),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.concatenate([[pv[1]], pv[1:]])),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - ac),
        "fixedlarge_log_variance": np.log(np.concatenate([[pv[1]], betas[1:]])),
    }


@pytest.mark.parametrize("t", sorted(GOLDEN))
def test_golden_values(t):
    schedule = make_schedule("linear", 1000)
    for field, expected in zip(GOLDEN_FIELDS, GOLDEN[t]):
        got = float(getattr(schedule, field)[t])
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-12), field


def test_tables_are_float32_with_length_T():
    schedule = make_schedule("cosine", 37)
    for field, value in vars(schedule).items():
        assert value.dtype == jnp.float32, field
        assert value.shape == (37,), field
    assert schedule.num_timesteps == 37


@pytest.mark.parametrize("name", sorted(set(BETA_SCHEDULES) - {"jsd"}))
def test_every_table_matches_float64_reference(name):
    betas = beta_schedule(name, 1000)
    schedule = schedule_from_betas(betas)
    for field, expected in reference_tables(betas).items():
        np.testing.assert_allclose(np.asarray(getattr(schedule, field)), expected, rtol=1e-6, atol=0, err_msg=field)


def test_named_betas():
    T = 1000
    np.testing.assert_allclose(beta_schedule("linear", T), 1e-4 + np.arange(T) * (0.02 - 1e-4) / (T - 1), rtol=1e-12)
    quad = beta_schedule("quad", T, beta_start=1e-4, beta_end=0.02)
    assert quad[0] == pytest.approx(1e-4) and quad[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), T), rtol=1e-12)
    np.testing.assert_array_equal(beta_schedule("const", 10, beta_end=0.3), np.full(10, 0.3))
    np.testing.assert_allclose(beta_schedule("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1])
    warm = beta_schedule("warmup10", T)
    np.testing.assert_allclose(warm[:100], np.linspace(1e-4, 0.02, 100), rtol=1e-12)
    np.testing.assert_array_equal(warm[100:], 0.02)
    assert np.all(beta_schedule("warmup50", T)[500:] == 0.02) and beta_schedule("warmup50", T)[499] == 0.02
    assert beta_schedule("warmup50", T)[0] == 1e-4


def test_cosine_follows_its_alphas_cumprod():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = beta_schedule("cosine", T)
    for t in (0, 1, 500, 998):
        assert betas[t] == pytest.approx(min(1 - f(t + 1) / f(t), 0.999), rel=1e-12)
    assert betas[-1] == 0.999  # clipped
    ac = np.cumprod(1 - betas)
    assert ac[499] == pytest.approx(f(500) / f(0), rel=1e-9)


def test_schedule_passes_through_jit():
    schedule = make_schedule("linear", 1000)
    lookup = jax.jit(lambda s, t: s.alphas_cumprod[t] * s.num_timesteps)
    assert float(lookup(schedule, 487)) == pytest.approx(0.0885857323205931 * 1000, rel=1e-6)


def test_respace_keeps_q_at_kept_steps():
    schedule = make_schedule("linear", 1000)
    kept = np.arange(0, 1000, 10)
    spaced = respace(schedule, kept)
    assert spaced.num_timesteps == 100
    np.testing.assert_allclose(spaced.alphas_cumprod, np.asarray(schedule.alphas_cumprod)[kept], rtol=1e-6)
    identity = respace(schedule, np.arange(1000))
    np.testing.assert_allclose(identity.betas, schedule.betas, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_schedule("tanh", 10), "tanh"),
        (lambda: make_schedule("linear", 0), "0"),
        (lambda: make_schedule("linear", -5), "-5"),
        (lambda: make_schedule("linear", 2.5), "2.5"),
        (lambda: make_schedule("linear", 10, beta_end=1.5), "1.5"),
        (lambda: make_schedule("linear", 10, beta_start=0.0), "0.0"),
        (lambda: make_schedule("cosine", 10, beta_end=0.1), "beta_end"),
        (lambda: schedule_from_betas([0.1, -0.2]), "-0.2"),
        (lambda: respace(make_schedule("linear", 10), [0, 5, 5]), "increasing"),
        (lambda: respace(make_schedule("linear", 10), [0, 10]), "10"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
