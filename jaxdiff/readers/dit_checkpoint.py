"""DiT / SiT weights -> `config.model` (network "dit", its `dit` section) and params, without running pickle code.

    model_config, params = read_dit_checkpoint("DiT-XL-2-256x256.pt")           # or "SiT-XL-2-256.pt", variant="sit"
    model_config, params = read_diffusers_dit("DiT-XL-2-256/transformer")      # a DiTTransformer2DModel folder

The original repositories' `.pt` files are `torch.save` zip archives of either a plain state dict (the released
`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`, `SiT-XL-2-256x256.pt`) or what their train.py saves,
{"model", "ema", "opt", "args"}, read as its "ema" state dict like the repositories' `find_model`. They are read
by `jaxdiff.weights.torch_pickle.read_zip_archive` with a subclass of its `RestrictedUnpickler` that also admits
train.py's `argparse.Namespace`, as an inert record of its attributes; any other global (`os.system`, ...) is
refused by name, and each storage's size is checked against the archive before it is read.

DiT and SiT share the network; a SiT's forward drops the σ channels of learned-σ weights. A plain state dict does
not say which it is: the variant is the one given (`variant`, the CLI's `--variant`), else train.py's
`args.model` (SiT-... or DiT-...), else the file name (starting with "SiT-", as the released SiT-XL-2-256x256.pt
does: SiT; otherwise DiT). The architecture
comes from the tensor shapes (patch size, channels, width, depth, MLP width, classes, learned σ; the input size
from `pos_embed`, which must equal the 2-D sin-cos embedding), the number of heads from the preset of that depth
and width, train.py's `args.model` or the `num_heads` argument. These use DiT's timestep frequencies
(freq_shift 0), layer norm eps 1e-6 and one shared timestep + label embedder.

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`). Every config key
of `DiTTransformer2DModel` is read or refused in one line naming it, as are the extra keys of the legacy
`Transformer2DModel` config with norm_type "ada_norm_zero", which diffusers loads as a `DiTTransformer2DModel`.
diffusers' blocks each hold a timestep + label embedder and the final layer uses block 0's; when all blocks'
embedders are equal (as in the released conversion of the DiT weights) the shared layout is used, otherwise
the per-block one. diffusers' timestep frequencies use freq_shift 1 and the MLP's layer norm its `norm_eps`.

Missing, unexpected or mis-shaped tensors raise one WeightsError listing them all (`jaxdiff.weights.matching`).

For sampling, `read_dit_run` gives a `.pt`'s whole run config (`dit_run_config`: DiT's diffusion, fixed by the
paper, and its sample.py's sampling; `sit_run_config`: SiT's flow matching in its reversed time and its sample.py's
SDE sampling; both guide the first 3 latent channels) and `read_dit_autoencoder` the Stable Diffusion VAE it draws
the latents of (`jaxdiff.sampling.pipeline.Pipeline.from_pretrained(path, vae=...)`).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import zipfile
from typing import Any, Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors

from jaxdiff.checks import is_int, is_real
from jaxdiff.config.defaults import default_config
from jaxdiff.errors import ConfigError, MissingWeightsError, UsageError, WeightsError
from jaxdiff.latent.component_weights import read_autoencoder
from jaxdiff.latent.decoding_autoencoder import DecodingAutoencoder
from jaxdiff.models import dit
from jaxdiff.schedule import ADM_SPACING
from jaxdiff.weights.files import CONFIG_FILE, DIFFUSERS_WEIGHTS_STEM, load_json
from jaxdiff.weights.matching import ParamPath, match_names
from jaxdiff.weights.safetensors_reader import read_tensor
from jaxdiff.weights.torch_layout import param_from_torch, torch_shape
from jaxdiff.weights.torch_pickle import (
    RestrictedUnpickler,
    ScriptObject,
    error_summary,
    read_torch_file,
    read_zip_archive,
)

VARIANTS = ("dit", "sit")
SIT_FILE_PREFIX = "sit-"  # a plain state dict whose file name starts so (case aside) is read as SiT's
POS_EMBED_TOLERANCE = 1e-5  # |stored pos_embed - the 2-D sin-cos formula|: float32 rounding is ~1e-7
TRAIN_CHECKPOINT_KEYS = ("model", "ema", "opt", "args")
EMBEDDER_PARTS = ("t_embedder", "y_embedder")

# diffusers' DiTTransformer2DModel keys with its defaults (for keys a config.json omits).
DIFFUSERS_DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}  # fmt: skip
# Keys with one allowed value (or a set of them): the values DiT's network has.
DIFFUSERS_FIXED = {
    "dropout": ((0,), "0 (the network has no dropout layers)"),
    "attention_bias": ((True,), "true (DiT's attention has biases)"),
    "activation_fn": (("gelu-approximate",), "'gelu-approximate' (DiT's GELU, tanh approximation)"),
    "norm_type": (("ada_norm_zero",), "'ada_norm_zero' (DiT's adaLN-Zero)"),
    "norm_elementwise_affine": ((False,), "false (DiT's layer norms have no scale or bias)"),
}
# Keys diffusers reads but that change nothing in this network: norm_num_groups (no GroupNorm in the ada_norm_zero
# path), upcast_attention (the attention logits and softmax are float32 here anyway).
DIFFUSERS_WITHOUT_EFFECT = ("norm_num_groups", "upcast_attention")
# The legacy Transformer2DModel's extra keys, which diffusers drops when it loads the folder as a
# DiTTransformer2DModel: allowed only with the values under which the two are the same network.
LEGACY_CLASS = "Transformer2DModel"
LEGACY_NEUTRAL = {
    "cross_attention_dim": (None,), "num_vector_embeds": (None,), "only_cross_attention": (False,),
    "double_self_attention": (False,), "attention_type": ("default",), "caption_channels": (None,),
    "use_additional_conditions": (None, False), "interpolation_scale": (None, 1),
    "use_linear_projection": (False, True),
}  # fmt: skip
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", LEGACY_CLASS)
DIT_TIMESTEPS = 1000  # DiT's diffusion: T, linear betas 1e-4..0.02 (`dit_run_config`)
DIT_SAMPLING_STEPS = 250  # DiT's sample.py: --num-sampling-steps
DIT_GUIDANCE_CHANNELS = 3  # DiT's and SiT's forward_with_cfg guide the first 3 of the 4 latent channels
SIT_SAMPLING_STEPS = 250  # SiT's sample.py SDE: --num-sampling-steps (Euler–Maruyama evaluations, the last step's too)
DIT_GUIDANCE = 3.0  # DiT's sample.py: --cfg-scale 4.0 = 1 + w (the paper's FID 2.27: cfg 1.5, w = 0.5)
SIT_GUIDANCE = 3.0  # SiT's sample.py: --cfg-scale 4.0 = 1 + w (the paper's FID 2.06: cfg 1.5, w = 0.5)
DIT_LATENT_SCALE = 0.18215  # DiT's sample.py decodes samples / 0.18215
DIFFUSERS_LABEL_DROPOUT = 0.1  # diffusers' LabelEmbedding always has the null row (class_dropout_prob 0.1)
DIFFUSERS_FREQ_SHIFT = 1  # diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
DIFFUSERS_LAYERS = {  # our layer (below blocks_{i} or at the top) -> diffusers' module
    ("t_embedder", "mlp_0"): "norm1.emb.timestep_embedder.linear_1",
    ("t_embedder", "mlp_2"): "norm1.emb.timestep_embedder.linear_2",
    ("y_embedder", "embedding_table"): "norm1.emb.class_embedder.embedding_table",
    ("adaLN_modulation_1",): "norm1.linear",
    ("attn", "qkv"): "attn1.to_q+to_k+to_v",  # the three Linear layers, concatenated by `_fuse_qkv`
    ("attn", "proj"): "attn1.to_out.0",
    ("mlp", "fc1"): "ff.net.0.proj",
    ("mlp", "fc2"): "ff.net.2",
    ("x_embedder", "proj"): "pos_embed.proj",
    ("final_layer", "adaLN_modulation_1"): "proj_out_1",
    ("final_layer", "linear"): "proj_out_2",
}


class RunArguments(ScriptObject):
    """Inert stand-in for the `argparse.Namespace` DiT's and SiT's train.py save as "args": its attributes in
    `fields`; nothing of it runs."""


class _CheckpointUnpickler(RestrictedUnpickler):
    """The tensor-file unpickler, admitting also `argparse.Namespace` (as `RunArguments`)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return RunArguments
        return super().find_class(module, name)


def _load_checkpoint(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """(state-dict tensors by name, train.py's args or {}) of a DiT/SiT `.pt`: a plain state dict, or the "ema"
    entry of a train.py checkpoint. Files in the legacy (pre-zip) torch.save format may hold a plain state dict."""
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        return read_torch_file(path), {}
    try:
        obj = read_zip_archive(path, _CheckpointUnpickler)
    except WeightsError as err:
        raise type(err)(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the reader raise is the file's fault
        raise WeightsError(f"{path}: not a readable PyTorch file ({error_summary(err)})") from err
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict or a train.py checkpoint dict, got {type(obj).__name__}")
    args = obj.get("args")
    args = args.fields if isinstance(args, RunArguments) else {}
    if "ema" in obj:
        obj = obj["ema"]
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: its 'ema' entry is a {type(obj).__name__}, not a state dict")
    leftover = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
    if leftover:
        raise WeightsError(f"{path}: not a DiT state dict: entries {leftover[:8]} are not tensors "
                           f"(a train.py checkpoint has the keys {TRAIN_CHECKPOINT_KEYS})")  # fmt: skip
    return {str(k): v for k, v in obj.items()}, args  # read-only views of the storages, converted once later


def _shape(tensors: dict[str, np.ndarray], name: str, ndim: int, source: str) -> tuple[int, ...]:
    if name not in tensors:
        raise WeightsError(f"{source}: not a DiT state dict (no {name})")
    if tensors[name].ndim != ndim:
        raise WeightsError(f"{source}: {name} has shape {tensors[name].shape}, expected {ndim} dimensions")
    return tensors[name].shape


def _heads(depth: int, hidden: int, num_heads: int | None, args: dict, source: str) -> int:
    """The number of heads: `num_heads` if given, else that of train.py's `args.model` preset, else that of the
    preset with this depth and width."""
    if num_heads is not None:
        return num_heads
    name = args.get("model")
    if isinstance(name, str):
        try:
            config = dit.preset_config(name)
        except ConfigError:
            raise WeightsError(f"{source}: args.model={name!r} is no DiT/SiT preset {dit.PRESETS}; pass num_heads") \
                from None  # fmt: skip
        if (config.depth, config.hidden_size) != (depth, hidden):
            raise WeightsError(f"{source}: args.model={name!r} has depth {config.depth} and width "
                               f"{config.hidden_size}, but the weights have {depth} and {hidden}")  # fmt: skip
        return config.num_heads
    size = dit.preset_of(depth, hidden)
    if size is None:
        raise WeightsError(f"{source}: depth {depth} and width {hidden} are no DiT size {tuple(dit.SIZES)}, so the "
                           "number of heads is unknown; pass num_heads")  # fmt: skip
    return dit.SIZES[size][2]


def _section_from_state_dict(
    tensors: dict[str, np.ndarray], source: str, *, variant: str, num_heads: int | None, args: dict
) -> ml_collections.ConfigDict:
    """The `config.model.dit` section of DiT's state-dict tensors (shapes as in PyTorch), see the module docstring."""
    hidden, channels, patch, patch_w = _shape(tensors, "x_embedder.proj.weight", 4, source)
    _, tokens, _ = _shape(tensors, "pos_embed", 3, source)
    grid = math.isqrt(tokens)
    if grid * grid != tokens or patch != patch_w:
        raise WeightsError(f"{source}: pos_embed of {tokens} tokens and {patch}×{patch_w} patches: not a square DiT")
    depth = 0
    while f"blocks.{depth}.mlp.fc1.weight" in tensors:
        depth += 1
    if depth == 0:
        raise WeightsError(f"{source}: not a DiT state dict (no blocks.0.mlp.fc1.weight)")
    mlp_hidden = _shape(tensors, "blocks.0.mlp.fc1.weight", 2, source)[0]
    out_features = _shape(tensors, "final_layer.linear.weight", 2, source)[0]
    if out_features not in (patch * patch * channels, 2 * patch * patch * channels):
        raise WeightsError(f"{source}: final_layer.linear has {out_features} outputs; expected {patch}·{patch}·"
                           f"{channels} or twice that (learned σ)")  # fmt: skip
    learn_sigma = out_features == 2 * patch * patch * channels
    table = tensors.get("y_embedder.embedding_table.weight")
    section = dit.preset_config(
        "XL/2", input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
        num_heads=_heads(depth, hidden, num_heads, args, source), mlp_ratio=mlp_hidden / hidden,
        num_classes=0 if table is None else table.shape[0] - 1, learn_sigma=learn_sigma,
        output_sigma=not (variant == "sit" and learn_sigma),
    )  # fmt: skip
    _check_buildable(section, source)
    return section


def _check_buildable(section: ml_collections.ConfigDict, source: str) -> None:
    try:
        dit.create_dit(section)
    except ValueError as err:
        raise WeightsError(f"{source}: unsupported DiT: {err}") from None


def dit_model_config(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.model` for a `dit` section: network "dit", and the shared keys (image_size, in_channels,
    out_channels, num_classes, null_label) agreeing with it; the U-Net's keys keep their defaults."""
    model = default_config().model
    network = dit.create_dit(section)
    model.network = "dit"
    model.image_size, model.in_channels = section.input_size, section.in_channels
    model.out_channels, model.num_classes = network.out_channels, section.num_classes
    model.null_label = network.null_label
    model.dit.update(section.to_dict())
    return model


def _params(section: ml_collections.ConfigDict, tensors: dict[str, np.ndarray], name_of: Callable[[ParamPath], str],
            source: str) -> dict:  # fmt: skip
    """Our params (NumPy, nested, in the section's compute dtype) of the network of `section` from PyTorch-layout
    tensors by name."""
    model = dit.create_dit(section)
    size, channels = section.input_size, section.in_channels
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.ones((1,)),
                              jnp.zeros((1,), jnp.int32) if section.num_classes else None)  # fmt: skip
    shapes = {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(abstract["params"]).items()}
    wanted = {p: ((name_of(p),), torch_shape(p, s)) for p, s in shapes.items()}
    found = match_names(wanted, {n: t.shape for n, t in tensors.items()}, source=source)
    flat = {p: np.asarray(tensors[n], np.float32) for p, n in found.items()}
    flat = {p: param_from_torch(p, a, shapes[p], section.dtype) for p, a in flat.items()}
    return flax.traverse_util.unflatten_dict(flat)


def state_dict_name(path: ParamPath) -> str:
    """DiT's state-dict name of our parameter: ("blocks_3", "adaLN_modulation_1", "kernel") ->
    "blocks.3.adaLN_modulation.1.weight", ("y_embedder", "embedding_table", "embedding") ->
    "y_embedder.embedding_table.weight"."""
    parts = [re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1]]
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def _check_pos_embed(tensors: dict[str, np.ndarray], section: ml_collections.ConfigDict, source: str) -> None:
    """DiT keeps its fixed position embedding in the state dict; ours is computed, so it must be that one."""
    grid = section.input_size // section.patch_size
    expected = dit.sincos_pos_embed_2d(section.hidden_size, grid)
    if tensors["pos_embed"].shape != (1, *expected.shape):
        raise WeightsError(f"{source}: pos_embed has shape {tensors['pos_embed'].shape}, "
                           f"expected {(1, *expected.shape)}")  # fmt: skip
    error = float(np.max(np.abs(tensors["pos_embed"][0].astype(np.float64) - expected)))
    if not error <= POS_EMBED_TOLERANCE:
        raise WeightsError(f"{source}: pos_embed differs from the 2-D sin-cos embedding of a {grid}×{grid} grid by "
                           f"up to {error:.3g}; only DiT's fixed embedding is supported")  # fmt: skip


def _check_dtype(dtype: str) -> None:
    """UsageError unless `dtype` is one the DiT computes in (and its parameters are read in): before any reading."""
    if dtype not in dit.COMPUTE_DTYPES:
        raise UsageError(f"dtype={dtype!r} is not one of {dit.COMPUTE_DTYPES}")


def _read_checkpoint(
    path: str | os.PathLike, variant: str | None, num_heads: int | None, dtype: str
) -> tuple[str, ml_collections.ConfigDict, dict]:
    """(the variant, `config.model`, params) of `read_dit_checkpoint`."""
    if variant is not None and variant not in VARIANTS:
        raise UsageError(f"variant={variant!r} is not one of {VARIANTS} (or None: from the checkpoint)")
    if num_heads is not None and (not is_int(num_heads, numpy=False) or num_heads < 1):
        raise UsageError(f"num_heads={num_heads!r} must be an int >= 1 (or None: from the preset)")
    _check_dtype(dtype)
    path = pathlib.Path(path)
    source = str(path)
    tensors, args = _load_checkpoint(path)
    if variant is None:
        name = str(args.get("model", path.name))
        variant = "sit" if name.lower().startswith(SIT_FILE_PREFIX) else "dit"
    section = _section_from_state_dict(tensors, source, variant=variant, num_heads=num_heads, args=args)
    section.dtype = dtype
    _check_pos_embed(tensors, section, source)
    tensors = {n: t for n, t in tensors.items() if n != "pos_embed"}
    return variant, dit_model_config(section), _params(section, tensors, state_dict_name, source)


def read_dit_checkpoint(
    path: str | os.PathLike, *, variant: str | None = None, num_heads: int | None = None, dtype: str = "float32"
) -> tuple[ml_collections.ConfigDict, dict]:
    """(`config.model`, params as NumPy) of a DiT or SiT `.pt` (see the module docstring).

    variant "sit" drops the σ channels of learned-σ weights from the output (SiT's forward); None takes it from
    train.py's `args.model`, else from the file name (module docstring). num_heads: for sizes other than the
    presets. dtype ("float32" | "bfloat16"): the network's compute dtype and its parameters'.
    """
    _, model_config, params = _read_checkpoint(path, variant, num_heads, dtype)
    return model_config, params


# --------------------------------------------------------------------------- DiT's diffusion and autoencoder


def dit_run_config(model_config: ml_collections.ConfigDict, *, guidance_channels: int) -> ml_collections.ConfigDict:
    """A run config of the discrete family for a DiT `config.model` (`dit_model_config`), with DiT's settings:
    its diffusion (create_diffusion's: linear betas 1e-4..0.02, T = 1000, ε prediction, the learned_range variance
    of learned σ trained by MSE + the bound, i.e. loss_type "hybrid" with λ·T = 1, else fixed_large and MSE), x̂_0
    not clipped when sampling, classifier-free guidance on the first
    `guidance_channels` output channels (0: all), and its training's label dropout (class_dropout_prob 0.1, as
    training.label_dropout: with the discrete schedule the network's key only adds the null-class row)."""
    config = default_config()
    config.model = model_config
    network = dit.create_dit(model_config.dit)
    dc, sc = config.diffusion, config.sampling
    dc.schedule, dc.num_timesteps, dc.beta_start, dc.beta_end = "linear", DIT_TIMESTEPS, 1e-4, 0.02
    learned = network.out_channels == 2 * network.in_channels
    dc.mean_type, dc.var_type = "eps", "learned_range" if learned else "fixedlarge"
    dc.loss_type, dc.hybrid_lambda = ("hybrid", 1.0 / DIT_TIMESTEPS) if learned else ("mse", dc.hybrid_lambda)
    sc.clip_denoised, sc.guidance_channels = False, guidance_channels
    if model_config.num_classes and network.null_label:
        config.training.label_dropout = model_config.dit.class_dropout_prob
    return config


def sit_run_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run config of the flow family for a SiT `config.model` (`dit_model_config`, without σ channels), with
    SiT's defaults (train_utils.py, sample.py's SDE mode): the Linear interpolant (process "flow", x_t =
    (1 − t)·x_0 + t·ε), velocity prediction in SiT's time τ = 1 − t on [0, 1] (time_reversed, time_scale 1),
    flow matching with uniform t; sampled by euler_maruyama (SiT's Euler–Maruyama: diffusion_form sigma, norm 1,
    last step mean of size 0.04, the sampler's defaults) in 250 steps, x̂_0 not clipped, and class-conditional
    models guided with w = 3 (cfg_scale 4) on the first 3 latent channels (forward_with_cfg). The DiT drops its own
    labels in training (class_dropout_prob), so training.label_dropout stays 0."""
    config = default_config()
    config.model = model_config
    dc, sc = config.diffusion, config.sampling
    dc.process, dc.parameterization, dc.loss_type = "flow", "velocity", "flow_matching"
    dc.time_scale, dc.time_reversed = 1.0, True
    sc.sampler, sc.steps, sc.clip_denoised = "euler_maruyama", SIT_SAMPLING_STEPS, False
    sc.guidance_channels = DIT_GUIDANCE_CHANNELS
    sc.guidance = SIT_GUIDANCE if model_config.num_classes else 0.0
    return config


def read_dit_run(path: str | os.PathLike, *, variant: str | None = None, num_heads: int | None = None,
                 dtype: str = "float32") -> tuple[ml_collections.ConfigDict, dict]:  # fmt: skip
    """(run config, params as NumPy) of an original DiT or SiT `.pt` (`read_dit_checkpoint`, `variant`,
    `num_heads` and `dtype` as there) as its sample.py samples it. DiT: `dit_run_config` with guidance on the first 3
    channels, improved DDPM's respacing (ADM_SPACING), its 250 steps (config.sampling.steps) and, class-conditional,
    its cfg scale 4 (w = 3, config.sampling.guidance): the defaults of `Pipeline.sample`. SiT: `sit_run_config`."""
    variant, model_config, params = _read_checkpoint(path, variant, num_heads, dtype)
    if variant == "sit":
        return sit_run_config(model_config), params
    config = dit_run_config(model_config, guidance_channels=DIT_GUIDANCE_CHANNELS)
    config.sampling.spacing, config.sampling.steps = ADM_SPACING, DIT_SAMPLING_STEPS
    config.sampling.guidance = DIT_GUIDANCE if model_config.num_classes else 0.0
    return config, params


def read_dit_autoencoder(folder: str | os.PathLike, model_config: ml_collections.ConfigDict) -> DecodingAutoencoder:
    """The autoencoder of a DiT `.pt` from a diffusers AutoencoderKL folder (stabilityai/sd-vae-ft-ema or -mse):
    DiT's sample.py decodes latents / 0.18215, so the folder's scaling_factor must be that and its shift_factor
    none; its latent channels must be the DiT's."""
    vae_config, vae_params = read_autoencoder(folder)
    if vae_config.scaling_factor != DIT_LATENT_SCALE or vae_config.shift_factor:
        raise WeightsError(f"{folder}: scaling_factor={vae_config.scaling_factor}, shift_factor="
                           f"{vae_config.shift_factor}: DiT decodes its latents / {DIT_LATENT_SCALE} (the SD VAE's "
                           "scaling, no shift)")  # fmt: skip
    autoencoder = DecodingAutoencoder(vae_config, vae_params)
    size = model_config.image_size
    autoencoder.check_latents((size, size, model_config.in_channels), str(folder))
    return autoencoder


# --------------------------------------------------------------------------- diffusers


def _refuse(source: str, key: str, value: Any, allowed: str) -> WeightsError:
    return WeightsError(f"{source}: unsupported {key}={value!r}; allowed: {allowed}")


def _one_of(value: Any, allowed: tuple) -> bool:
    """`value` is one of `allowed`, where None, true and false match only themselves (not 0 or 1)."""
    strict = lambda a: a is None or isinstance(a, bool)  # noqa: E731
    return any(value is a if strict(a) else (value == a and not strict(value)) for a in allowed)


def _positive_int(settings: dict, key: str, source: str) -> int:
    value = settings[key]
    if not is_int(value, numpy=False) or value < 1:
        raise _refuse(source, key, value, "an int >= 1")
    return value


def dit_section_from_diffusers_config(config: dict, source: str) -> ml_collections.ConfigDict:
    """The `config.model.dit` section (per-block embedders) of a DiTTransformer2DModel config.json (dict)."""
    class_name = config.get("_class_name", DIFFUSERS_CLASSES[0])
    if class_name not in DIFFUSERS_CLASSES:
        raise _refuse(source, "_class_name", class_name, " or ".join(DIFFUSERS_CLASSES))
    legacy = LEGACY_NEUTRAL if class_name == LEGACY_CLASS else {}
    settings = dict(DIFFUSERS_DIT_DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in legacy:
            if not _one_of(value, legacy[key]):
                raise _refuse(source, key, value, f"{' or '.join(map(repr, legacy[key]))} (for a DiT)")
            continue
        if key not in settings:
            raise WeightsError(f"{source}: unknown {class_name} setting {key}={value!r}; known: {sorted(settings)}")
        settings[key] = value
    for key, (allowed, words) in DIFFUSERS_FIXED.items():
        if not _one_of(settings[key], allowed):
            raise _refuse(source, key, settings[key], words)
    heads, head_dim, channels, depth, sample, patch, classes = (
        _positive_int(settings, key, source) for key in
        ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
         "num_embeds_ada_norm")
    )  # fmt: skip
    out = channels if settings["out_channels"] is None else settings["out_channels"]
    if out not in (channels, 2 * channels) or isinstance(out, bool):
        raise _refuse(source, "out_channels", out, f"{channels} (in_channels) or {2 * channels} (learned σ)")
    if not is_real(settings["norm_eps"], finite=True, numpy=False) or not settings["norm_eps"] > 0:
        raise _refuse(source, "norm_eps", settings["norm_eps"], "a number > 0")
    if not is_int(settings["norm_num_groups"], numpy=False):
        raise _refuse(source, "norm_num_groups", settings["norm_num_groups"], "an int (without effect here)")
    if not isinstance(settings["upcast_attention"], bool):
        raise _refuse(source, "upcast_attention", settings["upcast_attention"], "true or false (without effect here)")
    section = dit.preset_config(
        "XL/2", input_size=sample, patch_size=patch, in_channels=channels, hidden_size=heads * head_dim, depth=depth,
        num_heads=heads, num_classes=classes, class_dropout_prob=DIFFUSERS_LABEL_DROPOUT,
        learn_sigma=out == 2 * channels, per_block_embedders=True, freq_shift=DIFFUSERS_FREQ_SHIFT,
        mlp_norm_eps=float(settings["norm_eps"]),
    )  # fmt: skip
    _check_buildable(section, source)
    return section


def diffusers_name(path: ParamPath, per_block_embedders: bool) -> str:
    """diffusers' state-dict name of our parameter; with shared embedders ours are block 0's."""
    block = path[0] if re.fullmatch(r"blocks_\d+", path[0]) else None
    inner = path[1:-1] if block else path[:-1]
    if block is None and inner[0] in EMBEDDER_PARTS and not per_block_embedders:
        block = "blocks_0"
    prefix = f"transformer_blocks.{block[len('blocks_'):]}." if block else ""
    return f"{prefix}{DIFFUSERS_LAYERS[inner]}.{'bias' if path[-1] == 'bias' else 'weight'}"


def _fuse_qkv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """to_q, to_k, to_v of each block as one `attn1.to_q+to_k+to_v` tensor (q, k, v stacked on the output axis,
    DiT's fused qkv); blocks missing one of the three keep them, so the mismatch is reported."""
    fused = dict(tensors)
    for name in tensors:
        match = re.fullmatch(r"(transformer_blocks\.\d+\.attn1\.)to_q\.(weight|bias)", name)
        if match:
            parts = [f"{match[1]}to_{p}.{match[2]}" for p in "qkv"]
            if all(part in tensors for part in parts):
                fused[f"{match[1]}to_q+to_k+to_v.{match[2]}"] = np.concatenate([fused.pop(p) for p in parts])
    return fused


def _shared_embedders(tensors: dict[str, np.ndarray], depth: int) -> bool:
    """Whether every block's timestep and label embedder equals block 0's."""
    names = [n[len("transformer_blocks.0."):] for n in tensors if n.startswith("transformer_blocks.0.norm1.emb.")]
    return bool(names) and all(
        f"transformer_blocks.{i}.{n}" in tensors
        and np.array_equal(tensors[f"transformer_blocks.{i}.{n}"], tensors[f"transformer_blocks.0.{n}"])
        for i in range(1, depth) for n in names
    )  # fmt: skip


def _diffusers_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of `diffusion_pytorch_model.safetensors` (float32) or, without it, of the `.bin`."""
    file = folder / f"{DIFFUSERS_WEIGHTS_STEM}.safetensors"
    if file.is_file():
        with safetensors.safe_open(file, framework="np") as handle:
            return {name: read_tensor(file, name) for name in handle.keys()}
    bin_file = folder / f"{DIFFUSERS_WEIGHTS_STEM}.bin"
    if bin_file.is_file():
        return {name: np.asarray(t, np.float32) for name, t in read_torch_file(bin_file).items()}
    present = sorted(p.name for p in folder.iterdir())
    raise MissingWeightsError(f"{folder}: no {file.name} or {bin_file.name}; the folder holds {present}")


def read_diffusers_dit(folder: str | os.PathLike, *, dtype: str = "float32") -> tuple[ml_collections.ConfigDict, dict]:
    """(`config.model`, params as NumPy) of a diffusers DiTTransformer2DModel folder (see the module docstring);
    shared embedders when every block's equal block 0's, per-block ones otherwise; `dtype` as
    `read_dit_checkpoint`'s."""
    _check_dtype(dtype)
    folder = pathlib.Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise MissingWeightsError(f"{folder}: no {CONFIG_FILE} (expected a diffusers DiTTransformer2DModel folder)")
    source = f"diffusers folder {folder}"
    section = dit_section_from_diffusers_config(load_json(folder / CONFIG_FILE), source)
    section.dtype = dtype
    tensors = _fuse_qkv(_diffusers_tensors(folder))
    if _shared_embedders(tensors, section.depth):
        section.per_block_embedders = False
        tensors = {n: t for n, t in tensors.items()
                   if not re.fullmatch(r"transformer_blocks\.[1-9]\d*\.norm1\.emb\..*", n)}  # fmt: skip
    per_block = section.per_block_embedders
    return dit_model_config(section), _params(section, tensors, lambda p: diffusers_name(p, per_block), source)
