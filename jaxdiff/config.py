"""The configuration schema: every key a run can set, with the DDPM CIFAR-10 recipe as defaults.

Files in `configs/` start from `default_config()` and override what differs.
The returned ConfigDict is locked, so setting a key that does not exist
(a typo in a config file or on the command line) raises an error naming it.
"""

from __future__ import annotations

import ml_collections

from jaxdiff.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from jaxdiff.samplers import SAMPLERS, SPACINGS

DATASETS = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits", "synthetic")
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


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A locked config from a (saved, JSON-like) nested dict: defaults for absent keys, lists back to tuples.

    Unknown keys are errors, so a file from a different program is not silently misread.
    """
    config = default_config()

    def assign(target: ml_collections.ConfigDict, source: dict, prefix: str) -> None:
        for key, value in source.items():
            if key not in target:
                raise ValueError(f"unknown config key {prefix}{key!r}")
            if isinstance(target[key], ml_collections.ConfigDict):
                assign(target[key], value, f"{prefix}{key}.")
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    assign(config, values, "")
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the keys that have a fixed set of values and their consistency; returns `config`."""
    choices = {
        "data.dataset": (config.data.dataset, DATASETS),
        "model.dtype": (config.model.dtype, DTYPES),
        "diffusion.mean_type": (config.diffusion.mean_type, MEAN_TYPES),
        "diffusion.var_type": (config.diffusion.var_type, VAR_TYPES),
        "diffusion.loss_type": (config.diffusion.loss_type, LOSS_TYPES),
        "sampling.sampler": (config.sampling.sampler, SAMPLERS),
        "sampling.spacing": (config.sampling.spacing, ("",) + tuple(SPACINGS)),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config {key}={value!r} is not one of {allowed}")
    learned = config.diffusion.var_type in ("learned", "learned_range")
    expected_out = config.model.in_channels * (2 if learned else 1)
    if config.model.out_channels != expected_out:
        raise ValueError(
            f"config model.out_channels={config.model.out_channels} but var_type="
            f"{config.diffusion.var_type!r} with {config.model.in_channels} input channels needs {expected_out}"
        )
    return config
