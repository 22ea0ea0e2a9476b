"""The CPU benchmarks of SDXL's U-Net, the x4 upscaler and LoRA training memory (benchmarks/sdxl_unet_cpu.py,
upscaler_cpu.py, lora_memory.py): their networks have the released models' parameter counts (diffusers' and
transformers' modules built on the meta device against ours through `jax.eval_shape`), and (slow) each script run
end to end on its tiny size: the two sides' outputs agree, LoRA trains fewer parameters and needs less memory than
full fine-tuning, in XLA's estimate and in the measured peak."""

import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition, example_inputs
from jaxdiff.models.unet_condition_config import config_from_diffusers
from tests.helpers import ROOT

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def benchmark(name):
    """benchmarks/<name>.py as a module (its folder on sys.path, as when it runs as a script)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def unet_count(settings) -> int:
    config = config_from_diffusers(settings)
    args, kwargs = example_inputs(config)
    return count(jax.eval_shape(create_unet_condition(config).init, jax.random.PRNGKey(0), *args, **kwargs)["params"])


def test_sdxl_and_upscaler_networks_have_the_released_parameter_counts():
    sdxl, upscaler = benchmark("sdxl_unet_cpu"), benchmark("upscaler_cpu")
    with torch.device("meta"):
        theirs = [diffusers.UNet2DConditionModel(**sdxl.SDXL_BASE_UNET),
                  diffusers.UNet2DConditionModel(**upscaler.UNET), diffusers.AutoencoderKL(**upscaler.VAE),
                  transformers.CLIPTextModel(transformers.CLIPTextConfig(**upscaler.TEXT))]  # fmt: skip
    expected = [sum(p.numel() for p in module.parameters()) for module in theirs]
    assert expected[0] == 2_567_463_684  # SDXL base's U-Net
    vae = create_autoencoder(autoencoder_config(upscaler.VAE))
    text = create_clip_text(clip_text_config(upscaler.TEXT))
    ours = [
        unet_count(sdxl.SDXL_BASE_UNET), unet_count(upscaler.UNET),
        count(jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]),
        count(jax.eval_shape(text.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))["params"]),
    ]  # fmt: skip
    assert ours == expected


def test_lora_memory_sdxl_unet_lacks_only_the_added_embedding():
    """The SDXL U-Net of the LoRA benchmark (no text_time) is SDXL base's less its add_embedding: 2816·1280 + 1280
    + 1280·1280 + 1280 parameters."""
    sdxl, lora = benchmark("sdxl_unet_cpu"), benchmark("lora_memory")
    assert unet_count(sdxl.SDXL_BASE_UNET) - unet_count(lora.SDXL_UNET) == 2816 * 1280 + 1280 + 1280 * 1280 + 1280


@pytest.mark.slow  # about 80 s on the busy 2-core CPU (4 processes at 11 s of compiling each, tiny networks)
@pytest.mark.timeout(900)
def test_sdxl_benchmark_runs_the_same_network_on_both_sides():
    results = benchmark("sdxl_unet_cpu").main(["--size", "tiny"])
    assert results["prepare"]["parameters"] == unet_count(benchmark("sdxl_unet_cpu").SDXL_TINY_UNET)
    assert results["dtypes"]["float32"]["max_relative_difference"] < 1e-4
    assert results["dtypes"]["bfloat16"]["max_relative_difference"] < 0.1
    for side in ("jax", "torch"):
        side_result = results["dtypes"]["float32"][side]
        assert side_result["forward_s"] > 0 and side_result["peak_rss_gib"] > 0


@pytest.mark.slow  # about 2 min on the busy 2-core CPU
@pytest.mark.timeout(900)
def test_upscaler_benchmark_images_agree():
    results = benchmark("upscaler_cpu").main(["--size", "tiny"])
    assert results["jax"]["shape"] == results["torch"]["shape"] == [1, 128, 128, 3]
    assert results["max_abs_difference"] < 1e-3


@pytest.mark.slow  # about 2 min on the idle 2-core CPU: two compiled training steps, each run twice
@pytest.mark.timeout(900)
def test_lora_needs_less_memory_than_full_fine_tuning():
    results = benchmark("lora_memory").main(["--size", "tiny"])["sizes"]["tiny"]
    lora, full = results["lora"], results["full"]
    assert lora["trained_parameters"] < full["trained_parameters"] / 10
    assert lora["estimate_bytes"] < full["estimate_bytes"]
    assert lora["measured_gib"] < full["measured_gib"]
