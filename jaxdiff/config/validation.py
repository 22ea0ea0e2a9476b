"""Checking whole configs: `validate` (every value against its spec, then the values that must agree with each
other) and `config_from_dict`, a saved config read back onto the schema."""

from __future__ import annotations

import ml_collections

from jaxdiff.models.autoencoder import autoencoder_model_config
from jaxdiff.config.defaults import default_config
from jaxdiff.config.specs import ConfigError, flat_keys, spec_of, unknown_key_error
from jaxdiff.diffusion.continuous import CONTINUOUS_LOSSES, FLOW_LOSSES, PARAMETERIZATIONS, process_from_config
from jaxdiff.diffusion.flow import PARAMETERIZATIONS as FLOW_PARAMETERIZATIONS
from jaxdiff.models.networks import create_model
from jaxdiff.processes import FLOW_PROCESSES, PROCESSES
from jaxdiff.samplers import CONTINUOUS_SAMPLERS, SAMPLERS
from jaxdiff.samplers.registry import flow_config_options

DISCRETE_NETWORKS = ("ddpm_unet", "dit")  # the networks the discrete schedule runs


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


def _check_prior_preservation(config: ml_collections.ConfigDict) -> None:
    """training.prior_preservation: only for task 'latent'; its other keys only with a class_data_dir."""
    prior, defaults = config.training.prior_preservation, default_config().training.prior_preservation
    if prior.class_data_dir and config.task != "latent":
        raise ConfigError(f"config training.prior_preservation.class_data_dir={prior.class_data_dir!r}: prior "
                          f"preservation trains a text-conditioned latent run (task 'latent'); task {config.task!r} "
                          "has no prompts")  # fmt: skip
    changed = [f"training.prior_preservation.{key}={prior[key]!r}" for key in prior
               if key != "class_data_dir" and prior[key] != defaults[key]]  # fmt: skip
    if changed and not prior.class_data_dir:
        raise ConfigError(f"config {', '.join(changed)} without training.prior_preservation.class_data_dir: give the "
                          "class image folder or leave training.prior_preservation at its defaults")  # fmt: skip


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
    if config.task not in ("latent", "flow_lora") and config.training.lora.rank:
        raise ConfigError(f"config training.lora.rank={config.training.lora.rank}: LoRA trains adapters of a latent "
                          f"run's latent.unet_init U-Net; task {config.task!r} has none")  # fmt: skip
    if config.task != "flow_lora":
        changed = [f"flow.{key}={value!r}" for key, value in config.flow.items() if value != defaults[f"flow.{key}"]]
        if changed:
            raise ConfigError(f"config {', '.join(changed)}: the flow section is task 'flow_lora''s; task "
                              f"{config.task!r} reads none of it")  # fmt: skip
    _check_prior_preservation(config)
    if config.data.latent_cache and config.task != "class_latent":
        raise ConfigError(f"config data.latent_cache={config.data.latent_cache!r} holds latents for task "
                          f"'class_latent'; task {config.task!r} reads images: set data.latent_cache=''")  # fmt: skip
    if config.task == "autoencoder":
        _check_autoencoder(config.autoencoder)
        return config
    if config.model.network == "ddpm_unet":
        _check_unet(config)
    elif config.model.network == "dit":
        _check_dit(config)
    else:
        _check_network_section(config.model)
    _check_guidance_channels(config)
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


def _check_dit(config: ml_collections.ConfigDict) -> None:
    """The DiT section agrees with the model's image size, channels, classes, output channels and null label and
    builds; its σ channels are the discrete schedule's learned_range; exactly one label dropout acts: with the
    discrete schedule training.label_dropout (the family runs the DiT with train=False, its class_dropout_prob > 0
    only adding the null-class row), with a continuous process the DiT's own class_dropout_prob."""
    model, dc, section = config.model, config.diffusion, config.model.dit
    for own, shared in (("input_size", "image_size"), ("in_channels", "in_channels"), ("num_classes", "num_classes")):
        if section[own] != model[shared]:
            raise ConfigError(f"config model.dit.{own}={section[own]} must equal model.{shared}={model[shared]}")
    try:
        network = create_model(model)
    except ValueError as err:
        raise ConfigError(f"config model.dit: {err}") from None
    if model.out_channels != network.out_channels:
        raise ConfigError(f"config model.out_channels={model.out_channels} must equal the DiT's {network.out_channels} "
                          "output channels (model.dit.in_channels, twice that with learn_sigma and "
                          "output_sigma)")  # fmt: skip
    sigma = section.learn_sigma and section.output_sigma
    if dc.process == "discrete" and sigma != (dc.var_type == "learned_range"):
        raise ConfigError(f"config model.dit.learn_sigma={section.learn_sigma} does not suit diffusion.var_type="
                          f"{dc.var_type!r}: a DiT's σ channels are the learned_range interpolation (learn_sigma=True "
                          "with var_type='learned_range', learn_sigma=False with a fixed variance)")  # fmt: skip
    if dc.process == "discrete" and sigma and dc.loss_type != "hybrid":
        raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r}: a DiT's σ channels learn through the bound; "
                          "use 'hybrid' (DiT's MSE + bound: hybrid_lambda·num_timesteps = 1)")  # fmt: skip
    if dc.process != "discrete" and sigma:
        raise ConfigError(f"config model.dit.learn_sigma=True outputs σ channels, which diffusion.process="
                          f"{dc.process!r} does not read; set model.dit.output_sigma=False (SiT's "
                          "forward)")  # fmt: skip
    if model.num_classes and model.null_label != network.null_label:
        raise ConfigError(f"config model.null_label={model.null_label} must be {network.null_label}: a DiT has the "
                          "null-class row exactly when model.dit.class_dropout_prob > 0")  # fmt: skip
    dropout = config.training.label_dropout
    if dropout and not network.null_label:
        raise ConfigError(f"config training.label_dropout={dropout} needs the DiT's null-class row: set "
                          "model.dit.class_dropout_prob > 0")  # fmt: skip
    if dropout and dc.process != "discrete":
        raise ConfigError(f"config training.label_dropout={dropout} with model.dit.class_dropout_prob="
                          f"{section.class_dropout_prob} would drop labels twice: with diffusion.process="
                          f"{dc.process!r} the DiT drops its own; set training.label_dropout=0")  # fmt: skip


def _check_guidance_channels(config: ml_collections.ConfigDict) -> None:
    """sampling.guidance_channels fits the model's channels."""
    channels = config.sampling.guidance_channels
    if channels > config.model.in_channels:
        raise ConfigError(f"config sampling.guidance_channels={channels} exceeds model.in_channels="
                          f"{config.model.in_channels}")  # fmt: skip


def _check_process(config: ml_collections.ConfigDict) -> None:
    """The loss, network and sampler suit the process; a continuous process's parameters are consistent."""
    dc, sc = config.diffusion, config.sampling
    _check_flow_sampling(sc, dc.process)
    if dc.time_reversed and dc.process not in FLOW_PROCESSES:
        raise ConfigError(f"config diffusion.time_reversed=True is a setting of the flow processes {FLOW_PROCESSES}; "
                          f"diffusion.process={dc.process!r} takes only False")  # fmt: skip
    if dc.process == "discrete":
        if not config.data.centered:
            raise ConfigError("config data.centered=False needs a continuous diffusion.process; the discrete schedule "
                              "models data in [-1, 1]")  # fmt: skip
        if dc.loss_type in CONTINUOUS_LOSSES + FLOW_LOSSES:
            raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}), got 'discrete'")  # fmt: skip
        if config.model.network not in DISCRETE_NETWORKS:
            raise ConfigError(f"config model.network={config.model.network!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}); the discrete schedule runs model.network in "
                              f"{DISCRETE_NETWORKS}")  # fmt: skip
        if sc.sampler not in SAMPLERS:
            raise ConfigError(f"config sampling.sampler={sc.sampler!r} needs a continuous diffusion.process; "
                              f"the discrete schedule takes one of {SAMPLERS}")  # fmt: skip
        if sc.steps > dc.num_timesteps:
            raise ConfigError(
                f"config sampling.steps={sc.steps} exceeds diffusion.num_timesteps={dc.num_timesteps}"
            )
        return
    flow = dc.process in FLOW_PROCESSES
    losses, kinds = (FLOW_LOSSES, FLOW_PARAMETERIZATIONS) if flow else (CONTINUOUS_LOSSES, PARAMETERIZATIONS)
    if dc.loss_type not in CONTINUOUS_LOSSES + FLOW_LOSSES:
        raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} is a discrete-schedule loss; "
                          f"diffusion.process={dc.process!r} needs one of {losses}")  # fmt: skip
    if dc.loss_type not in losses:
        raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} is not a loss of diffusion.process="
                          f"{dc.process!r}; expected one of {losses}")  # fmt: skip
    if dc.parameterization not in kinds:
        raise ConfigError(f"config diffusion.parameterization={dc.parameterization!r} is not one of diffusion.process="
                          f"{dc.process!r}; expected one of {kinds}")  # fmt: skip
    if sc.sampler not in CONTINUOUS_SAMPLERS:
        raise ConfigError(f"config sampling.sampler={sc.sampler!r} is for the discrete schedule; "
                          f"diffusion.process={dc.process!r} takes one of {CONTINUOUS_SAMPLERS}")  # fmt: skip
    if sc.s_max < sc.s_min:
        raise ConfigError(f"config sampling.s_max={sc.s_max} must be >= sampling.s_min={sc.s_min}")
    try:
        process_from_config(dc)
    except ValueError as err:
        raise ConfigError(f"config diffusion (process {dc.process!r}): {err}") from None


def _check_flow_sampling(sc: ml_collections.ConfigDict, process: str) -> None:
    """The guidance interval is ordered; it and the flow samplers' options are left at their defaults unless the
    process is a flow process (the only one that reads them)."""
    if sc.guidance_t_min > sc.guidance_t_max:
        raise ConfigError(f"config sampling.guidance_t_min={sc.guidance_t_min} must be <= sampling.guidance_t_max="
                          f"{sc.guidance_t_max}")  # fmt: skip
    if process in FLOW_PROCESSES:
        return
    defaults = default_config().sampling
    for name in ("guidance_t_min", "guidance_t_max", *flow_config_options()):
        if sc[name] != defaults[name]:
            raise ConfigError(f"config sampling.{name}={sc[name]!r} is a setting of the flow processes "
                              f"{FLOW_PROCESSES}; diffusion.process={process!r} takes only its default "
                              f"{defaults[name]!r}")  # fmt: skip
