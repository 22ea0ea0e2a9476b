"""Original single-file Flux.1 (BFL) and SD3 / SD3.5 transformers (`jaxdiff.latent.transformer_single_file`):
random state dicts in the original layouts, written here from the original modules' names, read by us and converted
by diffusers' own single-file converters into diffusers models; our parameters equal diffusers' converted tensors,
our forward equals diffusers', our inferred config equals what diffusers infers (and the settings the test built
the file from); refusals are one line."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdiff.errors import WeightsError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.latent.mmdit_weights import diffusers_name
from jaxdiff.latent.transformer_single_file import (
    flux_settings, flux_sources, original_shapes, read_transformer_single_file, sd3_settings, sd3_sources,
)  # fmt: skip
from jaxdiff.models import flux, mmdit
from jaxdiff.weights.torch_layout import to_torch
from tests import test_flux_transformer as flux_tests
from tests import test_mmdit as mmdit_tests

FLUX_DEV = dict(flux_tests.DEV, in_channels=16, axes_dims_rope=(2, 2, 4))  # D = 16, heads of 8 channels
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False, num_single_layers=3)
# SD3 without qk-norm has 64-channel heads; SD3.5's width comes from its ln_q.
SD3 = dict(mmdit_tests.TINY, sample_size=128, attention_head_dim=64, num_attention_heads=1, caption_projection_dim=64,
           num_layers=2)  # fmt: skip
SD35 = dict(mmdit_tests.SD35, sample_size=128, num_layers=2, dual_attention_layers=[0])


def _linear(names: dict, module: str, out: int, inp: int) -> None:
    names[f"{module}.weight"], names[f"{module}.bias"] = (out, inp), (out,)


def bfl_names(s: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of BFL's `Flux` (flux/model.py, flux/modules/layers.py) for diffusers-style settings `s`."""
    d, hd = s["num_attention_heads"] * s["attention_head_dim"], s["attention_head_dim"]
    names: dict[str, tuple[int, ...]] = {}
    _linear(names, "img_in", d, s["in_channels"])
    _linear(names, "txt_in", d, s["joint_attention_dim"])
    embedders = [("time_in", 256), ("vector_in", s["pooled_projection_dim"])]
    for embedder, width in embedders + ([("guidance_in", 256)] if s["guidance_embeds"] else []):
        _linear(names, f"{embedder}.in_layer", d, width)
        _linear(names, f"{embedder}.out_layer", d, d)
    for i in range(s["num_layers"]):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            _linear(names, f"{block}_mod.lin", 6 * d, d)
            _linear(names, f"{block}_attn.qkv", 3 * d, d)
            names[f"{block}_attn.norm.query_norm.scale"] = names[f"{block}_attn.norm.key_norm.scale"] = (hd,)
            _linear(names, f"{block}_attn.proj", d, d)
            _linear(names, f"{block}_mlp.0", 4 * d, d)
            _linear(names, f"{block}_mlp.2", d, 4 * d)
    for i in range(s["num_single_layers"]):
        block = f"single_blocks.{i}"
        _linear(names, f"{block}.linear1", 3 * d + 4 * d, d)
        _linear(names, f"{block}.linear2", d, d + 4 * d)
        names[f"{block}.norm.query_norm.scale"] = names[f"{block}.norm.key_norm.scale"] = (hd,)
        _linear(names, f"{block}.modulation.lin", 3 * d, d)
    _linear(names, "final_layer.linear", s["in_channels"], d)
    _linear(names, "final_layer.adaLN_modulation.1", 2 * d, d)
    return names


def sd3_names(s: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of Stability's `MMDiTX` (sd3 reference code, mmditx.py) for diffusers-style settings `s`."""
    d, hd, p = s["num_attention_heads"] * s["attention_head_dim"], s["attention_head_dim"], s["patch_size"]
    names: dict[str, tuple[int, ...]] = {"pos_embed": (1, s["pos_embed_max_size"] ** 2, d),
                                         "x_embedder.proj.weight": (d, s["in_channels"], p, p),
                                         "x_embedder.proj.bias": (d,)}  # fmt: skip
    for embedder, width in (("t_embedder", 256), ("y_embedder", s["pooled_projection_dim"])):
        _linear(names, f"{embedder}.mlp.0", d, width)
        _linear(names, f"{embedder}.mlp.2", d, d)
    _linear(names, "context_embedder", d, s["joint_attention_dim"])
    last = s["num_layers"] - 1
    for i in range(s["num_layers"]):
        dual = i in s.get("dual_attention_layers", ())
        for stream in ("x_block", "context_block"):
            block, pre_only = f"joint_blocks.{i}.{stream}", stream == "context_block" and i == last
            attentions = ("attn", "attn2") if dual and stream == "x_block" else ("attn",)
            for attn in attentions:
                _linear(names, f"{block}.{attn}.qkv", 3 * d, d)
                if s.get("qk_norm"):
                    names[f"{block}.{attn}.ln_q.weight"] = names[f"{block}.{attn}.ln_k.weight"] = (hd,)
                if not pre_only:
                    _linear(names, f"{block}.{attn}.proj", d, d)
            _linear(names, f"{block}.adaLN_modulation.1", (2 if pre_only else 9 if len(attentions) == 2 else 6) * d, d)
            if not pre_only:
                _linear(names, f"{block}.mlp.fc1", 4 * d, d)
                _linear(names, f"{block}.mlp.fc2", d, 4 * d)
    _linear(names, "final_layer.linear", p * p * s["out_channels"], d)
    _linear(names, "final_layer.adaLN_modulation.1", 2 * d, d)
    return names


def random_state_dict(names: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (0.3 * rng.standard_normal(shape)).astype(np.float32) for name, shape in names.items()}


def as_torch(torch, state: dict) -> dict:
    return {name: torch.from_numpy(array) for name, array in state.items()}


@contextlib.contextmanager
def flux_width(torch, d: int):
    """diffusers' Flux converter splits single blocks' linear1 at Flux.1's width 3072 (a constant there): the split
    at the tiny model's width D instead."""
    split = torch.split

    def tiny_split(tensor, sizes, dim=0):
        return split(tensor, [d if s == 3072 else 4 * d for s in sizes] if isinstance(sizes, tuple) else sizes, dim)

    with mock.patch.object(torch, "split", tiny_split):
        yield


def diffusers_flux_from(torch, diffusers, settings: dict, state: dict):
    """(diffusers' converted tensors, the FluxTransformer2DModel holding them)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    d = settings["num_attention_heads"] * settings["attention_head_dim"]
    with flux_width(torch, d):
        converted = convert_flux_transformer_checkpoint_to_diffusers(as_torch(torch, state))
    model = diffusers.FluxTransformer2DModel(**settings).eval()
    model.load_state_dict(converted, strict=True)
    return converted, model


def save(path, state: dict, prefix: str = "") -> None:
    save_file({prefix + name: array for name, array in state.items()}, str(path))


def assert_params_equal(params: dict, converted: dict, model) -> None:
    """Each of our parameters is diffusers' converted tensor, in our layout (bitwise)."""
    shapes = param_shapes(model, *(flux.example_inputs(model) if isinstance(model, flux.FluxTransformer)
                                   else mmdit.example_inputs(model, size=model.patch_size)))  # fmt: skip
    used = set()
    for path in shapes:
        leaf = params
        for part in path:
            leaf = leaf[part]
        name = diffusers_name(path)
        np.testing.assert_array_equal(to_torch(path, np.asarray(leaf)), converted[name].numpy(), err_msg=name)
        used.add(name)
    assert used | {"pos_embed.pos_embed"} >= set(converted)


@pytest.mark.parametrize("settings, prefix", [(FLUX_DEV, ""), (FLUX_SCHNELL, "model.diffusion_model.")],
                         ids=["dev", "schnell-prefixed"])  # fmt: skip
def test_flux_file_matches_diffusers_converter(torch, diffusers, tmp_path, settings, prefix):
    state = random_state_dict(bfl_names(settings))
    save(tmp_path / "flux.safetensors", state, prefix)
    family, config, params = read_transformer_single_file(tmp_path / "flux.safetensors",
                                                          axes_dims_rope=settings["axes_dims_rope"])  # fmt: skip
    assert family == "flux"
    expected_config = flux.flux_config({**settings, "out_channels": settings["in_channels"]})
    assert config == expected_config
    converted, model = diffusers_flux_from(torch, diffusers, settings, state)
    assert_params_equal(params, converted, flux.create_flux(config))
    inputs = flux_tests.random_inputs(settings)
    got = flux_tests.our_forward(config, params, *inputs)
    assert flux_tests.relative_error(got, flux_tests.diffusers_forward(torch, model, *inputs)) < 1e-5


@pytest.mark.parametrize("settings", [SD3, SD35], ids=["sd3", "sd35"])
def test_sd3_file_matches_diffusers_converter(torch, diffusers, tmp_path, settings):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = random_state_dict(sd3_names(settings), seed=1)
    model = diffusers.SD3Transformer2DModel(**settings).eval()
    state["pos_embed"] = model.pos_embed.pos_embed.numpy()  # the stored table is the sin-cos one, not random
    save(tmp_path / "sd3.safetensors", state, "model.diffusion_model.")
    family, config, params = read_transformer_single_file(tmp_path / "sd3.safetensors")
    assert family == "sd3"
    assert config == mmdit.mmdit_config(settings)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(as_torch(torch, {f"model.diffusion_model.{k}": v
                                                                                 for k, v in state.items()}))
    model.load_state_dict(converted, strict=True)
    # What diffusers infers from the tensors (the rest of its config comes from the release's config.json).
    assert config.num_layers == model.config.num_layers and config.qk_norm == model.config.qk_norm
    assert list(config.dual_attention_layers) == list(model.config.dual_attention_layers)
    assert config.caption_projection_dim == converted["context_embedder.weight"].shape[0]
    assert_params_equal(params, converted, mmdit.create_mmdit(config))
    inputs = mmdit_tests.random_inputs(settings)
    got = mmdit_tests.our_forward(config, params, *inputs)
    assert mmdit_tests.relative_error(got, mmdit_tests.diffusers_forward(torch, model, *inputs)) < 1e-5


# --------------------------------------------------------------------------- refusals


def test_all_in_one_files_refuse_other_components_by_name(tmp_path):
    state = random_state_dict(bfl_names(FLUX_SCHNELL))
    others = {"first_stage_model.decoder.conv_in.weight": np.zeros((2, 2), np.float32),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": np.zeros(3, np.float32)}
    save(tmp_path / "all.safetensors", {**state, **others}, "")
    with pytest.raises(WeightsError, match=r"2 tensors of other components .*: first_stage_model\.decoder\.conv_in\."
                                           r"weight, text_encoders\.clip_l\..*transformer_only=True") as error:
        read_transformer_single_file(tmp_path / "all.safetensors", axes_dims_rope=(2, 2, 4))
    assert "\n" not in str(error.value)
    _, _, params = read_transformer_single_file(tmp_path / "all.safetensors", axes_dims_rope=(2, 2, 4),
                                                transformer_only=True)  # fmt: skip
    _, _, alone = read_transformer_single_file(_saved(tmp_path, state), axes_dims_rope=(2, 2, 4))
    np.testing.assert_array_equal(params["proj_out"]["kernel"], alone["proj_out"]["kernel"])


def _saved(tmp_path, state, name="alone.safetensors"):
    save(tmp_path / name, state)
    return tmp_path / name


def test_bad_tensors_are_listed_in_one_error(tmp_path):
    state = random_state_dict(bfl_names(FLUX_DEV))
    state["double_blocks.0.img_attn.extra.weight"] = np.zeros(3, np.float32)
    state["double_blocks.1.txt_mlp.0.bias"] = np.zeros(5, np.float32)
    del state["single_blocks.1.linear2.bias"]
    with pytest.raises(WeightsError) as error:
        read_transformer_single_file(_saved(tmp_path, state), axes_dims_rope=(2, 2, 4))
    message = str(error.value)
    for part in ("1 missing:\n    single_blocks.1.linear2.bias", "double_blocks.1.txt_mlp.0.bias: shape (5,), "
                 "expected (64,)", "1 unexpected:\n    double_blocks.0.img_attn.extra.weight"):  # fmt: skip
        assert part in message


@pytest.mark.parametrize("change, message", [
    (dict(axes_dims_rope=None), r"heads of 8 channels \(not Flux.1's 128\) need axes_dims_rope summing to 8, got "
                                r"\(16, 56, 56\)$"),
    (dict(drop="img_in.weight"), r"no tensor img_in.weight, which an original Flux transformer file has"),
    (dict(drop="double_blocks.0.img_attn.norm.query_norm.scale"), "no tensor double_blocks.0.img_attn.norm.query_norm"),
    (dict(reshape="img_in.weight"), r"img_in.weight has shape \[16\], not 2 dimensions"),
])  # fmt: skip
def test_flux_config_refusals_are_one_line(tmp_path, change, message):
    state = random_state_dict(bfl_names(FLUX_SCHNELL))
    state.pop(change.get("drop"), None)
    if "reshape" in change:
        state[change["reshape"]] = np.zeros(16, np.float32)
    with pytest.raises(WeightsError, match=message) as error:
        read_transformer_single_file(_saved(tmp_path, state), axes_dims_rope=change.get("axes_dims_rope", (2, 2, 4)))
    assert "\n" not in str(error.value)


def test_other_files_are_refused(tmp_path):
    save(tmp_path / "unet.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": np.zeros(2, np.float32)})
    with pytest.raises(WeightsError, match="holds neither an original Flux transformer"):
        read_transformer_single_file(tmp_path / "unet.safetensors")
    state = random_state_dict(sd3_names(SD3))
    with pytest.raises(WeightsError, match=r"the stored pos_embed differs from the one its config gives"):
        read_transformer_single_file(_saved(tmp_path, state))
    with pytest.raises(WeightsError, match=r"axes_dims_rope=\(2, 2, 4\) applies to Flux files only"):
        read_transformer_single_file(tmp_path / "alone.safetensors", axes_dims_rope=(2, 2, 4))


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell", "sd3-medium"])
def test_release_configs_and_tables(family):
    """The full-size releases' configs are inferred from their tensor shapes, and the tables read every parameter
    from a tensor of the original layout with its shape (traced, nothing allocated)."""
    if family.startswith("flux"):
        release = flux.FLUX_DEV if family == "flux-dev" else flux.FLUX_SCHNELL
        names = bfl_names(dict(release, in_channels=64))
        config = flux.flux_config(flux_settings(names, "file"))
        assert config == flux.flux_config(release)
        model, sources = flux.create_flux(config), flux_sources(config)
        shapes = param_shapes(model, *flux.example_inputs(model))
    else:
        names = sd3_names(mmdit.SD3_MEDIUM)
        config = mmdit.mmdit_config(sd3_settings(names, "file"))
        assert config == mmdit.sd3_medium_config()
        model, sources = mmdit.create_mmdit(config), sd3_sources(config)
        shapes = param_shapes(model, *mmdit.example_inputs(model, size=config.patch_size))
        del names["pos_embed"]  # a buffer, checked against the config's table
    assert original_shapes({path: sources[diffusers_name(path)] for path in shapes}, shapes) == names
