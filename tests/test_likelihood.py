"""Bits/dim against a float64 NumPy version of the DDPM bound; the stratified estimator; resumable evaluation."""

import json
import math
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.denoisers import model_denoiser
from jaxdiff.evaluation import likelihood
from jaxdiff.evaluation.likelihood import bpd_terms, evaluate_bpd, progress_path, stratified_bpd
from jaxdiff.models.unet import create_model
from jaxdiff.schedule import make_schedule, schedule_from_config
from tests.helpers import ROOT, TINY_CONFIG, free_port, multi_process_env

T = 20


# ---------------------------------------------------------------- float64 reference


class Bound:
    """The DDPM variational bound in float64 NumPy, written from REFERENCE.md ("The math", "Bits/dim")."""

    def __init__(self, betas):
        b = np.asarray(betas, np.float64)
        self.b = b
        self.ac = np.cumprod(1.0 - b)
        self.acp = np.append(1.0, self.ac[:-1])
        self.pv = b * (1.0 - self.acp) / (1.0 - self.ac)
        self.plv = np.log(np.append(self.pv[1], self.pv[1:]))
        self.coef1 = b * np.sqrt(self.acp) / (1.0 - self.ac)
        self.coef2 = (1.0 - self.acp) * np.sqrt(1.0 - b) / (1.0 - self.ac)

    def x_t(self, x0, t, noise):
        return math.sqrt(self.ac[t]) * x0 + math.sqrt(1.0 - self.ac[t]) * noise

    def x0_from(self, output, x_t, t, mean_type):
        if mean_type == "eps":
            return math.sqrt(1.0 / self.ac[t]) * x_t - math.sqrt(1.0 / self.ac[t] - 1.0) * output
        if mean_type == "v":
            return math.sqrt(self.ac[t]) * x_t - math.sqrt(1.0 - self.ac[t]) * output
        return output

    def posterior_mean(self, x0, x_t, t):
        return self.coef1[t] * x0 + self.coef2[t] * x_t

    def model_log_variance(self, t, var_type):
        if var_type == "fixedlarge":
            return np.log(np.append(self.pv[1], self.b[1:]))[t]
        return self.plv[t]

    @staticmethod
    def kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    @staticmethod
    def decoder_log_likelihood(x, mean, log_scale):
        def cdf(z):
            return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

        plus = cdf((x - mean + 1.0 / 255.0) * np.exp(-log_scale))
        minus = cdf((x - mean - 1.0 / 255.0) * np.exp(-log_scale))
        lowest, highest = np.log(np.maximum(plus, 1e-12)), np.log(np.maximum(1 - minus, 1e-12))
        return np.where(x < -0.999, lowest, np.where(x > 0.999, highest, np.log(np.maximum(plus - minus, 1e-12))))

    def term(self, x0, x_t, output, t, *, mean_type, var_type, clip):
        """L_t per image in bits/dim."""
        pred = self.x0_from(output, x_t, t, mean_type)
        if clip:
            pred = np.clip(pred, -1.0, 1.0)
        mean = self.posterior_mean(pred, x_t, t)
        log_variance = self.model_log_variance(t, var_type)
        axes = (1, 2, 3)
        if t == 0:
            return -self.decoder_log_likelihood(x0, mean, 0.5 * log_variance).mean(axes) / math.log(2)
        true_mean = self.posterior_mean(x0, x_t, t)
        return self.kl(true_mean, self.plv[t], mean, log_variance).mean(axes) / math.log(2)

    def prior(self, x0):
        mean, log_variance = math.sqrt(self.ac[-1]) * x0, math.log(1.0 - self.ac[-1])
        return self.kl(mean, log_variance, 0.0, 0.0).mean((1, 2, 3)) / math.log(2)

    def total(self, images, model64, rng, *, mean_type="eps", var_type="fixedlarge", clip=True):
        """(prior + Σ L_t, terms [B, T]) with the noise of step t = normal(fold_in(rng, t)) (as documented)."""
        x0 = images.astype(np.float64) / 127.5 - 1.0
        terms = np.zeros((images.shape[0], len(self.b)))
        for t in reversed(range(len(self.b))):
            noise = np.asarray(jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32), np.float64)
            x_t = self.x_t(x0, t, noise)
            terms[:, t] = self.term(x0, x_t, model64(x_t, t), t, mean_type=mean_type, var_type=var_type, clip=clip)
        return self.prior(x0) + terms.sum(axis=1), terms


# ---------------------------------------------------------------- shared fixtures


def images_with_extremes(batch, size, seed=0):
    """Random uint8 images that contain 0 and 255 (the decoder's edge bins)."""
    images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, -1, -1, -1] = 0, 255
    return images


def analytic_denoiser(schedule, mean_type="eps"):
    """ε̂ = sqrt(1 − ᾱ_t)·x_t + 0.1·sin(3·x_t) as a `mean_type` output; float32 twin of `analytic64`."""
    a = schedule.alphas_cumprod

    def denoise(x, t):
        at = a[t][:, None, None, None]
        eps = jnp.sqrt(1.0 - at) * x + 0.1 * jnp.sin(3.0 * x)
        x0 = (x - jnp.sqrt(1.0 - at) * eps) / jnp.sqrt(at)
        return {"eps": eps, "x_start": x0, "v": jnp.sqrt(at) * eps - jnp.sqrt(1.0 - at) * x0}[mean_type]

    return denoise


def analytic64(bound, mean_type="eps"):
    def denoise(x, t):
        at = bound.ac[t]
        eps = math.sqrt(1.0 - at) * x + 0.1 * np.sin(3.0 * x)
        x0 = (x - math.sqrt(1.0 - at) * eps) / math.sqrt(at)
        return {"eps": eps, "x_start": x0, "v": math.sqrt(at) * eps - math.sqrt(1.0 - at) * x0}[mean_type]

    return denoise


class RandomImages:
    """A minimal source: `num_examples` random uint8 images (the `jaxdiff.data` source interface)."""

    name = "random"

    def __init__(self, num_examples=10, image_shape=(8, 8, 3), seed=0):
        self.num_examples, self.image_shape, self.num_classes = num_examples, image_shape, 0
        self.images = np.random.default_rng(seed).integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
        self.calls = 0

    def get(self, indices):
        self.calls += 1
        return self.images[indices], np.zeros(len(indices), np.int32)


@pytest.fixture(scope="module")
def linear20():
    return make_schedule("linear", T), Bound(np.linspace(1e-4, 0.02, T))


# ---------------------------------------------------------------- the full bound


def tiny_unet_params(model, x, t, seed=0):
    """Random O(1)-scaled parameters (no layer near zero, unlike the 1e-10 init scale)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return jnp.asarray(rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1])), jnp.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=shape), jnp.float32)
        return jnp.asarray(0.2 * rng.normal(size=shape), jnp.float32)

    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.timeout(120)
def test_tiny_unet_bound_matches_float64_reference():
    config = runpy.run_path(TINY_CONFIG)["get_config"]()
    config.diffusion.num_timesteps = T
    schedule = schedule_from_config(config.diffusion)
    model = create_model(config.model)
    images = images_with_extremes(2, config.model.image_size)
    params = tiny_unet_params(model, jnp.zeros(images.shape), jnp.zeros(2, jnp.int32))
    forward = jax.jit(lambda x, t: model.apply({"params": params}, x, t, train=False))
    rng = jax.random.key(7)

    result = bpd_terms(model_denoiser(model, params), schedule, images, rng)

    bound = Bound(np.linspace(config.diffusion.beta_start, config.diffusion.beta_end, T))

    def model64(x_t, t):
        return np.asarray(forward(jnp.asarray(x_t, jnp.float32), jnp.full((2,), t, jnp.int32)), np.float64)

    total, terms = bound.total(images, model64, rng)
    assert result["terms"].shape == (2, T) and result["total"].shape == (2,)
    np.testing.assert_allclose(result["terms"], terms, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result["prior"], bound.prior(images / 127.5 - 1.0), rtol=1e-4)
    np.testing.assert_allclose(result["total"], total, rtol=1e-4)
    assert abs(np.asarray(result["total"])[0] - np.asarray(result["total"])[1]) > 1e-3  # two images, two values


@pytest.mark.parametrize(
    "mean_type, var_type, clip",
    [("x_start", "fixedsmall", False), ("v", "fixedlarge", True)],  # eps, fixedlarge, clipped: the U-Net test
)
def test_bound_of_analytic_denoiser_matches_float64_reference(linear20, mean_type, var_type, clip):
    schedule, bound = linear20
    images = images_with_extremes(2, 6, seed=1)
    rng = jax.random.key(3)
    types = dict(mean_type=mean_type, var_type=var_type)
    denoise = analytic_denoiser(schedule, mean_type)
    result = jax.jit(lambda x, r: bpd_terms(denoise, schedule, x, r, clip_denoised=clip, **types))(images, rng)
    total, terms = bound.total(images, analytic64(bound, mean_type), rng, clip=clip, **types)
    np.testing.assert_allclose(result["terms"], terms, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result["total"], total, rtol=1e-4)


# ---------------------------------------------------------------- the stratified estimator


@pytest.mark.timeout(120)
def test_stratified_estimate_is_unbiased_with_a_consistent_standard_error(linear20):
    schedule, _ = linear20
    copies, num_t = 4000, 5  # strata of 4 steps, grouped (0, 1), (2, 3, 4) for the standard error
    image = images_with_extremes(1, 8, seed=2)
    images = np.repeat(image, copies, axis=0)  # independent draws for one image
    denoise = analytic_denoiser(schedule)
    full = jax.jit(lambda x, r: bpd_terms(denoise, schedule, x, r))(images, jax.random.key(0))
    est = jax.jit(lambda x, r: stratified_bpd(denoise, schedule, x, r, num_t=num_t))(images, jax.random.key(1))
    full_terms, t, terms = (np.asarray(full["terms"], np.float64), np.asarray(est["t"]), np.asarray(est["terms"]))
    totals, stderr = np.asarray(est["total"], np.float64), np.asarray(est["stderr"], np.float64)

    # each t_k is uniform within its stratum [4k, 4k + 4)
    assert t.shape == (copies, num_t)
    np.testing.assert_array_equal(t // 4, np.broadcast_to(np.arange(num_t), t.shape))
    counts = np.bincount(t.ravel(), minlength=T)
    assert np.all(np.abs(counts - copies / 4) < 5 * math.sqrt(copies * 3 / 16)), counts

    # the estimate and its standard error from the returned draws, in float64
    weighted = 4.0 * terms
    np.testing.assert_allclose(totals, np.asarray(est["prior"]) + weighted.sum(axis=1), rtol=1e-5)
    pair, triple = weighted[:, :2], weighted[:, 2:]
    variance = 2 * ((pair - pair.mean(1, keepdims=True)) ** 2).sum(1)
    variance += 1.5 * ((triple - triple.mean(1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(stderr, np.sqrt(variance), rtol=1e-4, atol=1e-6)

    # unbiased: the same mean as the full bound (both Monte Carlo over t and noise)
    full_totals = np.asarray(full["total"], np.float64)
    difference = totals.mean() - full_totals.mean()
    assert abs(difference) < 4 * math.sqrt(totals.var() / copies + full_totals.var() / copies), difference

    # the estimator's variance, and the expected squared standard error, predicted from the full bound's
    # per-step moments: y_k = 4·L_t with t uniform in stratum k, so Var(estimate) = Σ_k Var(y_k) and
    # E[stderr²] = Σ_k Var(y_k) + Σ_groups G/(G−1)·Σ_{k in group} (E y_k − mean_group E y)².
    by_stratum = 4.0 * full_terms.reshape(copies, num_t, 4)
    means = by_stratum.mean(axis=(0, 2))
    variances = (by_stratum**2).mean(axis=(0, 2)) - means**2
    spread = 2 * ((means[:2] - means[:2].mean()) ** 2).sum() + 1.5 * ((means[2:] - means[2:].mean()) ** 2).sum()
    assert totals.var() == pytest.approx(variances.sum(), rel=0.15)
    assert np.mean(stderr**2) == pytest.approx(variances.sum() + spread, rel=0.15)
    assert np.mean(stderr**2) >= 0.9 * totals.var()  # conservative


def test_strata_cover_every_step_once():
    for num_timesteps, num_t in [(20, 5), (1000, 64), (7, 7), (10, 3)]:
        edges = likelihood.strata(num_timesteps, num_t)
        assert edges[0] == 0 and edges[-1] == num_timesteps and len(edges) == num_t + 1
        sizes = np.diff(edges)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


# ---------------------------------------------------------------- evaluation over a test set


def direct_totals(schedule, source, *, batch_size, seed, num_t=None):
    """Per-image totals batch by batch with the documented keys fold_in(key(seed), b), padding with zeros."""
    denoise = analytic_denoiser(schedule)
    if num_t is None:
        estimate = jax.jit(lambda x, key: bpd_terms(denoise, schedule, x, key)["total"])
    else:
        estimate = jax.jit(lambda x, key: stratified_bpd(denoise, schedule, x, key, num_t=num_t)["total"])
    totals = []
    for b, start in enumerate(range(0, source.num_examples, batch_size)):
        images = np.zeros((batch_size, *source.image_shape), np.uint8)
        real = source.images[start : start + batch_size]
        images[: len(real)] = real
        key = jax.random.fold_in(jax.random.key(seed), b)
        totals.extend(np.asarray(estimate(images, key), np.float64)[: len(real)])
    return np.array(totals)


class FailingAt(RandomImages):
    """Raises on the `fail_at`-th call of `get` (0-based), like a job preempted mid-run."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at = fail_at

    def get(self, indices):
        if self.calls == self.fail_at:
            raise RuntimeError("preempted")
        return super().get(indices)


EVALUATION = dict(batch_size=4, seed=5, progress=False)  # 10 images: batches of 4, 4, 2


@pytest.fixture(scope="module")
def uninterrupted(linear20, tmp_path_factory):
    """(denoise_fn, (bpd, stderr)) of one uninterrupted single-process evaluation of `RandomImages()`."""
    schedule, _ = linear20
    denoise = analytic_denoiser(schedule)
    out_path = tmp_path_factory.mktemp("uninterrupted") / "bpd.json"
    return denoise, evaluate_bpd(denoise, schedule, RandomImages(), out_path=out_path, **EVALUATION)


@pytest.mark.timeout(120)
def test_evaluation_resumes_after_the_last_finished_batch(tmp_path, linear20, uninterrupted):
    schedule, _ = linear20
    denoise, whole = uninterrupted

    out = tmp_path / "resumed" / "bpd.json"
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate_bpd(denoise, schedule, FailingAt(1), out_path=out, **EVALUATION)
    [progress] = out.parent.glob("bpd.json.progress-*-0.json")
    saved = json.loads(progress.read_text())
    assert progress == progress_path(out, saved["identity"], 0)
    assert len(saved["totals"]) == 4 and not out.exists()
    source = RandomImages()
    resumed = evaluate_bpd(denoise, schedule, source, out_path=out, **EVALUATION)
    assert source.calls == 2  # only batches 1 and 2
    assert resumed == whole

    expected = direct_totals(schedule, source, batch_size=4, seed=5)
    np.testing.assert_allclose(json.loads(progress.read_text())["totals"], expected, rtol=1e-5)
    assert resumed[0] == pytest.approx(expected.mean(), rel=1e-6)
    assert resumed[1] == pytest.approx(expected.std(ddof=1) / math.sqrt(10), rel=1e-4)
    assert json.loads(out.read_text())["bpd"] == resumed[0]

    again = RandomImages()
    assert evaluate_bpd(denoise, schedule, again, out_path=out, **EVALUATION) == whole and again.calls == 0

    # Another setting starts its own progress file and leaves the old one alone.
    before = progress.read_bytes()
    ten = make_schedule("linear", 10)
    other = evaluate_bpd(analytic_denoiser(ten), ten, RandomImages(), out_path=out, **EVALUATION)
    assert other != whole and json.loads(out.read_text())["num_timesteps"] == 10
    assert len(list(out.parent.glob("bpd.json.progress-*-0.json"))) == 2 and progress.read_bytes() == before
    cut = tmp_path / "cut.json"
    cut_progress = progress_path(cut, saved["identity"], 0)
    cut_progress.write_text(json.dumps({"identity": saved["identity"], "totals": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match="holds 3 totals, not a whole number of batches; delete it to start over"):
        evaluate_bpd(denoise, schedule, source, out_path=cut, **EVALUATION)
    cut_progress.write_text("{")
    with pytest.raises(ValueError, match="is unreadable .*delete it to start this evaluation over"):
        evaluate_bpd(denoise, schedule, source, out_path=cut, **EVALUATION)


def test_stratified_evaluation_of_the_first_images(tmp_path, linear20):
    schedule, _ = linear20
    source = RandomImages()
    bpd, stderr = evaluate_bpd(
        analytic_denoiser(schedule), schedule, source, batch_size=2, num_images=5, num_t=4, seed=1,
        out_path=tmp_path / "strat.json", progress=False,
    )  # fmt: skip
    first = RandomImages(num_examples=5)
    first.images = source.images[:5]
    expected = direct_totals(schedule, first, batch_size=2, seed=1, num_t=4)
    assert bpd == pytest.approx(expected.mean(), rel=1e-6)
    assert stderr == pytest.approx(expected.std(ddof=1) / math.sqrt(5), rel=1e-4)


TWO_HOSTS = """
import json, sys, jax
jax.config.update("jax_num_cpu_devices", 2)
from jaxdiff import sharding
sharding.initialize_distributed("127.0.0.1:{port}", 2, int(sys.argv[1]))
from jaxdiff.evaluation.likelihood import evaluate_bpd
from jaxdiff.schedule import make_schedule
from tests.test_likelihood import RandomImages, analytic_denoiser
schedule = make_schedule("linear", {T})
source = RandomImages()
bpd, stderr = evaluate_bpd(analytic_denoiser(schedule), schedule, source, batch_size=4, seed=5,
                           out_path={out!r}, progress=False)
with open({out!r} + f".{{sys.argv[1]}}.result", "w") as f:  # not stdout: gloo's threads write there too
    json.dump([bpd, stderr, source.calls], f)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_hosts_with_two_devices_each_match_one_process(tmp_path, uninterrupted):
    _, single = uninterrupted
    code = TWO_HOSTS.format(port=free_port(), T=T, out=str(tmp_path / "two.json"))
    env = {name: value for name, value in multi_process_env().items() if name != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads((tmp_path / f"two.json.{i}.result").read_text()) for i in range(2)]
    assert [calls for _, _, calls in results] == [2, 1]  # batches 0 and 2 on process 0, batch 1 on process 1
    for bpd, stderr, _ in results:
        assert bpd == pytest.approx(single[0], rel=1e-6) and stderr == pytest.approx(single[1], rel=1e-5)
    assert json.loads((tmp_path / "two.json").read_text())["process_count"] == 2


# ---------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_any_work(tmp_path, linear20):
    schedule, _ = linear20
    denoise = analytic_denoiser(schedule)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="uint8"):
        bpd_terms(denoise, schedule, np.zeros((2, 4, 4, 3), np.float32), key)
    with pytest.raises(ValueError, match=r"NHWC.*\(4, 4, 3\)"):
        bpd_terms(denoise, schedule, np.zeros((4, 4, 3), np.uint8), key)
    with pytest.raises(ValueError, match="mean_type 'epsilon'"):
        bpd_terms(denoise, schedule, np.zeros((2, 4, 4, 3), np.uint8), key, mean_type="epsilon")
    for num_t in (1, 21, 2.5):
        with pytest.raises(ValueError, match=rf"num_t={num_t}.*T=20"):
            stratified_bpd(denoise, schedule, np.zeros((2, 4, 4, 3), np.uint8), key, num_t=num_t)

    source = RandomImages()
    for bad, message in [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(batch_size=4, num_images=11), r"num_images=11 must lie in \[1, 10\]"),
        (dict(batch_size=4, num_t=40), "num_t=40"),
        (dict(batch_size=4, var_type="large"), "var_type 'large'"),
    ]:
        with pytest.raises(ValueError, match=message):
            evaluate_bpd(denoise, schedule, source, out_path=tmp_path / "bad.json", progress=False, **bad)
    assert source.calls == 0 and not list(tmp_path.iterdir())
