"""The flow_lora task: LoRA adapters of the frozen transformer of an SD3 / SD3.5 or Flux.1 diffusers folder trained
by flow matching on a captioned image folder, as diffusers' train_dreambooth_lora_sd3.py /
train_dreambooth_lora_flux.py train them (the step: `jaxdiff.training.flow_lora_step`).

`flow.pretrained` names the folder; it is read once (`SD3Pipeline.read` / `FluxPipeline.read`): the transformer, stored in
`training.lora.base_dtype` and never trained, the text encoders and the autoencoder, all frozen. A folder of any
other pipeline class is refused naming its class. Each step (jitted, nothing precomputed):
  - the images uint8 [B, H, W, 3] become latents [B, H/f, W/f, 16] in the transformer's scale
    (z − shift_factor)·scaling_factor, z a posterior sample of the autoencoder (`encode_to_latents`);
  - each caption is replaced by the empty prompt with probability `flow.caption_dropout`, then encoded by the
    frozen text encoders as the folder's pipeline encodes prompts (`SD3Pipeline._embed`: CLIP-L, CLIP-G and T5
    context with the pooled CLIP projections; `FluxPipeline._embed`: T5 context, CLIP pooled), T5 on
    `flow.max_sequence_length` tokens (0: the scripts' defaults, SD3 77, Flux 512);
  - `make_flow_lora_train_step` draws t (`flow.t_sampling`, `logit_mean`, `logit_std`, `mode_scale`, then
    `flow.shift`; 0: the folder scheduler's shift, 1 where it shifts dynamically, as Flux's), ε and trains the
    adapters on the velocity with `flow.weighting`; SD3 preconditions the outputs (x̂_0 = x_t − t·v̂ against x_0,
    its script's default), Flux does not (its script has no such option); a guidance-distilled Flux (dev) gets
    the constant `flow.guidance` (its script's --guidance_scale).
The encoders' draws come from fold_in(fold_in(state.rng, step), ENCODE_STREAM) (the posterior sample first, then the
dropout), the step's own from fold_in(state.rng, step). Adapters (`training.lora.rank`, `alpha`, `target_modules`:
peft suffixes of the transformer's diffusers module names) start at ΔW = 0; EMA, checkpoints and resumption are the
training loop's. Checkpoints hold the adapters and, in the extras, the folder's path and the SHA-256 of its
transformer's weights (`lora_base`: resuming on other weights is refused) and the grid's captions.

Grids: one image per caption of examples 0..N−1 of the dataset, drawn by the folder's pipeline loop (its
FlowMatchEuler scheduler; `sampling.sampler` is not read) with the EMA adapters added to the frozen weights,
`sampling.steps` steps (0: 28) and `sampling.guidance` (0: the pipeline's default; SD3: classifier-free guidance
with the empty prompt when > 1; Flux dev: the embedded guidance scale; Flux schnell takes none). `jaxdiff convert
--to diffusers-lora` writes the adapters as diffusers' `save_lora_weights` does (`transformer.<module>.lora_A`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import sharding
from jaxdiff.config.defaults import default_config
from jaxdiff.errors import ConfigError, DataError
from jaxdiff.latent.component_weights import component_folder, param_shapes, read_config
from jaxdiff.latent.flow_pipeline import folder_pipeline_class
from jaxdiff.latent.flow_scheduler import network_timesteps
from jaxdiff.latent import flux_pipeline, sd3
from jaxdiff.latent.pipeline import encode_to_latents
from jaxdiff.models import flux, mmdit
from jaxdiff.training.flow_lora_step import make_flow_lora_train_step
from jaxdiff.training.latent_step import (
    drop_captions,
    init_lora_state,
    is_target,
    lora_targets,
    lora_unet_params,
)
from jaxdiff.training.step import TrainState, make_optimizer, preprocess
from jaxdiff.training.lora_base import check_lora_base, lora_base_identity, lora_scale, lora_target_modules

FAMILY_OF_CLASS = {**dict.fromkeys(sd3.SD3_PIPELINE_CLASSES, "sd3"),
                   **dict.fromkeys(flux_pipeline.FLUX_PIPELINE_CLASSES, "flux")}  # fmt: skip
# family -> (pipeline class, folder reader, transformer config function, module constructor, tracing inputs)
FAMILIES = {
    "sd3": (sd3.SD3Pipeline, sd3.SD3Pipeline.read, mmdit.mmdit_config, mmdit.create_mmdit,
            lambda module, config: mmdit.example_inputs(module, size=config.patch_size)),
    "flux": (flux_pipeline.FluxPipeline, flux_pipeline.FluxPipeline.read, flux.flux_config, flux.create_flux,
             lambda module, config: flux.example_inputs(module)),
}  # fmt: skip
T5_KEY = {"sd3": "text_3", "flux": "text_2"}  # the T5 encoder's params / tokenizer key in each family's pipeline
DEFAULT_LENGTH = {"sd3": 77, "flux": 512}  # the scripts' --max_sequence_length defaults
ENCODE_STREAM = 1  # fold_in index of the encoders' draws (posterior sample, caption dropout)


def flow_family(config: ml_collections.ConfigDict) -> str:
    """"sd3" or "flux": the family of the `flow.pretrained` folder; ConfigError in one line naming its class."""
    folder = config.flow.pretrained
    if not folder:
        raise ConfigError("config flow.pretrained is empty: task 'flow_lora' trains LoRA adapters of an SD3 or Flux "
                          "diffusers folder (--config.flow.pretrained=PATH)")  # fmt: skip
    if not os.path.isdir(folder):
        raise ConfigError(f"config flow.pretrained={folder!r} is not a folder")
    pipeline_class = folder_pipeline_class(folder)
    if pipeline_class not in FAMILY_OF_CLASS:
        what = pipeline_class or "folder without model_index.json"
        raise ConfigError(f"config flow.pretrained={folder!r} is a {what} folder; task 'flow_lora' trains "
                          f"{', '.join(FAMILY_OF_CLASS)} folders")  # fmt: skip
    return FAMILY_OF_CLASS[pipeline_class]


def check_flow_lora_config(config: ml_collections.ConfigDict) -> str:
    """The family of a flow_lora run's folder, after the settings the task needs are checked (ConfigError in one
    line naming the key); the flow_lora_step settings are checked by `make_flow_lora_train_step`."""
    family = flow_family(config)
    lora, fc = config.training.lora, config.flow
    if not lora.rank:
        raise ConfigError("config training.lora.rank=0: task 'flow_lora' trains LoRA adapters only; set a rank > 0 "
                          "(diffusers' default 4)")  # fmt: skip
    if not all(lora_target_modules(lora)):
        raise ConfigError(f"config training.lora.target_modules={lora.target_modules!r}: give comma-separated module "
                          "name suffixes, e.g. 'to_k,to_q,to_v,to_out.0'")  # fmt: skip
    if fc.max_sequence_length == 1:
        raise ConfigError("config flow.max_sequence_length=1: give 0 (the script's default) or 2..512 T5 tokens")
    if config.training.grad_accum_steps != 1:
        raise ConfigError(f"config training.grad_accum_steps={config.training.grad_accum_steps}: task 'flow_lora' "
                          "takes 1 (no micro-batches)")  # fmt: skip
    if config.data.random_flip:
        raise ConfigError("config data.random_flip=True: task 'flow_lora' takes False (captions may name left and "
                          "right; the scripts' default)")  # fmt: skip
    return family


class FlowLoraTask:
    """LoRA adapters of an SD3 / Flux folder's frozen transformer, trained by flow matching (module docstring)."""

    name = "flow_lora"

    def __init__(self, config: ml_collections.ConfigDict, source=None):
        """`source` None builds the task only to describe its state (the folder's transformer config is read, not
        its weights)."""
        self.family = check_flow_lora_config(config)
        self.config = config
        pipeline_class, self._read, make_config, create, inputs = FAMILIES[self.family]
        transformer_config = read_config(component_folder(config.flow.pretrained, "transformer"), make_config)
        transformer = create(transformer_config)
        self.shapes = param_shapes(transformer, *inputs(transformer, transformer_config))
        self.targets = self._check_targets(self.shapes)
        self.tx = make_optimizer(config.training)
        self.length = config.flow.max_sequence_length or DEFAULT_LENGTH[self.family]
        guidance = self._training_guidance(transformer_config)
        fc = config.flow
        self.loss_options = dict(
            family=self.family, t_sampling=fc.t_sampling, logit_mean=fc.logit_mean, logit_std=fc.logit_std,
            mode_scale=fc.mode_scale, weighting=fc.weighting, lora_scale=lora_scale(config.training.lora),
            guidance=guidance, precondition_outputs=self.family == "sd3",
        )  # fmt: skip
        self.grid_captions = self.pipe = self.lora_base = None
        if source is not None:
            if not hasattr(source, "captions"):
                raise ConfigError(f"dataset {config.data.dataset!r} has no captions: task 'flow_lora' trains on "
                                  "captioned images (data.dataset='folder')")  # fmt: skip
            self._read_folder(pipeline_class)
            count = min(config.training.num_sample_images, source.num_examples)
            self.grid_captions = [str(c) for c in source.captions(np.arange(count))]
            self.image_size = source.image_shape[0]

    # ------------------------------------------------------------------ setup

    def _check_targets(self, shapes: dict) -> dict:
        targets = lora_target_modules(self.config.training.lora)
        found = lora_targets(shapes, targets, component="transformer")
        unmatched = [t for t in targets if not any(is_target(name, t) for name in found.values())]
        if unmatched:
            raise ConfigError(f"config training.lora.target_modules: {unmatched} match no dense module of the "
                              f"transformer of flow.pretrained={self.config.flow.pretrained!r}")  # fmt: skip
        return found

    def _training_guidance(self, transformer_config: ml_collections.ConfigDict) -> float | None:
        """flow.guidance for a guidance-distilled Flux; None otherwise, where the key must keep its default."""
        guidance = self.config.flow.guidance
        if self.family == "flux" and transformer_config.guidance_embeds:
            return guidance
        if self.family == "flux" and self.config.sampling.guidance:
            raise ConfigError(f"config sampling.guidance={self.config.sampling.guidance!r}: the Flux transformer of "
                              "flow.pretrained has no guidance embedding (schnell); grids take sampling.guidance=0")
        if guidance != default_config().flow.guidance:
            raise ConfigError(f"config flow.guidance={guidance!r}: the {self.family} transformer of flow.pretrained "
                              "has no guidance embedding; leave flow.guidance at its default")  # fmt: skip
        return None

    def _read_folder(self, pipeline_class) -> None:
        """Read the folder once: the pipeline holds the frozen networks (its transformer in base_dtype), placed on the
        run's mesh by the FSDP rule; sets `lora_base` and the shift."""
        models = self._read(self.config.flow.pretrained)
        self.lora_base = lora_base_identity(self.config.flow.pretrained, models.transformer_params)
        dtype = jnp.dtype(self.config.training.lora.base_dtype)
        cast = jax.tree.map(lambda leaf: np.asarray(leaf, dtype), models.transformer_params)
        # On the run's mesh (`training.fsdp`): the frozen networks split over "fsdp" as the adapters' state is.
        mesh = sharding.make_mesh(self.config.training.fsdp)
        self.pipe = pipeline_class(dataclasses.replace(models, transformer_params=cast), mesh)
        scheduler = self.pipe.scheduler
        shift = self.config.flow.shift or (1.0 if scheduler.use_dynamic_shifting else scheduler.shift)
        self._step = make_flow_lora_train_step(self.pipe.transformer, self.config.training, self.tx, shift=shift,
                                               **self.loss_options)  # fmt: skip
        self._empty = self.tokenize([""])

    def tokenize(self, prompts) -> dict[str, np.ndarray]:
        """{encoder key: int32 token ids [B, L]} of the prompts by the folder's tokenizers (T5: `length` tokens)."""
        ids = {}
        for key, tokenizer in self.pipe.model.tokenizers.items():
            options = {"max_length": self.length} if key == T5_KEY[self.family] else {}
            ids[key] = np.asarray(tokenizer(list(prompts), **options).input_ids, np.int32)
        return ids

    def _embed(self, ids: dict) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds [B, L', D], pooled [B, P]) of token ids, by the frozen text encoders (jittable)."""
        params = {key: self.pipe.params[key] for key in ids}
        if self.family == "sd3":
            return self.pipe._embed(params, ids["text"], ids["text_2"], ids.get("text_3"), clip_skip=0,
                                    t5_length=self.length)  # fmt: skip
        return self.pipe._embed(params, ids["text"], ids["text_2"])

    # ------------------------------------------------------------------ the Task protocol

    def check_source(self, source) -> None:
        multiple = self.pipe.latent_factor * self.pipe.token_patch
        height, width, channels = source.image_shape
        if height != width or height % multiple or channels != 3:
            raise ConfigError(f"dataset {self.config.data.dataset!r} has images of shape {tuple(source.image_shape)}; "
                              f"the {self.family} folder takes square RGB images with sides divisible by {multiple} "
                              "(model.image_size)")  # fmt: skip

    def init_state(self) -> TrainState:
        return init_lora_state(self.tx, self.config.seed, self.shapes, self.targets, self.config.training.lora.rank)

    def host_batch(self, local_batch: dict) -> dict:
        """{"image": uint8 [B, H, W, 3], and per text encoder key its token ids int32 [B, L]}."""
        if "caption" not in local_batch:
            raise DataError("task 'flow_lora' needs batches with captions")
        return {"image": np.asarray(local_batch["image"]), **self.tokenize(local_batch["caption"])}

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), ENCODE_STREAM)
        encode_rng, drop_rng = jax.random.split(key)
        pipe = self.pipe
        latents = encode_to_latents(pipe.vae, pipe.model.vae_config, pipe.params["vae"],
                                    preprocess(batch["image"], None), encode_rng)  # fmt: skip
        dropped = jax.random.bernoulli(drop_rng, self.config.flow.caption_dropout, (latents.shape[0],))
        ids = {key: drop_captions(batch[key], jnp.asarray(self._empty[key][0]), dropped) for key in self._empty}
        prompt_embeds, pooled = self._embed(ids)
        flow_batch = {"latents": jax.lax.stop_gradient(latents), "prompt_embeds": jax.lax.stop_gradient(prompt_embeds),
                      "pooled": jax.lax.stop_gradient(pooled)}  # fmt: skip
        return self._step(state, pipe.params["transformer"], flow_batch)

    def sample_grid(self, ema_params, rng) -> jax.Array:
        """float32 [N, H, W, 3] in [-1, 1]: the grid captions drawn by the pipeline loop with the EMA adapters."""
        pipe, s = self.pipe, self.config.sampling
        defaults = sd3 if self.family == "sd3" else flux_pipeline  # the pipelines' DEFAULT_STEPS, DEFAULT_GUIDANCE
        steps = s.steps or defaults.DEFAULT_STEPS
        side = self.image_size // pipe.latent_factor
        sigmas = pipe.run_levels(steps, self.image_size, self.image_size)
        timesteps = network_timesteps(pipe.scheduler, sigmas[:-1])
        cond = self._embed(self.tokenize(self.grid_captions))
        embedded, guidance, uncond = None, 1.0, None
        if self.family == "flux" and pipe.guidance_embeds:
            embedded = jnp.float32(s.guidance or defaults.DEFAULT_GUIDANCE)
        elif self.family == "sd3":
            guidance = s.guidance or defaults.DEFAULT_GUIDANCE
            if guidance > 1:
                uncond = self._embed(self.tokenize([""] * len(self.grid_captions)))
        weights = lora_unet_params(pipe.params["transformer"], ema_params["lora"], self.loss_options["lora_scale"])
        noise = jax.random.normal(rng, (len(self.grid_captions), side, side, pipe.latent_channels), jnp.float32)
        out = pipe._denoise(weights, cond, uncond, noise, jnp.asarray(sigmas), jnp.asarray(timesteps), embedded,
                            None, None, None, guidance=guidance, blend=False)  # fmt: skip
        return pipe._decode_latents(pipe.params["vae"], out) * 2.0 - 1.0

    def checkpoint_extras(self, state: TrainState) -> dict:
        return {"lora_base": self.lora_base, "family": self.family, "sample_prompts": self.grid_captions}

    def kept_params(self) -> None:
        """None: the run's frozen weights are the folder's (identified by `lora_base`), not copied."""
        return None

    def check_resumed(self, extras: dict) -> None:
        """WeightsError naming both when the checkpoint's adapters were trained on another transformer."""
        check_lora_base(extras["lora_base"], self.lora_base)

