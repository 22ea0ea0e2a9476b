"""kohya LoRA files in the original LDM (SD 1.x / 2.x) and sgm (SDXL) U-Net layout (`lora_unet_input_blocks_*`,
`middle_block_*`, `output_blocks_*`, `time_embed_*`, `label_emb_*`, `out_2`): a file renamed from diffusers' layout
with a table written here gives the same adapted weights as the diffusers-layout file, and those weights equal
W + (alpha / r)·ΔW in float64 NumPy; names the layout gives no module of the U-Net are listed in one refusal; an
SDXL file in sgm names gives the images of diffusers' own `load_lora_weights` (skipped without torch)."""

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.errors import WeightsError
from jaxdiff.latent.lora import COMPONENTS, module_table
from jaxdiff.latent.pipeline import LatentPipeline
from tests import test_lora, test_sdxl_pipeline
from tests.test_lora import _expected, _factors, _leaf
from tests.test_sdxl_pipeline import GUIDANCE, NEGATIVE, PROMPTS, SIZE, STEPS, nchw, noise_nhwc

# The tiny SD 1.x U-Net of tests/test_lora.py (two levels, one resnet each, attention on the first down and the
# second up level): original module -> diffusers module, both as kohya writes them. input_blocks: 0 conv_in, 1
# level 0, 2 its downsampler, 3 level 1; output_blocks 0-1 up level 0 (its upsampler is layer 1: no attention),
# 2-3 up level 1 (attention at layer 1).
SD1_NAMES = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
    "input_blocks_1_1_proj_in": "down_blocks_0_attentions_0_proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "input_blocks_2_0_op": "down_blocks_0_downsamplers_0_conv",
    "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "input_blocks_3_0_emb_layers_1": "down_blocks_1_resnets_0_time_emb_proj",
    "middle_block_0_out_layers_3": "mid_block_resnets_0_conv2",
    "middle_block_1_transformer_blocks_0_attn2_to_out_0": "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
    "middle_block_2_in_layers_2": "mid_block_resnets_1_conv1",
    "output_blocks_0_0_skip_connection": "up_blocks_0_resnets_0_conv_shortcut",
    "output_blocks_1_1_conv": "up_blocks_0_upsamplers_0_conv",
    "output_blocks_2_0_out_layers_3": "up_blocks_1_resnets_0_conv2",
    "output_blocks_3_1_transformer_blocks_0_ff_net_0_proj":
        "up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
    "output_blocks_3_1_proj_out": "up_blocks_1_attentions_1_proj_out",
    "time_embed_0": "time_embedding_linear_1",
    "out_2": "conv_out",
}  # fmt: skip
TEXT_MODULE = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
models = test_lora.models  # the tiny SD 1.x bundle built in JAX (a fixture)
saved = test_sdxl_pipeline.saved  # the tiny SDXL pipelines diffusers saved (a fixture)


def _write(path, tensors):
    safetensors.numpy.save_file(tensors, str(path))
    return path


def _modules(pipe, seed=0):
    """{diffusers-layout kohya key prefix: (our (params key, path), down, up, alpha)} (float32 factors) over
    SD1_NAMES' modules and one text-encoder layer, sized from the pipeline's weights; ranks 1-3."""
    rng = np.random.default_rng(seed)
    tables = {key: module_table(pipe.params[key], COMPONENTS[component][1], underscored=True)
              for key, component in (("unet", "unet"), ("text", "text_encoder"))}  # fmt: skip
    modules = {}
    for i, module in enumerate([*SD1_NAMES.values(), TEXT_MODULE]):
        key, name = ("text", TEXT_MODULE[len("lora_te_") :]) if module == TEXT_MODULE else ("unet", module)
        path = tables[key][name]
        down, up = _factors(rng, 1 + i % 3, _leaf(pipe.params[key], path).shape)
        prefix = module if module == TEXT_MODULE else f"lora_unet_{module}"
        modules[prefix] = ((key, path), 0.05 * down.astype(np.float32), 0.05 * up.astype(np.float32), float(1 + i % 4))
    return modules


def _tensors(modules, rename=None):
    """The kohya file's tensors, the U-Net modules renamed by `rename` (diffusers name -> original name)."""
    tensors = {}
    for prefix, (_, down, up, alpha) in modules.items():
        if rename and prefix.startswith("lora_unet_"):
            prefix = "lora_unet_" + rename[prefix[len("lora_unet_") :]]
        tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
        tensors[f"{prefix}.alpha"] = np.asarray(alpha, np.float32)
    return tensors


ORIGINAL = {diffusers_name: original for original, diffusers_name in SD1_NAMES.items()}


def test_original_layout_equals_diffusers_layout_and_numpy(tmp_path, models):
    pipe, reference = LatentPipeline(models), LatentPipeline(models)
    modules = _modules(pipe)
    original = _write(tmp_path / "ldm.safetensors", _tensors(modules, ORIGINAL))
    reference.load_lora(_write(tmp_path / "diffusers.safetensors", _tensors(modules)), scale=0.8)
    pipe.load_lora(original, scale=0.8)
    assert sum(len(adapted) for adapted in pipe._lora_adapters["default_0"].modules.values()) == len(modules)
    for ours, theirs in zip(jax.tree_util.tree_leaves(pipe._run_params),
                            jax.tree_util.tree_leaves(reference._run_params), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    for (key, path), down, up, alpha in modules.values():
        weight = _leaf(pipe.params[key], path)
        expected = _expected(weight, down.astype(np.float64), up.astype(np.float64), 0.8 * alpha / down.shape[0])
        adapted = np.asarray(_leaf(pipe._run_params[key], path), np.float64)
        assert np.abs(adapted - np.asarray(weight)).max() > 1e-4  # the adapter changed the weight
        np.testing.assert_allclose(adapted, expected, rtol=0, atol=2e-7 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("names, listed", [
    # up level 0 has no attention; level 1 has no downsampler; the middle block has three layers; a per-level
    # index beyond the U-Net; a resnet layer the original does not have.
    (["output_blocks_1_1_transformer_blocks_0_attn1_to_q", "input_blocks_5_0_op", "middle_block_3_in_layers_2"],
     ["lora_unet_input_blocks_5_0_op.alpha", "lora_unet_middle_block_3_in_layers_2.alpha",
      "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha"]),
    (["input_blocks_1_0_in_layers_5"], ["lora_unet_input_blocks_1_0_in_layers_5.lora_down.weight"]),
])  # fmt: skip
def test_names_of_no_module_are_listed_in_one_refusal(tmp_path, models, names, listed):
    pipe = LatentPipeline(models)
    rng = np.random.default_rng(1)
    tensors = {}
    for name in names:
        tensors[f"lora_unet_{name}.lora_down.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        tensors[f"lora_unet_{name}.lora_up.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
        tensors[f"lora_unet_{name}.alpha"] = np.asarray(1.0, np.float32)
    with pytest.raises(WeightsError, match=rf"{len(names) * 3} keys adapt no module of this pipeline") as error:
        pipe.load_lora(_write(tmp_path / "bad.safetensors", tensors))
    assert all(key in str(error.value) for key in listed) and "\n" not in str(error.value)
    assert pipe.lora_scales == {}


def test_one_module_in_both_layouts_is_refused(tmp_path, models):
    pipe = LatentPipeline(models)
    modules = _modules(pipe)
    both = {**_tensors(modules), **_tensors(modules, ORIGINAL)}
    with pytest.raises(WeightsError, match=r"keys adapt a module that other keys of the file already adapt \(one "
                                           r"module in two name layouts\): lora_unet_"):  # fmt: skip
        pipe.load_lora(_write(tmp_path / "both.safetensors", both))
    assert pipe.lora_scales == {}


# The tiny SDXL base U-Net of tests/test_sdxl_pipeline.py (levels 0: resnets only, 1: attention of depth 2; the
# middle block depth 2): original module -> diffusers module, for the factors' shapes.
SDXL_NAMES = {
    "input_blocks_0_0": "conv_in",
    "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
    "input_blocks_2_0_op": "down_blocks_0_downsamplers_0_conv",
    "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "input_blocks_3_0_emb_layers_1": "down_blocks_1_resnets_0_time_emb_proj",
    "input_blocks_3_1_proj_in": "down_blocks_1_attentions_0_proj_in",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
    "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "middle_block_2_out_layers_3": "mid_block_resnets_1_conv2",
    "output_blocks_0_1_transformer_blocks_1_ff_net_2": "up_blocks_0_attentions_0_transformer_blocks_1_ff_net_2",
    "output_blocks_1_0_skip_connection": "up_blocks_0_resnets_1_conv_shortcut",
    "output_blocks_1_2_conv": "up_blocks_0_upsamplers_0_conv",
    "output_blocks_3_0_in_layers_2": "up_blocks_1_resnets_1_conv1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "out_2": "conv_out",
}  # fmt: skip


@pytest.mark.slow  # 52 s on the 2-core CPU, most of it the SDXL folder and compiling its pipeline
def test_sdxl_sgm_file_matches_diffusers_load_lora_weights(saved, torch, tmp_path):
    """U-Net adapters only, one rank and alpha: diffusers 0.42.1 refuses kohya text-encoder keys ("Could not
    automatically infer state dict type") and drops the per-module alphas of attention projections (peft warns
    that their alpha_pattern keys match no module), so differing alphas would differ there."""
    ours, reference = saved["ours"]["base"], saved["base"]
    table = module_table(ours.params["unet"], COMPONENTS["unet"][1], underscored=True)
    rng = np.random.default_rng(7)
    tensors = {}
    for name, module in SDXL_NAMES.items():
        down, up = _factors(rng, 2, _leaf(ours.params["unet"], table[module]).shape)
        tensors[f"lora_unet_{name}.lora_down.weight"] = 0.2 * down.astype(np.float32)
        tensors[f"lora_unet_{name}.lora_up.weight"] = 0.2 * up.astype(np.float32)
        tensors[f"lora_unet_{name}.alpha"] = np.asarray(3.0, np.float32)
    file = _write(tmp_path / "sdxl_sgm.safetensors", tensors)
    noise = noise_nhwc(0)

    def images():
        theirs = reference(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, latents=nchw(torch, noise), height=SIZE, width=SIZE,
                           output_type="np").images  # fmt: skip
        mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                  sampler="euler", latents=noise, output_type="float")  # fmt: skip
        return mine, theirs

    base, _ = images()
    reference.load_lora_weights(str(file), adapter_name="sgm")
    ours.load_lora(file, scale=1.0)
    try:
        assert len(ours._lora_adapters["default_0"].modules["unet"]) == len(SDXL_NAMES)
        mine, theirs = images()
        assert np.abs(theirs - base).max() > 0.02  # the adapters change the images
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)
    finally:
        reference.unload_lora_weights()
        ours._init_lora()
