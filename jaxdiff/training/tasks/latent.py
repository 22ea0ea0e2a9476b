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

Latents are encoded on the fly in each step. Batches are {"image": uint8 [B,H,W,C], "input_ids": int32 [B,L]}
(`host_batch` tokenizes the captions). Grids are one image per prompt of the fixed prompt set, the captions of
examples 0..N−1 of the dataset (saved with each checkpoint as "sample_prompts" and beside each grid), drawn with
`config.sampling` (sampler, steps, guidance) as `LatentPipeline.text_to_image` does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from collections.abc import Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import ConfigError, DataError, WeightsError
from jaxdiff.training import checkpoint
from jaxdiff.training.tasks.autoencoder import AutoencoderTask
from jaxdiff.models.autoencoder import OPTION_DEFAULTS, autoencoder_model_config
from jaxdiff.config.defaults import default_config
from jaxdiff.config.validation import config_from_dict
from jaxdiff.diffusion.scheduler_config import apply_scheduler_config
from jaxdiff.weights.files import load_json
from jaxdiff.latent.component_weights import (
    CONFIG_FILE,
    component_folder,
    read_autoencoder,
    read_clip_text,
    read_config,
)
from jaxdiff.latent.stable_diffusion import SCHEDULER_CONFIG_FILE
from jaxdiff.latent.bundle import LatentModels
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
    make_latent_train_step,
    run_scheduler,
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


def read_lora_base(folder: str) -> tuple[dict, dict]:
    """(U-Net params as float32 NumPy, identity {"path": absolute path, "sha256"}) of the `unet_init` folder."""
    params = read_unet_condition(folder)[1]
    return params, {"path": os.path.abspath(folder), "sha256": weights_digest(params)}


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
                                       self.text_config.hidden_size)  # fmt: skip
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
            self._read_captions(source)
            self.networks = self.modules._replace(frozen=self._frozen_params())
            self._step, self._sample = self._make_step(), self._make_sampler()

    def _read_captions(self, source) -> None:
        if not hasattr(source, "captions"):
            raise ConfigError(f"dataset {self.config.data.dataset!r} has no captions: task 'latent' trains on "
                             "captioned images (e.g. data.dataset='shapes')")  # fmt: skip
        if self.config.latent.text_encoder:
            clip = CLIPTokenizer.from_folder(pathlib.Path(self.config.latent.text_encoder) / "tokenizer")
            self.tokenize = lambda prompts: np.asarray(clip(list(prompts)).input_ids, np.int32)
        else:
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
        loss_fn = make_latent_loss_fn(self.networks, self.scheduler.schedule, self.config.diffusion,
                                      caption_dropout=self.config.latent.caption_dropout, empty_ids=empty)  # fmt: skip
        return make_latent_train_step(loss_fn, self.config.training, self.tx)

    def _make_sampler(self) -> Callable:
        s = self.config.sampling
        return make_grid_sampler(self.networks, self.scheduler, self.tokenize(self.grid_captions),
                                 self.tokenize([""])[0], self.latent_shape, sampler=s.sampler,
                                 steps=s.steps or DEFAULT_STEPS, guidance=s.guidance)  # fmt: skip

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._step(state, batch)

    def host_batch(self, local_batch: dict) -> dict:
        if "caption" not in local_batch:
            raise DataError("task 'latent' needs batches with captions")
        return {"image": np.asarray(local_batch["image"]), "input_ids": self.tokenize(local_batch["caption"])}

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
    loaded as LORA_NAME at scale 1 (`pipe.set_lora_scale`, `fuse_lora` work on them)."""
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
