"""diffusers `UNet2DModel` NCSN++ (the `google/ncsnpp-*` layout) -> our `NCSNpp` config and parameters.

diffusers builds score_sde's NCSN++ from `SkipDownBlock2D`/`AttnSkipDownBlock2D` and
`SkipUpBlock2D`/`AttnSkipUpBlock2D`: Gaussian Fourier embedding of log σ (scale 16), BigGAN ResBlocks
with FIR (1, 3, 3, 1) resampling, outputs rescaled by 1/√2, `input_skip` (1×1 `skip_conv` summed in)
and `output_skip` (`skip_norm` + 3×3 `skip_conv` per level; the last level's are the model's
`conv_norm_out`/`conv_out`). Down block i is our `down_{i}`; up block k is our `up_{L-1-k}`.

Two differences stay with the caller: diffusers divides the output by σ (score_sde's `scale_by_sigma`),
our network does not; and diffusers' attention blocks (and the first ResBlock norm of its attention up
blocks) use 32 GroupNorm groups where score_sde uses min(C // 4, 32), which agree for widths ≥ 128 —
every published NCSN++.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.readers.architecture import ParamPath
from jaxdiff.readers.diffusers_format import ATTENTION_LAYERS
from jaxdiff.weights.torch_layout import TORCH_LEAF_NAMES, from_torch, torch_shape
from jaxdiff.weights.matching import match_names
from jaxdiff.errors import WeightsError
from jaxdiff.models import ncsnpp

RESBLOCK_LAYERS = {
    "norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
    "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut",
}  # fmt: skip
TOP_LAYERS = {
    "fourier_embedding": "time_proj", "temb_dense0": "time_embedding.linear_1",
    "temb_dense1": "time_embedding.linear_2", "conv_in": "conv_in",
    "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0", "mid_block_2": "mid_block.resnets.1",
}  # fmt: skip
DOWN_TYPES = {False: "SkipDownBlock2D", True: "AttnSkipDownBlock2D"}
UP_TYPES = {False: "SkipUpBlock2D", True: "AttnSkipUpBlock2D"}
# Settings the NCSN++ layout must have, with diffusers' default second.
REQUIRED_SETTINGS = {
    "time_embedding_type": (("fourier",), "positional"),
    "center_input_sample": ((False,), False),
    "mid_block_type": (("UNetMidBlock2D",), "UNetMidBlock2D"),
    "mid_block_scale_factor": ((2**0.5,), 1),
    "act_fn": (("silu", "swish"), "silu"),
    "norm_eps": ((1e-6,), 1e-5),
    "resnet_time_scale_shift": (("default",), "default"),
    "class_embed_type": ((None,), None),
    "num_class_embeds": ((None,), None),
    "in_channels": ((3,), 3),
    "out_channels": ((3,), 3),
    "time_embedding_dim": ((None,), None),
}
FOURIER_SCALE = 16.0  # diffusers' UNet2DModel fixes it


def _unsupported(key: str, value, need: str) -> WeightsError:
    return WeightsError(f"diffusers config: unsupported {key}={value!r} ({need})")


def config_from_diffusers(settings: Mapping) -> ml_collections.ConfigDict:
    """Our NCSN++ config (keys of `ncsnpp.default_config()`) for a `UNet2DModel` config.json dict."""
    for key, (allowed, default) in REQUIRED_SETTINGS.items():
        value = settings.get(key, default)
        if not any(value == a or (isinstance(a, float) and isinstance(value, float) and np.isclose(value, a))
                   for a in allowed):  # fmt: skip
            raise _unsupported(key, value, "NCSN++ needs " + " or ".join(map(repr, allowed)))
    widths = list(settings.get("block_out_channels", ()))
    if not widths or any(not isinstance(w, int) or w < 1 or w % widths[0] for w in widths):
        raise _unsupported("block_out_channels", widths, "positive multiples of the first entry")
    down = list(settings.get("down_block_types", ()))
    if len(down) != len(widths) or any(t not in DOWN_TYPES.values() for t in down):
        raise _unsupported("down_block_types", down, f"one of {sorted(DOWN_TYPES.values())} per level")
    attn = [t == DOWN_TYPES[True] for t in down]
    up = [UP_TYPES[a] for a in reversed(attn)]
    if list(settings.get("up_block_types", ())) != up:
        raise _unsupported("up_block_types", settings.get("up_block_types"), f"the mirror of down_block_types: {up}")
    size = settings.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _unsupported("sample_size", settings.get("sample_size"), "a square image size")
    config = ncsnpp.default_config()
    config.update(
        image_size=size, num_channels=3, nf=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=settings.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
        dropout=float(settings.get("dropout", 0.0)),
        fir=True, progressive="output_skip", progressive_input="input_skip", embedding_type="fourier",
        fourier_scale=FOURIER_SCALE,
    )  # fmt: skip
    return config


def _layer_name(layer: tuple[str, ...], num_levels: int) -> tuple[str, ...]:
    """Candidate diffusers module names of our layer path (without the leaf)."""
    if layer[0] in TOP_LAYERS:
        prefix = TOP_LAYERS[layer[0]]
        if len(layer) == 1:
            return (prefix,)
        table = ATTENTION_LAYERS if "attn" in layer[0] else {k: (v,) for k, v in RESBLOCK_LAYERS.items()}
        return tuple(f"{prefix}.{name}" for name in table[layer[1]])
    direction, level = layer[0].split("_")
    if direction == "down":
        block = f"down_blocks.{level}"
        special = {"downsample": "resnet_down", "pyramid_combine": "skip_conv"}
    else:
        block = f"up_blocks.{num_levels - 1 - int(level)}"
        if level == "0" and layer[1] in ("pyramid_norm", "pyramid_conv"):
            return ({"pyramid_norm": "conv_norm_out", "pyramid_conv": "conv_out"}[layer[1]],)
        special = {
            "upsample": "resnet_up", "pyramid_norm": "skip_norm", "pyramid_conv": "skip_conv", "attn": "attentions.0",
        }  # fmt: skip
    if layer[1] in special:
        inner = f"{block}.{special[layer[1]]}"
        if layer[1] == "attn":
            return tuple(f"{inner}.{name}" for name in ATTENTION_LAYERS[layer[2]])
        return (f"{inner}.{RESBLOCK_LAYERS[layer[2]]}",) if len(layer) == 3 else (inner,)
    kind, j = layer[1].split("_")
    if kind == "attn":
        return tuple(f"{block}.attentions.{j}.{name}" for name in ATTENTION_LAYERS[layer[2]])
    return (f"{block}.resnets.{j}.{RESBLOCK_LAYERS[layer[2]]}",)


def diffusers_names(path: ParamPath, num_levels: int) -> tuple[str, ...]:
    """Candidate diffusers tensor names of our parameter, best first (e.g. ("up_3", "attn", "q", "kernel")
    -> "up_blocks.0.attentions.0.to_q.weight", then the pre-0.15 "…query.weight")."""
    leaf = "weight" if path[-1] == "W" else TORCH_LEAF_NAMES[path[-1]]
    return tuple(f"{name}.{leaf}" for name in _layer_name(path[:-1], num_levels))


def params_from_diffusers(config: ml_collections.ConfigDict, tensors: Mapping[str, np.ndarray]) -> dict:
    """Our NCSN++ params (nested dicts of float32 NumPy arrays) from a diffusers state dict (PyTorch layouts).

    Missing, mis-shaped or left-over tensors raise one ValueError listing them all.
    """
    model = ncsnpp.create_ncsnpp(config)
    size, channels = config.image_size, config.num_channels
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.ones((1,)))
    flat_shapes = {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(shapes["params"]).items()}
    levels = len(config.ch_mult)
    wanted = {p: (diffusers_names(p, levels), torch_shape(p, s)) for p, s in flat_shapes.items()}
    found = match_names(wanted, {name: tuple(np.shape(t)) for name, t in tensors.items()}, source="diffusers NCSN++")
    flat = {p: from_torch(np.asarray(tensors[n], np.float32), flat_shapes[p]) for p, n in found.items()}
    return flax.traverse_util.unflatten_dict({p: np.ascontiguousarray(a) for p, a in flat.items()})
