"""LoRA on SD3 / Flux transformers (`jaxdiff.latent.lora`): our adapted weights (`match_lora` + `adapted_params` on
{"transformer": params}) equal diffusers' after `load_lora_adapter` + `fuse_lora` on the PyTorch model with the same
file, for diffusers/peft files of SD3.5 and Flux (saved by diffusers' `save_lora_weights`) and for a kohya Flux
file in Black Forest Labs' names (converted for the reference by diffusers' `_convert_kohya_flux_lora_to_diffusers`);
ComfyUI's dotted variant reads as the kohya one; unmatched keys and misfit fused factors are refused in one line;
`LoraAdapters` runs on a pipeline without a U-Net."""

from __future__ import annotations

import copy
import types

import flax.traverse_util
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdiff.errors import WeightsError
from jaxdiff.latent.flux_weights import read_flux_transformer
from jaxdiff.latent.lora import LoraAdapters, adapted_params, match_lora
from jaxdiff.latent.mmdit_weights import diffusers_name, read_mmdit
from jaxdiff.weights.lora_files import read_lora_file
from jaxdiff.models import flux
from jaxdiff.weights.torch_layout import to_torch
from tests import test_flux_transformer as flux_tests
from tests import test_mmdit as mmdit_tests
from tests.test_transformer_single_file import FLUX_DEV, bfl_names

RANK = 4
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear", "context_embedder", "pos_embed.proj",
               "proj_out", "linear_1"]  # fmt: skip
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff.net.2", "proj_mlp", "proj_out",
                "norm.linear", "norm1_context.linear", "x_embedder", "guidance_embedder.linear_2"]  # fmt: skip


def flat(tree: dict) -> dict:
    return flax.traverse_util.flatten_dict(tree)


def fused_reference(model, state: dict, metadata: dict | None = None) -> dict[str, np.ndarray]:
    """diffusers' weights of `model` with the LoRA state dict (`transformer.` keys) and peft metadata loaded as its
    pipelines' `load_lora_weights` loads them, fused at scale 1; float64."""
    model = copy.deepcopy(model)
    model.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {name: tensor.detach().double().numpy() for name, tensor in model.state_dict().items()}


def ours(params: dict, path) -> dict:
    """Our adapted transformer params with the LoRA file at `path`, at scale 1."""
    adapter = match_lora(read_lora_file(path), {"transformer": params})
    return adapted_params({"transformer": params}, [(adapter, 1.0)])["transformer"]


def assert_adapted_equal(adapted: dict, reference: dict, base: dict, changed_at_least: int) -> None:
    """Every adapted parameter equals diffusers' fused weight (rtol 1e-5); at least `changed_at_least` changed."""
    changed = 0
    for path, value in flat(adapted).items():
        expected = reference[diffusers_name(path)]
        np.testing.assert_allclose(to_torch(path, np.asarray(value, np.float64)), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=diffusers_name(path))  # fmt: skip
        changed += not np.array_equal(np.asarray(value), np.asarray(flat(base)[path]))
    assert changed >= changed_at_least


def save_peft_lora(torch, diffusers, pipeline, model, targets, folder, seed):
    """A diffusers-format LoRA of `model` (peft r=4, lora_alpha=8, in the header) saved by `pipeline`'s
    `save_lora_weights`; returns the file."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    adapted = copy.deepcopy(model)
    adapted.add_adapter(config)
    layers = {k: 0.3 * v if "lora_B" in k else v for k, v in get_peft_model_state_dict(adapted).items()}
    pipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                               transformer_lora_adapter_metadata=config.to_dict())  # fmt: skip
    return folder / "pytorch_lora_weights.safetensors"


def test_sd3_diffusers_lora_matches_diffusers(torch, diffusers, tmp_path):
    model = mmdit_tests.diffusers_mmdit(torch, diffusers, **mmdit_tests.SD35)
    model.save_pretrained(tmp_path / "transformer")
    _, params = read_mmdit(tmp_path / "transformer")
    file = save_peft_lora(torch, diffusers, diffusers.StableDiffusion3Pipeline, model, SD3_TARGETS, tmp_path / "lora",
                          seed=0)  # fmt: skip
    state, metadata = diffusers.StableDiffusion3Pipeline.lora_state_dict(file, return_lora_metadata=True)
    assert_adapted_equal(ours(params, file), fused_reference(model, state, metadata), params,
                         changed_at_least=len(read_lora_file(file).modules))


def flux_model(torch, diffusers, tmp_path):
    model = flux_tests.diffusers_flux(torch, diffusers, **FLUX_DEV)
    model.save_pretrained(tmp_path / "transformer")
    config, params = read_flux_transformer(tmp_path / "transformer")
    return model, config, params


def test_flux_diffusers_lora_matches_diffusers(torch, diffusers, tmp_path):
    model, _, params = flux_model(torch, diffusers, tmp_path)
    file = save_peft_lora(torch, diffusers, diffusers.FluxPipeline, model, FLUX_TARGETS, tmp_path / "lora", seed=1)
    state, metadata = diffusers.FluxPipeline.lora_state_dict(file, return_lora_metadata=True)
    assert_adapted_equal(ours(params, file), fused_reference(model, state, metadata), params,
                         changed_at_least=len(read_lora_file(file).modules))


def kohya_flux_state(seed=2) -> dict[str, np.ndarray]:
    """A kohya LoRA of every Linear module of the tiny Flux in BFL's names (`lora_unet_<module>`), rank 4 with
    alpha 2 (scale 0.5); final_layer's modules with alpha = rank (diffusers drops their alphas)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in bfl_names(FLUX_DEV).items():
        if name.endswith(".weight") and len(shape) == 2:
            module = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
            state[f"{module}.lora_down.weight"] = (0.3 * rng.standard_normal((RANK, shape[1]))).astype(np.float32)
            state[f"{module}.lora_up.weight"] = (0.3 * rng.standard_normal((shape[0], RANK))).astype(np.float32)
            state[f"{module}.alpha"] = np.array(float(RANK) if "final_layer" in module else 2.0, np.float32)
    return state


def our_flux() -> tuple:
    """(config, params) of the tiny Flux, initialised by Flax (no torch)."""
    config = flux.flux_config(FLUX_DEV)
    model = flux.create_flux(config)
    return config, jax.jit(model.init)(jax.random.key(0), *flux.example_inputs(model))["params"]


def kohya_reference(torch, model, state: dict, d: int) -> dict[str, np.ndarray]:
    """diffusers' fused weights with the kohya file converted by `_convert_kohya_flux_lora_to_diffusers`.

    Two gaps of diffusers 0.42.1 are bridged here: it splits single blocks' `linear1` at Flux.1's widths (3072,
    3072, 3072, 12288: constants there), so those modules' reference is ΔW = alpha/r · up @ down split by rows
    [D, D, D, 4·D] in float64 NumPy; and it names the modules outside the blocks (`x_embedder`, `norm_out.linear`,
    `proj_out`, the embedders) without the `transformer.` prefix its loader filters by, so the prefix is added."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    linear1 = {k: v for k, v in state.items() if "_linear1." in k}
    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in state.items()
                                                       if k not in linear1})  # fmt: skip
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    reference = fused_reference(model, converted)
    for i in range(FLUX_DEV["num_single_layers"]):
        module = f"lora_unet_single_blocks_{i}_linear1"
        down, up = (linear1[f"{module}.{role}.weight"].astype(np.float64) for role in ("lora_down", "lora_up"))
        delta = float(linear1[f"{module}.alpha"]) / RANK * (up @ down)
        block = f"single_transformer_blocks.{i}"
        for name, (start, stop) in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                       ((0, d), (d, 2 * d), (2 * d, 3 * d), (3 * d, 7 * d))):  # fmt: skip
            reference[f"{block}.{name}.weight"] = reference[f"{block}.{name}.weight"] + delta[start:stop]
    return reference


def test_flux_kohya_lora_matches_diffusers_conversion(torch, diffusers, tmp_path):
    model, config, params = flux_model(torch, diffusers, tmp_path)
    state = kohya_flux_state()
    save_file(state, str(tmp_path / "kohya.safetensors"))
    lora = read_lora_file(tmp_path / "kohya.safetensors")
    adapter = match_lora(lora, {"transformer": params}, flux_config=config)
    adapted = adapted_params({"transformer": params}, [(adapter, 1.0)])["transformer"]
    d = config.num_attention_heads * config.attention_head_dim
    reference = kohya_reference(torch, model, state, d)
    # Every kernel of the tiny Flux is adapted: the BFL modules cover them all.
    assert_adapted_equal(adapted, reference, params, changed_at_least=sum(p[-1] == "kernel" for p in flat(params)))
    # ComfyUI's dotted names read as the same modules.
    comfy = {k.replace("lora_unet_", "diffusion_model.", 1): v for k, v in state.items()}
    comfy = {_dotted(k): v for k, v in comfy.items()}
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    again = match_lora(read_lora_file(tmp_path / "comfy.safetensors"), {"transformer": params}, flux_config=config)
    for path, value in flat(adapted_params({"transformer": params}, [(again, 1.0)])["transformer"]).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat(adapted)[path]))


def _dotted(key: str) -> str:
    """diffusion_model.double_blocks_0_img_attn_qkv.lora_down.weight -> ...double_blocks.0.img_attn.qkv.lora_..."""
    module, _, role = key.removeprefix("diffusion_model.").partition(".")
    names = {bfl.removesuffix(".weight").replace(".", "_"): bfl.removesuffix(".weight") for bfl in bfl_names(FLUX_DEV)}
    return f"diffusion_model.{names[module]}.{role}"


def test_kohya_fused_modules_split_as_numpy(tmp_path):
    """Independent float64 reference: ΔW = alpha/r · up @ down of BFL's fused [q; k; v] and [q; k; v; mlp] weights
    split by rows onto our kernels ([in, out]), and final_layer's (shift, scale) rows swapped onto norm_out."""
    config, params = our_flux()
    state = kohya_flux_state()
    save_file(state, str(tmp_path / "kohya.safetensors"))
    adapter = match_lora(read_lora_file(tmp_path / "kohya.safetensors"), {"transformer": params}, flux_config=config)
    adapted = flat(adapted_params({"transformer": params}, [(adapter, 2.0)])["transformer"])
    base, d = flat(params), 16

    def delta(module):
        down, up = (state[f"lora_unet_{module}.lora_{role}.weight"].astype(np.float64) for role in ("down", "up"))
        return float(state[f"lora_unet_{module}.alpha"]) / RANK * 2.0 * (up @ down)

    rows = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d), "mlp": slice(3 * d, 7 * d)}
    expected = {("transformer_blocks_1", "attn", "add_k_proj"): delta("double_blocks_1_txt_attn_qkv")[rows["k"]],
                ("single_transformer_blocks_0", "attn", "to_v"): delta("single_blocks_0_linear1")[rows["v"]],
                ("single_transformer_blocks_1", "proj_mlp"): delta("single_blocks_1_linear1")[rows["mlp"]],
                ("norm_out", "linear"): np.roll(delta("final_layer_adaLN_modulation_1"), -d, axis=0)}  # fmt: skip
    for module, change in expected.items():
        got = np.asarray(adapted[(*module, "kernel")], np.float64) - np.asarray(base[(*module, "kernel")], np.float64)
        np.testing.assert_allclose(got, change.T, rtol=1e-5, atol=1e-6, err_msg=str(module))


def test_unmatched_and_misfit_keys_are_listed_in_one_error(tmp_path):
    config, params = our_flux()
    state = kohya_flux_state()
    save_file(state, str(tmp_path / "kohya.safetensors"))
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    extra = {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": zeros(RANK, 16),
             "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": zeros(48, RANK),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": zeros(RANK, 8),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": zeros(8, RANK)}  # fmt: skip
    save_file({**state, **extra}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match=r"4 keys adapt no module of this pipeline's networks .*: lora_te1_text_"
                                           r"model.*lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight$") as error:
        match_lora(read_lora_file(tmp_path / "extra.safetensors"), {"transformer": params}, flux_config=config)
    assert "\n" not in str(error.value)
    state["lora_unet_single_blocks_0_linear1.lora_up.weight"] = zeros(7 * 16 + 2, RANK)
    save_file(state, str(tmp_path / "misfit.safetensors"))
    with pytest.raises(WeightsError, match=r"1 adapters do not fit .*: unet.single_blocks_0_linear1: ΔW has 114 rows, "
                                           r"the fused weight 112$"):  # fmt: skip
        match_lora(read_lora_file(tmp_path / "misfit.safetensors"), {"transformer": params}, flux_config=config)
    # Without the Flux config, BFL names are not read.
    with pytest.raises(WeightsError, match="keys adapt no module of this pipeline's networks"):
        match_lora(read_lora_file(tmp_path / "kohya.safetensors"), {"transformer": params})


class TransformerPipeline(LoraAdapters):
    """The LoRA methods on a pipeline of {"transformer"} params and a model with no U-Net."""

    def __init__(self, params: dict, flux_config=None):
        self.params, self.model, self.flux_config = {"transformer": params}, types.SimpleNamespace(), flux_config
        self._init_lora()

    def _lora_layouts(self) -> dict:
        return {} if self.flux_config is None else {"flux_config": self.flux_config}


def test_lora_adapters_run_without_a_unet(torch, diffusers, tmp_path):
    model, config, params = flux_model(torch, diffusers, tmp_path)
    file = save_peft_lora(torch, diffusers, diffusers.FluxPipeline, model, FLUX_TARGETS, tmp_path / "lora", seed=1)
    plain = TransformerPipeline(params)
    plain.load_lora(file, scale=0.5)
    expected = adapted_params({"transformer": params}, [(match_lora(read_lora_file(file), {"transformer": params}),
                                                         0.5)])  # fmt: skip
    kernel = ("transformer_blocks_0", "attn", "to_q", "kernel")
    np.testing.assert_array_equal(flat(plain._run_params["transformer"])[kernel], flat(expected["transformer"])[kernel])
    save_file(kohya_flux_state(), str(tmp_path / "kohya.safetensors"))
    flux_pipe = TransformerPipeline(params, config)
    flux_pipe.load_lora(tmp_path / "kohya.safetensors")
    flux_pipe.fuse_lora()
    assert not np.array_equal(flat(flux_pipe.params["transformer"])[kernel], flat(params)[kernel])
