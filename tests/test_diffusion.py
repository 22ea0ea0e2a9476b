"""The diffusion functions against an independent float64 NumPy reference."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxdiff import diffusion as D
from jaxdiff.schedule import beta_schedule, make_schedule

T = 1000
SHAPE = (6, 4, 4, 3)


# ---------------------------------------------------------------- float64 reference


class Ref:
    """The DDPM math written from the paper/REFERENCE.md in float64 NumPy."""

    def __init__(self, betas):
        self.b = np.asarray(betas, np.float64)
        self.ac = np.cumprod(1 - self.b)
        self.acp = np.append(1.0, self.ac[:-1])
        self.pv = self.b * (1 - self.acp) / (1 - self.ac)
        self.plv = np.log(np.append(self.pv[1], self.pv[1:]))

    def at(self, table, t):
        return table[t][:, None, None, None]

    def q_sample(self, x0, t, eps):
        return np.sqrt(self.at(self.ac, t)) * x0 + np.sqrt(1 - self.at(self.ac, t)) * eps

    def posterior(self, x0, xt, t):
        ac, acp, b = self.at(self.ac, t), self.at(self.acp, t), self.at(self.b, t)
        mean = b * np.sqrt(acp) / (1 - ac) * x0 + (1 - acp) * np.sqrt(1 - b) / (1 - ac) * xt
        return mean, self.at(self.pv, t), self.at(self.plv, t)

    def x0_from_eps(self, xt, t, eps):
        ac = self.at(self.ac, t)
        return xt / np.sqrt(ac) - np.sqrt(1 / ac - 1) * eps

    def x0_from_v(self, xt, t, v):
        ac = self.at(self.ac, t)
        return np.sqrt(ac) * xt - np.sqrt(1 - ac) * v

    def variance(self, t, var_type, var_out=None):
        if var_type == "fixedlarge":
            return self.at(self.b, t), self.at(np.log(np.append(self.pv[1], self.b[1:])), t)
        if var_type == "fixedsmall":
            return self.at(self.pv, t), self.at(self.plv, t)
        if var_type == "learned":
            return np.exp(var_out), var_out
        frac = (var_out + 1) / 2
        lv = frac * self.at(np.log(self.b), t) + (1 - frac) * self.at(self.plv, t)
        return np.exp(lv), lv

    def p_mean_variance(self, out, xt, t, mean_type, var_type, clip):
        c = xt.shape[-1]
        mean_out, var_out = (out[..., :c], out[..., c:]) if var_type.startswith("learned") else (out, None)
        x0 = {
            "eps": lambda: self.x0_from_eps(xt, t, mean_out),
            "x_start": lambda: mean_out,
            "v": lambda: self.x0_from_v(xt, t, mean_out),
        }[mean_type]()
        if clip:
            x0 = np.clip(x0, -1, 1)
        mean, _, _ = self.posterior(x0, xt, t)
        var, logvar = self.variance(t, var_type, var_out)
        return mean, var, logvar, x0

    @staticmethod
    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    @staticmethod
    def cdf(x):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def decoder_loglik(self, x, mean, log_scale):
        inv = np.exp(-log_scale)
        upper = self.cdf(inv * (x - mean + 1 / 255))
        lower = self.cdf(inv * (x - mean - 1 / 255))
        out = np.log(np.maximum(upper - lower, 1e-12))
        out = np.where(x < -0.999, np.log(np.maximum(upper, 1e-12)), out)
        return np.where(x > 0.999, np.log(np.maximum(1 - lower, 1e-12)), out)

    def vb_bpd(self, out, x0, xt, t, mean_type, var_type, clip):
        true_mean, _, true_lv = self.posterior(x0, xt, t)
        mean, _, lv, _ = self.p_mean_variance(out, xt, t, mean_type, var_type, clip)
        kl = self.kl(true_mean, true_lv, mean, lv).mean(axis=(1, 2, 3)) / math.log(2)
        nll = -self.decoder_loglik(x0, mean, 0.5 * lv).mean(axis=(1, 2, 3)) / math.log(2)
        return np.where(t == 0, nll, kl)


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("linear", T)


@pytest.fixture(scope="module")
def ref():
    return Ref(beta_schedule("linear", T))


def sample_inputs(seed, channels=3):
    """Random float32 inputs (as the model sees them) and t covering 0 and T-1."""
    rng = np.random.default_rng(seed)
    shape = SHAPE[:3] + (channels,)
    # x_0 on the 8-bit grid, including the edge bins -1 and 1.
    x0 = (rng.integers(0, 256, shape) / 127.5 - 1).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    t = np.array([0, T - 1, 1, *rng.integers(0, T, SHAPE[0] - 3)], dtype=np.int32)
    return x0, eps, t


def assert_close(got, want, rtol=2e-5):
    """Relative agreement, with an absolute floor scaled to the reference's magnitude."""
    want = np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_and_q_mean_variance(schedule, ref):
    x0, eps, t = sample_inputs(0)
    assert_close(D.q_sample(schedule, x0, t, eps), ref.q_sample(x0, t, eps))
    mean, var, logvar = D.q_mean_variance(schedule, x0, t)
    assert_close(mean, np.sqrt(ref.at(ref.ac, t)) * x0)
    assert_close(var, 1 - ref.at(ref.ac, t))
    assert_close(logvar, np.log(1 - ref.at(ref.ac, t)))


def test_q_posterior_mean_variance(schedule, ref):
    x0, eps, t = sample_inputs(1)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    got = D.q_posterior_mean_variance(schedule, x0, xt, t)
    want = ref.posterior(x0, xt, t)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert float(got[1][0, 0, 0, 0]) == 0.0  # t = 0: the posterior is a point mass
    assert float(got[2][0, 0, 0, 0]) == pytest.approx(-9.81672513529567, rel=1e-6)


def test_parameterisation_conversions(schedule, ref):
    x0, eps, t = sample_inputs(2)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    assert_close(D.predict_start_from_noise(schedule, xt, t, eps), ref.x0_from_eps(xt, t, eps), rtol=1e-4)
    v = np.sqrt(ref.at(ref.ac, t)) * eps - np.sqrt(1 - ref.at(ref.ac, t)) * x0
    assert_close(D.v_target(schedule, x0, t, eps), v)
    assert_close(D.predict_start_from_v(schedule, xt, t, v.astype(np.float32)), x0, rtol=1e-5)
    x0_hat = ref.x0_from_eps(xt, t, eps)
    assert_close(D.predict_noise_from_start(schedule, xt, t, x0_hat.astype(np.float32)), eps, rtol=1e-3)


@pytest.mark.parametrize("mean_type", ["eps", "x_start", "v"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance(schedule, ref, mean_type, var_type, clip):
    x0, eps, t = sample_inputs(3)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    rng = np.random.default_rng(4)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    if var_type.startswith("learned"):
        var_out = rng.uniform(-1, 1, SHAPE) if var_type == "learned_range" else rng.uniform(-9, -3, SHAPE)
        out = np.concatenate([out, var_out.astype(np.float32)], axis=-1)
    got = D.p_mean_variance(schedule, out, xt, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip)
    want = ref.p_mean_variance(out.astype(np.float64), xt, t, mean_type, var_type, clip)
    for name, g, w in zip(("mean", "variance", "log_variance", "pred_x_start"), got, want):
        assert_close(np.broadcast_to(g, np.shape(w)), w, rtol=1e-4 if mean_type == "eps" else 2e-5)
    if clip:
        assert np.all(np.abs(np.asarray(got[3])) <= 1.0)


def test_fixedlarge_index_zero_rule(schedule):
    """Official code: variance β_0 but log-variance log(β̃_1) at t = 0."""
    x = jnp.zeros((1, 2, 2, 1))
    t = jnp.zeros((1,), jnp.int32)
    _, var, logvar, _ = D.p_mean_variance(schedule, x, x, t, var_type="fixedlarge")
    assert float(var.squeeze()) == pytest.approx(1e-4, rel=1e-6)
    assert float(logvar.squeeze()) == pytest.approx(-9.81672513529567, rel=1e-6)
    _, var_small, _, _ = D.p_mean_variance(schedule, x, x, t, var_type="fixedsmall")
    assert float(var_small.squeeze()) == 0.0


# ---------------------------------------------------------------- likelihood terms


def test_normal_kl_and_cdf_against_reference():
    rng = np.random.default_rng(5)
    m1, lv1, m2, lv2 = (rng.standard_normal(50).astype(np.float32) for _ in range(4))
    assert_close(D.normal_kl(m1, lv1, m2, lv2), Ref.kl(*(a.astype(np.float64) for a in (m1, lv1, m2, lv2))))
    x = np.linspace(-5, 5, 101).astype(np.float32)
    assert_close(D.approx_standard_normal_cdf(x), Ref.cdf(x.astype(np.float64)), rtol=1e-6)


def test_discretized_gaussian_log_likelihood(ref):
    rng = np.random.default_rng(6)
    x = (rng.integers(0, 256, (4, 8, 8, 3)) / 127.5 - 1).astype(np.float32)
    mean = (x + 0.03 * rng.standard_normal(x.shape)).astype(np.float32)
    log_scale = rng.uniform(-6, -2, x.shape).astype(np.float32)
    got = D.discretized_gaussian_log_likelihood(x, means=mean, log_scales=log_scale)
    want = ref.decoder_loglik(x.astype(np.float64), mean.astype(np.float64), log_scale.astype(np.float64))
    # float32 differences of two CDFs near 1 lose all digits in the far tail (as in the official
    # float32 code): compare values where the bin holds at least 1e-3 of the mass; beyond, both are tiny.
    held = want > math.log(1e-3)
    assert held.mean() > 0.5
    np.testing.assert_allclose(np.asarray(got)[held], want[held], rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(got)[~held] < math.log(2e-3))


@settings(max_examples=25, deadline=None)
@given(mean=st.floats(-1.2, 1.2), log_scale=st.floats(-6.0, 0.5))
def test_decoder_probabilities_sum_to_one_over_256_bins(mean, log_scale):
    bins = (np.arange(256) / 127.5 - 1).astype(np.float32)
    logp = D.discretized_gaussian_log_likelihood(
        jnp.asarray(bins), means=jnp.full(256, mean, jnp.float32), log_scales=jnp.full(256, log_scale, jnp.float32)
    )
    assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    m1=st.floats(-5, 5), lv1=st.floats(-10, 3), m2=st.floats(-5, 5), lv2=st.floats(-10, 3)
)
def test_kl_is_non_negative_and_zero_on_equal(m1, lv1, m2, lv2):
    assert float(D.normal_kl(m1, lv1, m2, lv2)) >= -1e-5
    assert float(D.normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, T - 1), seed=st.integers(0, 2**16))
def test_posterior_of_a_forward_sample_is_consistent(t, seed):
    schedule = make_schedule("linear", T)
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (1, 2, 2, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    tt = jnp.array([t])
    # Noise-free forward path: x_t = sqrt(ᾱ_t)·x_0 has posterior mean sqrt(ᾱ_{t-1})·x_0.
    noiseless = D.q_sample(schedule, x0, tt, np.zeros_like(x0))
    mean, _, _ = D.q_posterior_mean_variance(schedule, x0, noiseless, tt)
    np.testing.assert_allclose(mean, math.sqrt(float(schedule.alphas_cumprod_prev[t])) * x0, rtol=1e-4, atol=1e-6)
    # ε recovers x_0 from a noisy forward sample, and the posterior from the recovered x_0 is the same.
    xt = D.q_sample(schedule, x0, tt, eps)
    recovered = D.predict_start_from_noise(schedule, xt, tt, eps)
    np.testing.assert_allclose(recovered, x0, atol=2e-5 * float(schedule.sqrt_recip_alphas_cumprod[t]))


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_vb_terms_bpd(schedule, ref, var_type, clip):
    channels = 2 if var_type == "learned_range" else 1
    x0, eps, t = sample_inputs(7, channels=3)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    rng = np.random.default_rng(8)
    out = np.concatenate([eps + 0.1 * rng.standard_normal(eps.shape)] * channels, axis=-1).astype(np.float32)
    if var_type == "learned_range":
        out[..., 3:] = rng.uniform(-1, 1, SHAPE)
    got, _ = D.vb_terms_bpd(schedule, out, x_start=x0, x_t=xt, t=t, var_type=var_type, clip_denoised=clip)
    want = ref.vb_bpd(out.astype(np.float64), x0, xt, t, "eps", var_type, clip)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)


def test_prior_bpd(schedule, ref):
    x0, _, _ = sample_inputs(9)
    ac = ref.ac[-1]
    want = Ref.kl(np.sqrt(ac) * x0, np.log(1 - ac), 0.0, 0.0).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(D.prior_bpd(schedule, x0), want, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("mean_type", ["eps", "x_start", "v"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_mse_loss_and_min_snr_weight(schedule, ref, mean_type, gamma):
    x0, eps, t = sample_inputs(10)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    out = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
    got = D.training_losses(schedule, out, x_start=x0, x_t=xt, t=t, noise=eps, mean_type=mean_type, min_snr_gamma=gamma)
    ac = ref.ac[t]
    target = {
        "eps": eps,
        "x_start": x0,
        "v": np.sqrt(ref.at(ref.ac, t)) * eps - np.sqrt(1 - ref.at(ref.ac, t)) * x0,
    }[mean_type]
    want = ((target - out) ** 2).mean(axis=(1, 2, 3))
    if gamma:
        snr = ac / (1 - ac)
        want = want * {"eps": np.minimum(snr, gamma) / snr, "x_start": np.minimum(snr, gamma),
                       "v": np.minimum(snr, gamma) / (snr + 1)}[mean_type]  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kl_loss_is_the_unclipped_bound(schedule, ref):
    x0, eps, t = sample_inputs(12)
    xt = ref.q_sample(x0, t, eps).astype(np.float32)
    out = (eps + 0.3).astype(np.float32)
    got = D.training_losses(schedule, out, x_start=x0, x_t=xt, t=t, noise=eps, loss_type="kl")
    np.testing.assert_allclose(got, ref.vb_bpd(out, x0, xt, t, "eps", "fixedlarge", False), rtol=2e-3, atol=1e-5)


def test_hybrid_loss_stops_the_bound_gradient_at_the_mean(schedule, ref):
    x0, eps, t = sample_inputs(13)
    xt = jnp.asarray(ref.q_sample(x0, t, eps), jnp.float32)
    rng = np.random.default_rng(14)
    out = np.concatenate([rng.standard_normal(SHAPE), rng.uniform(-1, 1, SHAPE)], axis=-1).astype(np.float32)

    def loss(o, loss_type):
        return jnp.sum(D.training_losses(
            schedule, o, x_start=x0, x_t=xt, t=t, noise=eps, var_type="learned_range", loss_type=loss_type
        ))  # fmt: skip

    hybrid = loss(out, "hybrid")
    mse = jnp.sum(((eps - out[..., :3]) ** 2).mean(axis=(1, 2, 3)))
    bound = ref.vb_bpd(out.astype(np.float64), x0, np.asarray(xt), t, "eps", "learned_range", False)
    np.testing.assert_allclose(hybrid, float(mse) + 0.001 * T * bound.sum(), rtol=1e-3)
    grad = jax.grad(loss)(out, "hybrid")
    mse_grad = 2 * (out[..., :3] - eps) / np.prod(SHAPE[1:])
    np.testing.assert_allclose(grad[..., :3], mse_grad, rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(grad[..., 3:]))) > 0  # the variance does learn from the bound


def test_jit_equals_eager(schedule):
    x0, eps, t = sample_inputs(15)
    out = np.concatenate([eps, np.zeros_like(eps)], axis=-1)

    def everything(s, x0, eps, t, out):
        xt = D.q_sample(s, x0, t, eps)
        pmv = D.p_mean_variance(s, out, xt, t, var_type="learned_range")
        loss = D.training_losses(s, out, x_start=x0, x_t=xt, t=t, noise=eps, var_type="learned_range", loss_type="hybrid")
        return xt, pmv, loss, D.prior_bpd(s, x0)

    eager = everything(schedule, x0, eps, t, out)
    jitted = jax.jit(everything)(schedule, x0, eps, t, out)
    # Fusion may reorder float32 ops; x̂_0 at t = T-1 amplifies rounding by sqrt(1/ᾱ) ≈ 157.
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=5e-5)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(schedule):
    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.array([0, 1])
    with pytest.raises(ValueError, match="NHWC"):
        D.q_sample(schedule, jnp.zeros((4, 4, 3)), t, jnp.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="1000"):
        D.q_sample(schedule, x, jnp.array([0, 1000]), x)
    with pytest.raises(ValueError, match="-1"):
        D.q_sample(schedule, x, jnp.array([-1, 3]), x)
    with pytest.raises(ValueError, match="integer"):
        D.q_sample(schedule, x, jnp.array([0.5, 1.0]), x)
    with pytest.raises(ValueError, match=r"\[B\]"):
        D.q_sample(schedule, x, jnp.array([0, 1, 2]), x)
    with pytest.raises(ValueError, match="'epsilon'"):
        D.p_mean_variance(schedule, x, x, t, mean_type="epsilon")
    with pytest.raises(ValueError, match="'large'"):
        D.p_mean_variance(schedule, x, x, t, var_type="large")
    with pytest.raises(ValueError, match="6 channels"):
        D.p_mean_variance(schedule, x, x, t, var_type="learned")
    with pytest.raises(ValueError, match="'l1'"):
        D.training_losses(schedule, x, x_start=x, x_t=x, t=t, noise=x, loss_type="l1")
    with pytest.raises(ValueError, match="hybrid"):
        D.training_losses(schedule, jnp.zeros((2, 4, 4, 6)), x_start=x, x_t=x, t=t, noise=x, var_type="learned")
    with pytest.raises(ValueError, match="learned variance"):
        D.training_losses(schedule, x, x_start=x, x_t=x, t=t, noise=x, loss_type="hybrid")
