"""Checking whole configs: `validate` (every value against its spec, then the values that must agree with each
other) and `config_from_dict`, a saved config read back onto the schema."""

from __future__ import annotations

import ml_collections

from jaxdiff.models.autoencoder import autoencoder_model_config
from jaxdiff.config.defaults import default_config
from jaxdiff.config.specs import ConfigError, flat_keys, spec_of, unknown_key_error
from jaxdiff.diffusion.continuous import CONTINUOUS_LOSSES, process_from_config
from jaxdiff.models.networks import create_model
from jaxdiff.processes import PROCESSES
from jaxdiff.samplers import CONTINUOUS_SAMPLERS, SAMPLERS


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
    if config.task == "autoencoder":
        _check_autoencoder(config.autoencoder)
        return config
    if config.model.network == "ddpm_unet":
        _check_unet(config)
    else:
        _check_network_section(config.model)
    _check_process(config)
    return config


def _check_autoencoder(ae: ml_collections.ConfigDict) -> None:
    """The autoencoder builds, reconstructs what it encodes and fits its images."""
    try:
        autoencoder_model_config(ae)
    except ValueError as err:
        raise ConfigError(f"config autoencoder: {err}") from None
    if ae.out_channels != ae.in_channels:
        raise ConfigError(f"config autoencoder.out_channels={ae.out_channels} must equal autoencoder.in_channels="
                          f"{ae.in_channels} to train it on reconstructions")  # fmt: skip
    factor = 2 ** (len(ae.block_out_channels) - 1)
    if ae.sample_size % factor:
        raise ConfigError(
            f"config autoencoder.sample_size={ae.sample_size} must be divisible by 2^{len(ae.block_out_channels) - 1} "
            f"(autoencoder.block_out_channels has {len(ae.block_out_channels)} levels, each but the last halving)"
        )


def _check_unet(config: ml_collections.ConfigDict) -> None:
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


def _check_network_section(model: ml_collections.ConfigDict) -> None:
    """The NCSN++ / SongUNet section agrees with the model's image size, channels and classes, and builds."""
    if model.network == "ncsnpp":
        if model.num_classes:
            raise ConfigError(f"config model.num_classes={model.num_classes} but model.network='ncsnpp' is "
                              "unconditional; expected 0 or model.network='song_unet'")  # fmt: skip
        pairs = (("ncsnpp.image_size", "image_size"), ("ncsnpp.num_channels", "in_channels"))
    else:
        pairs = (("song_unet.img_resolution", "image_size"), ("song_unet.in_channels", "in_channels"),
                 ("song_unet.out_channels", "in_channels"), ("song_unet.label_dim", "num_classes"))  # fmt: skip
    for own, shared in pairs:
        section, key = own.split(".")
        if model[section][key] != model[shared]:
            raise ConfigError(f"config model.{own}={model[section][key]} must equal model.{shared}={model[shared]}")
    try:
        create_model(model)
    except ValueError as err:
        raise ConfigError(f"config model.{model.network}: {err}") from None


def _check_process(config: ml_collections.ConfigDict) -> None:
    """The loss, network and sampler suit the process; a continuous process's parameters are consistent."""
    dc, sc = config.diffusion, config.sampling
    if dc.process == "discrete":
        if not config.data.centered:
            raise ConfigError("config data.centered=False needs a continuous diffusion.process; the discrete schedule "
                              "models data in [-1, 1]")  # fmt: skip
        if dc.loss_type in CONTINUOUS_LOSSES:
            raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}), got 'discrete'")  # fmt: skip
        if config.model.network != "ddpm_unet":
            raise ConfigError(f"config model.network={config.model.network!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}); the discrete schedule runs model.network='ddpm_unet'")  # fmt: skip
        if sc.sampler not in SAMPLERS:
            raise ConfigError(f"config sampling.sampler={sc.sampler!r} needs a continuous diffusion.process; "
                              f"the discrete schedule takes one of {SAMPLERS}")  # fmt: skip
        if sc.steps > dc.num_timesteps:
            raise ConfigError(
                f"config sampling.steps={sc.steps} exceeds diffusion.num_timesteps={dc.num_timesteps}"
            )
        return
    if dc.loss_type not in CONTINUOUS_LOSSES:
        raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} is a discrete-schedule loss; "
                          f"diffusion.process={dc.process!r} needs one of {CONTINUOUS_LOSSES}")  # fmt: skip
    if sc.sampler not in CONTINUOUS_SAMPLERS:
        raise ConfigError(f"config sampling.sampler={sc.sampler!r} is for the discrete schedule; "
                          f"diffusion.process={dc.process!r} takes one of {CONTINUOUS_SAMPLERS}")  # fmt: skip
    if sc.s_max < sc.s_min:
        raise ConfigError(f"config sampling.s_max={sc.s_max} must be >= sampling.s_min={sc.s_min}")
    try:
        process_from_config(dc)
    except ValueError as err:
        raise ConfigError(f"config diffusion (process {dc.process!r}): {err}") from None
