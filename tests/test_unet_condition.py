"""The Stable Diffusion U-Net (jaxdiff.models.unet_condition) and its diffusers weight import.

References: diffusers' own `UNet2DConditionModel`, built from tiny configs with random weights, saved with
`save_pretrained` and run in float64 on the same inputs; parameter counts of the full SD 1.5 / 2.1 U-Nets
from diffusers modules built on the `meta` device (shapes only).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.latent.component_weights import torch_shape
from jaxdiff.latent.unet_weights import (
    diffusers_tensor_name,
    read_unet_condition,
    read_unet_condition_weights,
    unet_condition_shapes,
)
from jaxdiff.models.unet_condition import Attention, create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers

TINY_LEVELS = dict(
    block_out_channels=[8, 16, 16], norm_num_groups=4, layers_per_block=2, cross_attention_dim=12,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)  # fmt: skip
# SD 1.x: 1×1-conv projections, `attention_head_dim` an int (= heads per level: 2 heads of width 4, 8).
SD1_TINY = dict(TINY_LEVELS, sample_size=16, in_channels=4, out_channels=4, attention_head_dim=2)
# SD 2.x: linear projections, per-level `attention_head_dim` (heads 1, 2, 4 of width 8, 8, 4), upcast attention.
SD2_TINY = dict(
    TINY_LEVELS, sample_size=16, in_channels=4, out_channels=4, attention_head_dim=[1, 2, 4],
    use_linear_projection=True, upcast_attention=True,
)  # fmt: skip
# Inpainting: 9 input channels (latents, mask, masked-image latents).
INPAINT_TINY = dict(SD1_TINY, in_channels=9, layers_per_block=1)
# One level: the smallest network with every kind of block, for gradient tests.
ONE_LEVEL = dict(
    SD1_TINY, block_out_channels=[8], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D"],
)  # fmt: skip

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD21_UNET = dict(
    SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
)  # fmt: skip


def saved_random_unet(torch, diffusers, settings, folder, seed=0):
    """A diffusers UNet2DConditionModel, every parameter moved off its init (norms off (1, 0)), saved to `folder`."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**settings)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unet.save_pretrained(folder)
    return unet.double().eval()


def diffusers_forward(torch, unet, sample, t, context):
    """diffusers' output (float64) as NHWC NumPy for NHWC `sample`."""
    with torch.no_grad():
        out = unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)).double(), t, torch.from_numpy(context).double())
    return out.sample.numpy().transpose(0, 2, 3, 1)


def relative_error(ours, reference):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def random_inputs(settings, batch, height, width, seed):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, settings["in_channels"])).astype(np.float32)
    context = rng.standard_normal((batch, 7, settings["cross_attention_dim"])).astype(np.float32)
    return sample, context


# ---------------------------------------------------------------- forward parity with diffusers


@pytest.mark.parametrize(
    "settings, size",
    [(SD1_TINY, (16, 16)), (SD2_TINY, (16, 16)), (INPAINT_TINY, (12, 10))],
    ids=["sd1", "sd2", "inpaint"],
)
def test_forward_matches_diffusers(torch, diffusers, tmp_path, settings, size):
    """Batch timesteps and one scalar timestep; the inpainting case also has odd sizes (10 -> 5 -> 3 and back).
    The U-Net is saved as a pipeline's `unet/` and read from the pipeline folder."""
    reference_unet = saved_random_unet(torch, diffusers, settings, tmp_path / "unet")
    config, params = read_unet_condition(tmp_path)
    model = create_unet_condition(config)
    apply = jax.jit(model.apply)
    sample, context = random_inputs(settings, 2, *size, seed=1)

    steps = np.array([981, 17])
    ours = apply({"params": params}, sample, steps, context)
    reference = diffusers_forward(torch, reference_unet, sample, torch.from_numpy(steps), context)
    assert ours.shape == reference.shape == (2, *size, settings["out_channels"])
    assert relative_error(ours, reference) < 1e-4

    ours_scalar = apply({"params": params}, sample, 500, context)
    reference_scalar = diffusers_forward(torch, reference_unet, sample, 500, context)
    assert relative_error(ours_scalar, reference_scalar) < 1e-4
    assert relative_error(ours_scalar, reference) > 1e-2  # the timestep matters


def test_bfloat16_compute_and_remat():
    """bf16 compute keeps float32 params and stays near float32; remat changes neither values nor gradients."""
    config = config_from_diffusers(ONE_LEVEL)
    sample, context = random_inputs(ONE_LEVEL, 2, 8, 8, seed=2)
    steps = np.array([3, 700])
    params = jax.jit(create_unet_condition(config).init)(jax.random.PRNGKey(0), sample, steps, context)["params"]

    def loss_and_grad(**options):
        model = create_unet_condition(config_from_diffusers(ONE_LEVEL, **options))
        loss = lambda p: jnp.mean(model.apply({"params": p}, sample, steps, context) ** 2)  # noqa: E731
        out = jax.jit(model.apply)({"params": params}, sample, steps, context)
        return jax.jit(jax.value_and_grad(loss))(params), out

    (loss, grads), out = loss_and_grad()
    (loss_remat, grads_remat), _ = loss_and_grad(remat=True)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-5)
    for g, g_remat in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)):
        np.testing.assert_allclose(g_remat, g, rtol=1e-4, atol=1e-6)

    bf16_model = create_unet_condition(config_from_diffusers(ONE_LEVEL, dtype="bfloat16"))
    bf16_params = jax.eval_shape(bf16_model.init, jax.random.PRNGKey(0), sample, steps, context)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    bf16_out = jax.jit(bf16_model.apply)({"params": params}, sample, steps, context)
    assert bf16_out.dtype == jnp.float32
    assert 1e-4 < relative_error(bf16_out, np.asarray(out, np.float64)) < 3e-2


def _dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


@pytest.mark.parametrize("upcast, score_dtype", [(False, jnp.bfloat16), (True, jnp.float32)])
def test_upcast_attention_scores_from_float32_operands(upcast, score_dtype):
    """In bf16 compute, q·kᵀ reads bf16 q, k unless upcast_attention, which makes them float32."""
    attention = Attention(num_heads=2, head_dim=4, upcast=upcast, dtype=jnp.bfloat16)
    x, context = jnp.zeros((1, 6, 8)), jnp.zeros((1, 3, 5))  # 6 queries, 3 keys
    params = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(attention.init, jax.random.PRNGKey(0), x, context)
    )
    jaxpr = jax.make_jaxpr(attention.apply)(params, x, context).jaxpr
    scores = [e for e in _dot_generals(jaxpr) if e.outvars[0].aval.shape[-1] == 3 and 6 in e.outvars[0].aval.shape]
    assert len(scores) == 1
    assert [v.aval.dtype for v in scores[0].invars] == [jnp.dtype(score_dtype)] * 2
    assert scores[0].outvars[0].aval.dtype == jnp.float32


# ---------------------------------------------------------------- parameter counts of the full U-Nets


@pytest.mark.parametrize(
    "settings, expected", [(SD15_UNET, 859_520_964), (SD21_UNET, 865_910_724)], ids=["sd15", "sd21"]
)
def test_full_size_parameter_count(torch, diffusers, settings, expected):
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**settings)
    assert sum(p.numel() for p in reference.parameters()) == expected

    config = config_from_diffusers(settings)
    model = create_unet_condition(config)
    inputs = (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, settings["cross_attention_dim"])))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)) == expected


def test_heads_per_level():
    """`attention_head_dim` counts heads (diffusers' quirk) unless `num_attention_heads` is set."""
    assert create_unet_condition(config_from_diffusers(SD15_UNET)).num_heads == (8, 8, 8, 8)  # widths 40, 80, 160, 160
    assert create_unet_condition(config_from_diffusers(SD21_UNET)).num_heads == (5, 10, 20, 20)  # width 64 each
    explicit = dict(SD21_UNET, num_attention_heads=[5, 10, 20, 20], attention_head_dim=64)
    assert create_unet_condition(config_from_diffusers(explicit)).num_heads == (5, 10, 20, 20)


# ---------------------------------------------------------------- bad input


def test_unsupported_settings_are_named():
    kandinsky_like = dict(SD15_UNET, encoder_hid_dim_type="text_proj", encoder_hid_dim=1024)
    with pytest.raises(ValueError, match=r"not supported yet") as info:
        config_from_diffusers(kandinsky_like)
    assert "encoder_hid_dim_type='text_proj'" in str(info.value)
    assert "encoder_hid_dim=1024" in str(info.value)
    with pytest.raises(ValueError, match=r"class_embed_type='simple_projection'"):
        config_from_diffusers(dict(SD15_UNET, class_embed_type="simple_projection"))
    with pytest.raises(ValueError, match=r"unknown keys \['made_up_key'\]"):
        config_from_diffusers(dict(SD15_UNET, made_up_key=1))
    with pytest.raises(ValueError, match=r"only UNet2DConditionModel"):
        config_from_diffusers(dict(SD15_UNET, _class_name="UNet2DModel"))
    with pytest.raises(ValueError, match=r"down_block_types=.*AttnDownBlock2D"):
        config_from_diffusers(dict(SD15_UNET, down_block_types=["AttnDownBlock2D"] * 4))
    with pytest.raises(ValueError, match=r"1280 is not divisible by norm_num_groups=48"):
        config_from_diffusers(dict(SD15_UNET, block_out_channels=[336, 672, 1280, 1280], norm_num_groups=48))
    # diffusers' defaults written out explicitly are fine
    config_from_diffusers(dict(SD15_UNET, transformer_layers_per_block=1, class_embed_type=None, dropout=0.0))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 8, 8, 4), (2,), (2, 7, 12)), r"sample must be .*\[B, H, W, 9\] \(NHWC\), got .* \(2, 8, 8, 4\)"),
        (((2, 8, 8, 9), (3,), (2, 7, 12)), r"timesteps must be a number or an array \[2\], got float32 \(3,\)"),
        (((2, 8, 8, 9), (), (2, 7, 768)), r"encoder_hidden_states must have shape \[2, L, 12\], got \(2, 7, 768\)"),
    ],
)
def test_bad_inputs_are_named(shapes, message):
    model = create_unet_condition(config_from_diffusers(INPAINT_TINY))
    inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)


def test_weight_file_problems_are_all_listed(tmp_path):
    config = config_from_diffusers(INPAINT_TINY)
    shapes = unet_condition_shapes(config)
    tensors = {diffusers_tensor_name(p): np.zeros(torch_shape(p, s), np.float32) for p, s in shapes.items()}
    del tensors["mid_block.attentions.0.proj_in.weight"]
    tensors["conv_in.weight"] = np.zeros((8, 4, 3, 3), np.float32)  # 4 input channels, not 9
    tensors["add_embedding.linear_1.weight"] = np.zeros((3, 3), np.float32)
    safetensors.numpy.save_file(tensors, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError) as info:
        read_unet_condition_weights(config, tmp_path / "weights.safetensors")
    message = str(info.value)
    assert "1 missing:\n    mid_block.attentions.0.proj_in.weight" in message
    assert "conv_in.weight: shape (8, 4, 3, 3), expected (8, 9, 3, 3)" in message
    assert "1 unexpected:\n    add_embedding.linear_1.weight" in message


def test_tensor_names():
    assert diffusers_tensor_name(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    path = ("up_blocks_1", "attentions_2", "transformer_blocks_0", "ff", "net_0", "proj", "bias")
    assert diffusers_tensor_name(path) == "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.bias"
    path = ("down_blocks_0", "downsamplers_0", "conv", "kernel")
    assert diffusers_tensor_name(path) == "down_blocks.0.downsamplers.0.conv.weight"
    assert diffusers_tensor_name(("conv_norm_out", "scale")) == "conv_norm_out.weight"


def test_unsupported_config_file_is_refused_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(SD15_UNET, addition_embed_type="text_image")))
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"config.json: .*addition_embed_type='text_image' is not supported yet"):
        read_unet_condition(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(INPAINT_TINY))
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.fp16.safetensors \(variant='fp16'\)"):
        read_unet_condition(tmp_path, variant="fp16")
