"""The text-to-image benchmark's networks are SD 1.5's: their parameter counts (jax.eval_shape, nothing
materialised) equal those of diffusers'/transformers' models built from the same configs on the meta device."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import pytest

from jaxdiff.models.autoencoder import create_autoencoder
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from tests.helpers import ROOT

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def benchmark_module():
    spec = importlib.util.spec_from_file_location("text_to_image_benchmark", ROOT / "benchmarks" / "text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_count(module, *inputs) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def test_benchmark_networks_have_sd15_parameter_counts():
    bench = benchmark_module()
    with torch.device("meta"):
        reference = [diffusers.UNet2DConditionModel(**bench.UNET_SD15), diffusers.AutoencoderKL(**bench.VAE_SD15),
                     transformers.CLIPTextModel(transformers.CLIPTextConfig(**bench.CLIP_VIT_L))]  # fmt: skip
    expected = [859_520_964, 83_653_863, 123_060_480]
    assert [sum(p.numel() for p in m.parameters()) for m in reference] == expected
    unet_config, vae_config, text_config = bench.sd15_configs("bfloat16")
    ours = [
        shape_count(create_unet_condition(unet_config), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768))),
        shape_count(create_autoencoder(vae_config), jnp.zeros((1, 16, 16, 3))),
        shape_count(create_clip_text(text_config), jnp.zeros((1, 77), jnp.int32)),
    ]
    assert ours == expected
