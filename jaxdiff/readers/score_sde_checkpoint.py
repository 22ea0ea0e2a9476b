"""score_sde's released Flax checkpoints (`checkpoint_<N>` msgpack files) -> our `NCSNpp` and its process.

score_sde saves, with `flax.training.checkpoints`, a msgpack dict of its training state: step, optimizer
(`flax.optim`: {"state": ..., "target": params}), lr, model_state, ema_rate, params_ema, rng. It is read
with `flax.serialization.msgpack_restore` into plain dicts (no pickle, no `flax.optim`).

Its networks are Linen modules with automatic names, numbered per class in creation order within each
scope (`Conv_0`, `ResnetBlockBigGANpp_3`, `AttnBlockpp_0/NIN_2`, `Combine_1/Conv_0`, ...). `score_sde_names`
replays that order for one of our configs: models/ncsnpp.py for NCSN++/DDPM++, models/ddpm.py (other
block class names, same order) for "DDPM". NIN layers (W [in, out], b) become our Dense kernels, or
1×1 convolutions for ResBlock shortcuts.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.readers.architecture import ParamPath, Shape
from jaxdiff.weights.matching import match_names
from jaxdiff.errors import WeightsError
from jaxdiff.models import ncsnpp


class ScoreSdeCheckpointError(WeightsError):
    """A score_sde checkpoint that cannot be read or does not fit the named config."""


_VP = dict(process="vp", beta_min=0.1, beta_max=20.0, num_scales=1000, data_range=(-1.0, 1.0), network_input="x",
           scale_by_sigma=False)
_SUBVP = dict(_VP, process="subvp")
_VE = dict(process="ve", sigma_min=0.01, sigma_max=50.0, num_scales=1000, data_range=(0.0, 1.0), network_input="2x-1",
           scale_by_sigma=True)
_EPS_CONTINUOUS = dict(continuous=True, parameterization="eps", noise_labels="999t")
_EPS_DISCRETE = dict(continuous=False, parameterization="eps", noise_labels="step")
# (our NCSN++ variant, process info) of score_sde's CIFAR-10 configs, named as its `configs/` files without
# the "cifar10_" prefix. noise_labels: "999t" = 999·t, "step" = 0-based step t·(N−1), "sigma" = σ,
# "sigma_index" = i of σ_i = σ_max·(σ_min/σ_max)^(i/(N−1)). network_input: what the network is fed for
# data x in data_range (score_sde centres [0, 1] data inside its model). scale_by_sigma: score = output / σ.
CONFIGS = {
    "vp/ddpm": ("ddpm", dict(_VP, **_EPS_DISCRETE)),
    "vp/ddpm_continuous": ("ddpm", dict(_VP, **_EPS_CONTINUOUS)),
    "vp/ddpmpp": ("ddpmpp", dict(_VP, **_EPS_DISCRETE)),
    "vp/ddpmpp_continuous": ("ddpmpp", dict(_VP, **_EPS_CONTINUOUS)),
    "vp/ddpmpp_deep_continuous": ("ddpmpp_deep", dict(_VP, **_EPS_CONTINUOUS)),
    "subvp/ddpm_continuous": ("ddpm", dict(_SUBVP, **_EPS_CONTINUOUS)),
    "subvp/ddpmpp_continuous": ("ddpmpp", dict(_SUBVP, **_EPS_CONTINUOUS)),
    "subvp/ddpmpp_deep_continuous": ("ddpmpp_deep", dict(_SUBVP, **_EPS_CONTINUOUS)),
    "ve/ncsnpp": ("ncsnpp_discrete", dict(_VE, continuous=False, parameterization="score", noise_labels="sigma_index")),
    "ve/ncsnpp_continuous": ("ncsnpp", dict(_VE, continuous=True, parameterization="score", noise_labels="sigma")),
    "ve/ncsnpp_deep_continuous": (
        "ncsnpp_deep", dict(_VE, continuous=True, parameterization="score", noise_labels="sigma")
    ),
}  # fmt: skip
# score_sde's block classes: models/ncsnpp.py (by resblock_type) and models/ddpm.py.
BLOCK_CLASSES = {"biggan": "ResnetBlockBigGANpp", "ddpm": "ResnetBlockDDPMpp", "ddpm_model": "ResnetBlockDDPM"}
ATTENTION_CLASSES = {"ncsnpp": "AttnBlockpp", "ddpm_model": "AttnBlock"}
RESBLOCK_CHILDREN = {"norm1": "GroupNorm_0", "conv1": "Conv_0", "temb_proj": "Dense_0", "norm2": "GroupNorm_1",
                     "conv2": "Conv_1"}  # fmt: skip
ATTENTION_CHILDREN = {"norm": "GroupNorm_0", "q": "NIN_0", "k": "NIN_1", "v": "NIN_2", "proj_out": "NIN_3"}
NIN_LEAVES = {"kernel": "W", "bias": "b"}
_CHECKPOINT_FILE = re.compile(r"checkpoint_(\d+)$")


def network_config(config_name: str) -> ml_collections.ConfigDict:
    """Our NCSN++ config of a score_sde config name (one of `CONFIGS`)."""
    if config_name not in CONFIGS:
        raise ScoreSdeCheckpointError(f"unknown score_sde config {config_name!r}; choose one of {sorted(CONFIGS)}")
    return ncsnpp.cifar10_config(CONFIGS[config_name][0])


class _Names:
    """Our layer path -> (score_sde module path, kind), built in score_sde's creation order."""

    def __init__(self):
        self.counts = collections.Counter()
        self.layers: dict[ParamPath, tuple[str, str]] = {}

    def new(self, cls: str, ours: ParamPath | None = None, kind: str = "plain") -> None:
        """Create one module of class `cls` at the top scope; `ours` is our layer path (None: no params)."""
        name = f"{cls}_{self.counts[cls]}"
        self.counts[cls] += 1
        if ours is not None:
            self.layers[ours] = (name, kind)


def _layer_names(config: ml_collections.ConfigDict, ddpm_model: bool) -> dict[ParamPath, tuple[str, str]]:
    """Replays score_sde's NCSNpp (or, with `ddpm_model`, its DDPM) module creation for `config`."""
    block_kind = "resblock_nin" if config.resblock_type == "ddpm" else "resblock_conv"
    block = BLOCK_CLASSES["ddpm_model" if ddpm_model else config.resblock_type]
    attn = ATTENTION_CLASSES["ddpm_model" if ddpm_model else "ncsnpp"]
    resample = "resample_fir" if config.fir else "resample"
    levels = len(config.ch_mult)
    resolutions = [config.image_size // 2**i for i in range(levels)]
    n = _Names()
    if config.embedding_type == "fourier":
        n.new("GaussianFourierProjection", ("fourier_embedding",))
    if config.conditional:
        n.new("Dense", ("temb_dense0",))
        n.new("Dense", ("temb_dense1",))
    n.new("Conv", ("conv_in",))
    for i in range(levels):
        for j in range(config.num_res_blocks):
            n.new(block, (f"down_{i}", f"block_{j}"), block_kind)
            if resolutions[i] in config.attn_resolutions:
                n.new(attn, (f"down_{i}", f"attn_{j}"), "attention")
        if i == levels - 1:
            continue
        if config.resblock_type == "ddpm":
            n.new("Downsample", (f"down_{i}", "downsample"), resample)
        else:
            n.new(block, (f"down_{i}", "downsample"), block_kind)
        if config.progressive_input == "input_skip":
            n.new("Downsample")
            n.new("Combine", (f"down_{i}", "pyramid_combine"), "combine")
        elif config.progressive_input == "residual":
            n.new("Downsample", (f"down_{i}", "pyramid_downsample"), resample)
    n.new(block, ("mid_block_1",), block_kind)
    n.new(attn, ("mid_attn_1",), "attention")
    n.new(block, ("mid_block_2",), block_kind)
    for i in reversed(range(levels)):
        for j in range(config.num_res_blocks + 1):
            n.new(block, (f"up_{i}", f"block_{j}"), block_kind)
        if resolutions[i] in config.attn_resolutions:
            n.new(attn, (f"up_{i}", "attn"), "attention")
        lowest = i == levels - 1
        if config.progressive == "output_skip" or (config.progressive == "residual" and lowest):
            if config.progressive == "output_skip" and not lowest:
                n.new("Upsample")
            n.new("GroupNorm", (f"up_{i}", "pyramid_norm"))
            n.new("Conv", (f"up_{i}", "pyramid_conv"))
        elif config.progressive == "residual":
            n.new("Upsample", (f"up_{i}", "pyramid_upsample"), resample)
        if i != 0:
            if config.resblock_type == "ddpm":
                n.new("Upsample", (f"up_{i}", "upsample"), resample)
            else:
                n.new(block, (f"up_{i}", "upsample"), block_kind)
    if config.progressive != "output_skip":
        n.new("GroupNorm", ("norm_out",))
        n.new("Conv", ("conv_out",))
    return n.layers


def _child_name(kind: str, child: str, leaf: str) -> tuple[str, bool]:
    """score_sde's name of our `child`/`leaf` inside a layer of `kind`, and whether it is a NIN."""
    if kind.startswith("resblock"):
        if child == "shortcut":
            return ("NIN_0", True) if kind == "resblock_nin" else ("Conv_2", False)
        return RESBLOCK_CHILDREN[child], False
    if kind == "attention":
        return ATTENTION_CHILDREN[child], child != "norm"
    return {"resample": "Conv_0", "resample_fir": "Conv2d_0"}[kind], False


def score_sde_names(config: ml_collections.ConfigDict, shapes: dict[ParamPath, Shape], *, ddpm_model: bool = False
                    ) -> dict[ParamPath, tuple[str, Shape]]:  # fmt: skip
    """For each of our parameters (path -> shape): score_sde's "/"-joined name and the shape it has there."""
    layers = _layer_names(config, ddpm_model)
    names = {}
    for path, shape in shapes.items():
        depth = next(d for d in (3, 2, 1) if path[:d] in layers)
        module, kind = layers[path[:depth]]
        rest, leaf = path[depth:-1], path[-1]
        if kind == "combine":
            names[path] = (f"{module}/Conv_0/{leaf}", shape)
        elif not rest:
            names[path] = (f"{module}/{leaf}", shape)
        else:
            child, nin = _child_name(kind, rest[0], leaf)
            their_shape = shape[-2:] if nin and leaf == "kernel" else shape
            names[path] = (f"{module}/{child}/{NIN_LEAVES[leaf] if nin else leaf}", their_shape)
    return names


def checkpoint_file(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint at `path`: the file itself, else the highest `checkpoint_<N>` in the folder, in its
    `checkpoints/` or else in its `checkpoints-meta/`."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints", path / "checkpoints-meta"):
        found = [(int(m.group(1)), f) for f in folder.glob("checkpoint_*") if (m := _CHECKPOINT_FILE.match(f.name))]
        if found:
            return max(found)[1]
    raise ScoreSdeCheckpointError(
        f"{path}: no score_sde checkpoint (a checkpoint_<N> file, here or in checkpoints/ or checkpoints-meta/)"
    )


def read_state(path: pathlib.Path) -> dict:
    """The msgpack training state of a checkpoint file as nested dicts of NumPy arrays."""
    try:
        state = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise ScoreSdeCheckpointError(f"{path}: not a readable msgpack checkpoint ({reason})") from err
    if not isinstance(state, dict) or not isinstance(state.get("params_ema"), dict):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ScoreSdeCheckpointError(f"{path}: not a score_sde training state (no params_ema; found {keys})")
    return state


def read_score_sde_checkpoint(
    path: str | os.PathLike, config_name: str, *, ema: bool = True
) -> tuple[str, ml_collections.ConfigDict, dict, dict]:
    """("ncsnpp", our network config, params (NumPy), process info) of a score_sde checkpoint.

    `config_name` is one of `CONFIGS` (the config file the checkpoint was trained with); `ema` picks
    params_ema (default) or the raw optimizer target. A tensor that is missing, mis-shaped or left over
    raises one ScoreSdeCheckpointError naming them all.
    """
    config = network_config(config_name)
    file = checkpoint_file(path)
    state = read_state(file)
    optimizer = state.get("optimizer")
    params = state["params_ema"] if ema else optimizer.get("target") if isinstance(optimizer, dict) else None
    if not isinstance(params, dict):
        raise ScoreSdeCheckpointError(f"{file}: no optimizer/target parameters in the checkpoint")
    model = ncsnpp.create_ncsnpp(config)
    size, channels = config.image_size, config.num_channels
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.ones((1,)))
    shapes = {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(abstract["params"]).items()}
    names = score_sde_names(config, shapes, ddpm_model=CONFIGS[config_name][0] == "ddpm")
    tensors = flax.traverse_util.flatten_dict(params, sep="/")
    wanted = {p: ((name,), shape) for p, (name, shape) in names.items()}
    available = {name: tuple(np.shape(t)) for name, t in tensors.items()}
    try:
        found = match_names(wanted, available, source=f"{file} ({'params_ema' if ema else 'optimizer target'})")
    except ValueError as err:
        raise ScoreSdeCheckpointError(f"score_sde config {config_name!r}: {err}") from err
    flat = {p: np.asarray(tensors[name], np.float32).reshape(shapes[p]) for p, name in found.items()}
    return "ncsnpp", config, flax.traverse_util.unflatten_dict(flat), dict(CONFIGS[config_name][1])
