"""Flux.1 transformer (`jaxdiff.models.flux`, read by `jaxdiff.latent.flux_weights`): the 3-axis rotary embedding
against a float64 NumPy formula, packing against diffusers' FluxPipeline helpers, forward parity with diffusers'
FluxTransformer2DModel on the same random weights (dev with guidance, schnell without; bfloat16 and sharded files),
Flux.1-dev's parameter count, and the one-line refusals of bad configs and inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.latent.flux_weights import read_flux_transformer
from jaxdiff.models import flux, mmdit

FLUX_DEV_PARAMETERS = 11_901_408_320  # REFERENCE_NEXT.md: diffusers 0.42.1, built on the meta device
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
            axes_dims_rope=[2, 2, 4])  # fmt: skip
DEV = dict(TINY, guidance_embeds=True)
SCHNELL = dict(TINY, guidance_embeds=False)


def relative_error(got, expected) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


def numpy_rotary(ids: np.ndarray, axes_dims) -> tuple[np.ndarray, np.ndarray]:
    """Float64, one channel at a time: channel 2j and 2j+1 of axis a hold cos / sin(ids[:, a] / 10000^(2j/dim_a))."""
    cos, sin = [], []
    for a, dim in enumerate(axes_dims):
        for j in range(dim // 2):
            phase = ids[:, a].astype(np.float64) / 10000.0 ** (2 * j / dim)
            cos += [np.cos(phase)] * 2
            sin += [np.sin(phase)] * 2
    return np.stack(cos, axis=1), np.stack(sin, axis=1)


def test_rotary_embedding_matches_numpy():
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.zeros((4, 3)), flux.latent_image_ids(32, 48), rng.integers(0, 128, (5, 3))])
    for axes in ((16, 56, 56), (2, 2, 4)):
        cos, sin = flux.rotary_embedding(jnp.asarray(ids), axes)
        expected_cos, expected_sin = numpy_rotary(ids, axes)
        np.testing.assert_allclose(np.asarray(cos), expected_cos, rtol=0, atol=2e-5)  # float32 phases up to 127
        np.testing.assert_allclose(np.asarray(sin), expected_sin, rtol=0, atol=2e-5)


def test_rotation_turns_each_channel_pair():
    x = np.random.default_rng(1).normal(size=(1, 3, 2, 4))
    angle = np.random.default_rng(2).normal(size=(3, 2))
    cos, sin = np.repeat(np.cos(angle), 2, axis=1), np.repeat(np.sin(angle), 2, axis=1)
    a, b = x[..., 0::2], x[..., 1::2]
    expected = np.empty_like(x)
    expected[..., 0::2] = a * np.cos(angle)[None, :, None] - b * np.sin(angle)[None, :, None]
    expected[..., 1::2] = b * np.cos(angle)[None, :, None] + a * np.sin(angle)[None, :, None]
    got = mmdit.apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def test_packing_matches_diffusers(torch, diffusers):
    pipeline = diffusers.FluxPipeline
    latents = np.random.default_rng(3).normal(size=(2, 6, 10, 16)).astype(np.float32)
    tokens = np.asarray(flux.pack_latents(jnp.asarray(latents)))
    expected = pipeline._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(jnp.asarray(tokens), 6, 10)), latents)
    unpacked = pipeline._unpack_latents(torch.from_numpy(tokens.copy()), 6 * 8, 10 * 8, 8).numpy()
    np.testing.assert_array_equal(unpacked.transpose(0, 2, 3, 1), latents)
    ids = pipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.latent_image_ids(6, 10), ids)
    with pytest.raises(UsageError, match="even H and W"):
        flux.pack_latents(jnp.zeros((1, 5, 4, 16)))
    with pytest.raises(UsageError, match="not the 2×2 packing of 6×8 latents"):
        flux.unpack_latents(jnp.asarray(tokens), 6, 8)


def test_flux_dev_parameter_count():
    model = flux.create_flux(flux.flux_config(flux.FLUX_DEV))
    shapes = param_shapes(model, *flux.example_inputs(model))
    assert sum(math.prod(shape) for shape in shapes.values()) == FLUX_DEV_PARAMETERS


def test_flux_dev_parameter_count_equals_diffusers(torch, diffusers):
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = diffusers.FluxTransformer2DModel(**flux.FLUX_DEV)
    assert sum(p.numel() for p in model.parameters()) == FLUX_DEV_PARAMETERS


# --------------------------------------------------------------------------- parity with diffusers


def diffusers_flux(torch, diffusers, seed=0, **config):
    """A tiny FluxTransformer2DModel with random weights (std 0.3)."""
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def random_inputs(config, height=4, width=6, batch=2, text_tokens=3, seed=1, timesteps=(0.002, 0.04),
                  guidance=(0.004, 0.01)):  # fmt: skip
    """(tokens, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance) for height×width
    latents of in_channels / 4 channels; the text ids are not all zero, so that their rotation counts.

    diffusers rounds the frequencies of 1000·t and 1000·guidance to float32 (ours are rounded from float64), which
    moves their phases by ~1e-4 at 1000·3.5: parity at 1e-5 is checked at small values, pipeline values at 1e-4."""
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(batch, height, width, config["in_channels"] // 4)).astype(np.float32)
    tokens = np.array(flux.pack_latents(jnp.asarray(latents)))
    t = np.array(timesteps[:batch], np.float32)
    context = rng.normal(size=(batch, text_tokens, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(batch, config["pooled_projection_dim"])).astype(np.float32)
    txt_ids = rng.integers(0, 3, (text_tokens, 3)).astype(np.float32)
    scale = np.array(guidance[:batch], np.float32) if config.get("guidance_embeds") else None
    return tokens, t, context, pooled, flux.latent_image_ids(height, width), txt_ids, scale


def diffusers_forward(torch, model, tokens, t, context, pooled, img_ids, txt_ids, guidance):
    as_torch = lambda a: None if a is None else torch.from_numpy(a).double()  # noqa: E731
    with torch.no_grad():
        out = model.double()(as_torch(tokens), as_torch(context), as_torch(pooled), as_torch(t),
                             as_torch(img_ids), as_torch(txt_ids), as_torch(guidance))  # fmt: skip
    return out.sample.numpy()


def our_forward(config, params, *inputs):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(flux.create_flux(config).apply)({"params": params}, *inputs))


@pytest.mark.parametrize("settings", [DEV, SCHNELL], ids=["dev", "schnell"])
def test_matches_diffusers(torch, diffusers, tmp_path, settings):
    model = diffusers_flux(torch, diffusers, **settings)
    model.save_pretrained(tmp_path)
    config, params = read_flux_transformer(tmp_path)
    assert config.guidance_embeds == settings["guidance_embeds"]
    assert ("guidance_embedder" in params["time_text_embed"]) == settings["guidance_embeds"]
    inputs = random_inputs(settings)
    assert relative_error(our_forward(config, params, *inputs), diffusers_forward(torch, model, *inputs)) < 1e-5
    late = random_inputs(settings, timesteps=(0.3, 0.95), guidance=(3.5, 1.0))
    assert relative_error(our_forward(config, params, *late), diffusers_forward(torch, model, *late)) < 1e-4


def test_bfloat16_and_sharded_files(torch, diffusers, tmp_path):
    model = diffusers_flux(torch, diffusers, **DEV)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", variant="bf16")
    model.float().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    config, half = read_flux_transformer(tmp_path / "bf16", variant="bf16")
    _, sharded = read_flux_transformer(tmp_path / "sharded")
    inputs = random_inputs(DEV)
    expected = diffusers_forward(torch, model, *inputs)  # the model's weights are bfloat16-rounded now
    assert relative_error(our_forward(config, sharded, *inputs), expected) < 1e-5
    assert relative_error(our_forward(config, half, *inputs), expected) < 1e-5


def test_bfloat16_compute_and_remat():
    small = dict(DEV, num_layers=1, num_single_layers=1)
    model = flux.create_flux(flux.flux_config(small))
    inputs = random_inputs(small)
    params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
    reference = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    for options in (dict(dtype="bfloat16"), dict(remat=True)):
        other = flux.create_flux(flux.flux_config(small, **options))
        out = np.asarray(jax.jit(other.apply)({"params": params}, *inputs))
        assert out.dtype == np.float32
        assert relative_error(out, reference) < (3e-2 if "dtype" in options else 1e-6)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(axes_dims_rope=[2, 2, 2]), "unsupported axes_dims_rope=\\(2, 2, 2\\)"),
        (dict(axes_dims_rope=[3, 1, 4]), "unsupported axes_dims_rope"),
        (dict(axes_dims_rope="16,56,56"), "unsupported axes_dims_rope='16,56,56'"),
        (dict(guidance_embeds=1), "guidance_embeds=1 must be true or false"),
        (dict(num_layers=-1), "num_layers=-1 must be an int >= 0"),
        (dict(pos_embed_max_size=96), "unknown keys \\['pos_embed_max_size'\\]"),
        (dict(_class_name="SD3Transformer2DModel"), "unsupported _class_name='SD3Transformer2DModel'"),
    ],
)
def test_bad_config_is_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        flux.flux_config({**TINY, **settings})


def test_bad_inputs_are_one_line():
    dev, schnell = (flux.create_flux(flux.flux_config(s)) for s in (DEV, SCHNELL))
    tokens, t, context, pooled, img_ids, txt_ids, guidance = random_inputs(DEV)
    params = jax.eval_shape(dev.init, jax.random.key(0), tokens, t, context, pooled, img_ids, txt_ids, guidance)
    bad = [
        ((tokens[..., :8], t, context, pooled, img_ids, txt_ids, guidance), "hidden_states must be float tokens"),
        ((tokens, t[:1], context, pooled, img_ids, txt_ids, guidance), "timestep must be numbers of shape \\[2\\]"),
        ((tokens, t, context[..., :3], pooled, img_ids, txt_ids, guidance), "encoder_hidden_states must be"),
        ((tokens, t, context, pooled[:, :2], img_ids, txt_ids, guidance), "pooled_projections must be \\[2, 10\\]"),
        ((tokens, t, context, pooled, img_ids[:3], txt_ids, guidance), "img_ids must be \\[6, 3\\]"),
        ((tokens, t, context, pooled, img_ids, txt_ids[:, :2], guidance), "txt_ids must be \\[3, 3\\]"),
        ((tokens, t, context, pooled, img_ids, txt_ids, None), "guidance must be numbers of shape \\[2\\]"),
    ]
    for inputs, message in bad:
        with pytest.raises(UsageError, match=message):
            jax.eval_shape(dev.apply, params, *inputs)
    with pytest.raises(UsageError, match="no guidance embedder"):
        jax.eval_shape(schnell.init, jax.random.key(0), tokens, t, context, pooled, img_ids, txt_ids, guidance)
