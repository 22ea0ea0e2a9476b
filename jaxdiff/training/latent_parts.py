"""The parts of a latent run as its config and checkpoints name them: the frozen autoencoder it trains on, and the
configs of its text encoder and U-Net.

- `FrozenAutoencoder`: an autoencoder run's checkpoint or a Stable Diffusion folder's `vae/`, with its identity
  (path, checkpoint step, scaling factor), or the copy a latent run's checkpoints keep (`KEPT_CONFIG` in the
  extras, the weights as the checkpoint's kept parameters "vae").
- `text_encoder_config`, `unet_config`: the text transformer trained with the run (`config.latent.text`) or the
  `text_encoder` folder's, and the U-Net of `config.latent.unet` or of the `unet_init` folder.

The latent tasks (`jaxdiff.training.tasks.latent`, `class_latent`) build on these, and so does reading a trained
run into a pipeline (`jaxdiff.readers.workdir_pipelines`).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable

import ml_collections

from jaxdiff.config.validation import config_from_dict
from jaxdiff.errors import ConfigError, WeightsError
from jaxdiff.latent.bundle import SDXL_PIPELINE_CLASSES
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.component_weights import CONFIG_FILE, component_folder, read_autoencoder, read_config
from jaxdiff.latent.word_tokenizer import END_ID, PAD_ID, START_ID
from jaxdiff.models.autoencoder import OPTION_DEFAULTS, autoencoder_config, autoencoder_model_config
from jaxdiff.models.clip_text import clip_text_config
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.training import checkpoint
from jaxdiff.training.tasks.autoencoder import AutoencoderTask
from jaxdiff.weights.files import MODEL_INDEX_FILE, load_json

# --------------------------------------------------------------------------- the frozen autoencoder


class FrozenAutoencoder:
    """An autoencoder latent diffusion trains on: `config` (its `autoencoder_config`, scaling_factor included),
    `identity` {"path": absolute path, "step": checkpoint step or None for a Stable Diffusion folder,
    "scaling_factor"}, and its (EMA) parameters, read by `params()`. `at(path, step)` reads it where it
    lives; `kept_in(workdir)` gives the copy a latent run's checkpoints keep."""

    def __init__(self, config: ml_collections.ConfigDict, identity: dict, read_params: Callable[[], dict]):
        self.config, self.identity, self._read_params = config, identity, read_params

    @classmethod
    def at(cls, path: str, step: int | None = None) -> "FrozenAutoencoder":
        """The autoencoder at `path`: a Stable Diffusion folder, or checkpoint `step` (default: the newest) of
        an autoencoder run."""
        path = os.path.abspath(path)
        if is_autoencoder_folder(path):
            config = read_config(component_folder(path, "vae"), autoencoder_config)
            step, read = None, lambda: read_autoencoder(component_folder(path, "vae"))[1]
        else:
            run_config, step, scaling_factor = _autoencoder_run(path, step)
            config = autoencoder_model_config(run_config.autoencoder)
            config.scaling_factor = scaling_factor
            read = lambda: checkpoint.read_params(path, AutoencoderTask, step=step)[2]  # noqa: E731
        return cls(config, {"path": path, "step": step, "scaling_factor": float(config.scaling_factor)}, read)

    @classmethod
    def kept_in(cls, workdir: str) -> "FrozenAutoencoder | None":
        """The autoencoder kept by the newest readable checkpoint of the latent run at `workdir` (every step of a
        run keeps the same one); None when it has no checkpoint, or only checkpoints from before copies were kept."""
        if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
            return None
        manager = checkpoint.make_manager(workdir, read_only=True)
        try:
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    extras = checkpoint.read_extras(manager, step)
                except Exception:  # noqa: BLE001 - a damaged step: restoring reports it
                    continue
                if KEPT_CONFIG not in extras:
                    return None
                identity = extras["autoencoder"]
                return cls(config_of_kept(extras), identity, functools.partial(_read_kept, workdir, identity))
            return None
        finally:
            manager.close()

    def params(self) -> dict:
        """The autoencoder's (EMA) parameters."""
        return self._read_params()


KEPT_CONFIG = "autoencoder_config"  # the extras' entry holding the autoencoder's config


def config_of_kept(extras: dict) -> ml_collections.ConfigDict:
    """The `autoencoder_config` a latent checkpoint's extras keep."""
    saved = extras[KEPT_CONFIG]
    options = {key: saved[key] for key in OPTION_DEFAULTS}
    return autoencoder_config({key: value for key, value in saved.items() if key not in OPTION_DEFAULTS}, **options)


def _read_kept(workdir: str, identity: dict) -> dict:
    """The autoencoder parameters kept by the newest step of the latent run at `workdir` that reads (damaged
    steps skipped: restoring reports them)."""
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return checkpoint.read_kept(manager, step)["vae"]
            except Exception:  # noqa: BLE001 - orbax raises many types for damaged files
                continue
    finally:
        manager.close()
    raise checkpoint.CheckpointError(f"no checkpoint in {manager.directory} keeps a readable copy of the autoencoder "
                                     f"{describe_autoencoder(identity)}")  # fmt: skip


def is_autoencoder_folder(path: str) -> bool:
    """Whether `path` is a diffusers AutoencoderKL folder or a pipeline folder with `vae/` (not a run's workdir)."""
    if os.path.isfile(os.path.join(path, "vae", CONFIG_FILE)):
        return True
    file = os.path.join(path, CONFIG_FILE)
    return os.path.isfile(file) and load_json(pathlib.Path(file)).get("_class_name") == "AutoencoderKL"


def _autoencoder_run(path: str, step: int | None) -> tuple[ml_collections.ConfigDict, int, float]:
    """(config, step, scaling factor) of checkpoint `step` (default: newest) of the autoencoder run at `path`."""
    what = f"config latent.autoencoder={path!r}"
    if not os.path.isdir(path):
        raise WeightsError(f"{what} does not exist: give an autoencoder run's workdir or a Stable Diffusion folder")
    try:
        manager = checkpoint.make_manager(path, read_only=True)
    except checkpoint.CheckpointError:
        manager = None
    try:
        steps = sorted(manager.all_steps()) if manager is not None else []
        if not steps:
            raise WeightsError(f"{what} has no checkpoint: train the autoencoder first "
                             f"(jaxdiff train --config configs/shapes_autoencoder.py --workdir {path})")  # fmt: skip
        step = steps[-1] if step is None else step
        if step not in steps:
            raise WeightsError(f"{what} has no checkpoint at step {step}; its steps: {steps}")
        config = config_from_dict(checkpoint.restore_config(manager, step))
        extras = checkpoint.read_extras(manager, step)
    finally:
        if manager is not None:
            manager.close()
    if config.task != "autoencoder":
        raise WeightsError(f"{what} is a {config.task!r} run, not an autoencoder run")
    if "scaling_factor" not in extras:
        raise WeightsError(f"{what}: checkpoint step {step} has no latent scaling factor in its extras")
    return config, step, float(extras["scaling_factor"])


def describe_autoencoder(identity: dict) -> str:
    where = "a Stable Diffusion folder" if identity["step"] is None else f"checkpoint step {identity['step']}"
    return f"{identity['path']} ({where}, scaling factor {identity['scaling_factor']:.6g})"


def check_same_autoencoder(recorded: dict, given: dict) -> None:
    """ValueError naming both when the autoencoder a model was trained on is not the one given."""
    if recorded != given:
        raise WeightsError(f"this latent model was trained on the autoencoder {describe_autoencoder(recorded)} but is "
                         f"given {describe_autoencoder(given)}; use the autoencoder it was trained on")  # fmt: skip



# --------------------------------------------------------------------------- text encoder and U-Net configs


def trained_text_config(text: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CLIP text config of `config.latent.text`: WordTokenizer's ids (pad 0, start 2, end 3; pooled at end)."""
    return clip_text_config(dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        max_position_embeddings=text.max_length, hidden_act=text.hidden_act, bos_token_id=START_ID,
        eos_token_id=END_ID, pad_token_id=PAD_ID,
    ))  # fmt: skip


def text_encoder_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
    """(text config, prompt length in tokens) of the trained transformer or of the `text_encoder` folder."""
    folder = config.latent.text_encoder
    if not folder:
        return trained_text_config(config.latent.text), config.latent.text.max_length
    text_config = read_config(component_folder(folder, "text_encoder"), clip_text_config)
    return text_config, CLIPTokenizer.from_folder(pathlib.Path(folder) / "tokenizer").model_max_length


def is_sdxl_folder(path: str) -> bool:
    """Whether `path` is a diffusers folder whose model_index.json names an SDXL pipeline class."""
    index = pathlib.Path(path) / MODEL_INDEX_FILE
    return bool(path) and index.is_file() and load_json(index).get("_class_name") in SDXL_PIPELINE_CLASSES


def text_width(config: ml_collections.ConfigDict, text_config: ml_collections.ConfigDict) -> int:
    """The context width the U-Net reads: the text encoder's, or for SDXL both encoders' together."""
    if not is_sdxl_folder(config.latent.text_encoder):
        return text_config.hidden_size
    second = read_config(pathlib.Path(config.latent.text_encoder) / "text_encoder_2", clip_text_config)
    return text_config.hidden_size + second.hidden_size


def unet_config(config: ml_collections.ConfigDict, latent_channels: int, latent_size: int,
                text_width: int) -> ml_collections.ConfigDict:  # fmt: skip
    """The U-Net of `unet_init` (checked to fit the latents and text), else the one of `config.latent.unet`."""
    if config.latent.unet_init:
        folder = component_folder(config.latent.unet_init, "unet")
        u = read_config(folder, config_from_diffusers)
        if u.in_channels != latent_channels or u.out_channels != latent_channels or u.cross_attention_dim != text_width:
            raise ConfigError(
                f"config latent.unet_init: the U-Net of {folder} takes {u.in_channels} channels and text of width "
                f"{u.cross_attention_dim}; the autoencoder has {latent_channels} latent channels, the text encoder "
                f"width {text_width}"
            )
        return u
    u = config.latent.unet
    levels = len(u.block_out_channels)
    bad = [level for level in u.attention_levels if level >= levels]
    if bad:
        raise ConfigError(f"config latent.unet.attention_levels={u.attention_levels}: levels {bad} do not exist "
                         f"(latent.unet.block_out_channels has {levels})")  # fmt: skip
    cross = [level in u.attention_levels for level in range(levels)]
    try:
        return config_from_diffusers(dict(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
            cross_attention_dim=text_width, attention_head_dim=u.attention_heads, norm_num_groups=u.norm_num_groups,
            use_linear_projection=u.use_linear_projection,
            down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
            up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        ), dtype=u.dtype)  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"config latent.unet: {err}") from None
