"""LoRA adapters on a pipeline's U-Net or transformer (SD3, Flux) and CLIP text encoders.

A LoRA file (`jaxdiff.weights.lora_files`: diffusers/peft, older diffusers and kohya formats) is matched to our
parameters through the weight readers' own name tables — `diffusers_tensor_name` (U-Net),
`jaxdiff.latent.mmdit_weights.diffusers_name` (SD3 / Flux transformer) and `clip_names` (text encoders) name each
of our kernels as its PyTorch module — and its factors become each kernel's change
ΔW = up @ down in our layouts (dense [in, out], conv HWIO). With adapters i at user scales s_i and the files'
own scales c_i (alpha / r), an adapted kernel is

    W + Σ_i s_i · c_i · ΔW_i,

computed once whenever the adapters or their scales change (not at each call: in float64 on the host, rounded
once to float32), so a pipeline runs at the same speed with or without them; a scale change costs one pass over
the adapted kernels, no recompilation. `LoraAdapters` gives `LatentPipeline` its methods:

- `load_lora(path, scale=1.0, name=None)`: adds a file's adapters (checked in full first: on any refusal the
  pipeline is unchanged).
- `set_lora_scale(scale, name=None)`: one adapter's scale, or every adapter's.
- `fuse_lora()`: the adapted weights become the pipeline's weights (`params`); the originals are kept, and
  adapters can be neither added nor rescaled until `unfuse_lora()`.
- `unfuse_lora()`: the original weights back (the very arrays, so bitwise); the adapters apply again, unfused.

Unfused, `params` holds the original weights and the adapted ones are used only to run; `lora_scales` maps each
adapter's name to its scale.

kohya U-Net keys in the original LDM (SD 1.x / 2.x) / sgm (SDXL) layout (`lora_unet_input_blocks_4_1_...`,
`lora_unet_middle_block_1_...`, `lora_unet_output_blocks_...`, `time_embed_0`, `label_emb_0_0`, `out_2`: what kohya
writes for SDXL) are renamed to diffusers' names by the single-file reader's own table
(`jaxdiff.latent.stable_diffusion.unet_diffusers_name`), read with the U-Net's `layers_per_block` and
`up_block_types`; like every key no module takes, a name that renames to none of our kernels is listed in the
refusal.

kohya / ComfyUI Flux files name the transformer's modules as Black Forest Labs' code does
(`lora_unet_double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`, `final_layer_adaLN_modulation_1`); the
single-file reader's table (`jaxdiff.latent.transformer_single_file.flux_sources`) gives each original module's
diffusers modules and the rows of its weight each takes, so a fused module's ΔW = up @ down splits by rows onto our
q, k, v (and the single block's MLP input) kernels: each part is up[rows] @ down, at the module's alpha / r. Read
with the transformer's Flux config (`match_lora(..., flux_config=)`, which a Flux pipeline passes through
`LoraAdapters._lora_layouts`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable

import flax.traverse_util
import jax
import numpy as np

from jaxdiff.checks import is_real
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.component_weights import clip_names, torch_shape
from jaxdiff.latent.mmdit_weights import diffusers_name
from jaxdiff.latent.stable_diffusion import unet_diffusers_name
from jaxdiff.latent.transformer_single_file import flux_sources, original_modules
from jaxdiff.latent.unet_weights import diffusers_tensor_name
from jaxdiff.weights.lora_files import LoraFile, LoraModule, listed, read_lora_file
from jaxdiff.weights.matching import ParamPath
from jaxdiff.weights.torch_layout import from_torch

# A LoRA file's component -> (the pipeline's params key, the PyTorch names of our parameter at a path).
COMPONENTS: dict[str, tuple[str, Callable[[ParamPath], tuple[str, ...]]]] = {
    "unet": ("unet", lambda path: (diffusers_tensor_name(path),)),
    "transformer": ("transformer", lambda path: (diffusers_name(path),)),  # SD3, Flux
    "text_encoder": ("text", clip_names),
    "text_encoder_2": ("text_2", clip_names),  # SDXL's second text encoder
}


# The first module names of the original LDM / sgm U-Net, as kohya writes them (dots as `_`).
ORIGINAL_UNET_MODULES = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_INDEX = re.compile(r"_(\d+)(?=_|$)|(?<=\d)_")  # `_` next to a digit: input_blocks_4_1_proj_in


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA file matched to a pipeline: params key ("unet", "text") -> our kernel's path -> its factors."""

    path: pathlib.Path
    modules: dict[str, dict[ParamPath, LoraModule]]


def check_lora_scale(scale) -> float:
    """`scale` as a float; UsageError unless it is a finite number >= 0."""
    if not is_real(scale, finite=True) or scale < 0:
        raise UsageError(f"LoRA scale={scale!r} must be a finite number >= 0")
    return float(scale)


def module_table(params: dict, names: Callable[[ParamPath], tuple[str, ...]],
                 underscored: bool) -> dict[str, ParamPath]:  # fmt: skip
    """Each kernel of `params` by the PyTorch names of its module (`names(path)` without `.weight`), their dots
    written `_` when `underscored` (kohya)."""
    table = {}
    for path in flax.traverse_util.flatten_dict(params):
        if path[-1] == "kernel":
            for name in names(path):
                module = name.removesuffix(".weight")
                table[module.replace(".", "_") if underscored else module] = path
    return table


def original_unet_module(module: str, unet_config) -> str | None:
    """The kohya (underscored) diffusers name of a kohya U-Net module named in the original LDM / sgm layout, e.g.
    `input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`
    (two resnets per level), `output_blocks_2_0_skip_connection` -> `up_blocks_0_resnets_2_conv_shortcut`; the
    module itself if it is not in that layout; None if the layout names nothing of `unet_config` (a U-Net
    ConfigDict in diffusers' terms: its integer `layers_per_block` and `up_block_types` place the blocks).
    The list indices get their dots back and `unet_diffusers_name` renames the rest."""
    if not module.startswith(ORIGINAL_UNET_MODULES):
        return module
    if not isinstance(unet_config.layers_per_block, int):
        return None  # per-level block counts have no original layout
    dotted = _INDEX.sub(lambda index: f".{index[1] or ''}", module)  # input_blocks.4.1.proj_in
    name = unet_diffusers_name(dotted + ".weight", unet_config)
    return None if name is None else name.removesuffix(".weight").replace(".", "_")


def flux_parts(module: str, factors: LoraModule,
               modules: dict[str, list]) -> list[tuple[str, LoraModule]] | str | None:  # fmt: skip
    """The kohya (underscored) diffusers modules a kohya Flux module in BFL's names adapts, each with its factors
    (a fused module's up restricted to the rows of its part); `modules` is `original_modules(flux_sources(...))`
    with underscored keys. None for a name that is not BFL's; a message (str) when a fused module's ΔW has another
    number of rows than its weight."""
    targets = modules.get(module)
    if targets is None:
        return None
    rows = max((stop for _, ranges in targets if ranges for _, stop in ranges), default=None)
    if rows is not None and factors.up.shape[0] != rows:
        return f"unet.{module}: ΔW has {factors.up.shape[0]} rows, the fused weight {rows}"
    return [(target.replace(".", "_"), factors if ranges is None else dataclasses.replace(
                factors, up=np.concatenate([factors.up[start:stop] for start, stop in ranges])))
            for target, ranges in targets]  # fmt: skip


def match_lora(lora: LoraFile, params: dict, unet_config=None, flux_config=None) -> Adapter:
    """`lora`'s adapters on our kernels of `params` ({"unet" or "transformer", "text", ...}); one WeightsError lists
    the keys that adapt no module of the pipeline, another the adapters whose ΔW has another shape than their weight
    (a LoRA for another base model). With the U-Net's `unet_config`, kohya U-Net names in the original LDM / sgm
    layout are read too (`original_unet_module`); with the Flux transformer's `flux_config`, kohya Flux names in
    BFL's layout (`flux_parts`)."""
    tables = {}
    modules: dict[str, dict[ParamPath, LoraModule]] = {}
    unmatched, misfit, twice = [], [], []
    items = []
    bfl = None
    if flux_config is not None and lora.underscored:
        bfl = {name.replace(".", "_"): targets for name, targets in original_modules(flux_sources(flux_config)).items()}
    for (component, module), factors in lora.modules.items():
        parts = flux_parts(module, factors, bfl) if component == "unet" and bfl is not None else None
        if isinstance(parts, str):
            misfit.append(parts)
        elif parts is not None:
            items.extend(("transformer", target, part) for target, part in parts)
        else:
            items.append((component, module, factors))
    for component, module, factors in items:
        if component == "unet" and lora.underscored and unet_config is not None:
            module = original_unet_module(module, unet_config)
        key, names = COMPONENTS.get(component, (None, None))
        key = key if key in params else None  # a component this pipeline lacks (an SDXL refiner's text_encoder)
        if key is not None and key not in tables:
            tables[key] = module_table(params[key], names, lora.underscored)
        path = None if key is None else tables[key].get(module)
        if path is None:
            unmatched.extend(factors.keys)
            continue
        shape = torch_shape(path, tuple(_leaf(params[key], path).shape))
        if factors.delta_shape != shape:
            misfit.append(f"{component}.{module}: ΔW {list(factors.delta_shape)}, weight {list(shape)}")
            continue
        if path in modules.get(key, {}):  # the same module named in two layouts
            twice.extend(factors.keys)
            continue
        modules.setdefault(key, {})[path] = factors
    unmatched = sorted(set(unmatched))  # the parts of a fused module share its keys
    if unmatched:
        raise WeightsError(f"{lora.path}: {len(unmatched)} keys adapt no module of this pipeline's networks (a LoRA "
                           f"for another model?): {listed(unmatched)}")  # fmt: skip
    if misfit:
        raise WeightsError(f"{lora.path}: {len(misfit)} adapters do not fit their weights' shapes (a LoRA for another "
                           f"base model?): {listed(misfit)}")  # fmt: skip
    if twice:
        raise WeightsError(f"{lora.path}: {len(twice)} keys adapt a module that other keys of the file already adapt "
                           f"(one module in two name layouts): {listed(sorted(twice))}")  # fmt: skip
    return Adapter(lora.path, modules)


def _leaf(tree: dict, path: ParamPath):
    for part in path:
        tree = tree[part]
    return tree


def factors_delta(down, up, shape: tuple[int, ...]):
    """ΔW = up @ down over the rank in our layout of a weight of shape `shape` (dense [in, out], conv HWIO), for
    factors in PyTorch layout (down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1]); NumPy or JAX
    arrays, in their dtype."""
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return from_torch(delta.reshape((up.shape[0], *down.shape[1:])), shape)


def lora_delta(factors: LoraModule, shape: tuple[int, ...]) -> np.ndarray:
    """ΔW = up @ down over the rank, float64, in our layout of a weight of shape `shape` (dense [in, out], conv
    HWIO)."""
    return factors_delta(factors.down.astype(np.float64), factors.up.astype(np.float64), shape)


def adapted_params(params: dict, adapters: list[tuple[Adapter, float]]) -> dict:
    """`params` with each adapted kernel W replaced by W + Σ s·c·ΔW over (adapter, s) in `adapters` (c: the file's
    alpha / r), summed in float64 on the host and rounded once to W's dtype; every other leaf, and every subtree
    no adapter touches, is the same object."""
    changes: dict[str, dict[ParamPath, np.ndarray]] = {}
    for adapter, scale in adapters:
        for key, modules in adapter.modules.items():
            for path, factors in modules.items():
                term = (scale * factors.scale) * lora_delta(factors, _leaf(params[key], path).shape)
                previous = changes.setdefault(key, {}).get(path)
                changes[key][path] = term if previous is None else previous + term
    out = dict(params)
    for key, deltas in changes.items():
        flat = flax.traverse_util.flatten_dict(params[key])
        for path, delta in deltas.items():
            weight = flat[path]
            placement = getattr(weight, "sharding", None)  # an adapted weight stays where (and as split as) W is
            flat[path] = jax.device_put((np.asarray(weight, np.float64) + delta).astype(weight.dtype), placement)
        out[key] = flax.traverse_util.unflatten_dict(flat)
    return out


class LoraAdapters:
    """The LoRA methods of a pipeline whose `params` is {"unet" or "transformer", "text", ...} (see the module
    docstring). The pipeline calls `_init_lora()` in its constructor and runs its networks with `_run_params`;
    `_lora_layouts` gives the matcher what reads original-layout (kohya) names."""

    params: dict
    model: LatentModels

    def _init_lora(self) -> None:
        self.lora_scales: dict[str, float] = {}
        self._lora_adapters: dict[str, Adapter] = {}
        self._lora_adapted: dict | None = None  # the unfused adapted weights
        self._lora_originals: dict | None = None  # the original weights while fused

    @property
    def _run_params(self) -> dict:
        """The weights to run with: the adapted ones while adapters apply unfused, else `params`."""
        return self.params if self._lora_adapted is None or self._lora_originals is not None else self._lora_adapted

    def _lora_layouts(self) -> dict:
        """`match_lora`'s keyword arguments for this pipeline's original-layout (kohya) names: the U-Net's config
        where the model has one (`model.unet_config`), else none. A pipeline of other networks overrides this; a
        Flux pipeline returns {"flux_config": its transformer's config}."""
        unet_config = getattr(self.model, "unet_config", None)
        return {} if unet_config is None else {"unet_config": unet_config}

    def _refuse_fused(self, method: str) -> None:
        if self._lora_originals is not None:
            raise UsageError(f"{method}(): the LoRA adapters are fused; call unfuse_lora() first")

    def _set_lora(self, adapters: dict[str, Adapter], scales: dict[str, float]) -> None:
        adapted = adapted_params(self.params, [(adapters[name], scales[name]) for name in adapters])
        self._lora_adapters, self.lora_scales, self._lora_adapted = adapters, scales, adapted

    def load_lora(self, path: str | os.PathLike | LoraFile, scale: float = 1.0, name: str | None = None) -> str:
        """Adds the adapters of a LoRA file (or of a folder holding `pytorch_lora_weights.safetensors`, or of a
        `LoraFile` already read) at `scale` under `name` (default: `default_<i>`, the first i not in use); returns
        the name. The file is read and matched in full before anything changes."""
        self._refuse_fused("load_lora")
        scale = check_lora_scale(scale)
        if name is None:
            free = (f"default_{i}" for i in range(len(self.lora_scales) + 1))
            name = next(n for n in free if n not in self.lora_scales)
        elif not isinstance(name, str) or not name:
            raise UsageError(f"LoRA name={name!r} must be a non-empty string")
        elif name in self.lora_scales:
            raise UsageError(f"a LoRA named {name!r} is already loaded; loaded: {sorted(self.lora_scales)}")
        lora = path if isinstance(path, LoraFile) else read_lora_file(path)
        adapter = match_lora(lora, self.params, **self._lora_layouts())
        self._set_lora({**self._lora_adapters, name: adapter}, {**self.lora_scales, name: scale})
        return name

    def set_lora_scale(self, scale: float, name: str | None = None) -> None:
        """Sets the scale of the adapter `name`, or of every adapter (name=None)."""
        self._refuse_fused("set_lora_scale")
        scale = check_lora_scale(scale)
        if not self.lora_scales:
            raise UsageError("set_lora_scale(): no LoRA is loaded (load_lora first)")
        if name is not None and name not in self.lora_scales:
            raise UsageError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.lora_scales)}")
        scales = {n: scale if name in (None, n) else s for n, s in self.lora_scales.items()}
        self._set_lora(self._lora_adapters, scales)

    def fuse_lora(self) -> None:
        """Makes the adapted weights the pipeline's `params`, keeping the originals for `unfuse_lora`."""
        if not self.lora_scales:
            raise UsageError("fuse_lora(): no LoRA is loaded (load_lora first)")
        self._refuse_fused("fuse_lora")
        self._lora_originals, self.params = self.params, self._lora_adapted

    def unfuse_lora(self) -> None:
        """Puts back the original weights (bitwise); the adapters apply again, unfused, at their scales."""
        if self._lora_originals is None:
            raise UsageError("unfuse_lora(): the LoRA adapters are not fused (fuse_lora first)")
        self.params, self._lora_originals = self._lora_originals, None
