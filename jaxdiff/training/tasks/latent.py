"""The latent task: text-conditioned diffusion on the latents of a frozen autoencoder (`jaxdiff.training.latent_step`).

The parts, from `config.latent`:
- `autoencoder`: an autoencoder run's workdir (the EMA parameters of its newest checkpoint, the latent
  scaling factor saved with it) or a Stable Diffusion folder (its `vae/`). Which one — path, checkpoint
  step (None for a folder) and scaling factor — is saved with every checkpoint, and so are its config (in
  the extras) and weights (the checkpoint's kept parameters): the run resumes and samples with that copy,
  whatever becomes of the autoencoder run later (continued, its steps deleted, removed). Resuming against
  another autoencoder path is refused, naming both.
- the text encoder: by default a CLIP-architecture transformer (`latent.text`) trained jointly with the
  U-Net on a word-level vocabulary of the dataset's captions (`WordTokenizer`, saved with every checkpoint;
  prompt words outside it are an error naming them); or `text_encoder`, a Stable Diffusion folder: its
  frozen `text_encoder/` with its CLIP `tokenizer/`.
- the U-Net: `latent.unet` from scratch, or `unet_init`, a Stable Diffusion folder whose U-Net is fine-tuned
  (its architecture and weights; `config.diffusion` must then be its scheduler's schedule and prediction).
  With `training.lora.rank` > 0 that U-Net stays frozen and only LoRA adapters of its `training.lora.target_modules`
  are trained (`jaxdiff.training.latent_step`): checkpoints hold the adapters alone, with the folder's path and
  the SHA-256 of its U-Net weights (`lora_base` in the extras; resuming or sampling against other weights is
  refused), and a run samples as that folder's U-Net with the adapters loaded (`LoraAdapters.load_lora`).
- SDXL (`latent.unet_init`, `latent.text_encoder` and `latent.autoencoder` one SDXL base folder; LoRA only: full
  fine-tuning of SDXL is refused): both frozen text encoders read each caption, and the U-Net gets SDXL's added
  conditioning with each image's time ids from its original size (`original_size` of the batch, which the
  `folder` dataset gives; else the image's own size), as diffusers' train_text_to_image_lora_sdxl.py
  (`jaxdiff.training.latent_step.sdxl_time_ids`). Grids are conditioned as the SDXL pipeline conditions
  (the time ids of the grid's own size; zeros for the unconditional half where the folder has
  force_zeros_for_empty_prompt); a trained run samples through the folder's SDXL `LatentPipeline`.
- DreamBooth's prior preservation (`training.prior_preservation.class_data_dir`, with `unet_init` and
  `text_encoder`, on a `folder` dataset): the class images (`jaxdiff.data.prior`; the missing ones generated
  once from `class_prompt` by the `unet_init` folder's `LatentPipeline` at the training size) are attached to the
  source, each batch holds `training.batch_size` instance examples and as many class examples ("class_image",
  "class_input_ids"), and the step trains on both: instance mse + weight·class mse, both logged
  (`loss_instance`, `loss_prior`), as diffusers' train_dreambooth_lora.py.

Latents are encoded on the fly in each step. Batches are {"image": uint8 [B,H,W,C], "input_ids": int32 [B,L]}
(SDXL: input_ids [B,2,L] and "time_ids" float32 [B,6]; `host_batch` tokenizes the captions). Grids are one image per prompt of the fixed prompt set, the captions of
examples 0..N−1 of the dataset (saved with each checkpoint as "sample_prompts" and beside each grid), drawn with
`config.sampling` (sampler, steps, guidance) as `LatentPipeline.text_to_image` does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
from collections.abc import Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import ConfigError, DataError, WeightsError
from jaxdiff.data.prior import add_class_images, class_image_count, load_class_examples
from jaxdiff.training import checkpoint
from jaxdiff.training.tasks.autoencoder import AutoencoderTask
from jaxdiff.models.autoencoder import OPTION_DEFAULTS, autoencoder_model_config
from jaxdiff.config.defaults import default_config
from jaxdiff.config.validation import config_from_dict
from jaxdiff.diffusion.scheduler_config import apply_scheduler_config
from jaxdiff.weights.files import MODEL_INDEX_FILE, load_json
from jaxdiff.latent.component_weights import (
    CONFIG_FILE,
    component_folder,
    read_autoencoder,
    read_clip_text,
    read_config,
)
from jaxdiff.latent.stable_diffusion import SCHEDULER_CONFIG_FILE, read_stable_diffusion
from jaxdiff.latent.bundle import SDXL_PIPELINE_CLASSES, LatentModels
from jaxdiff.latent.prompt_conditioning import PromptEncoder
from jaxdiff.latent.unet_weights import read_unet_condition, unet_condition_shapes
from jaxdiff.latent.pipeline import DEFAULT_STEPS, LatentPipeline
from jaxdiff.training.latent_step import (
    LatentNetworks,
    init_lora_state,
    is_target,
    lora_targets,
    trained_lora,
    init_latent_state,
    make_grid_sampler,
    make_latent_loss_fn,
    make_latent_losses_fn,
    make_latent_train_step,
    run_scheduler,
    sdxl_time_ids,
)
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.samplers import SAMPLERS
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.training.step import TrainState, make_optimizer
from jaxdiff.latent.word_tokenizer import (
    END_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    START_ID,
    WordTokenizer,
)

log = logging.getLogger(__name__)

SCHEDULE_KEYS = ("schedule", "num_timesteps", "beta_start", "beta_end", "mean_type")


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


def caption_tokenizer(captions: np.ndarray, text: ml_collections.ConfigDict) -> WordTokenizer:
    """The vocabulary of `captions`, checked to fit `config.latent.text` (embedding rows, prompt length)."""
    tokenizer = WordTokenizer.from_captions(list(captions), max_length=text.max_length)
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(f"the captions have {len(tokenizer.words)} words, {tokenizer.vocab_size} tokens with "
                         f"{len(SPECIAL_TOKENS)} special ones, but config latent.text.vocab_size="
                         f"{text.vocab_size}")  # fmt: skip
    longest = max(len(c.split()) for c in captions)
    if longest > text.max_length - 2:
        raise ConfigError(f"captions have up to {longest} words but config latent.text.max_length={text.max_length} "
                         f"holds {text.max_length - 2} (plus start and end)")  # fmt: skip
    return tokenizer


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


def check_schedule_of(config: ml_collections.ConfigDict, folder: str) -> None:
    """`config.diffusion` must be the schedule and prediction of the scheduler of the SD folder `folder`."""
    file = pathlib.Path(folder) / "scheduler" / SCHEDULER_CONFIG_FILE
    expected = ml_collections.ConfigDict({"diffusion": dict(config.diffusion), "sampling": dict(config.sampling)})
    apply_scheduler_config(expected, {**load_json(file), "_class_name": "DDPMScheduler"}, str(file))
    differ = [f"diffusion.{k}={config.diffusion[k]!r} (its {expected.diffusion[k]!r})" for k in SCHEDULE_KEYS
              if config.diffusion[k] != expected.diffusion[k]]  # fmt: skip
    if differ:
        raise ConfigError(f"config latent.unet_init={folder!r} was trained with another noise schedule: "
                         f"{', '.join(differ)}")  # fmt: skip


def check_latent_config(config: ml_collections.ConfigDict) -> None:
    """What the latent task supports of the run config; ValueError naming the key."""
    d, lc = config.diffusion, config.latent
    if not lc.autoencoder:
        raise ConfigError("config latent.autoencoder is empty: give an autoencoder run's workdir or a Stable Diffusion "
                         "folder (--config.latent.autoencoder=PATH)")  # fmt: skip
    if d.process != "discrete" or d.loss_type != "mse" or d.var_type in ("learned", "learned_range"):
        raise ConfigError(f"task 'latent' trains a discrete-schedule model with the mse loss and a fixed variance; "
                         f"got diffusion.process={d.process!r}, loss_type={d.loss_type!r}, "
                         f"var_type={d.var_type!r}")  # fmt: skip
    if config.sampling.sampler not in SAMPLERS:
        raise ConfigError(f"config sampling.sampler={config.sampling.sampler!r}: task 'latent' samples with {SAMPLERS}")
    if config.training.grad_accum_steps != 1:
        raise ConfigError(f"config training.grad_accum_steps={config.training.grad_accum_steps}: task 'latent' "
                         "takes 1 (no micro-batches)")  # fmt: skip
    if config.data.random_flip:
        raise ConfigError("config data.random_flip=True: task 'latent' takes False (captions may name left and right)")
    if lc.unet_init:
        check_schedule_of(config, lc.unet_init)
    check_lora_config(config)
    check_sdxl_config(config)
    check_prior_config(config)


def check_prior_config(config: ml_collections.ConfigDict) -> None:
    """DreamBooth's prior preservation (`training.prior_preservation`) fine-tunes a pretrained U-Net with its
    frozen text encoder (latent.unet_init, latent.text_encoder) on a captioned folder (data.dataset='folder')."""
    directory = config.training.prior_preservation.class_data_dir
    what = f"config training.prior_preservation.class_data_dir={directory!r}"
    if directory and not (config.latent.unet_init and config.latent.text_encoder):
        raise ConfigError(f"{what}: prior preservation fine-tunes a pretrained model: give latent.unet_init and "
                          "latent.text_encoder (a Stable Diffusion folder)")  # fmt: skip
    if directory and config.data.dataset != "folder":
        raise ConfigError(f"{what}: prior preservation trains on a captioned folder (data.dataset='folder'), "
                          f"got data.dataset={config.data.dataset!r}")  # fmt: skip


def check_sdxl_config(config: ml_collections.ConfigDict) -> None:
    """An SDXL folder in any of latent.unet_init / text_encoder / autoencoder must be all three, an SDXL base
    folder with both text encoders, with LoRA adapters (training.lora.rank > 0); ConfigError naming the keys."""
    lc = config.latent
    given = {key: lc[key] for key in ("unet_init", "text_encoder", "autoencoder")}
    sdxl = [key for key, value in given.items() if is_sdxl_folder(value)]
    if not sdxl:
        return
    paths = {os.path.abspath(value) if value else "" for value in given.values()}
    if len(sdxl) < 3 or len(paths) > 1:
        raise ConfigError(f"config latent.{sdxl[0]}={given[sdxl[0]]!r} is an SDXL folder: SDXL trains with "
                          "latent.unet_init, latent.text_encoder and latent.autoencoder all that folder; got "
                          + ", ".join(f"latent.{key}={value!r}" for key, value in given.items()))  # fmt: skip
    if not config.training.lora.rank:
        raise ConfigError(f"config latent.unet_init={lc.unet_init!r} is an SDXL folder: jaxdiff trains LoRA adapters of "
                          "SDXL (training.lora.rank > 0), not the whole U-Net (training.lora.rank=0)")  # fmt: skip
    folder = pathlib.Path(lc.unet_init)
    if not all((folder / part / CONFIG_FILE).is_file() for part in ("text_encoder", "text_encoder_2")):
        raise ConfigError(f"config latent.unet_init={lc.unet_init!r}: an SDXL folder without both text_encoder/ and "
                          "text_encoder_2/ (a refiner?); LoRA training takes an SDXL base folder")  # fmt: skip


def check_lora_config(config: ml_collections.ConfigDict) -> None:
    """`training.lora` fits the run: adapters (rank > 0) of a `latent.unet_init` U-Net with its frozen
    `latent.text_encoder`, target modules named; with rank 0 every other lora key at its default."""
    lora, lc = config.training.lora, config.latent
    if not lora.rank:
        defaults = default_config().training.lora
        changed = [f"training.lora.{key}={lora[key]!r}" for key in lora if lora[key] != defaults[key]]
        if changed:
            raise ConfigError(f"config {', '.join(changed)} without adapters (training.lora.rank=0): set the rank "
                              "> 0 or leave training.lora at its defaults")  # fmt: skip
        return
    what = f"config training.lora.rank={lora.rank} trains LoRA adapters of a pretrained U-Net"
    if not lc.unet_init:
        raise ConfigError(f"{what}: latent.unet_init is empty (give a Stable Diffusion folder)")
    if not lc.text_encoder:
        raise ConfigError(f"{what} with its frozen text encoder: latent.text_encoder is empty (give the Stable "
                          "Diffusion folder)")  # fmt: skip
    if not all(lora_target_modules(lora)):
        raise ConfigError(f"config training.lora.target_modules={lora.target_modules!r}: give comma-separated module "
                          "name suffixes, e.g. 'to_q,to_k,to_v,to_out.0'")  # fmt: skip


def lora_target_modules(lora: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The module name suffixes of `training.lora.target_modules`."""
    return tuple(item.strip() for item in lora.target_modules.split(","))


def lora_scale(lora: ml_collections.ConfigDict) -> float:
    """alpha / r of `training.lora` (alpha 0: alpha = r)."""
    return (lora.alpha or lora.rank) / lora.rank


def check_lora_targets(config: ml_collections.ConfigDict, shapes: dict) -> dict:
    """The kernels `training.lora.target_modules` adapts in a U-Net of parameter shapes `shapes` (`lora_targets`);
    ConfigError naming the targets that match no module."""
    targets = lora_target_modules(config.training.lora)
    found = lora_targets(shapes, targets)
    unmatched = [t for t in targets if not any(is_target(name, t) for name in found.values())]
    if unmatched:
        raise ConfigError(f"config training.lora.target_modules: {unmatched} match no dense or convolution module of "
                          f"the U-Net of latent.unet_init={config.latent.unet_init!r}")  # fmt: skip
    return found


def weights_digest(params: dict) -> str:
    """SHA-256 of a parameter tree's arrays (float32 bytes, in sorted path order): which weights a LoRA run adapts."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(params).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
    return digest.hexdigest()


def check_lora_base(recorded: dict, given: dict) -> None:
    """WeightsError naming both when the U-Net a LoRA run was trained on is not the one given."""
    if recorded != given:
        raise WeightsError(f"this LoRA run was trained on the U-Net of {recorded['path']} (weights sha256 "
                           f"{recorded['sha256'][:12]}) but is given {given['path']} (sha256 {given['sha256'][:12]}); "
                           "use the U-Net it was trained on")  # fmt: skip


def lora_base_identity(folder: str, params: dict) -> dict:
    """{"path": absolute path, "sha256"} of the U-Net `params` of the `unet_init` folder: what a LoRA run adapts."""
    return {"path": os.path.abspath(folder), "sha256": weights_digest(params)}


def read_lora_base(folder: str) -> tuple[dict, dict]:
    """(U-Net params as float32 NumPy, `lora_base_identity`) of the `unet_init` folder."""
    params = read_unet_condition(folder)[1]
    return params, lora_base_identity(folder, params)


# --------------------------------------------------------------------------- the task


class LatentTask:
    """Trains the cross-attention U-Net (and the text transformer) on a frozen autoencoder's latents."""

    name = "latent"

    def __init__(self, config: ml_collections.ConfigDict, source=None, workdir: str | None = None):
        check_latent_config(config)
        self.config = config
        lc = config.latent
        kept = FrozenAutoencoder.kept_in(workdir) if workdir is not None else None
        same = kept is not None and kept.identity["path"] == os.path.abspath(lc.autoencoder)
        self.autoencoder = kept if same else FrozenAutoencoder.at(lc.autoencoder)
        vae_config = self.autoencoder.config
        self.factor = 2 ** (len(vae_config.block_out_channels) - 1)
        image_size = source.image_shape[0] if source is not None else vae_config.sample_size
        self.text_config, self.text_length = text_encoder_config(config)
        self.unet_config = unet_config(config, vae_config.latent_channels, image_size // self.factor,
                                       text_width(config, self.text_config))  # fmt: skip
        self.image_size = image_size
        self.sdxl = is_sdxl_folder(lc.text_encoder)
        self._zero_uncond = False  # SDXL's force_zeros_for_empty_prompt, once the folder is read
        self.latent_shape = (self.unet_config.sample_size,) * 2 + (vae_config.latent_channels,)
        lora = config.training.lora
        self.unet_shapes = unet_condition_shapes(self.unet_config) if lora.rank else None
        self.lora_targets = check_lora_targets(config, self.unet_shapes) if lora.rank else None
        self.lora_base = None  # {"path", "sha256"} of the frozen U-Net of a LoRA run, once read
        self.modules = LatentNetworks(
            create_unet_condition(self.unet_config), create_clip_text(self.text_config),
            create_autoencoder(vae_config), vae_config, not lc.text_encoder, {},
            lora_scale(lora) if lora.rank else None,
        )  # fmt: skip
        self.tx = make_optimizer(config.training)
        self.scheduler = run_scheduler(config.diffusion)
        self.tokenize = self.word_tokenizer = self.grid_captions = self.networks = self._kept = None
        if source is not None:
            if config.training.prior_preservation.class_data_dir:
                source.class_examples = self._class_examples()
            self._read_captions(source)
            if self.sdxl:
                self.networks = self._sdxl_networks()
            else:
                self.networks = self.modules._replace(frozen=self._frozen_params())
            self._step, self._sample = self._make_step(), self._make_sampler()

    def _sdxl_networks(self) -> LatentNetworks:
        """The networks of an SDXL LoRA run from its folder (read once: the frozen U-Net, both text encoders and
        their tokenizers, the autoencoder); sets `tokenize` (ids [B, 2, L]) and `lora_base`."""
        models = read_stable_diffusion(self.config.latent.unet_init)
        self.lora_base = lora_base_identity(self.config.latent.unet_init, models.unet_params)
        dtype = jnp.dtype(self.config.training.lora.base_dtype)
        frozen = jax.device_put({"vae": models.vae_params, "text": models.text_params, "text_2": models.text_params_2})
        frozen["unet"] = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), models.unet_params)
        self._zero_uncond = models.force_zeros_for_empty_prompt
        tokenizers = (models.tokenizer, models.tokenizer_2)
        self.tokenize = lambda prompts: np.stack([np.asarray(t(list(prompts)).input_ids, np.int32) for t in tokenizers],
                                                 axis=1)  # fmt: skip
        return self.modules._replace(frozen=frozen, sdxl=PromptEncoder(models))

    def _class_examples(self):
        """The class images of DreamBooth's prior preservation (`jaxdiff.data.prior`); the missing ones generated
        first from `class_prompt` by the `unet_init` folder's pipeline at the training image size."""
        prior = self.config.training.prior_preservation
        directory, wanted = os.path.abspath(prior.class_data_dir), prior.num_class_images
        missing = wanted - class_image_count(directory)
        if missing > 0:
            if not prior.class_prompt:
                raise ConfigError(f"config training.prior_preservation.class_data_dir={prior.class_data_dir!r} has "
                                  f"{wanted - missing} of num_class_images={wanted} images: give "
                                  "training.prior_preservation.class_prompt to generate the rest")  # fmt: skip
            pipe = LatentPipeline.from_pretrained(self.config.latent.unet_init)
            chunk = self.config.training.batch_size
            for start in range(0, missing, chunk):
                count = min(chunk, missing - start)
                log.info("generating class images %d-%d of %d into %s", start + 1, start + count, missing, directory)
                images = pipe.text_to_image([prior.class_prompt] * count, seed=self.config.seed + start,
                                            height=self.image_size, width=self.image_size)  # fmt: skip
                add_class_images(directory, images, prior.class_prompt)
        return load_class_examples(directory, self.image_size, wanted)

    def _read_captions(self, source) -> None:
        if not hasattr(source, "captions"):
            raise ConfigError(f"dataset {self.config.data.dataset!r} has no captions: task 'latent' trains on "
                             "captioned images (e.g. data.dataset='shapes')")  # fmt: skip
        if self.config.latent.text_encoder and not self.sdxl:  # SDXL's two: `_sdxl_networks`
            clip = CLIPTokenizer.from_folder(pathlib.Path(self.config.latent.text_encoder) / "tokenizer")
            self.tokenize = lambda prompts: np.asarray(clip(list(prompts)).input_ids, np.int32)
        elif not self.config.latent.text_encoder:
            captions = source.captions(np.arange(source.num_examples))
            self.word_tokenizer = caption_tokenizer(captions, self.config.latent.text)
            self.tokenize = lambda prompts: self.word_tokenizer.encode(prompts).input_ids
        count = min(self.config.training.num_sample_images, source.num_examples)
        self.grid_captions = [str(c) for c in source.captions(np.arange(count))]

    def _frozen_params(self) -> dict:
        """The parameters that are not trained: the autoencoder's, a pretrained text encoder's and a LoRA run's
        U-Net (in `training.lora.base_dtype`)."""
        frozen = {"vae": self.autoencoder.params()}
        if self.config.latent.text_encoder:
            frozen["text"] = read_clip_text(self.config.latent.text_encoder)[1]
        frozen = jax.device_put(frozen)
        if self.modules.lora_scale is not None:
            unet, self.lora_base = read_lora_base(self.config.latent.unet_init)
            dtype = jnp.dtype(self.config.training.lora.base_dtype)
            frozen["unet"] = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), unet)
        return frozen

    def check_source(self, source) -> None:
        vae = self.autoencoder.config
        height, width, channels = source.image_shape
        if height != width or height % self.factor or channels != vae.in_channels:
            raise ConfigError(f"dataset {self.config.data.dataset!r} has images of shape {tuple(source.image_shape)}; "
                             f"the autoencoder takes square images with {vae.in_channels} channels and sides "
                             f"divisible by {self.factor}")  # fmt: skip

    def init_state(self) -> TrainState:
        if self.modules.lora_scale is not None:
            return init_lora_state(self.tx, self.config.seed, self.unet_shapes, self.lora_targets,
                                   self.config.training.lora.rank)  # fmt: skip
        unet_params = None
        if self.config.latent.unet_init:
            unet_params = read_unet_condition(self.config.latent.unet_init)[1]
        return init_latent_state(self.modules, self.tx, self.config.seed, self.latent_shape, self.text_length,
                                 unet_params)  # fmt: skip

    def _make_step(self) -> Callable:
        empty = self.tokenize([""])[0]
        prior = self.config.training.prior_preservation
        make = make_latent_losses_fn if prior.class_data_dir else make_latent_loss_fn
        loss_fn = make(self.networks, self.scheduler.schedule, self.config.diffusion,
                       caption_dropout=self.config.latent.caption_dropout, empty_ids=empty)  # fmt: skip
        return make_latent_train_step(loss_fn, self.config.training, self.tx,
                                      prior_weight=prior.weight if prior.class_data_dir else None)  # fmt: skip

    def _make_sampler(self) -> Callable:
        s = self.config.sampling
        time_ids = sdxl_time_ids([[self.image_size] * 2], self.image_size)[0] if self.sdxl else None
        return make_grid_sampler(self.networks, self.scheduler, self.tokenize(self.grid_captions),
                                 self.tokenize([""])[0], self.latent_shape, sampler=s.sampler,
                                 steps=s.steps or DEFAULT_STEPS, guidance=s.guidance, time_ids=time_ids,
                                 zero_uncond=self._zero_uncond)  # fmt: skip

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._step(state, batch)

    def host_batch(self, local_batch: dict) -> dict:
        """{"image", "input_ids"(, "time_ids")}; with prior preservation also the paired class examples' as
        "class_image", "class_input_ids"(, "class_time_ids")."""
        if "caption" not in local_batch:
            raise DataError("task 'latent' needs batches with captions")
        halves = ("", "class_") if self.config.training.prior_preservation.class_data_dir else ("",)
        batch = {}
        for half in halves:
            images = np.asarray(local_batch[half + "image"])
            batch[half + "image"], batch[half + "input_ids"] = images, self.tokenize(local_batch[half + "caption"])
            if self.sdxl:
                sizes = local_batch.get(half + "original_size", np.tile(images.shape[1:3], (len(images), 1)))
                batch[half + "time_ids"] = sdxl_time_ids(sizes, self.image_size)
        return batch

    def sample_grid(self, ema_params, rng) -> jax.Array:
        return self._sample(ema_params, rng)

    def checkpoint_extras(self, state: TrainState) -> dict:
        extras = {"autoencoder": self.autoencoder.identity, KEPT_CONFIG: self.autoencoder.config.to_dict(),
                  "sample_prompts": self.grid_captions}  # fmt: skip
        if self.word_tokenizer is not None:
            extras["tokenizer"] = self.word_tokenizer.to_json()
        if self.lora_base is not None:
            extras["lora_base"] = self.lora_base
        return extras

    def kept_params(self) -> dict:
        """{"vae": the autoencoder's parameters} (NumPy), so that the run never depends on the autoencoder's path."""
        if self._kept is None:
            self._kept = {"vae": jax.tree.map(np.asarray, self.networks.frozen["vae"])}
        return self._kept

    def check_resumed(self, extras: dict) -> None:
        """ValueError when a checkpoint's extras do not fit this run: another autoencoder (naming both), another
        caption vocabulary, or LoRA adapters of another U-Net (or adapters resumed as full fine-tuning, or back)."""
        check_same_autoencoder(extras["autoencoder"], self.autoencoder.identity)
        if ("lora_base" in extras) != (self.lora_base is not None):
            state = "LoRA adapters" if "lora_base" in extras else "a whole U-Net"
            raise WeightsError(f"the checkpoint holds {state}; resume with the training.lora.rank it was trained with")
        if self.lora_base is not None:
            check_lora_base(extras["lora_base"], self.lora_base)
        if self.word_tokenizer is not None and extras.get("tokenizer") != self.word_tokenizer.to_json():
            raise DataError("the checkpoint's caption vocabulary differs from this dataset's; resume on the same data")


# --------------------------------------------------------------------------- sampling a trained run

LORA_NAME = "run"  # the name a LoRA run's adapters are loaded under in its pipeline (`pipe.lora_scales`)
LORA_SOURCE = "training.lora adapters"  # what errors about them call them


def latent_pipeline(config: ml_collections.ConfigDict, params: dict, extras: dict) -> LatentPipeline:
    """`LatentPipeline` (text_to_image, image_to_image, inpaint) of a latent run's (EMA) `params` and the
    checkpoint's `extras`: its autoencoder (the copy the checkpoint keeps, `params["vae"]`, as `load_run` gives
    it; for a checkpoint without one, the step it was trained on where it lives, refused if that is not what
    the path now holds), its text encoder and tokenizer, and its schedule (`run_scheduler`). A LoRA run's
    pipeline is the `unet_init` folder's U-Net (checked to be the one trained on) with the run's EMA adapters
    loaded as LORA_NAME at scale 1 (`pipe.set_lora_scale`, `fuse_lora` work on them); an SDXL run's, that
    folder's SDXL pipeline with them."""
    if is_sdxl_folder(config.latent.unet_init):
        folder = extras["lora_base"]["path"]
        pipe = LatentPipeline.from_pretrained(folder)
        check_lora_base(extras["lora_base"], lora_base_identity(folder, pipe.model.unet_params))
        pipe.load_lora(trained_lora(params["lora"], lora_scale(config.training.lora), LORA_SOURCE), name=LORA_NAME)
        return pipe
    recorded = extras["autoencoder"]
    if "vae" in params and KEPT_CONFIG in extras:
        vae_config, vae_params = config_of_kept(extras), params["vae"]
    else:
        try:
            autoencoder = FrozenAutoencoder.at(recorded["path"], recorded["step"])
        except ValueError as err:
            raise WeightsError(f"this latent model was trained on the autoencoder {describe_autoencoder(recorded)}, "
                             f"which cannot be read now: {err}") from None  # fmt: skip
        check_same_autoencoder(recorded, autoencoder.identity)
        vae_config, vae_params = autoencoder.config, autoencoder.params()
    text_config, _ = text_encoder_config(config)
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    unet = unet_config(config, vae_config.latent_channels, vae_config.sample_size // factor, text_config.hidden_size)
    if config.latent.text_encoder:
        folder = pathlib.Path(config.latent.text_encoder)
        text_params, tokenizer = read_clip_text(folder)[1], CLIPTokenizer.from_folder(folder / "tokenizer")
    else:
        text_params, tokenizer = params["text"], WordTokenizer.from_json(extras["tokenizer"]).encode
    lora = "lora_base" in extras
    if lora:
        unet_params, base = read_lora_base(extras["lora_base"]["path"])
        check_lora_base(extras["lora_base"], base)
    else:
        unet_params = params["unet"]
    pipe = LatentPipeline(LatentModels(
        unet_config=unet, unet_params=unet_params, vae_config=vae_config, vae_params=vae_params,
        text_config=text_config, text_params=text_params, tokenizer=tokenizer,
        scheduler=run_scheduler(config.diffusion),
    ))  # fmt: skip
    if lora:
        pipe.load_lora(trained_lora(params["lora"], lora_scale(config.training.lora), LORA_SOURCE), name=LORA_NAME)
    return pipe
