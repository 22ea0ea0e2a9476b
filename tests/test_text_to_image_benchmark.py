"""The text-to-image benchmark's networks are SD 1.5's: their parameter counts (jax.eval_shape, nothing
materialised) equal those of diffusers'/transformers' models built from the same configs on the meta device. The
SD 1.5 U-Net profile puts the same layers of both sides in the same parts."""

import collections
import importlib.util
import math
import sys

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


def benchmark_module(name: str = "text_to_image"):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when it runs as a script
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def param_shapes(module, *inputs) -> dict:
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"])


def shape_count(shapes) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


@pytest.fixture(scope="module")
def sd15():
    """The benchmark module, diffusers' SD 1.5 U-Net on the meta device and our U-Net's parameter shapes."""
    bench = benchmark_module()
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**bench.UNET_SD15)
    unet = create_unet_condition(bench.sd15_configs("bfloat16")[0])
    return bench, theirs, param_shapes(unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))


def test_benchmark_networks_have_sd15_parameter_counts(sd15):
    bench, their_unet, our_unet = sd15
    with torch.device("meta"):
        reference = [their_unet, diffusers.AutoencoderKL(**bench.VAE_SD15),
                     transformers.CLIPTextModel(transformers.CLIPTextConfig(**bench.CLIP_VIT_L))]  # fmt: skip
    expected = [859_520_964, 83_653_863, 123_060_480]
    assert [sum(p.numel() for p in m.parameters()) for m in reference] == expected
    _, vae_config, text_config = bench.sd15_configs("bfloat16")
    ours = [
        shape_count(our_unet),
        shape_count(param_shapes(create_autoencoder(vae_config), jnp.zeros((1, 16, 16, 3)))),
        shape_count(param_shapes(create_clip_text(text_config), jnp.zeros((1, 77), jnp.int32))),
    ]
    assert ours == expected


def test_profile_parts_are_the_same_layers_on_both_sides(sd15):
    _, theirs, shapes = sd15
    profile = benchmark_module("profile_sd_unet")
    their_parts = collections.Counter(
        profile.part_of(name.split("."), isinstance(module, torch.nn.Conv2d))
        for name, module in theirs.named_modules() if any(True for _ in module.parameters(recurse=False))
    )  # fmt: skip
    layers = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        layers.setdefault(tuple(key.key for key in path[:-1]), []).append(leaf.ndim)
    our_parts = collections.Counter(profile.part_of(list(path), 4 in ndims) for path, ndims in layers.items())
    assert our_parts == their_parts
    assert set(our_parts) == set(profile.PARTS) - {"attention core"}  # the only part without parameters
    assert our_parts["LayerNorm"] == 3 * 16 and our_parts["attention proj"] == 4 * 2 * 16  # 16 transformer blocks
