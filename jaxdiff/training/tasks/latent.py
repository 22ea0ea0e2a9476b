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

import logging
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import ConfigError, DataError, WeightsError
from jaxdiff.data.prior import add_class_images, class_image_count, load_class_examples
from jaxdiff.config.defaults import default_config
from jaxdiff.diffusion.scheduler_config import apply_scheduler_config
from jaxdiff.weights.files import load_json
from jaxdiff.latent.component_weights import CONFIG_FILE, read_clip_text
from jaxdiff.latent.stable_diffusion import SCHEDULER_CONFIG_FILE, read_stable_diffusion
from jaxdiff.latent.prompt_conditioning import PromptEncoder
from jaxdiff.latent.unet_weights import read_unet_condition, unet_condition_shapes
from jaxdiff.latent.pipeline import DEFAULT_STEPS, LatentPipeline
from jaxdiff.training.latent_parts import (
    KEPT_CONFIG,
    FrozenAutoencoder,
    check_same_autoencoder,
    is_sdxl_folder,
    text_encoder_config,
    text_width,
    unet_config,
)
from jaxdiff.training.latent_step import (
    LatentNetworks,
    init_lora_state,
    is_target,
    lora_targets,
    init_latent_state,
    make_grid_sampler,
    make_latent_loss_fn,
    make_latent_losses_fn,
    make_latent_train_step,
    run_scheduler,
    sdxl_time_ids,
)
from jaxdiff.training.lora_base import (
    check_lora_base,
    lora_base_identity,
    lora_scale,
    lora_target_modules,
    read_lora_base,
)
from jaxdiff.models.autoencoder import create_autoencoder
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.samplers import SAMPLERS
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.training.step import TrainState, make_optimizer
from jaxdiff.latent.word_tokenizer import SPECIAL_TOKENS, WordTokenizer

log = logging.getLogger(__name__)

SCHEDULE_KEYS = ("schedule", "num_timesteps", "beta_start", "beta_end", "mean_type")


# --------------------------------------------------------------------------- the text encoder's tokenizer and checks


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

