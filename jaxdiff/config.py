"""The configuration schema: every key a run can set, with the DDPM CIFAR-10 recipe as defaults.

Files in `configs/` start from `default_config()` and override what differs.
The returned ConfigDict is locked, so setting a key that does not exist
(a typo in a config file or on the command line) raises an error naming it.
`SPECS` gives each key its type, allowed values and meaning; `validate`
checks a whole config against it before a run starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections

from jaxdiff.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from jaxdiff.samplers import SAMPLERS, SPACINGS
from jaxdiff.schedule import BETA_SCHEDULES

DATASETS = (
    "cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits", "shapes", "synthetic",
)  # fmt: skip
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 recipe (Ho et al. 2020, official code), locked: values may change, keys may not."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data_dir; "" means TFDS' default (~/tensorflow_datasets)
    c.data.random_flip = True

    c.model = ml_collections.ConfigDict()
    c.model.image_size = 32
    c.model.in_channels = 3
    c.model.out_channels = 3  # 2 * in_channels for the learned variances
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.resamp_with_conv = True
    c.model.num_classes = 0  # > 0: class-conditional, label `num_classes` is the null label
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.remat = False  # recompute ResBlock activations in the backward pass (saves memory)
    # Options of diffusers' UNet2DModel; the defaults are the official DDPM network.
    c.model.null_label = True  # class-conditional: label_emb has a row for "no label" (index num_classes)
    c.model.flip_sin_to_cos = False  # timestep embedding [cos, sin] instead of [sin, cos]
    c.model.freq_shift = 1  # timestep frequencies exp(-i·ln(10000) / (ch/2 - freq_shift))
    c.model.norm_groups = 32  # GroupNorm groups
    c.model.norm_eps = 1e-6  # GroupNorm epsilon
    c.model.act = "silu"  # ResBlock activation: silu (= swish), mish, gelu, relu
    c.model.attn_head_dim = 0  # channels per attention head; 0: one head over all channels
    c.model.temb_scale_shift = False  # the timestep embedding scales and shifts norm2 (diffusers' scale_shift)
    c.model.downsample_padding = 0  # strided conv padding: 0 = TF (0 before, 1 after), 1 = 1 each side
    c.model.resblock_down_levels = ()  # levels whose downsampler is a ResBlock with average pooling
    c.model.resblock_up_levels = ()  # levels whose upsampler is a ResBlock with nearest upsampling
    c.model.mid_attn = True  # self-attention between the two middle ResBlocks
    c.model.mid_attn_norm = True  # GroupNorm in that attention block

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.mean_type = "eps"
    c.diffusion.var_type = "fixedlarge"
    c.diffusion.loss_type = "mse"
    c.diffusion.hybrid_lambda = 0.001
    c.diffusion.min_snr_gamma = 0.0  # 0 turns min-SNR-γ weighting off

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global, over all devices and hosts
    c.training.num_train_steps = 800_000
    c.training.learning_rate = 2e-4
    c.training.warmup_steps = 5000
    c.training.grad_clip_norm = 1.0
    c.training.adam_b1 = 0.9
    c.training.adam_b2 = 0.999
    c.training.adam_eps = 1e-8
    c.training.ema_decay = 0.9999
    c.training.grad_accum_steps = 1
    c.training.label_dropout = 0.0  # probability of the null label (classifier-free guidance)
    c.training.max_consecutive_nonfinite = 10
    c.training.log_every_steps = 100
    c.training.checkpoint_every_steps = 10_000
    c.training.keep_checkpoints = 3
    c.training.sample_every_steps = 50_000
    c.training.num_sample_images = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddpm"
    c.sampling.steps = 0  # 0: all T steps
    c.sampling.eta = 0.0
    c.sampling.spacing = ""  # "": the sampler's default (uniform for ddpm/ddim, karras for the ODE solvers)
    c.sampling.clip_denoised = True
    c.sampling.guidance = 0.0
    c.sampling.batch_size = 256
    c.lock()
    return c


class ConfigError(ValueError):
    """A config key that does not exist, or a value its spec does not allow; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config key accepts. For tuples, `low`/`high` bound every item and `min_items` the length."""

    type: type  # bool, int, float, str or tuple (of ints)
    meaning: str
    choices: tuple = ()  # the allowed values, when they form a fixed set
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False  # `high` itself is not allowed
    min_items: int = 0

    def allowed(self) -> str:
        """What the spec accepts, in words: "an int >= 1", "a float in (0, 1]", "one of ('a', 'b')"."""
        if self.choices:
            return f"one of {self.choices}"
        name = {bool: "a bool", int: "an int", float: "a number", str: "a string", tuple: "a tuple of ints"}[self.type]
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            bounds = ""
        if self.type is tuple:
            length = f", at least {self.min_items}" if self.min_items else ""
            return f"{name}{bounds}{length}"
        return name + bounds

    def accepts(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if self.type is tuple:
            items = value if isinstance(value, (tuple, list)) else None
            return (
                items is not None and len(items) >= self.min_items
                and all(_is_int(item) and self._in_range(item) for item in items)
            )  # fmt: skip
        if self.type is bool:
            return isinstance(value, bool)
        if self.type is int:
            return _is_int(value) and self._in_range(value)
        if self.type is float:
            return _is_number(value) and math.isfinite(value) and self._in_range(value)
        return isinstance(value, self.type)

    def _in_range(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(meaning: str) -> Spec:
    return Spec(int, meaning, low=1)


def _fraction(meaning: str, *, high_open: bool = True) -> Spec:
    return Spec(float, meaning, low=0, high=1, high_open=high_open)


SPECS: dict[str, Spec] = {
    "seed": Spec(int, "seed of parameter initialisation, data order and sampling", low=0, high=2**32 - 1),
    "data.dataset": Spec(str, "training data", choices=DATASETS),
    "data.split": Spec(str, "split to train on, e.g. 'train'"),
    "data.data_dir": Spec(str, "TFDS data_dir; '' means TFDS' default"),
    "data.random_flip": Spec(bool, "random horizontal flips of the training images"),
    "model.image_size": _positive_int("height = width of the images, pixels"),
    "model.in_channels": _positive_int("image channels"),
    "model.out_channels": _positive_int("model output channels: in_channels, or twice that for learned variances"),
    "model.ch": _positive_int("base channel width of the U-Net"),
    "model.ch_mult": Spec(tuple, "width multiplier of each resolution level", low=1, min_items=1),
    "model.num_res_blocks": _positive_int("ResBlocks per resolution level"),
    "model.attn_resolutions": Spec(tuple, "resolutions (pixels) with self-attention", low=1),
    "model.dropout": _fraction("dropout rate in the ResBlocks"),
    "model.resamp_with_conv": Spec(bool, "3×3 convolutions in up/downsampling (else nearest/average pooling)"),
    "model.num_classes": Spec(int, "classes of a class-conditional model; 0: unconditional", low=0),
    "model.dtype": Spec(str, "compute dtype (parameters stay float32)", choices=DTYPES),
    "model.remat": Spec(bool, "recompute ResBlock activations in the backward pass"),
    "model.null_label": Spec(bool, "class-conditional models: a label num_classes meaning 'no label'"),
    "model.flip_sin_to_cos": Spec(bool, "timestep embedding [cos, sin] instead of [sin, cos]"),
    "model.freq_shift": Spec(int, "timestep frequencies exp(-i·ln(10000) / (ch/2 - freq_shift))", low=0),
    "model.norm_groups": _positive_int("GroupNorm groups"),
    "model.norm_eps": Spec(float, "GroupNorm epsilon", low=0, low_open=True),
    "model.act": Spec(str, "ResBlock activation", choices=("silu", "swish", "mish", "gelu", "relu")),
    "model.attn_head_dim": Spec(int, "channels per attention head; 0: one head", low=0),
    "model.temb_scale_shift": Spec(bool, "the timestep embedding scales and shifts the second GroupNorm"),
    "model.downsample_padding": Spec(int, "strided conv padding: 0 = TF (0 before, 1 after), 1 = 1 each side",
                                     low=0, high=1),  # fmt: skip
    "model.resblock_down_levels": Spec(tuple, "levels downsampled by a ResBlock with average pooling", low=0),
    "model.resblock_up_levels": Spec(tuple, "levels upsampled by a ResBlock with nearest upsampling", low=1),
    "model.mid_attn": Spec(bool, "self-attention between the two middle ResBlocks"),
    "model.mid_attn_norm": Spec(bool, "GroupNorm in the middle attention block"),
    "diffusion.schedule": Spec(str, "beta schedule", choices=tuple(BETA_SCHEDULES)),
    "diffusion.num_timesteps": Spec(int, "T, the number of diffusion steps", low=2),
    "diffusion.beta_start": Spec(float, "beta of the first step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.beta_end": Spec(float, "beta of the last step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.mean_type": Spec(str, "what the model predicts", choices=MEAN_TYPES),
    "diffusion.var_type": Spec(str, "reverse-process variance", choices=VAR_TYPES),
    "diffusion.loss_type": Spec(str, "training loss", choices=LOSS_TYPES),
    "diffusion.hybrid_lambda": Spec(float, "weight of the variational bound in the hybrid loss", low=0),
    "diffusion.min_snr_gamma": Spec(float, "min-SNR-γ loss weighting; 0: off", low=0),
    "training.batch_size": _positive_int("global batch size, over all devices and hosts"),
    "training.num_train_steps": _positive_int("optimizer steps of the whole run"),
    "training.learning_rate": Spec(float, "Adam learning rate after warm-up", low=0, low_open=True),
    "training.warmup_steps": Spec(int, "steps of linear learning-rate warm-up", low=0),
    "training.grad_clip_norm": Spec(float, "global gradient-norm clip; 0: off", low=0),
    "training.adam_b1": _fraction("Adam β1"),
    "training.adam_b2": _fraction("Adam β2"),
    "training.adam_eps": Spec(float, "Adam ε", low=0, low_open=True),
    "training.ema_decay": _fraction("decay of the parameters' exponential moving average", high_open=False),
    "training.grad_accum_steps": _positive_int("micro-batches accumulated per optimizer step"),
    "training.label_dropout": _fraction("probability of the null label (classifier-free guidance)"),
    "training.max_consecutive_nonfinite": _positive_int("non-finite steps in a row that stop the run"),
    "training.log_every_steps": _positive_int("steps between metric logs"),
    "training.checkpoint_every_steps": _positive_int("steps between checkpoints"),
    "training.keep_checkpoints": _positive_int("checkpoints kept in the workdir"),
    "training.sample_every_steps": _positive_int("steps between sample grids"),
    "training.num_sample_images": _positive_int("images in each sample grid"),
    "sampling.sampler": Spec(str, "sampler", choices=SAMPLERS),
    "sampling.steps": Spec(int, "sampling steps; 0: all T", low=0),
    "sampling.eta": Spec(float, "DDIM noise scale", low=0),
    "sampling.spacing": Spec(str, "timestep spacing; '': the sampler's default", choices=("",) + tuple(SPACINGS)),
    "sampling.clip_denoised": Spec(bool, "clip each predicted x_0 to [-1, 1]"),
    "sampling.guidance": Spec(float, "classifier-free guidance scale w", low=0),
    "sampling.batch_size": _positive_int("images per sampling batch"),
}


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"section.key": value} of every leaf of `config`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spec_of(key: str, default) -> Spec | None:
    """The spec of `key`: its entry in `SPECS`, else a type check derived from its default value (None: no check)."""
    if key in SPECS:
        return SPECS[key]
    kind = type(default)
    return Spec(kind, "no spec yet: type of the default") if kind in (bool, int, float, str, tuple) else None


def keys_without_spec() -> list[str]:
    """The schema's keys missing from `SPECS` (they get only a type check)."""
    return [key for key in flat_keys(default_config()) if key not in SPECS]


def unknown_key_error(key: str) -> ConfigError:
    """The error for a key the schema lacks, naming the closest valid keys (by full name, then by last part)."""
    valid = list(flat_keys(default_config()))
    by_leaf = {}
    for name in valid:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
        close += by_leaf[leaf]
    close = list(dict.fromkeys(close))[:3]
    sections = [f"{name}.*" for name, value in default_config().items() if isinstance(value, ml_collections.ConfigDict)]
    top = [name for name in default_config() if f"{name}.*" not in sections]
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys are {', '.join(top + sections)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A locked config from a (saved, JSON-like) nested dict: defaults for absent keys, lists back to tuples.

    Unknown keys are errors, so a file from a different program is not silently misread.
    """
    config = default_config()

    def assign(target: ml_collections.ConfigDict, source: dict, prefix: str) -> None:
        for key, value in source.items():
            if key not in target:
                raise unknown_key_error(f"{prefix}{key}")
            if isinstance(target[key], ml_collections.ConfigDict):
                assign(target[key], value, f"{prefix}{key}.")
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    assign(config, values, "")
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every value against its spec, then the values that must agree; returns `config`.

    Raises ConfigError naming the key, the value and what is allowed.
    """
    defaults = flat_keys(default_config())
    for key, value in flat_keys(config).items():
        if key not in defaults:
            raise unknown_key_error(key)
        spec = spec_of(key, defaults[key])
        if spec is not None and not spec.accepts(value):
            raise ConfigError(f"config {key}={value!r} is not allowed: expected {spec.allowed()} ({spec.meaning})")
    learned = config.diffusion.var_type in ("learned", "learned_range")
    expected_out = config.model.in_channels * (2 if learned else 1)
    if config.model.out_channels != expected_out:
        raise ConfigError(
            f"config model.out_channels={config.model.out_channels} but var_type="
            f"{config.diffusion.var_type!r} with {config.model.in_channels} input channels needs {expected_out}"
        )
    levels = len(config.model.ch_mult)
    if config.model.image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"config model.image_size={config.model.image_size} must be divisible by 2^{levels - 1} "
            f"(model.ch_mult has {levels} levels, each but the last halving the resolution)"
        )
    if config.sampling.steps > config.diffusion.num_timesteps:
        raise ConfigError(
            f"config sampling.steps={config.sampling.steps} exceeds diffusion.num_timesteps="
            f"{config.diffusion.num_timesteps}"
        )
    return config
