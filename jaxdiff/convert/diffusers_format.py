"""Hugging Face diffusers `UNet2DModel` folders <-> our config and parameters (no torch needed).

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (PyTorch layouts: conv
weights OIHW, Linear weights [out, in]); a `scheduler/scheduler_config.json` (`DDPMScheduler`) beside
them, or in the pipeline folder around a `unet/` subfolder, carries the noise schedule. Exports add
`jaxdiff_config.json`, the full run config, so that a round trip restores it exactly.

The DDPM U-Net is the `UNet2DModel` with `DownBlock2D`/`AttnDownBlock2D` (attention where ours has
it), single-head attention (`attention_head_dim` None), GroupNorm 32 groups eps 1e-6, SiLU, TF-style
downsampling padding (`downsample_padding` 0: pad 0 before, 1 after) and the positional timestep
embedding with `flip_sin_to_cos` False and `freq_shift` 1, i.e. [sin(t·f_i), cos(t·f_i)] with
f_i = exp(-i·ln(10000)/(half - 1)) as in the official code. Down block i is our level `down_{i}`;
up block k is our level `up_{L-1-k}` (diffusers orders up blocks from the lowest resolution).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

import flax.traverse_util
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from jaxdiff.config import config_from_dict, validate
from jaxdiff.convert.architecture import Architecture, ParamPath, build_config, param_shapes
from jaxdiff.convert.matching import match_names
from jaxdiff.models.layers import GROUP_NORM_EPS, NUM_GROUPS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
JAXDIFF_CONFIG_FILE = "jaxdiff_config.json"

# Settings a DDPM U-Net must have; a config.json that omits a key means diffusers' default, given second.
REQUIRED_UNET_SETTINGS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "center_input_sample": ((False,), False),
    "time_embedding_type": (("positional",), "positional"),
    "flip_sin_to_cos": ((False,), True),
    "freq_shift": ((1,), 0),
    "mid_block_type": (("UNetMidBlock2D",), "UNetMidBlock2D"),
    "mid_block_scale_factor": ((1,), 1),
    "downsample_padding": ((0,), 1),
    "downsample_type": (("conv",), "conv"),
    "upsample_type": (("conv",), "conv"),
    "act_fn": (("silu", "swish"), "silu"),
    "norm_num_groups": ((NUM_GROUPS,), 32),
    "attn_norm_num_groups": ((None, NUM_GROUPS), None),
    "norm_eps": ((GROUP_NORM_EPS,), 1e-5),
    "resnet_time_scale_shift": (("default",), "default"),
    "add_attention": ((True,), True),
    "class_embed_type": ((None,), None),
    "num_class_embeds": ((None,), None),
}
# Settings read into the architecture, with diffusers' defaults.
ARCHITECTURE_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "time_embedding_dim": None,
}
IGNORED_UNET_SETTINGS = ("dropout", "num_train_timesteps")  # training-only / unused by positional embeddings
BLOCK_TYPES = {False: ("DownBlock2D", "UpBlock2D"), True: ("AttnDownBlock2D", "AttnUpBlock2D")}

# Our beta schedules, variance and mean types <-> DDPMScheduler's names.
BETA_SCHEDULES = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
VAR_TYPES = {
    "fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned", "learned_range": "learned_range",
}  # fmt: skip
MEAN_TYPES = {"eps": "epsilon", "x_start": "sample", "v": "v_prediction"}
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}

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
    ("mid", "block_1"): "mid_block.resnets.0", ("mid", "attn_1"): "mid_block.attentions.0",
    ("mid", "block_2"): "mid_block.resnets.1",
}  # fmt: skip
RESAMPLERS = {"downsample": "downsamplers", "upsample": "upsamplers"}
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

log = logging.getLogger(__name__)


class DiffusersExport(NamedTuple):
    """An exported folder's contents: UNet config.json, tensors (PyTorch layouts), scheduler config, our config."""

    unet_config: dict
    tensors: dict[str, np.ndarray]
    scheduler_config: dict
    jaxdiff_config: dict


# --------------------------------------------------------------------------- names and layouts


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
        return (f"{block}.{RESAMPLERS[layer[1]]}.0.conv",)
    kind, j = layer[1].split("_")
    if kind == "attn":
        return tuple(f"{block}.attentions.{j}.{name}" for name in ATTENTION_LAYERS[layer[2]])
    return tuple(f"{block}.resnets.{j}.{name}" for name in RESBLOCK_LAYERS[layer[2]])


def diffusers_names(path: ParamPath, num_levels: int) -> tuple[str, ...]:
    """Candidate diffusers tensor names of our parameter, best first."""
    return tuple(f"{name}.{LEAF_NAMES[path[-1]]}" for name in _layer_names(path[:-1], num_levels))


def torch_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of our parameter: HWIO -> OIHW, dense [in, out] -> Linear [out, in],
    `nin_shortcut` -> the 1×1 Conv2d `conv_shortcut` [out, in, 1, 1]."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0], 1, 1) if path[-2] == "nin_shortcut" else (shape[1], shape[0])
    return shape


def to_torch(path: ParamPath, array: np.ndarray) -> np.ndarray:
    """Our parameter at `path` in PyTorch layout (shape `torch_shape(path, array.shape)`)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T.reshape(torch_shape(path, array.shape))
    return array


def from_torch(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor as our parameter of shape `shape`: OIHW -> HWIO, [out, in] or [out, in, 1, 1] -> [in, out]."""
    if len(shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if len(shape) == 2:
        return array.reshape(shape[::-1]).T
    return array


# --------------------------------------------------------------------------- reading


def unet_folder(folder: str | os.PathLike) -> pathlib.Path | None:
    """The folder holding the UNet's `config.json` and safetensors: `folder` or `folder/unet`; None if neither."""
    folder = pathlib.Path(folder)
    for candidate in (folder, folder / "unet"):
        if (candidate / CONFIG_FILE).is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    return None


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
    if (folder / WEIGHTS_FILE).is_file():
        return folder / WEIGHTS_FILE
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        names = [f.name for f in files]
        raise ValueError(f"{folder} has no {WEIGHTS_FILE} but {len(files)} other safetensors files {names}")
    return files[0]


def _load_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _unsupported(source: str, key: str, value: Any, need: str) -> ValueError:
    return ValueError(f"{source}: unsupported setting {key}={value!r} ({need})")


def architecture_from_unet_config(settings: dict, source: str) -> tuple[Architecture, int]:
    """(architecture, image size) of a `UNet2DModel` config.json; unsupported settings raise ValueError naming them."""
    if settings.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{source}: _class_name={settings['_class_name']!r}; only UNet2DModel is supported")
    for key, (allowed, default) in REQUIRED_UNET_SETTINGS.items():
        value = settings.get(key, default)
        if value not in allowed:
            raise _unsupported(source, key, value, "the DDPM U-Net needs " + " or ".join(map(repr, allowed)))
    known = set(REQUIRED_UNET_SETTINGS) | set(ARCHITECTURE_DEFAULTS) | set(IGNORED_UNET_SETTINGS)
    unknown = sorted(k for k in settings if k not in known and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring unknown settings %s", source, unknown)
    s = {key: settings.get(key, default) for key, default in ARCHITECTURE_DEFAULTS.items()}

    size = s["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _unsupported(source, "sample_size", s["sample_size"], "a square image size is needed")
    widths = list(s["block_out_channels"])
    if not widths or any(not isinstance(w, int) or w < 1 or w % widths[0] for w in widths):
        raise _unsupported(source, "block_out_channels", widths, "positive multiples of the first entry")
    ch = widths[0]
    down_types = list(s["down_block_types"])
    down_names = (BLOCK_TYPES[False][0], BLOCK_TYPES[True][0])
    if len(down_types) != len(widths) or any(t not in down_names for t in down_types):
        raise _unsupported(source, "down_block_types", down_types, "DownBlock2D or AttnDownBlock2D per level")
    attn_levels = tuple(i for i, t in enumerate(down_types) if t == BLOCK_TYPES[True][0])
    up_types = [BLOCK_TYPES[i in attn_levels][1] for i in reversed(range(len(widths)))]
    if list(s["up_block_types"]) != up_types:
        raise _unsupported(source, "up_block_types", s["up_block_types"], f"the mirror of down_block_types: {up_types}")
    head_dim = s["attention_head_dim"]
    attn_widths = {widths[i] for i in attn_levels} | {widths[-1]}
    if head_dim is not None and attn_widths != {head_dim}:
        need = f"multi-head attention; the DDPM U-Net has one head: null, or the width {sorted(attn_widths)}"
        raise _unsupported(source, "attention_head_dim", head_dim, need)
    if s["time_embedding_dim"] not in (None, 4 * ch):
        raise _unsupported(source, "time_embedding_dim", s["time_embedding_dim"], f"must be 4·{ch} or null")
    arch = Architecture(
        in_channels=s["in_channels"],
        out_channels=s["out_channels"],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=s["layers_per_block"],
        attn_levels=attn_levels,
        resamp_with_conv=True,
    )
    return arch, size


def _inverse(table: dict[str, str], value: str, key: str, source: str) -> str:
    for ours, theirs in table.items():
        if theirs == value:
            return ours
    raise _unsupported(source, key, value, f"supported: {sorted(table.values())}")


def apply_scheduler_config(config: ml_collections.ConfigDict, settings: dict, source: str) -> None:
    """Set `config.diffusion` and `config.sampling.clip_denoised` from a `DDPMScheduler` config."""
    if settings.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise ValueError(f"{source}: _class_name={settings['_class_name']!r}; only DDPMScheduler is supported")
    s = {key: settings.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    for key in ("trained_betas", "thresholding", "rescale_betas_zero_snr"):
        if s[key] not in (None, False):
            raise _unsupported(source, key, s[key], "DDPM sampling uses no such option")
    if s["clip_sample"] and s["clip_sample_range"] != 1.0:
        raise _unsupported(source, "clip_sample_range", s["clip_sample_range"], "clipping is to [-1, 1]")
    d = config.diffusion
    d.schedule = _inverse(BETA_SCHEDULES, s["beta_schedule"], "beta_schedule", source)
    d.num_timesteps = int(s["num_train_timesteps"])
    d.beta_start, d.beta_end = float(s["beta_start"]), float(s["beta_end"])
    d.var_type = _inverse(VAR_TYPES, s["variance_type"], "variance_type", source)
    d.mean_type = _inverse(MEAN_TYPES, s["prediction_type"], "prediction_type", source)
    config.sampling.clip_denoised = bool(s["clip_sample"])


def _scheduler_file(unet_dir: pathlib.Path) -> pathlib.Path | None:
    candidates = [unet_dir / SCHEDULER_FILE]
    if unet_dir.name == "unet":
        candidates.append(unet_dir.parent / SCHEDULER_FILE)
    return next((c for c in candidates if c.is_file()), None)


def read_diffusers(
    folder: str | os.PathLike, *, dataset: str | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a diffusers `UNet2DModel` folder (or a pipeline folder with `unet/`).

    The model section comes from `config.json`; the rest from the recipe of `dataset` if given, else
    the folder's `jaxdiff_config.json` if any, else the released DDPM model with that architecture;
    a DDPMScheduler config, if present, sets the diffusion section. Params are nested dicts of float32
    NumPy arrays in our layout. Unsupported settings and missing, unexpected or mis-shaped tensors
    raise ValueError.
    """
    unet_dir = unet_folder(folder)
    if unet_dir is None:
        raise ValueError(f"{folder} is not a diffusers folder: no {CONFIG_FILE} with *.safetensors in it or in unet/")
    source = f"diffusers folder {unet_dir}"
    arch, image_size = architecture_from_unet_config(_load_json(unet_dir / CONFIG_FILE), source)
    saved = unet_dir / JAXDIFF_CONFIG_FILE
    base = config_from_dict(_load_json(saved)) if saved.is_file() else None
    config = build_config(arch, image_size=image_size, dataset=dataset, source=source, base=base)
    scheduler = _scheduler_file(unet_dir)
    if scheduler is not None:
        apply_scheduler_config(config, _load_json(scheduler), str(scheduler))
    validate(config)
    shapes = param_shapes(config.model)
    levels = len(arch.ch_mult)
    wanted = {p: (diffusers_names(p, levels), torch_shape(p, s)) for p, s in shapes.items()}
    with safetensors.safe_open(_weights_file(unet_dir), framework="np") as f:
        available = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        found = match_names(wanted, available, source=source)
        flat = {p: from_torch(np.asarray(f.get_tensor(n), np.float32), shapes[p]) for p, n in found.items()}
    return config, flax.traverse_util.unflatten_dict({p: np.ascontiguousarray(a) for p, a in flat.items()})


# --------------------------------------------------------------------------- writing


def unet_config(config: ml_collections.ConfigDict) -> dict:
    """The `UNet2DModel` config.json of our model; models diffusers cannot express raise ValueError."""
    m = config.model
    if m.num_classes:
        raise ValueError(f"model.num_classes={m.num_classes}: class-conditional models have no UNet2DModel equivalent")
    if not m.resamp_with_conv:
        raise ValueError("model.resamp_with_conv=False: UNet2DModel always resamples with convolutions")
    attn = [res in tuple(m.attn_resolutions) for res in (m.image_size // 2**i for i in range(len(m.ch_mult)))]
    settings = {
        "_class_name": "UNet2DModel",
        "sample_size": m.image_size,
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "block_out_channels": [m.ch * mult for mult in m.ch_mult],
        "layers_per_block": m.num_res_blocks,
        "down_block_types": [BLOCK_TYPES[a][0] for a in attn],
        "up_block_types": [BLOCK_TYPES[a][1] for a in reversed(attn)],
        "attention_head_dim": None,
        "time_embedding_dim": None,
        "dropout": m.dropout,
    }
    settings.update({key: allowed[0] for key, (allowed, _) in REQUIRED_UNET_SETTINGS.items()})
    return settings


def scheduler_config(config: ml_collections.ConfigDict) -> dict:
    """The `DDPMScheduler` config of our diffusion; settings it cannot express raise ValueError."""
    d = config.diffusion
    for key, table, value in (("schedule", BETA_SCHEDULES, d.schedule), ("var_type", VAR_TYPES, d.var_type),
                              ("mean_type", MEAN_TYPES, d.mean_type)):  # fmt: skip
        if value not in table:
            raise ValueError(f"diffusion.{key}={value!r} has no DDPMScheduler equivalent (supported: {sorted(table)})")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": BETA_SCHEDULES[d.schedule],
        "trained_betas": None,
        "variance_type": VAR_TYPES[d.var_type],
        "clip_sample": bool(config.sampling.clip_denoised),
        "clip_sample_range": 1.0,
        "prediction_type": MEAN_TYPES[d.mean_type],
        "thresholding": False,
    }


def to_diffusers(config: ml_collections.ConfigDict, params) -> DiffusersExport:
    """Everything `write_diffusers` writes, checked (config representable, params fit the model) and in memory."""
    validate(config)
    settings, scheduler = unet_config(config), scheduler_config(config)
    shapes = param_shapes(config.model)
    flat = {p: np.asarray(a, np.float32) for p, a in flax.traverse_util.flatten_dict(params).items()}
    wanted = {p: (("/".join(p),), s) for p, s in shapes.items()}
    match_names(wanted, {"/".join(p): a.shape for p, a in flat.items()}, source="params")
    levels = len(config.model.ch_mult)
    tensors = {diffusers_names(p, levels)[0]: np.ascontiguousarray(to_torch(p, a)) for p, a in flat.items()}
    return DiffusersExport(settings, tensors, scheduler, config.to_dict())


def save_export(export: DiffusersExport, folder: str | os.PathLike) -> None:
    """Write `export` into `folder` (created if needed; files of the same names are replaced)."""
    folder = pathlib.Path(folder)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(export.tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    for name, content in ((CONFIG_FILE, export.unet_config), (SCHEDULER_FILE, export.scheduler_config),
                          (JAXDIFF_CONFIG_FILE, export.jaxdiff_config)):  # fmt: skip
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_diffusers(config: ml_collections.ConfigDict, params, folder: str | os.PathLike) -> None:
    """Export our model as a diffusers `UNet2DModel` folder (config.json, diffusion_pytorch_model.safetensors)
    with `scheduler/scheduler_config.json` (DDPMScheduler) and `jaxdiff_config.json`; checks everything first."""
    save_export(to_diffusers(config, params), folder)
