"""Autoencoder training: the loss and its KL term against float64 NumPy, the adaptive weight against a direct
gradient, the PatchGAN against a PyTorch build of pix2pix's, the scaling factor against NumPy, learning on
shapes, bitwise determinism, and the loss settings' errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.training.autoencoder_step import (
    PatchDiscriminator,
    check_loss_settings,
    encode_fn,
    estimate_scaling_factor,
    hinge_discriminator_loss,
    init_autoencoder_train_state,
    make_autoencoder_loss_fn,
    make_autoencoder_train_step,
    make_discriminator,
    reconstruct,
)
from jaxdiff.data import draw_shapes
from jaxdiff.models.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    autoencoder_config,
    create_autoencoder,
)
from jaxdiff.training.step import make_optimizer

TINY = {
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}
IMAGE_SHAPE = (32, 32, 3)


def training_section(**overrides) -> ml_collections.ConfigDict:
    values = {"learning_rate": 2e-3, "warmup_steps": 10, "grad_clip_norm": 1.0, "adam_b1": 0.9, "adam_b2": 0.999,
              "adam_eps": 1e-8, "ema_decay": 0.99}  # fmt: skip
    return ml_collections.ConfigDict({**values, **overrides})


@pytest.fixture(scope="module")
def model() -> AutoencoderKL:
    return create_autoencoder(autoencoder_config(TINY))


@pytest.fixture(scope="module")
def params(model):
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]


def shapes_batch(n: int, seed: int = 0) -> np.ndarray:
    return draw_shapes(n, seed=seed)[0]


def to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) / 127.5 - 1.0


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_and_kl_match_numpy(model, params, kind):
    kl_weight = 0.01
    loss_fn = jax.jit(make_autoencoder_loss_fn(model, None, {"reconstruction_loss": kind, "kl_weight": kl_weight}))
    images = shapes_batch(3)
    x = to_unit(images)
    rng = jax.random.PRNGKey(5)
    loss, aux = loss_fn(params, None, jnp.asarray(x, jnp.float32), rng, True)

    encode = jax.jit(lambda p, v: model.apply({"params": p}, v, method=AutoencoderKL.encode))
    posterior = encode(params, jnp.asarray(x, jnp.float32))
    mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
    noise = np.asarray(jax.random.normal(rng, mean.shape), np.float64)
    z = mean + np.exp(0.5 * logvar) * noise
    np.testing.assert_allclose(aux["z"], z, rtol=1e-5, atol=1e-5)
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, aux["z"])
    np.testing.assert_allclose(aux["reconstruction"], decoded, rtol=1e-5, atol=1e-5)

    reconstruction = np.asarray(aux["reconstruction"], np.float64)
    difference = x - reconstruction
    rec = np.mean(np.abs(difference)) if kind == "l1" else np.mean(difference**2)
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))  # summed per example
    assert kl > 10  # the KL term is not negligible against rec at this weight
    np.testing.assert_allclose(aux["reconstruction_error"], rec, rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, rec + kl_weight * kl, rtol=1e-5)


def test_adaptive_weight_and_discriminator_term_match_direct_gradients(model, params):
    settings = {"disc_weight": 0.5, "disc_layers": 2, "disc_channels": 8, "kl_weight": 0.0}
    discriminator = make_discriminator(settings)
    disc_params = discriminator.init(jax.random.PRNGKey(1), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    loss_fn = jax.jit(make_autoencoder_loss_fn(model, discriminator, settings))
    x = jnp.asarray(to_unit(shapes_batch(2)), jnp.float32)
    rng = jax.random.PRNGKey(2)
    loss_on, aux = loss_fn(params, disc_params, x, rng, True)
    loss_off, _ = loss_fn(params, disc_params, x, rng, False)

    def terms(p):  # the reconstruction and generator losses as functions of all parameters
        z = model.apply({"params": p}, x, method=AutoencoderKL.encode).sample(rng)
        r = model.apply({"params": p}, z, method=AutoencoderKL.decode)
        return jnp.mean(jnp.abs(x - r)), -jnp.mean(discriminator.apply({"params": disc_params}, r))

    (rec, g_loss), grads = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(params)
    rec_grad, g_grad = (g["decoder"]["conv_out"]["kernel"] for g in grads)
    rec_norm, g_norm = np.linalg.norm(np.asarray(rec_grad, np.float64)), np.linalg.norm(np.asarray(g_grad, np.float64))
    weight = 0.5 * min(rec_norm / (g_norm + 1e-4), 1e4)
    np.testing.assert_allclose(aux["disc_adaptive_weight"], weight, rtol=1e-4)
    np.testing.assert_allclose(aux["g_loss"], g_loss, rtol=1e-5)
    np.testing.assert_allclose(loss_off, rec, rtol=1e-5)
    np.testing.assert_allclose(loss_on, float(rec) + weight * float(g_loss), rtol=1e-4, atol=1e-7)


def test_hinge_loss_matches_numpy():
    real = np.array([[0.3, 1.7], [-0.4, 2.0]])
    fake = np.array([[-2.0, 0.1], [-0.5, 0.9]])
    reference = 0.5 * (np.mean(np.maximum(1 - real, 0)) + np.mean(np.maximum(1 + fake, 0)))
    np.testing.assert_allclose(hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake)), reference, rtol=1e-6)


def test_patch_discriminator_matches_pytorch_pix2pix(torch):
    nn = torch.nn
    layers, channels = 2, 4
    discriminator = PatchDiscriminator(layers, channels)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    disc_params = discriminator.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    # pix2pix's NLayerDiscriminator with BatchNorm, in training mode (batch statistics)
    widths = [channels * min(2**n, 8) for n in range(layers + 1)]
    modules = [nn.Conv2d(3, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
    for n in range(1, layers + 1):
        stride = 2 if n < layers else 1
        modules += [nn.Conv2d(widths[n - 1], widths[n], 4, stride, 1, bias=False), nn.BatchNorm2d(widths[n]),
                    nn.LeakyReLU(0.2)]  # fmt: skip
    modules.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
    net = nn.Sequential(*modules).train()
    names = [f"conv_{n}" for n in range(layers + 1)] + ["conv_out"]
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    norms = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for conv, name in zip(convs, names):
            conv.weight.copy_(torch.from_numpy(np.asarray(disc_params[name]["kernel"]).transpose(3, 2, 0, 1).copy()))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.asarray(disc_params[name]["bias"]) + 0.1))
                disc_params[name]["bias"] = disc_params[name]["bias"] + 0.1
        for norm, n in zip(norms, range(1, layers + 1)):
            norm.weight.copy_(torch.from_numpy(np.array(disc_params[f"norm_{n}"]["scale"])))
            norm.bias.copy_(torch.full((widths[n],), 0.05))
            disc_params[f"norm_{n}"]["bias"] = jnp.full((widths[n],), 0.05)
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ours = discriminator.apply({"params": disc_params}, jnp.asarray(x))
    assert ours.shape == expected.shape == (3, 2, 2, 1)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_scaling_factor_matches_numpy_on_fixed_latents():
    images = np.random.default_rng(3).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)

    def encode(p, x):  # fixed latents: an affine map of the image, constant log-variance
        return DiagonalGaussian(x * p["gain"] + 0.5, jnp.full(x.shape, -1.0))

    p = {"gain": 3.0}
    mean = to_unit(images) * 3.0 + 0.5
    np.testing.assert_allclose(estimate_scaling_factor(encode, p, images, batch_size=4), 1 / np.std(mean, ddof=1),
                               rtol=1e-6)  # fmt: skip
    rng = jax.random.PRNGKey(7)
    noise = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), (4, 4, 4, 3))) for i in range(3)]
    samples = mean + np.exp(-0.5) * np.concatenate(noise)[:10]
    sampled = estimate_scaling_factor(encode, p, images, rng, batch_size=4)
    np.testing.assert_allclose(sampled, 1 / np.std(samples, ddof=1), rtol=1e-6)


STEPS = 150
BATCH = 8
MAX_ERROR_RATIO = 0.2  # measured on the held-out batch: 0.916 at step 0, 0.112 after 150 steps (0.12)


@pytest.mark.slow
def test_training_on_shapes_lowers_the_reconstruction_error(model):
    settings = {"reconstruction_loss": "l1", "kl_weight": 1e-6}
    training = training_section()
    tx = make_optimizer(training)
    state = init_autoencoder_train_state(model, None, tx, 0, IMAGE_SHAPE)
    train_step = jax.jit(make_autoencoder_train_step(model, None, settings, training, tx, random_flip=True))
    images = shapes_batch(STEPS * BATCH)
    held_out = shapes_batch(32, seed=1)

    def error(p):
        pairs = np.asarray(reconstruct(model, p, held_out), np.float64)
        return np.mean(np.abs(pairs[0::2] - pairs[1::2]))

    initial = error(state.params)
    for i in range(STEPS):
        state, metrics = train_step(state, images[i * BATCH : (i + 1) * BATCH])
    final = error(state.params)
    assert int(state.step) == STEPS and int(state.skipped) == 0
    assert final < MAX_ERROR_RATIO * initial, (initial, final)
    assert float(metrics["reconstruction_error"]) < MAX_ERROR_RATIO * initial
    x = jnp.asarray(to_unit(held_out), jnp.float32)
    modes = model.apply({"params": state.params}, x, method=AutoencoderKL.encode)
    scale = estimate_scaling_factor(encode_fn(model), state.params, held_out, batch_size=16)
    np.testing.assert_allclose(scale, 1 / np.std(np.asarray(modes.mean, np.float64), ddof=1), rtol=1e-5)


def test_two_runs_with_one_seed_are_bitwise_equal(model):
    settings = {"disc_weight": 0.5, "disc_start": 1, "disc_layers": 2, "disc_channels": 8}
    training = training_section()
    tx = make_optimizer(training)
    discriminator = make_discriminator(settings)
    train_step = jax.jit(make_autoencoder_train_step(model, discriminator, settings, training, tx, random_flip=True))
    images = shapes_batch(3 * 4)

    def run():
        state = init_autoencoder_train_state(model, discriminator, tx, 3, IMAGE_SHAPE)
        for i in range(3):
            state, metrics = train_step(state, images[i * 4 : (i + 1) * 4])
        return state, metrics

    (first, first_metrics), (second, second_metrics) = run(), run()
    assert float(first_metrics["disc_loss"]) > 0  # the discriminator took part from step 1
    leaves = jax.tree.leaves((first, first_metrics)), jax.tree.leaves((second, second_metrics))
    assert all(np.array_equal(a, b) for a, b in zip(*leaves))


@pytest.mark.parametrize(
    "key, value",
    [
        ("kl_weight", -1e-6),
        ("kl_weight", float("nan")),
        ("reconstruction_loss", "lpips"),
        ("disc_weight", -0.5),
        ("disc_start", 1.5),
        ("disc_layers", 0),
        ("disc_channels", True),
    ],
)
def test_bad_loss_settings_are_named(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        check_loss_settings({key: value})


def test_unknown_loss_setting_is_named():
    with pytest.raises(ValueError, match="kl_wieght"):
        check_loss_settings({"kl_wieght": 1e-6})
