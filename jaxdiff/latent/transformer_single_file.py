"""The original single-file transformers of Flux.1 (Black Forest Labs' `flux1-dev.safetensors`,
`flux1-schnell.safetensors`) and SD3 / SD3.5 (Stability's `sd3_medium.safetensors`, `sd3.5_large.safetensors`, ...)
-> our config and float32 NumPy parameters, without torch: `read_transformer_single_file`.

The tensors are named as the original code names its modules, optionally under `model.diffusion_model.`:

- Flux (BFL's `flux/model.py`): `img_in`, `txt_in`, `time_in.in_layer` / `out_layer`, `vector_in.*`, `guidance_in.*`
  (dev only), `double_blocks.{i}.img_attn.qkv` (q, k, v fused by rows), `img_attn.norm.query_norm.scale`,
  `img_attn.proj`, `img_mlp.0` / `.2`, `img_mod.lin` and the same under `txt_`, `single_blocks.{i}.linear1` (q, k, v
  and the MLP's input fused by rows: D, D, D, 4·D), `linear2`, `modulation.lin`, `norm.query_norm.scale`,
  `final_layer.adaLN_modulation.1`, `final_layer.linear`.
- SD3 (`sd3_impls.py` / `mmditx.py`): `x_embedder.proj`, `pos_embed` (the stored sin-cos table [1, G², D]),
  `t_embedder.mlp.0` / `.2`, `y_embedder.mlp.*`, `context_embedder`, `joint_blocks.{i}.x_block` / `context_block`
  with `attn.qkv` (fused), `attn.proj`, `attn.ln_q` / `ln_k` (SD3.5), `mlp.fc1` / `fc2`, `adaLN_modulation.1`,
  SD3.5-medium's `x_block.attn2.*` (dual attention), `final_layer.*`.

`flux_sources` and `sd3_sources` give, for each diffusers tensor name (`jaxdiff.latent.mmdit_weights.diffusers_name`
of our parameters), the original tensor and the rows it takes, as diffusers' single-file converters split them. The
original adaptive norms before the output (`final_layer`, and SD3's last `context_block`) give (shift, scale) where
diffusers' give (scale, shift): their halves are swapped. The same tables rename kohya LoRA modules of Flux
(`jaxdiff.latent.lora`) through `original_modules`.

The config is inferred from the tensors' shapes, as diffusers' converters do where they infer (layer counts, dual
attention layers, qk-norm, guidance) and from the remaining shapes otherwise (widths, channels, patch size, head
width from the qk-norm scales; SD3 without qk-norm: 64-channel heads, as every SD3 release); settings no tensor
determines are the releases' (SD3 `sample_size` 128, checked through the stored position table; Flux
`axes_dims_rope` (16, 56, 56) unless given). Every tensor of the file is used or listed in one WeightsError; the
VAE and text encoders that all-in-one files add (`first_stage_model.`, `text_encoders.`, ...) are refused by name
unless `transformer_only=True` skips them (they are not read: use a diffusers folder for those components).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from jaxdiff.errors import WeightsError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.latent.mmdit_weights import check_buffer, diffusers_name
from jaxdiff.latent.stable_diffusion import UNET_PREFIX, check_single_file
from jaxdiff.models import flux, mmdit
from jaxdiff.weights.lora_files import listed
from jaxdiff.weights.matching import ParamPath, match_names
from jaxdiff.weights.safetensors_reader import open_safetensors, read_tensor
from jaxdiff.weights.torch_layout import param_from_torch, torch_shape

# Prefixes of the other components all-in-one files hold (autoencoder, text encoders).
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "vae.", "conditioner.", "cond_stage_model.")
SD3_SAMPLE_SIZE = 128  # every SD3 / SD3.5 transformer's config.json
SD3_HEAD_DIM = 64  # the original MMDiT's head width (hidden size 64·depth, depth heads)
FLUX_AXES_DIMS_ROPE = (16, 56, 56)  # Flux.1's rotary axes (head width 128)
_BLOCK = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a diffusers tensor comes from: the original tensor `name` and the row ranges [start, stop) of it that,
    concatenated, make the diffusers tensor (None: the whole tensor)."""

    name: str
    rows: tuple[tuple[int, int], ...] | None = None


def _linear(table: dict, target: str, original: str, leaves: tuple[str, ...] = ("weight", "bias")) -> None:
    for leaf in leaves:
        table[f"{target}.{leaf}"] = Source(f"{original}.{leaf}")


def _fused(table: dict, targets: tuple[str, ...], widths: tuple[int, ...], original: str) -> None:
    """`targets` take consecutive row ranges of `widths` rows of the original weight and bias."""
    starts = np.cumsum((0, *widths))
    for leaf in ("weight", "bias"):
        for target, start, stop in zip(targets, starts[:-1], starts[1:]):
            table[f"{target}.{leaf}"] = Source(f"{original}.{leaf}", ((int(start), int(stop)),))


def _swapped(table: dict, target: str, original: str, width: int) -> None:
    """The original (shift, scale) halves of `width` rows each as diffusers' (scale, shift)."""
    for leaf in ("weight", "bias"):
        table[f"{target}.{leaf}"] = Source(f"{original}.{leaf}", ((width, 2 * width), (0, width)))


def _qk_norms(table: dict, target: str, queries: str, keys: str, leaf: str) -> None:
    table[f"{target}_q.weight"] = Source(f"{queries}.{leaf}")
    table[f"{target}_k.weight"] = Source(f"{keys}.{leaf}")


def flux_sources(config: ml_collections.ConfigDict) -> dict[str, Source]:
    """diffusers tensor name -> its `Source` in a BFL Flux file, for a `flux.flux_config` config (D =
    num_attention_heads · attention_head_dim; single blocks' linear1 rows: q, k, v of D each, then the MLP's 4·D)."""
    d = config.num_attention_heads * config.attention_head_dim
    table: dict[str, Source] = {}
    for target, original in (("time_text_embed.timestep_embedder", "time_in"),
                             ("time_text_embed.text_embedder", "vector_in"),
                             ("time_text_embed.guidance_embedder", "guidance_in")):  # fmt: skip
        _linear(table, f"{target}.linear_1", f"{original}.in_layer")
        _linear(table, f"{target}.linear_2", f"{original}.out_layer")
    _linear(table, "context_embedder", "txt_in")
    _linear(table, "x_embedder", "img_in")
    for i in range(config.num_layers):
        block, original = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, attn, mod, ff, out, norm in (("img", "attn.to", "norm1", "ff", "attn.to_out.0", "attn.norm"),
                                                 ("txt", "attn.add", "norm1_context", "ff_context", "attn.to_add_out",
                                                  "attn.norm_added")):  # fmt: skip
            _linear(table, f"{block}.{mod}.linear", f"{original}.{stream}_mod.lin")
            names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            _fused(table, tuple(f"{block}.attn.{n}" for n in names), (d, d, d), f"{original}.{stream}_attn.qkv")
            _qk_norms(table, f"{block}.{norm}", f"{original}.{stream}_attn.norm.query_norm",
                      f"{original}.{stream}_attn.norm.key_norm", "scale")  # fmt: skip
            _linear(table, f"{block}.{ff}.net.0.proj", f"{original}.{stream}_mlp.0")
            _linear(table, f"{block}.{ff}.net.2", f"{original}.{stream}_mlp.2")
            _linear(table, f"{block}.{out}", f"{original}.{stream}_attn.proj")
    for i in range(config.num_single_layers):
        block, original = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _linear(table, f"{block}.norm.linear", f"{original}.modulation.lin")
        _fused(table, tuple(f"{block}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
               (d, d, d, flux.MLP_RATIO * d), f"{original}.linear1")  # fmt: skip
        _qk_norms(table, f"{block}.attn.norm", f"{original}.norm.query_norm", f"{original}.norm.key_norm", "scale")
        _linear(table, f"{block}.proj_out", f"{original}.linear2")
    _linear(table, "proj_out", "final_layer.linear")
    _swapped(table, "norm_out.linear", "final_layer.adaLN_modulation.1", d)
    return table


def sd3_sources(config: ml_collections.ConfigDict) -> dict[str, Source]:
    """diffusers tensor name -> its `Source` in an original SD3 / SD3.5 file, for a `mmdit.mmdit_config` config
    (entries for every optional module: the caller looks up those its parameters have)."""
    d = config.num_attention_heads * config.attention_head_dim
    table: dict[str, Source] = {}
    _linear(table, "pos_embed.proj", "x_embedder.proj")
    for target, original in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        _linear(table, f"time_text_embed.{target}.linear_1", f"{original}.mlp.0")
        _linear(table, f"time_text_embed.{target}.linear_2", f"{original}.mlp.2")
    _linear(table, "context_embedder", "context_embedder")
    for i in range(config.num_layers):
        block, x, context = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        _fused(table, tuple(f"{block}.attn.{n}" for n in ("to_q", "to_k", "to_v")), (d, d, d), f"{x}.attn.qkv")
        _fused(table, tuple(f"{block}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")), (d, d, d),
               f"{context}.attn.qkv")  # fmt: skip
        _fused(table, tuple(f"{block}.attn2.{n}" for n in ("to_q", "to_k", "to_v")), (d, d, d), f"{x}.attn2.qkv")
        _qk_norms(table, f"{block}.attn.norm", f"{x}.attn.ln_q", f"{x}.attn.ln_k", "weight")
        _qk_norms(table, f"{block}.attn.norm_added", f"{context}.attn.ln_q", f"{context}.attn.ln_k", "weight")
        _qk_norms(table, f"{block}.attn2.norm", f"{x}.attn2.ln_q", f"{x}.attn2.ln_k", "weight")
        _linear(table, f"{block}.attn.to_out.0", f"{x}.attn.proj")
        _linear(table, f"{block}.attn.to_add_out", f"{context}.attn.proj")
        _linear(table, f"{block}.attn2.to_out.0", f"{x}.attn2.proj")
        _linear(table, f"{block}.norm1.linear", f"{x}.adaLN_modulation.1")
        if i == config.num_layers - 1:  # context_pre_only: AdaLayerNormContinuous
            _swapped(table, f"{block}.norm1_context.linear", f"{context}.adaLN_modulation.1", d)
        else:
            _linear(table, f"{block}.norm1_context.linear", f"{context}.adaLN_modulation.1")
        for ff, stream in (("ff", x), ("ff_context", context)):
            _linear(table, f"{block}.{ff}.net.0.proj", f"{stream}.mlp.fc1")
            _linear(table, f"{block}.{ff}.net.2", f"{stream}.mlp.fc2")
    _linear(table, "proj_out", "final_layer.linear")
    _swapped(table, "norm_out.linear", "final_layer.adaLN_modulation.1", d)
    return table


def original_modules(sources: Mapping[str, Source]) -> dict[str, list[tuple[str, tuple[tuple[int, int], ...] | None]]]:
    """Each original module (its weight's name without `.weight`) -> [(diffusers module, the row ranges of the
    original weight it takes, None for all)], from `flux_sources` / `sd3_sources`."""
    modules: dict[str, list] = {}
    for target, source in sources.items():
        if target.endswith(".weight") and source.name.endswith(".weight"):
            modules.setdefault(source.name.removesuffix(".weight"), []).append(
                (target.removesuffix(".weight"), source.rows))  # fmt: skip
    return modules


def original_shapes(paths: Mapping[ParamPath, Source], shapes: Mapping[ParamPath, tuple[int, ...]]) -> dict:
    """The original tensors' shapes (PyTorch layout) that our parameters at `paths` (-> their `Source`) of `shapes`
    are read from: a fused tensor has the rows of all its parts."""
    expected = {}
    for path, source in paths.items():
        shape = torch_shape(path, shapes[path])
        rows = shape[0] if source.rows is None else max(stop for _, stop in source.rows)
        rows = max(rows, expected.get(source.name, (0,))[0])  # the part that ends last gives the fused tensor's rows
        expected[source.name] = (rows, *shape[1:])
    return expected


def _block_count(names: Mapping[str, tuple[int, ...]], kind: str) -> int:
    """max i + 1 over the tensors `{kind}.{i}.*` (0 without any), as diffusers counts blocks."""
    indices = [int(match[2]) for name in names if (match := _BLOCK.match(name)) and match[1] == kind]
    return max(indices, default=-1) + 1


def _shape(names: Mapping[str, tuple[int, ...]], name: str, ndim: int, file, family: str) -> tuple[int, ...]:
    """The shape of tensor `name`, which must be there with `ndim` dimensions."""
    if name not in names:
        raise WeightsError(f"{file}: no tensor {name}, which an original {family} transformer file has (a file of "
                           "another model?)")  # fmt: skip
    if len(names[name]) != ndim:
        raise WeightsError(f"{file}: {name} has shape {list(names[name])}, not {ndim} dimensions")
    return names[name]


def flux_settings(names: Mapping[str, tuple[int, ...]], file, axes_dims_rope=None) -> dict:
    """diffusers FluxTransformer2DModel settings of a BFL file's tensors (name -> shape, prefix removed)."""
    d, in_channels = _shape(names, "img_in.weight", 2, file, "Flux")
    num_layers, num_single_layers = _block_count(names, "double_blocks"), _block_count(names, "single_blocks")
    norm = ("double_blocks.0.img_attn.norm.query_norm.scale" if num_layers else
            "single_blocks.0.norm.query_norm.scale")  # fmt: skip
    (head_dim,) = _shape(names, norm, 1, file, "Flux")
    if d % head_dim:
        raise WeightsError(f"{file}: {norm} gives heads of {head_dim} channels, which do not divide the width {d}")
    axes = FLUX_AXES_DIMS_ROPE if axes_dims_rope is None else tuple(axes_dims_rope)
    if sum(axes) != head_dim:
        raise WeightsError(f"{file}: heads of {head_dim} channels (not Flux.1's {sum(FLUX_AXES_DIMS_ROPE)}) need "
                           f"axes_dims_rope summing to {head_dim}, got {axes}")  # fmt: skip
    out_rows = _shape(names, "final_layer.linear.weight", 2, file, "Flux")[0]
    return dict(patch_size=1, in_channels=in_channels, out_channels=out_rows, num_layers=num_layers,
                num_single_layers=num_single_layers, attention_head_dim=head_dim, num_attention_heads=d // head_dim,
                joint_attention_dim=_shape(names, "txt_in.weight", 2, file, "Flux")[1],
                pooled_projection_dim=_shape(names, "vector_in.in_layer.weight", 2, file, "Flux")[1],
                guidance_embeds="guidance_in.in_layer.weight" in names, axes_dims_rope=axes)  # fmt: skip


def sd3_settings(names: Mapping[str, tuple[int, ...]], file) -> dict:
    """diffusers SD3Transformer2DModel settings of an original SD3 / SD3.5 file's tensors (prefix removed)."""
    d, in_channels, patch, _ = _shape(names, "x_embedder.proj.weight", 4, file, "SD3")
    num_layers = _block_count(names, "joint_blocks")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight"
    head_dim = _shape(names, qk_norm, 1, file, "SD3")[0] if qk_norm in names else SD3_HEAD_DIM
    if d % head_dim:
        raise WeightsError(f"{file}: a width of {d} is not a whole number of {head_dim}-channel heads")
    grid = round(np.sqrt(_shape(names, "pos_embed", 3, file, "SD3")[1]))
    dual = sorted({int(match[2]) for name in names
                   if (match := _BLOCK.match(name)) and name.startswith(f"{match[0]}x_block.attn2.")})  # fmt: skip
    return dict(sample_size=SD3_SAMPLE_SIZE, patch_size=patch, in_channels=in_channels, num_layers=num_layers,
                attention_head_dim=head_dim, num_attention_heads=d // head_dim,
                joint_attention_dim=_shape(names, "context_embedder.weight", 2, file, "SD3")[1],
                caption_projection_dim=d,
                pooled_projection_dim=_shape(names, "y_embedder.mlp.0.weight", 2, file, "SD3")[1],
                out_channels=_shape(names, "final_layer.linear.weight", 2, file, "SD3")[0] // (patch * patch),
                pos_embed_max_size=grid, dual_attention_layers=dual,
                qk_norm="rms_norm" if qk_norm in names else None)  # fmt: skip


def transformer_family(names, file) -> str:
    """"flux" or "sd3" by the tensor names (prefix removed); WeightsError for neither."""
    if "img_in.weight" in names or any(name.startswith("double_blocks.") for name in names):
        return "flux"
    if "x_embedder.proj.weight" in names or any(name.startswith("joint_blocks.") for name in names):
        return "sd3"
    raise WeightsError(f"{file} holds neither an original Flux transformer (img_in, double_blocks.*) nor an SD3 one "
                       "(x_embedder.proj, joint_blocks.*)")  # fmt: skip


def _file_names(file, handle, transformer_only: bool) -> dict[str, str]:
    """Each transformer tensor's name without `model.diffusion_model.` -> its name in the file; WeightsError listing
    the other components' tensors (unless `transformer_only`) or names present with and without the prefix."""
    stripped, others, twice = {}, [], []
    for name in handle.keys():  # noqa: SIM118 (a safe_open handle)
        if name.startswith(OTHER_COMPONENTS):
            others.append(name)
            continue
        short = name.removeprefix(UNET_PREFIX)
        if short in stripped:
            twice.append(name)
        stripped[short] = name
    if twice:
        raise WeightsError(f"{file}: {len(twice)} tensors are present both with and without the prefix "
                           f"{UNET_PREFIX!r}: {listed(sorted(twice))}")  # fmt: skip
    if others and not transformer_only:
        raise WeightsError(f"{file}: {len(others)} tensors of other components (autoencoder, text encoders) are not "
                           f"read from single files: {listed(sorted(others))}; pass transformer_only=True to read the "
                           "transformer alone and take the other components from a diffusers folder")  # fmt: skip
    return stripped


def read_transformer_single_file(
    file: str | os.PathLike, *, transformer_only: bool = False, axes_dims_rope=None, **options: Any
) -> tuple[str, ml_collections.ConfigDict, dict]:
    """(family "flux" | "sd3", config, params) of an original-format Flux.1 or SD3 / SD3.5 `.safetensors` file (see
    the module docstring): the config as `flux.flux_config` / `mmdit.mmdit_config` build it from the settings the
    tensors give, with `options` (dtype, remat, attention); params NumPy in our layouts, in the compute dtype.
    `transformer_only` skips the tensors of an all-in-one file's autoencoder and text encoders; `axes_dims_rope` sets
    Flux's rotary axes (default Flux.1's). Every problem with the tensors is one WeightsError naming the file."""
    file = check_single_file(file)
    with open_safetensors(file) as handle:
        stored = _file_names(file, handle, transformer_only)
        names = {short: tuple(handle.get_slice(name).get_shape()) for short, name in stored.items()}
        family = transformer_family(names, file)
        if family == "flux":
            config = flux.flux_config(flux_settings(names, file, axes_dims_rope), **options)
            model, sources, buffers = flux.create_flux(config), flux_sources(config), {}
            shapes = param_shapes(model, *flux.example_inputs(model))
        else:
            if axes_dims_rope is not None:
                raise WeightsError(f"{file}: axes_dims_rope={axes_dims_rope!r} applies to Flux files only")
            config = mmdit.mmdit_config(sd3_settings(names, file), **options)
            model, sources = mmdit.create_mmdit(config), sd3_sources(config)
            shapes = param_shapes(model, *mmdit.example_inputs(model, size=config.patch_size))
            buffers = {"pos_embed": model.pos_table().astype(np.float32)[None]}
        paths = {path: sources[diffusers_name(path)] for path in shapes}
        expected = {**original_shapes(paths, shapes), **{name: value.shape for name, value in buffers.items()}}
        match_names({(name,): ((name,), shape) for name, shape in expected.items()}, names, source=str(file))
        for name, table in buffers.items():
            check_buffer(str(file), name, read_tensor(file, stored[name]), table)
        params, cache = {}, {}
        for path, source in sorted(paths.items(), key=lambda item: item[1].name):
            if source.name not in cache:  # a fused tensor is read once for its parts, then dropped
                cache = {source.name: read_tensor(file, stored[source.name])}
            array = cache[source.name]
            if source.rows is not None:
                array = np.concatenate([array[start:stop] for start, stop in source.rows])
            params[path] = param_from_torch(path, array, shapes[path], config.dtype)
    return family, config, flax.traverse_util.unflatten_dict(params)
