"""What a latent pipeline's U-Net is conditioned on, from prompts: `Conditioning` (the cross-attention context and,
for SDXL, the added conditioning) and `PromptEncoder`, the text encoders of a `LatentModels` that make it, as
diffusers' `encode_prompt` of the pipeline family.

SD 1.x / 2.x (one CLIP encoder): the context is the encoder's last hidden state, or with clip_skip k the final
LayerNorm of hidden state −(k+1) (for the prompts; negative prompts always take the last hidden state).

SDXL (text_encoder, CLIP ViT-L, and text_encoder_2, CLIPTextModelWithProjection; a refiner has only the second):
the context concatenates on the feature axis each encoder's hidden state −(k+2) (the penultimate layer for k = 0,
without the final LayerNorm; negative prompts always −2), and the added conditioning is
{"text_embeds": text_encoder_2's projected pooled output [B, P], "time_ids": [B, n]}. The time ids are SDXL's
micro-conditioning (`MICRO_CONDITIONING`, each a keyword of the pipeline's methods): base layout (6 ids)
original_size + crops_coords_top_left + target_size; refiner layout (`requires_aesthetics_score`, 5 ids)
original_size + crops_coords_top_left + (aesthetic_score,). Sizes are (height, width) in pixels and default to the
generated size; the negative ids are built as diffusers builds them (`PromptEncoder.time_ids`). With
`force_zeros_for_empty_prompt` and no negative prompts, the unconditional context and text_embeds are zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.checks import is_int, is_real, prompt_list
from jaxdiff.errors import UsageError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.models.clip_text import create_clip_text
from jaxdiff.xla_options import inference_jit

Array = jax.Array

# The SDXL micro-conditioning keywords and their defaults (None: the generated image's (height, width)).
MICRO_CONDITIONING = {
    "original_size": None, "crops_coords_top_left": (0, 0), "target_size": None, "negative_original_size": None,
    "negative_crops_coords_top_left": (0, 0), "negative_target_size": None, "aesthetic_score": 6.0,
    "negative_aesthetic_score": 2.5,
}  # fmt: skip
AESTHETIC_KEYS = ("aesthetic_score", "negative_aesthetic_score")  # refiner layout only
TARGET_KEYS = ("target_size", "negative_target_size")  # base layout only


class Conditioning(NamedTuple):
    """The U-Net's conditioning for B images: context [B, L, D] (cross-attention) and added_cond (SDXL's
    {"text_embeds": [B, P], "time_ids": [B, n]}, float32; None for U-Nets without an added embedding). A pytree:
    guidance concatenates the unconditional and conditional ones leaf by leaf."""

    context: Array
    added_cond: dict | None = None


def _pair(name: str, value, low: int) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) and v >= low for v in value)
    if not ok:
        raise UsageError(f"{name}={value!r} must be a pair of ints >= {low} (height, width)")
    return int(value[0]), int(value[1])


class PromptEncoder:
    """The text encoders of `model` (params keys "text" and, for SDXL, "text_2"): `encode` prompts into the
    (cond, uncond) `Conditioning` pair, `time_ids` SDXL's micro-conditioning (module docstring)."""

    def __init__(self, model: LatentModels):
        self.sdxl = model.text_config_2 is not None
        self.aesthetics = model.requires_aesthetics_score
        self.force_zeros = model.force_zeros_for_empty_prompt
        parts = [("text", model.text_config, model.tokenizer), ("text_2", model.text_config_2, model.tokenizer_2)]
        self.encoders = [(key, create_clip_text(config), tokenizer) for key, config, tokenizer in parts
                         if config is not None]  # fmt: skip
        self.params = {key: params for key, params in (("text", model.text_params), ("text_2", model.text_params_2))
                       if params is not None}  # fmt: skip
        # clip_skip k takes hidden state −(k+1) (SD) or −(k+2) (SDXL) of every encoder.
        self.max_clip_skip = min(config.num_hidden_layers for config in (model.text_config, model.text_config_2)
                                 if config is not None) - (1 if self.sdxl else 0)  # fmt: skip
        self._encode = inference_jit(self._encode_ids, static_argnames="clip_skip")

    def _encode_ids(self, params: dict, ids: dict, clip_skip: int) -> tuple[Array, Array | None]:
        """(context [N, L, D], pooled [N, P] or None) of token ids {params key: int [N, L]}."""
        contexts, pooled = [], None
        for key, module, _ in self.encoders:
            out = module.apply({"params": params[key]}, ids[key], clip_skip=0 if self.sdxl else clip_skip)
            contexts.append(out.hidden_states[-(clip_skip + 2)] if self.sdxl else out.prompt_embeds)
            pooled = out.text_embeds
        return jnp.concatenate(contexts, axis=-1), pooled if self.sdxl else None

    def check_clip_skip(self, clip_skip) -> int:
        if not is_int(clip_skip, numpy=False) or not 0 <= clip_skip <= self.max_clip_skip:
            raise UsageError(f"clip_skip={clip_skip!r} must be an int in 0..{self.max_clip_skip}")
        return clip_skip

    def time_ids(self, size: tuple[int, int], options: dict, *, image_to_image: bool) -> tuple | None:
        """(cond, uncond) time ids, float32 [n] each, for images of `size` (height, width) and the
        micro-conditioning keywords `options` (MICRO_CONDITIONING), checked here; None for a U-Net without
        them (any keyword refused). The negative ids are as diffusers': StableDiffusionXLPipeline takes
        negative_original_size, negative_crops_coords_top_left and negative_target_size only when both sizes are
        given (else the positive ids; one alone is refused); StableDiffusionXLImg2ImgPipeline defaults the negative sizes to the
        positive ones and, in the base layout, takes crops_coords_top_left (not the negative one)."""
        unknown = [key for key in options if key not in MICRO_CONDITIONING]
        if unknown:
            raise UsageError(f"unknown keyword {unknown[0]!r}; the micro-conditioning keywords are "
                             f"{list(MICRO_CONDITIONING)}")  # fmt: skip
        if not self.sdxl:
            if options:
                raise UsageError(f"{next(iter(options))} is SDXL's micro-conditioning; this model takes none")
            return None
        refused = TARGET_KEYS if self.aesthetics else AESTHETIC_KEYS
        for key in refused:
            if key in options:
                raise UsageError(f"{key} applies to SDXL folders with requires_aesthetics_score="
                                 f"{not self.aesthetics}; this one has {self.aesthetics}")  # fmt: skip
        o = {**MICRO_CONDITIONING, **options}
        for key in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
            o[key] = size if o[key] is None and not key.startswith("negative") else o[key]
            o[key] = None if o[key] is None else _pair(key, o[key], 1)
        for key in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            o[key] = _pair(key, o[key], 0)
        for key in AESTHETIC_KEYS:
            if not is_real(o[key], finite=True):
                raise UsageError(f"{key}={o[key]!r} must be a finite number")
        positive = o["original_size"] + o["crops_coords_top_left"]
        positive += (o["aesthetic_score"],) if self.aesthetics else o["target_size"]
        if image_to_image:
            negative_original = o["negative_original_size"] or o["original_size"]
            if self.aesthetics:
                negative = negative_original + o["negative_crops_coords_top_left"] + (o["negative_aesthetic_score"],)
            else:
                negative = negative_original + o["crops_coords_top_left"] + (o["negative_target_size"] or o["target_size"])
        elif o["negative_original_size"] is not None and o["negative_target_size"] is not None:
            negative = o["negative_original_size"] + o["negative_crops_coords_top_left"] + o["negative_target_size"]
        else:
            ignored = [key for key in options if key.startswith("negative_")]
            if ignored:
                raise UsageError(f"{ignored[0]} applies (in text_to_image, as diffusers) only with both "
                                 "negative_original_size and negative_target_size")  # fmt: skip
            negative = positive
        return np.asarray(positive, np.float32), np.asarray(negative, np.float32)

    def encode(self, params: dict, prompts, negative_prompts, *, clip_skip: int = 0, time_ids: tuple | None = None,
               prompts_2=None, negative_prompts_2=None) -> tuple[Conditioning, Conditioning]:  # fmt: skip
        """(cond, uncond) for `prompts` (a string or list) and `negative_prompts` (one per prompt; None: the empty
        prompt, or zeros with force_zeros_for_empty_prompt; unused without guidance), with the text encoders' `params`
        ({"text", "text_2"} as present) and `time_ids` from `time_ids` (SDXL). SDXL base: `prompts_2` and
        `negative_prompts_2` are what text_encoder_2 reads (None: `prompts`, `negative_prompts`), as diffusers'
        prompt_2 and negative_prompt_2; refused elsewhere (a refiner's only encoder reads `prompts`)."""
        prompts = prompt_list(prompts, "prompts")
        for name, value in (("prompts_2", prompts_2), ("negative_prompts_2", negative_prompts_2)):
            if value is not None and len(self.encoders) < 2:
                what = "a refiner's only text encoder reads prompts" if self.sdxl else "this model has one text encoder"
                raise UsageError(f"{name} is what SDXL's second text encoder reads; {what}")
        zeros = negative_prompts is None and self.force_zeros
        if zeros and negative_prompts_2 is not None:
            raise UsageError("negative_prompts_2 needs negative_prompts: without them this model's unconditional "
                             "embeddings are zeros (force_zeros_for_empty_prompt), as diffusers'")  # fmt: skip
        negative = [""] * len(prompts) if negative_prompts is None else prompt_list(negative_prompts, "negative_prompts")
        texts = {"prompts": prompts, "negative_prompts": negative}
        for name, value, default in (("prompts_2", prompts_2, prompts), ("negative_prompts_2", negative_prompts_2,
                                                                          negative)):  # fmt: skip
            texts[name] = default if value is None else prompt_list(value, name)
        for name, value in texts.items():
            if len(value) != len(prompts):
                raise UsageError(f"{len(value)} {name} for {len(prompts)} prompts; give one per prompt")
        pair = []
        for first, second, skip in (("prompts", "prompts_2", clip_skip), ("negative_prompts", "negative_prompts_2", 0)):
            if zeros and first == "negative_prompts":
                pair.append(jax.tree.map(jnp.zeros_like, pair[0]))
                continue
            # diffusers pairs the encoders with (prompt, prompt_2) in order: a refiner's only one reads prompt.
            ids = {key: jnp.asarray(tokenizer(texts[name]).input_ids)
                   for (key, _, tokenizer), name in zip(self.encoders, (first, second))}  # fmt: skip
            pair.append(self._encode(params, ids, clip_skip=skip))
        out = []
        for (context, pooled), ids in zip(pair, (None, None) if time_ids is None else time_ids, strict=True):
            added = None
            if self.sdxl:
                added = {"text_embeds": pooled, "time_ids": jnp.broadcast_to(jnp.asarray(ids), (len(prompts), len(ids)))}
            out.append(Conditioning(context, added))
        return out[0], out[1]


def rescale_guided(guided: Array, conditional: Array, rescale: float) -> Array:
    """Guidance rescale (Lin et al. 2023, §3.4; diffusers' `rescale_noise_cfg`): the guided output [B, ...]
    rescaled to the conditional output's per-image standard deviation (unbiased, over all but the batch axis),
    mixed back as rescale·rescaled + (1 − rescale)·guided."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(conditional, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return rescale * (guided * ratio) + (1.0 - rescale) * guided


def check_fraction(name: str, value) -> float:
    """`value` as a float in the open interval (0, 1); UsageError naming `name` otherwise."""
    if not is_real(value, finite=True) or not 0.0 < value < 1.0:
        raise UsageError(f"{name}={value!r} must be a number in (0, 1)")
    return float(value)


def cutoff_step(num_train: int, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff: round(T − fraction·T), the training step where denoising_end stops
    (steps >= it are run) and denoising_start begins (steps < it)."""
    return int(round(num_train - fraction * num_train))

