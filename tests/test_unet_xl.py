"""The U-Nets of the x4 upscaler and of SDXL (jaxdiff.models.unet_condition): a class-label table, per-level
`only_cross_attention`, per-level transformer layers, SDXL's "text_time" added embedding; the other class
embeddings ("timestep", "identity", "projection"); their original single-file names.

References: diffusers' own `UNet2DConditionModel` built from tiny configs with these features, random weights,
saved with `save_pretrained` (safetensors) and run in float64 on the same inputs; the original (LDM / SGM)
single-file names converted back by diffusers' own converter; parameter counts of the full U-Nets from
diffusers modules built on the `meta` device (shapes only); the time-id embedding against a float64 NumPy
sinusoid.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.errors import ConfigError, UsageError, WeightsError
from jaxdiff.latent.stable_diffusion import UNET_PREFIX, read_original_tensors, read_single_file, unet_diffusers_name
from jaxdiff.latent.unet_weights import diffusers_tensor_name, read_unet_condition, unet_condition_shapes
from jaxdiff.models.unet_condition import create_unet_condition, example_inputs, text_time_input
from jaxdiff.models.unet_condition_config import config_from_diffusers
from tests.test_unet_condition import random_inputs, relative_error, saved_random_unet

TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|, ours in float32, diffusers in float64

# The x4 upscaler's layout, narrow: 7 input channels, a label table (the noise level), no self-attention at the
# levels before the last (level 0 has no attention at all: DownBlock2D / UpBlock2D).
UPSCALER_TINY = dict(
    sample_size=16, in_channels=7, out_channels=4, block_out_channels=[8, 16, 16], norm_num_groups=4,
    layers_per_block=1, cross_attention_dim=12, attention_head_dim=2, use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    num_class_embeds=20, only_cross_attention=[True, True, False],
)  # fmt: skip
# SDXL's layout, narrow: per-level transformer layers (1 unused at level 0, 2, 3; the middle block takes 3),
# per-level heads (1, 2, 4 of width 8), text_time with an 8-wide sinusoid per time id and P = 58 inputs
# (10 text + 6 time ids as SDXL base, or 18 text + 5 time ids as the refiner).
SDXL_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[8, 16, 32], norm_num_groups=4,
    layers_per_block=1, cross_attention_dim=12, attention_head_dim=[1, 2, 4], use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 3], addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=58,
)  # fmt: skip

# One level, its attention reading the text first (only_cross_attention), for the other class embeddings.
ONE_LEVEL = dict(
    UPSCALER_TINY, block_out_channels=[8], down_block_types=["CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D"], only_cross_attention=True, num_class_embeds=None,
)  # fmt: skip
UNCLIP_TINY = dict(ONE_LEVEL, class_embed_type="projection", projection_class_embeddings_input_dim=5)

UPSCALER_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, act_fn="silu", attention_head_dim=8,
    block_out_channels=[256, 512, 512, 1024], layers_per_block=2, cross_attention_dim=1024,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    num_class_embeds=1000, only_cross_attention=[True, True, True, False], use_linear_projection=True,
)  # fmt: skip
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SDXL_REFINER_UNET = dict(
    SDXL_BASE_UNET, block_out_channels=[384, 768, 1536, 1536], transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280, projection_class_embeddings_input_dim=2560,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)  # fmt: skip


# SDXL base: original size (h, w), crop top-left, target size; the refiner: original size, crop, aesthetic score.
BASE_TIME_IDS = [[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 768]]
REFINER_TIME_IDS = [[1024, 1024, 0, 0, 6.0], [512, 768, 8, 0, 2.5]]


def added_cond(batch, text_width, time_ids, seed):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((batch, text_width)).astype(np.float32)
    return {"text_embeds": text, "time_ids": np.asarray(time_ids, np.float32)}


def their_forward(torch, unet, sample, steps, context, class_labels=None, cond=None):
    """diffusers' output (float64, NHWC) with the upscaler's / SDXL's conditioning."""
    extra = {}
    if class_labels is not None:
        labels = torch.from_numpy(np.asarray(class_labels))
        extra["class_labels"] = labels.double() if labels.is_floating_point() else labels
    if cond is not None:
        extra["added_cond_kwargs"] = {k: torch.from_numpy(v).double() for k, v in cond.items()}
    with torch.no_grad():
        out = unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)).double(), torch.from_numpy(steps),
                   torch.from_numpy(context).double(), **extra)  # fmt: skip
    return out.sample.numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- forward parity with diffusers


def test_upscaler_unet_matches_diffusers(torch, diffusers, tmp_path):
    """Labels per example and one label for all (which changes the output); attn1 reads the text (width 12) at
    level 1, the image at level 2."""
    reference = saved_random_unet(torch, diffusers, UPSCALER_TINY, tmp_path / "unet")
    config, params = read_unet_condition(tmp_path)
    assert params["class_embedding"]["embedding"].shape == (20, 32)
    attn1 = {i: params[f"down_blocks_{i}"]["attentions_0"]["transformer_blocks_0"]["attn1"] for i in (1, 2)}
    assert attn1[1]["to_k"]["kernel"].shape == (12, 16) and attn1[2]["to_k"]["kernel"].shape == (16, 16)
    apply = jax.jit(create_unet_condition(config).apply)
    sample, context = random_inputs(UPSCALER_TINY, 2, 12, 10, seed=1)
    steps = np.array([981, 17])

    labels = np.array([19, 3])
    ours = apply({"params": params}, sample, steps, context, class_labels=labels)
    theirs = their_forward(torch, reference, sample, steps, context, class_labels=labels)
    assert relative_error(ours, theirs) < TOLERANCE

    ours_one = apply({"params": params}, sample, steps, context, class_labels=np.int32(3))
    theirs_one = their_forward(torch, reference, sample, steps, context, class_labels=[3, 3])
    assert relative_error(ours_one, theirs_one) < TOLERANCE
    np.testing.assert_allclose(ours_one[1], ours[1], rtol=1e-5, atol=1e-6)  # the same label 3
    assert relative_error(ours_one[0], theirs[0]) > 1e-3  # label 3 instead of 19


def test_only_cross_attention_everywhere_matches_diffusers(torch, diffusers, tmp_path):
    """`only_cross_attention: true` (one bool): every down and up transformer's attn1 reads the text; diffusers then
    also sets mid_block_only_cross_attention, which its UNetMidBlock2DCrossAttn ignores (attn1 reads the image)."""
    settings = dict(ONE_LEVEL, num_class_embeds=20)
    reference = saved_random_unet(torch, diffusers, settings, tmp_path / "unet")
    assert reference.mid_block.attentions[0].transformer_blocks[0].only_cross_attention is False
    config, params = read_unet_condition(tmp_path / "unet")
    attn1 = {name: params[name]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_k"]["kernel"].shape
             for name in ("down_blocks_0", "mid_block", "up_blocks_0")}  # fmt: skip
    assert attn1 == {"down_blocks_0": (12, 8), "mid_block": (8, 8), "up_blocks_0": (12, 8)}
    sample, context = random_inputs(settings, 2, 8, 8, seed=7)
    steps, labels = np.array([5, 600]), np.array([0, 7])
    ours = jax.jit(create_unet_condition(config).apply)({"params": params}, sample, steps, context,
                                                         class_labels=labels)  # fmt: skip
    theirs = their_forward(torch, reference, sample, steps, context, class_labels=labels)
    assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize(
    "class_embed_type, labels",
    [("timestep", np.array([3.0, 420.5])), ("identity", np.random.default_rng(8).standard_normal((2, 32))),
     ("projection", np.random.default_rng(9).standard_normal((2, 5)))],  # fmt: skip
    ids=["timestep", "identity", "projection"],
)
def test_class_embed_types_match_diffusers(torch, diffusers, tmp_path, class_embed_type, labels):
    """Labels embedded as timesteps, added as they are, or projected (SD 2.1 unCLIP); the labels change the output."""
    settings = UNCLIP_TINY if class_embed_type == "projection" else dict(ONE_LEVEL, class_embed_type=class_embed_type)
    reference = saved_random_unet(torch, diffusers, settings, tmp_path / "unet")
    config, params = read_unet_condition(tmp_path / "unet")
    apply = jax.jit(create_unet_condition(config).apply)
    sample, context = random_inputs(settings, 2, 8, 8, seed=10)
    steps, labels = np.array([5, 600]), labels.astype(np.float32)
    ours = apply({"params": params}, sample, steps, context, class_labels=labels)
    theirs = their_forward(torch, reference, sample, steps, context, class_labels=labels)
    assert relative_error(ours, theirs) < TOLERANCE
    assert relative_error(apply({"params": params}, sample, steps, context, class_labels=labels[::-1]), theirs) > 1e-3


def test_sdxl_unet_matches_diffusers(torch, diffusers, tmp_path):
    """SDXL base's 6 time ids and the refiner's 5 (with wider text) through the same add_embedding."""
    reference = saved_random_unet(torch, diffusers, SDXL_TINY, tmp_path / "unet")
    config, params = read_unet_condition(tmp_path / "unet")
    assert set(params["mid_block"]["attentions_0"]) >= {f"transformer_blocks_{n}" for n in range(3)}
    assert "transformer_blocks_2" not in params["down_blocks_1"]["attentions_0"]
    apply = jax.jit(create_unet_condition(config).apply)
    sample, context = random_inputs(SDXL_TINY, 2, 16, 16, seed=2)
    steps = np.array([999, 250])

    base = added_cond(2, 10, BASE_TIME_IDS, seed=3)
    ours = apply({"params": params}, sample, steps, context, added_cond=base)
    theirs = their_forward(torch, reference, sample, steps, context, cond=base)
    assert relative_error(ours, theirs) < TOLERANCE

    refiner = added_cond(2, 18, REFINER_TIME_IDS, seed=4)
    ours = apply({"params": params}, sample, steps, context, added_cond=refiner)
    theirs_refiner = their_forward(torch, reference, sample, steps, context, cond=refiner)
    assert relative_error(ours, theirs_refiner) < TOLERANCE
    assert relative_error(theirs_refiner, theirs) > 1e-3


@pytest.mark.parametrize("time_ids", [BASE_TIME_IDS, REFINER_TIME_IDS], ids=["base", "refiner"])
@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1)])
def test_text_time_input_against_numpy(time_ids, flip, shift):
    """[text_embeds, sinusoid(time_id_0), ..., sinusoid(time_id_N-1)], each sinusoid [cos, sin] (flip_sin_to_cos)
    or [sin, cos] of frequencies exp(-ln(10000)·i / (half - freq_shift)), in float64 NumPy."""
    cond = added_cond(2, 10, time_ids, seed=6)
    got = text_time_input(cond["text_embeds"], cond["time_ids"], 8, flip_sin_to_cos=flip, freq_shift=shift)
    half = 4
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
    args = cond["time_ids"].astype(np.float64)[..., None] * freqs  # [B, N, half]
    parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
    expected = np.concatenate([cond["text_embeds"], np.concatenate(parts, axis=-1).reshape(2, -1)], axis=-1)
    assert got.shape == (2, 10 + 8 * len(time_ids[0]))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=2e-4)  # float32 args up to 1024


# ---------------------------------------------------------------- original single-file names


def original_unet_names(names, settings):
    """diffusers name -> original (LDM / SGM) name of a U-Net's tensors, with the label table `label_emb.weight`
    and the class or add embedding's layers `label_emb.0.0` / `label_emb.0.2`."""
    from tests.test_stable_diffusion import original_unet_name

    added = {"class_embedding.weight": "label_emb.weight"}
    for k, layer in (("1", "0"), ("2", "2")):
        for leaf in ("weight", "bias"):
            for module in ("class_embedding", "add_embedding"):
                added[f"{module}.linear_{k}.{leaf}"] = f"label_emb.0.{layer}.{leaf}"
    return {name: UNET_PREFIX + added[name] if name in added else original_unet_name(name, settings) for name in names}


@pytest.mark.parametrize("settings", [UPSCALER_TINY, SDXL_TINY, UNCLIP_TINY], ids=["upscaler", "sdxl", "unclip"])
def test_original_names_read_as_the_folder(torch, diffusers, tmp_path, settings):
    """Original-named tensors (checked against diffusers' converter) read into the same parameters as the folder."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    reference = saved_random_unet(torch, diffusers, settings, tmp_path / "unet")
    state = {k: v.float().numpy() for k, v in reference.state_dict().items()}
    names = original_unet_names(state, reference.config)
    original = {names[name]: value for name, value in state.items()}
    back = single_file_utils.convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in original.items()},
                                                         reference.config)  # fmt: skip
    assert {k: v.numpy().tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in state.items()}
    for name, original_name in names.items():
        assert unet_diffusers_name(original_name[len(UNET_PREFIX) :], dict(reference.config)) == name

    safetensors.numpy.save_file(original, tmp_path / "model.safetensors")
    config, folder_params = read_unet_condition(tmp_path / "unet")
    shapes = {"unet": (unet_condition_shapes(config), lambda path: (diffusers_tensor_name(path),), "float32")}
    params = read_original_tensors(tmp_path / "model.safetensors", shapes, {"unet": settings}, 0)["unet"]
    jax.tree.map(np.testing.assert_array_equal, params, folder_params)


def test_sdxl_single_file_is_refused_in_one_line(tmp_path):
    for component, settings in (("unet", SDXL_TINY), ("vae", {}), ("text_encoder", {})):
        (tmp_path / "configs" / component).mkdir(parents=True)
        (tmp_path / "configs" / component / "config.json").write_text(json.dumps(settings))
    (tmp_path / "configs" / "tokenizer").mkdir()
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(WeightsError, match=r"^\S+config.json: addition_embed_type='text_time' \(SDXL\); SDXL single "
                       r"files, with their two text encoders, are read with an SDXL pipeline folder as config folder"):  # fmt: skip
        read_single_file(tmp_path / "sdxl.safetensors", config_folder=tmp_path / "configs")


# ---------------------------------------------------------------- parameter counts of the full U-Nets


@pytest.mark.parametrize(
    "settings, expected",
    [(UPSCALER_UNET, 473_398_020), (SDXL_BASE_UNET, 2_567_463_684), (SDXL_REFINER_UNET, 2_259_526_660)],
    ids=["upscaler", "sdxl_base", "sdxl_refiner"],
)
def test_full_size_parameter_count(settings, expected, tmp_path, capsys):
    """`jaxdiff info --pretrained FOLDER` counts the U-Net from its config.json through `jax.eval_shape`."""
    from jaxdiff.cli import main

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **settings}))
    assert main(["info", "--pretrained", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"U-Net parameters: {expected:,}\n"


@pytest.mark.parametrize(
    "settings, expected",
    [(UPSCALER_UNET, 473_398_020), (SDXL_BASE_UNET, 2_567_463_684), (SDXL_REFINER_UNET, 2_259_526_660)],
    ids=["upscaler", "sdxl_base", "sdxl_refiner"],
)
def test_diffusers_parameter_count(torch, diffusers, settings, expected):
    """diffusers' count; its full config (every key written out) reads as the settings do."""
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**settings)
    assert sum(p.numel() for p in reference.parameters()) == expected
    assert config_from_diffusers(dict(reference.config)) == config_from_diffusers(settings)


# ---------------------------------------------------------------- bad input


def _init(settings, **kwargs):
    config = config_from_diffusers(settings)
    args, _ = example_inputs(config, batch=2)
    return jax.eval_shape(create_unet_condition(config).init, jax.random.PRNGKey(0), *args, **kwargs)


def test_bad_conditioning_is_named():
    sample, context = random_inputs(UPSCALER_TINY, 2, 8, 8, seed=0)
    model = create_unet_condition(config_from_diffusers(UPSCALER_TINY))
    with pytest.raises(UsageError, match=r"^class_labels must lie in \[0, 20\), got 20"):
        model.init(jax.random.PRNGKey(0), sample, np.array([1, 2]), context, class_labels=np.array([3, 20]))
    with pytest.raises(UsageError, match=r"^class_labels must lie in \[0, 20\), got -1"):
        model.init(jax.random.PRNGKey(0), sample, np.array([1, 2]), context, class_labels=-1)
    with pytest.raises(UsageError, match=r"^class_labels are required: this U-Net embeds them \(num_class_embeds=20\)"):
        _init(UPSCALER_TINY)
    with pytest.raises(UsageError, match=r"^class_labels must be an int array \[2\] or an int \(num_class_embeds=20\), "
                       r"got float32 \(2,\)"):  # fmt: skip
        _init(UPSCALER_TINY, class_labels=jnp.zeros(2))
    with pytest.raises(UsageError, match=r"^class_labels must be a number array \[2, 5\] \(class_embed_type="
                       r"'projection'\), got float32 \(2, 4\)"):  # fmt: skip
        _init(UNCLIP_TINY, class_labels=jnp.zeros((2, 4)))
    with pytest.raises(UsageError, match=r"^class_labels are required: this U-Net embeds them \(class_embed_type="
                       r"'timestep'\)"):  # fmt: skip
        _init(dict(ONE_LEVEL, class_embed_type="timestep"))
    with pytest.raises(UsageError, match=r"^added_cond was given but this U-Net has no added embedding"):
        _init(UPSCALER_TINY, class_labels=jnp.zeros(2, jnp.int32), added_cond={})

    cond = added_cond(2, 10, np.zeros((2, 6)), seed=0)
    with pytest.raises(UsageError, match=r"^added_cond must be a dict with \['text_embeds', 'time_ids'\]"):
        _init(SDXL_TINY)
    with pytest.raises(UsageError, match=r"^added_cond must hold exactly .*: missing \['time_ids'\], surplus \[\]"):
        _init(SDXL_TINY, added_cond={"text_embeds": cond["text_embeds"]})
    with pytest.raises(UsageError, match=r"missing \[\], surplus \['image_embeds'\]"):
        _init(SDXL_TINY, added_cond=dict(cond, image_embeds=cond["text_embeds"]))
    with pytest.raises(
        UsageError, match=r"^added_cond: text_embeds \[B, 10\] and time_ids \[B, 5\] give 10 \+ 5·8 = 50 inputs, but "
        r"the add_embedding takes projection_class_embeddings_input_dim=58"
    ):  # fmt: skip
        _init(SDXL_TINY, added_cond=dict(cond, time_ids=cond["time_ids"][:, :5]))
    with pytest.raises(UsageError, match=r"^added_cond\['time_ids'\] must be a number array \[2, N\], got float32 "
                       r"\(6,\)"):  # fmt: skip
        _init(SDXL_TINY, added_cond=dict(cond, time_ids=cond["time_ids"][0]))
    with pytest.raises(UsageError, match=r"^class_labels were given but this U-Net has no class embedding"):
        _init(SDXL_TINY, added_cond=cond, class_labels=jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(class_embed_type="simple_projection"), r"^class_embed_type='simple_projection' is not supported yet"),
        (dict(addition_embed_type=None), r"^addition_time_embed_dim=8, projection_class_embeddings_input_dim=58 set "
                                         r"where nothing reads it"),
        (dict(class_embed_type="timestep", num_class_embeds=5), r"^num_class_embeds=5 set where nothing reads it"),
        (dict(addition_embed_type="text"), r"^addition_embed_type='text' is not supported yet"),
        (dict(addition_time_embed_dim=6, freq_shift=3), r"^addition_time_embed_dim=6 must be even, at least 4 and "
                                                        r"above twice freq_shift$"),
        (dict(projection_class_embeddings_input_dim=None),
         r"^projection_class_embeddings_input_dim=None must be an int"),
        (dict(transformer_layers_per_block=[1, 2]), r"^transformer_layers_per_block=\(1, 2\) must be one value or a "
                                                    r"list of 3 \(one per level\)$"),
        (dict(transformer_layers_per_block=[[1], [2], [3]]), r"^transformer_layers_per_block entry=\[1\] must be an"),
        (dict(reverse_transformer_layers_per_block=[[1], [2], [3]]), r"reverse_transformer_layers_per_block="),
        (dict(only_cross_attention=[True, False]), r"^only_cross_attention=\(True, False\) must be one value or a"),
        (dict(only_cross_attention="yes"), r"^only_cross_attention entry='yes' must be true or false$"),
        (dict(num_class_embeds=0), r"^num_class_embeds=0 must be an int >= 1$"),
    ],
)
def test_unsupported_or_bad_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_diffusers(dict(SDXL_TINY, **change))
