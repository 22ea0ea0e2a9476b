"""The KL autoencoder against diffusers' AutoencoderKL (same random weights, float32), its posterior against
float64 NumPy, and the converter's and config's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # parity with the PyTorch originals; skipped where torch is absent
import safetensors.numpy
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jaxdiff.latent.component_weights import param_shapes, read_autoencoder, torch_shape, vae_names
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder, posterior_from_moments

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 3,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.5,
}

TOLERANCE = 5e-6  # relative; measured float32 errors are below 1e-6, a GroupNorm eps of 1e-5 gives 7e-6


def relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def save_torch_vae(folder, **overrides) -> TorchAutoencoderKL:
    """A tiny diffusers AutoencoderKL with every parameter (norms included) randomised, saved to `folder`."""
    torch.manual_seed(0)
    vae = TorchAutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.2 * torch.randn_like(p))
    vae.save_pretrained(folder)
    return vae


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}],
    ids=["sd", "no-quant-conv-no-attention"],
)
def test_encode_decode_match_diffusers(tmp_path, overrides):
    vae = save_torch_vae(tmp_path, **overrides)
    config, params = read_autoencoder(tmp_path)
    assert config.scaling_factor == 0.5 and config.shift_factor is None
    model = create_autoencoder(config)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(nchw(x)).latent_dist
        decoded = vae.decode(nchw(z)).sample
    ours = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(params, x)
    assert relative_error(ours.mean, nhwc(posterior.mean)) < TOLERANCE
    assert relative_error(ours.logvar, nhwc(posterior.logvar)) < TOLERANCE
    decode = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))
    assert relative_error(decode(params, z), nhwc(decoded)) < TOLERANCE
    np.testing.assert_allclose(ours.kl(), posterior.kl().numpy(), rtol=1e-4)
    with pytest.raises(ValueError, match=r"H and W multiples of 2, got \(2, 15, 16, 3\)"):
        model.apply({"params": params}, x[:, 1:], method=model.encode)


def test_stable_diffusion_size_names_and_shapes_match_diffusers():
    """The SD 1.x/2.x VAE (83,653,863 parameters): every tensor name and PyTorch shape, built on the meta device."""
    settings = {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "sample_size": 512,
    }
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in TorchAutoencoderKL(**settings).state_dict().items()}
    config = autoencoder_config(settings)
    shapes = param_shapes(create_autoencoder(config), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    assert {vae_names(path)[0]: torch_shape(path, shape) for path, shape in shapes.items()} == expected
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == 83_653_863


def test_legacy_attention_names_give_the_same_params(tmp_path):
    save_torch_vae(tmp_path / "new")
    save_torch_vae(tmp_path / "old")
    file = tmp_path / "old" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in tensors.items():
        for new, old in renames.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[name] = value
    assert any(".query." in name for name in renamed)
    safetensors.numpy.save_file(renamed, file)
    new, old = read_autoencoder(tmp_path / "new")[1], read_autoencoder(tmp_path / "old")[1]
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, new, old))


def test_posterior_kl_sample_and_clipping_match_numpy():
    rng = np.random.default_rng(1)
    moments = rng.normal(size=(2, 4, 4, 6)).astype(np.float32) * 3
    moments[0, 0, 0, 3:] = [-45.0, 25.0, 0.5]  # logvar outside [-30, 20] is clipped
    posterior = posterior_from_moments(jnp.asarray(moments))
    mean = moments[..., :3].astype(np.float64)
    logvar = np.clip(moments[..., 3:].astype(np.float64), -30.0, 20.0)
    np.testing.assert_array_equal(posterior.logvar[0, 0, 0], [-30.0, 20.0, 0.5])
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(posterior.kl(), kl, rtol=1e-5)
    key = jax.random.PRNGKey(3)
    noise = np.asarray(jax.random.normal(key, mean.shape), np.float64)
    np.testing.assert_allclose(posterior.sample(key), mean + np.exp(0.5 * logvar) * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(posterior.mode(), moments[..., :3])


def test_bfloat16_compute_keeps_float32_params_and_remat_changes_nothing(tmp_path):
    save_torch_vae(tmp_path)
    config, params = read_autoencoder(tmp_path)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    reference = jax.jit(create_autoencoder(config).apply)({"params": params}, x)
    config.remat = True
    assert np.array_equal(jax.jit(create_autoencoder(config).apply)({"params": params}, x), reference)
    config.dtype = "bfloat16"
    model = create_autoencoder(config)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(model.apply)({"params": params}, x)
    assert out.dtype == jnp.float32
    assert 1e-4 < relative_error(out, reference) < 5e-2


def test_variant_file_is_chosen_by_name(tmp_path):
    vae = save_torch_vae(tmp_path)
    vae.half().save_pretrained(tmp_path, variant="fp16")
    params = read_autoencoder(tmp_path)[1]
    half = read_autoencoder(tmp_path, variant="fp16")[1]
    kernel, half_kernel = params["encoder"]["conv_in"]["kernel"], half["encoder"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(half_kernel, kernel.astype(np.float16).astype(np.float32))
    assert half_kernel.dtype == np.float32 and not np.array_equal(half_kernel, kernel)
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.bf16.safetensors \(variant='bf16'\)"):
        read_autoencoder(tmp_path, variant="bf16")


def test_converter_lists_missing_unexpected_and_misshaped_tensors(tmp_path):
    save_torch_vae(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    del tensors["decoder.conv_in.weight"]
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["quant_conv.bias"] = np.zeros(7, np.float32)
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(ValueError) as err:
        read_autoencoder(tmp_path)
    message = str(err.value)
    assert "1 missing" in message and "decoder.conv_in.weight" in message
    assert "1 unexpected" in message and "encoder.extra.weight" in message
    assert "quant_conv.bias: shape (7,), expected (6,)" in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("norm_num_groups", 3),
        ("block_out_channels", []),
        ("use_quant_conv", "yes"),
        ("_class_name", "AutoencoderTiny"),
    ],
)
def test_unsupported_config_values_are_named(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"unsupported {key}="):
        autoencoder_config({**TINY, key: value})
    (tmp_path / "config.json").write_text(json.dumps({**TINY, key: value}))
    with pytest.raises(ValueError, match=f"config.json: AutoencoderKL config: unsupported {key}="):
        read_autoencoder(tmp_path)  # rejected before any weights are looked for
