"""Hugging Face diffusers `UNet2DModel` folders and `DDPMPipeline`/`DDIMPipeline` folders <-> our config and
parameters (no torch needed).

A UNet folder holds `config.json` and `diffusion_pytorch_model.safetensors` (PyTorch layouts: conv
weights OIHW, Linear weights [out, in]); a pipeline folder holds `model_index.json`, `unet/` and
`scheduler/scheduler_config.json` (`DDPMScheduler` or `DDIMScheduler`), which sets the diffusion. Writing
such folders is `jaxdiff.convert.diffusers_export`'s; both share the name tables here.

Supported UNets: `DownBlock2D`, `AttnDownBlock2D`, `ResnetDownsampleBlock2D` per level, up blocks mirroring
where attention is (`UpBlock2D`, `AttnUpBlock2D`, `ResnetUpsampleBlock2D`), `UNetMidBlock2D`, the
positional timestep embedding, and every setting of `UNET_SETTINGS` (each maps to a `config.model` key).
Down block i is our level `down_{i}`; up block k is our level `up_{L-1-k}` (diffusers orders up blocks
from the lowest resolution). The official DDPM network is the `UNet2DModel` with `flip_sin_to_cos`
False, `freq_shift` 1, `downsample_padding` 0, `norm_eps` 1e-6 and `attention_head_dim` None.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import flax.traverse_util
import ml_collections
import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.config.validation import config_from_dict, validate
from jaxdiff.config.defaults import default_config
from jaxdiff.readers.architecture import (
    Architecture,
    ParamPath,
    build_config,
    matching_released_recipe,
    param_shapes,
)
from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, MODEL_INDEX_FILE, load_json, weights_file
from jaxdiff.weights.matching import match_names
from jaxdiff.weights.torch_layout import TORCH_LEAF_NAMES, from_torch, torch_shape
from jaxdiff.diffusion.scheduler_config import apply_scheduler_config, unsupported_setting
from jaxdiff.errors import WeightsError
from jaxdiff.models.layers import ACTIVATIONS
from jaxdiff.weights.safetensors_reader import open_safetensors

WEIGHTS_FILE = f"{DIFFUSERS_WEIGHTS_STEM}.safetensors"
SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
JAXDIFF_CONFIG_FILE = "jaxdiff_config.json"

# Settings that must have one value; a config.json that omits a key means diffusers' default, given second.
REQUIRED_UNET_SETTINGS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "center_input_sample": ((False,), False),
    "time_embedding_type": (("positional",), "positional"),
    "mid_block_type": (("UNetMidBlock2D",), "UNetMidBlock2D"),
    "mid_block_scale_factor": ((1,), 1),
    "class_embed_type": ((None,), None),
}
# Settings read into the architecture, with diffusers' defaults.
UNET_SETTINGS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "time_embedding_dim": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "num_class_embeds": None,
}
IGNORED_UNET_SETTINGS = ("dropout", "num_train_timesteps")  # training-only / unused by positional embeddings
# Block types by (attention, resampled by a ResBlock); AttnDownBlock2D/AttnUpBlock2D choose their resampler
# with downsample_type/upsample_type.
DOWN_BLOCKS = {
    (False, False): "DownBlock2D", (False, True): "ResnetDownsampleBlock2D", (True, False): "AttnDownBlock2D",
}  # fmt: skip
UP_BLOCKS = {
    (False, False): "UpBlock2D", (False, True): "ResnetUpsampleBlock2D", (True, False): "AttnUpBlock2D",
}  # fmt: skip

# Our beta schedules, variance and mean types <-> the schedulers' names.
PIPELINES = ("DDPMPipeline", "DDIMPipeline")

# Our layer names -> diffusers' (attention: current name first, then the pre-0.15 one).
RESBLOCK_LAYERS = {
    "norm1": ("norm1",), "conv1": ("conv1",), "temb_proj": ("time_emb_proj",),
    "norm2": ("norm2",), "conv2": ("conv2",), "nin_shortcut": ("conv_shortcut",),
}  # fmt: skip
ATTENTION_LAYERS = {
    "norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
    "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn"),
}  # fmt: skip
TOP_LAYERS = {
    ("conv_in",): "conv_in", ("norm_out",): "conv_norm_out", ("conv_out",): "conv_out",
    ("temb", "dense0"): "time_embedding.linear_1", ("temb", "dense1"): "time_embedding.linear_2",
    ("label_emb",): "class_embedding",
    ("mid", "block_1"): "mid_block.resnets.0", ("mid", "attn_1"): "mid_block.attentions.0",
    ("mid", "block_2"): "mid_block.resnets.1",
}  # fmt: skip
RESAMPLERS = {"downsample": "downsamplers", "upsample": "upsamplers"}
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- names


def _layer_names(layer: tuple[str, ...], num_levels: int) -> tuple[str, ...]:
    """Candidate diffusers module names of our layer path (without the leaf), e.g. ("up_3", "attn_0", "q")
    -> ("up_blocks.0.attentions.0.to_q", "up_blocks.0.attentions.0.query") for 4 levels."""
    if layer in TOP_LAYERS:
        return (TOP_LAYERS[layer],)
    if layer[:2] in TOP_LAYERS:
        table = ATTENTION_LAYERS if layer[1].startswith("attn") else RESBLOCK_LAYERS
        return tuple(f"{TOP_LAYERS[layer[:2]]}.{name}" for name in table[layer[2]])
    direction, index = layer[0].split("_")
    block = f"down_blocks.{index}" if direction == "down" else f"up_blocks.{num_levels - 1 - int(index)}"
    if layer[1] in RESAMPLERS:
        resampler = f"{block}.{RESAMPLERS[layer[1]]}.0"
        if layer[2] == "conv":
            return (f"{resampler}.conv",)
        return tuple(f"{resampler}.{name}" for name in RESBLOCK_LAYERS[layer[2]])
    kind, j = layer[1].split("_")
    if kind == "attn":
        return tuple(f"{block}.attentions.{j}.{name}" for name in ATTENTION_LAYERS[layer[2]])
    return tuple(f"{block}.resnets.{j}.{name}" for name in RESBLOCK_LAYERS[layer[2]])


def diffusers_names(path: ParamPath, num_levels: int) -> tuple[str, ...]:
    """Candidate diffusers tensor names of our parameter, best first."""
    return tuple(f"{name}.{TORCH_LEAF_NAMES[path[-1]]}" for name in _layer_names(path[:-1], num_levels))


# --------------------------------------------------------------------------- reading


def unet_folder(folder: str | os.PathLike) -> pathlib.Path | None:
    """The folder holding the UNet's `config.json` and safetensors: `folder` or `folder/unet`; None if neither."""
    folder = pathlib.Path(folder)
    for candidate in (folder, folder / "unet"):
        if (candidate / CONFIG_FILE).is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    return None


def _levels(down_types: list, up_types: list, s: dict, source: str) -> tuple[tuple[int, ...], tuple, tuple]:
    """(attention levels, levels downsampled by a ResBlock, levels upsampled by a ResBlock) of the block types."""
    num_levels = len(down_types)
    attn, res_down, res_up = [], [], []
    for i, name in enumerate(down_types):
        kinds = [key for key, value in DOWN_BLOCKS.items() if value == name]
        if not kinds:
            need = f"each one of {sorted(DOWN_BLOCKS.values())}"
            raise unsupported_setting(source, "down_block_types", down_types, need)
        with_attn, by_resblock = kinds[0]
        attn += [i] if with_attn else []
        by_resblock = by_resblock or (with_attn and s["downsample_type"] == "resnet")
        res_down += [i] if by_resblock and i < num_levels - 1 else []
    for k, name in enumerate(up_types):
        i = num_levels - 1 - k
        kinds = [key for key, value in UP_BLOCKS.items() if value == name]
        if not kinds or kinds[0][0] != (i in attn):
            need = "an AttnUpBlock2D mirroring each AttnDownBlock2D, else UpBlock2D or ResnetUpsampleBlock2D"
            raise unsupported_setting(source, "up_block_types", up_types, need)
        with_attn, by_resblock = kinds[0]
        by_resblock = by_resblock or (with_attn and s["upsample_type"] == "resnet")
        res_up += [i] if by_resblock and i > 0 else []
    return tuple(attn), tuple(res_down), tuple(sorted(res_up))


def _check_choice(source: str, s: dict, key: str, allowed: tuple) -> None:
    if s[key] not in allowed or isinstance(s[key], bool) != isinstance(allowed[0], bool):
        raise unsupported_setting(source, key, s[key], "one of " + ", ".join(map(repr, allowed)))


def architecture_from_unet_config(settings: dict, source: str) -> tuple[Architecture, int]:
    """(architecture, image size) of a `UNet2DModel` config.json; unsupported settings raise ValueError naming them."""
    if settings.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise WeightsError(f"{source}: _class_name={settings['_class_name']!r}; only UNet2DModel is supported")
    for key, (allowed, default) in REQUIRED_UNET_SETTINGS.items():
        value = settings.get(key, default)
        if value not in allowed:
            raise unsupported_setting(source, key, value, "supported: " + " or ".join(map(repr, allowed)))
    known = set(REQUIRED_UNET_SETTINGS) | set(UNET_SETTINGS) | set(IGNORED_UNET_SETTINGS)
    unknown = sorted(k for k in settings if k not in known and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring unknown settings %s", source, unknown)
    s = {key: settings.get(key, default) for key, default in UNET_SETTINGS.items()}

    size = s["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not is_int(size, numpy=False) or size < 1:
        raise unsupported_setting(source, "sample_size", s["sample_size"], "a square image size is needed")
    widths = list(s["block_out_channels"])
    if not widths or any(not is_int(w, numpy=False) or w < 1 or w % widths[0] for w in widths):
        raise unsupported_setting(source, "block_out_channels", widths, "positive multiples of the first entry")
    ch = widths[0]
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        if not is_int(s[key], numpy=False) or s[key] < 1:
            raise unsupported_setting(source, key, s[key], "a positive int")
    _check_choice(source, s, "flip_sin_to_cos", (True, False))
    _check_choice(source, s, "add_attention", (True, False))
    _check_choice(source, s, "downsample_padding", (0, 1))
    _check_choice(source, s, "downsample_type", ("conv", "resnet"))
    _check_choice(source, s, "upsample_type", ("conv", "resnet"))
    _check_choice(source, s, "act_fn", tuple(ACTIVATIONS))
    _check_choice(source, s, "resnet_time_scale_shift", ("default", "scale_shift"))
    if not is_int(s["freq_shift"], numpy=False) or not 0 <= s["freq_shift"] < ch // 2:
        raise unsupported_setting(source, "freq_shift", s["freq_shift"], f"an int in 0..{ch // 2 - 1}")
    if not is_real(s["norm_eps"], numpy=False) or not s["norm_eps"] > 0:
        raise unsupported_setting(source, "norm_eps", s["norm_eps"], "a number > 0")
    if s["time_embedding_dim"] not in (None, 4 * ch):
        raise unsupported_setting(source, "time_embedding_dim", s["time_embedding_dim"], f"must be 4·{ch} or null")
    if s["attn_norm_num_groups"] not in (None, s["norm_num_groups"]):
        need = f"null or norm_num_groups ({s['norm_num_groups']})"
        raise unsupported_setting(source, "attn_norm_num_groups", s["attn_norm_num_groups"], need)
    classes = s["num_class_embeds"]
    if classes is not None and (not is_int(classes, numpy=False) or classes < 1):
        raise unsupported_setting(source, "num_class_embeds", classes, "null or a positive int")

    down_types, up_types = list(s["down_block_types"]), list(s["up_block_types"])
    if len(down_types) != len(widths) or len(up_types) != len(widths):
        need = f"one block type per entry of block_out_channels ({len(widths)})"
        raise unsupported_setting(source, "down_block_types" if len(down_types) != len(widths) else "up_block_types",
                           down_types if len(down_types) != len(widths) else up_types, need)  # fmt: skip
    attn_levels, res_down, res_up = _levels(down_types, up_types, s, source)
    head_dim = s["attention_head_dim"]
    attn_widths = sorted({widths[i] for i in attn_levels} | ({widths[-1]} if s["add_attention"] else set()))
    if head_dim is not None and (
        not is_int(head_dim, numpy=False) or head_dim < 1 or any(w % head_dim for w in attn_widths)
    ):
        need = f"null or a divisor of the attention widths {attn_widths}"
        raise unsupported_setting(source, "attention_head_dim", head_dim, need)
    scale_shift = s["resnet_time_scale_shift"] == "scale_shift"
    arch = Architecture(
        in_channels=s["in_channels"],
        out_channels=s["out_channels"],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=s["layers_per_block"],
        attn_levels=attn_levels,
        resamp_with_conv=True,
        num_classes=classes or 0,
        null_label=False if classes else True,
        flip_sin_to_cos=s["flip_sin_to_cos"],
        freq_shift=s["freq_shift"],
        norm_groups=s["norm_num_groups"],
        norm_eps=float(s["norm_eps"]),
        act=s["act_fn"],
        attn_head_dim=head_dim or 0,
        temb_scale_shift=scale_shift,
        downsample_padding=s["downsample_padding"],
        resblock_down_levels=res_down,
        resblock_up_levels=res_up,
        mid_attn=s["add_attention"],
        mid_attn_norm=s["attn_norm_num_groups"] is not None or not scale_shift,
    )
    return arch, size


def _beside(unet_dir: pathlib.Path, name: str) -> pathlib.Path | None:
    """`name` in the UNet folder, or in the pipeline folder around it (when the UNet folder is `unet/`)."""
    candidates = [unet_dir / name]
    if unet_dir.name == "unet":
        candidates.append(unet_dir.parent / name)
    return next((c for c in candidates if c.is_file()), None)


def _base_config(arch: Architecture, image_size: int, saved: pathlib.Path | None, source: str):
    """(the config to build on, arch): the saved jaxdiff config if any (which also restores a null label that
    diffusers stores as an ordinary class), else the released DDPM recipe of this architecture, else the
    default (DDPM CIFAR-10) recipe."""
    if saved is not None:
        base = config_from_dict(load_json(saved))
        m = base.model
        if m.num_classes and m.null_label and arch.num_classes == m.num_classes + 1:
            arch = arch._replace(num_classes=m.num_classes, null_label=True)
        return base, arch
    return matching_released_recipe(arch, image_size, source) or default_config(), arch


def _set_diffusion(config: ml_collections.ConfigDict, arch: Architecture, unet_dir: pathlib.Path, source: str) -> None:
    """The diffusion from the scheduler config beside the UNet, else the recipe's, logged. Either way a UNet
    whose output holds variances (2·in_channels) gets learned_range variances unless a variance_type or the
    recipe says which learned variances."""
    scheduler = _beside(unet_dir, SCHEDULER_FILE)
    settings = load_json(scheduler) if scheduler is not None else {}
    if scheduler is not None:
        apply_scheduler_config(config, settings, str(scheduler))
    d = config.diffusion
    learned = d.var_type in ("learned", "learned_range")
    if arch.out_channels == 2 * arch.in_channels and "variance_type" not in settings and not learned:
        d.var_type = "learned_range"
    if scheduler is None:
        log.info(
            "%s: no %s; using the %s schedule with T=%d, %s prediction, %s variance",
            source, SCHEDULER_FILE, d.schedule, d.num_timesteps, d.mean_type, d.var_type,
        )  # fmt: skip


def read_diffusers(
    folder: str | os.PathLike, *, dataset: str | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a diffusers `UNet2DModel` folder or of a pipeline folder with `unet/`.

    The model section comes from `config.json`; the rest from the recipe of `dataset` if given, else
    the folder's `jaxdiff_config.json` if any, else the released DDPM model with that architecture, else
    the default recipe. The scheduler config, if present, sets the diffusion section; without one the
    recipe's diffusion is kept (see `_set_diffusion`). Params are nested dicts of float32 NumPy arrays
    in our layout. Other pipelines, unsupported settings and missing, unexpected or mis-shaped tensors
    raise ValueError.
    """
    unet_dir = unet_folder(folder)
    if unet_dir is None:
        raise WeightsError(f"{folder} is not a diffusers folder: no {CONFIG_FILE} with *.safetensors in it or in unet/")
    source = f"diffusers folder {unet_dir}"
    index = _beside(unet_dir, MODEL_INDEX_FILE) if unet_dir.name == "unet" else None
    pipeline = load_json(index).get("_class_name") if index is not None else None
    if pipeline is not None and pipeline not in PIPELINES:
        raise WeightsError(f"{index}: _class_name={pipeline!r}; supported pipelines: {', '.join(PIPELINES)}")
    arch, image_size = architecture_from_unet_config(load_json(unet_dir / CONFIG_FILE), source)
    base, arch = _base_config(arch, image_size, _beside(unet_dir, JAXDIFF_CONFIG_FILE), source)
    config = build_config(arch, image_size=image_size, dataset=dataset, source=source, base=base)
    _set_diffusion(config, arch, unet_dir, source)
    validate(config)
    shapes = param_shapes(config.model)
    levels = len(arch.ch_mult)
    wanted = {p: (diffusers_names(p, levels), torch_shape(p, s)) for p, s in shapes.items()}
    with open_safetensors(weights_file(unet_dir, DIFFUSERS_WEIGHTS_STEM)) as f:
        available = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        found = match_names(wanted, available, source=source)
        flat = {p: np.asarray(f.get_tensor(n), np.float32) for p, n in found.items()}
    flat = {p: a if p[-1] == "embedding" else from_torch(a, shapes[p]) for p, a in flat.items()}
    return config, flax.traverse_util.unflatten_dict({p: np.ascontiguousarray(a) for p, a in flat.items()})
