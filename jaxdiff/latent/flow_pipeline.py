"""What SD3 / SD3.5 (`jaxdiff.latent.sd3`) and Flux.1 (`jaxdiff.latent.flux_pipeline`) share: their folders'
reading (`FolderSpec`, `read_flow_folder` -> `FlowModels`) and `FlowPipeline`, the flow-matching Euler loop of
diffusers' FlowMatchEulerDiscreteScheduler (`jaxdiff.latent.flow_scheduler`) behind text-to-image, image-to-image and
inpainting.

Conventions: images are NHWC, uint8 in [0, 255] or float in [0, 1]; masks [B, H, W] or [B, H, W, 1], >= 0.5 (>= 128
for uint8) where the image is repainted. Latents are NHWC [B, H/f, W/f, C] (f the autoencoder's factor, C its
latent_channels, 16) in the transformer's scale z = (vae_latent − shift_factor)·scaling_factor; `latents=` is the
noise ε, N(0, I) (default: drawn from `seed`). The state is x = (1 − σ)·x_0 + σ·ε; the transformer predicts the
velocity v = ε − x_0 and each step is x' = x + (σ_next − σ)·v, the whole run one jitted `lax.scan`. With guidance
w > 1 the velocity is v_uncond + w·(v_cond − v_uncond) from one pass on [x; x] (unconditional rows first).
Image-to-image starts at σ_0·ε + (1 − σ_0)·x_0 (diffusers' `scale_noise`) on the last steps that `strength` leaves;
inpainting blends after every step: x = (1 − m)·(σ_next·ε + (1 − σ_next)·x_0) + m·x with the latent mask m (the
pixel mask subsampled by f, nearest as torch's interpolate), so the last step leaves the image's own latents outside
the mask. The decoder then gets z/scaling_factor + shift_factor (diffusers' SD3 inpainting pipeline leaves
shift_factor out there; jaxdiff decodes every run alike).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxdiff.checks import is_int, prompt_list
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.component_weights import check_index_entry, read_autoencoder, read_clip_text, read_config
from jaxdiff.latent.flow_scheduler import (
    CLASS_NAME as SCHEDULER_CLASS,
    FlowMatchSettings,
    flow_match_settings,
    network_timesteps,
    run_sigmas,
    strength_start,
)
from jaxdiff.latent.lora import LoraAdapters
from jaxdiff.latent.pipeline import LatentPipeline, _check_number, _mask_array, guided_unet, to_uint8
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.latent.t5_tokenizer import T5Tokenizer
from jaxdiff.latent.t5_weights import read_t5_encoder
from jaxdiff.latent.transformer_single_file import read_transformer_single_file
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.param_sharding import shard_params
from jaxdiff.models.clip_text import clip_text_config
from jaxdiff.models.flux import CLASS_NAME as FLUX_TRANSFORMER_CLASS
from jaxdiff.models.t5_encoder import t5_encoder_config
from jaxdiff.weights.files import MODEL_INDEX_FILE, load_json
from jaxdiff.xla_options import inference_jit, per_step_params

Array = jax.Array

OUTPUT_TYPES = ("uint8", "float", "latent")
MAX_SEQUENCE_LENGTH = 512  # diffusers' SD3 and Flux pipelines refuse more T5 tokens
INDEX_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")
UNUSED = ("image_encoder", "feature_extractor")  # IP-adapter components jaxdiff does not run
# Text encoder kinds: the classes a model_index.json may name for the encoder and its tokenizer, the config
# function, the weights reader (folder, variant, dtype) and the tokenizer class.
ENCODER_KINDS = {
    "clip": (("CLIPTokenizer", "CLIPTokenizerFast"), clip_text_config,
             lambda folder, variant, dtype: read_clip_text(folder, variant=variant, dtype=dtype), CLIPTokenizer),
    "t5": (("T5Tokenizer", "T5TokenizerFast"), t5_encoder_config,
           lambda folder, variant, dtype: read_t5_encoder(folder, subfolder=folder.name, variant=variant, dtype=dtype),
           T5Tokenizer),
}  # fmt: skip


class Encoder(NamedTuple):
    """A text encoder of a folder: the pipeline's params key, its component and tokenizer folders, the classes
    model_index.json may name for it, its kind (ENCODER_KINDS) and whether the folder may leave both null."""

    key: str
    component: str
    tokenizer: str
    classes: tuple[str, ...]
    kind: str
    optional: bool = False


class FolderSpec(NamedTuple):
    """A pipeline family's folder: its model_index.json classes, the transformer's class, config function and
    reader, and its text encoders."""

    pipeline_classes: tuple[str, ...]
    transformer_class: str
    transformer_config: Callable[..., ml_collections.ConfigDict]
    read_transformer: Callable[..., tuple]
    encoders: tuple[Encoder, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowModels:
    """A flow-matching pipeline folder read: each network's config and float32 NumPy parameters (encoders: params
    key -> (config, params), the absent optional ones left out), the tokenizers by the same keys, and the scheduler."""

    pipeline_class: str
    transformer_config: ml_collections.ConfigDict
    transformer_params: dict
    vae_config: ml_collections.ConfigDict
    vae_params: dict
    encoders: dict
    tokenizers: dict
    scheduler: FlowMatchSettings


def _present_components(folder: pathlib.Path, spec: FolderSpec) -> dict[str, str]:
    """The components model_index.json names (key -> class), every key checked; one WeightsError line each."""
    index_file = folder / MODEL_INDEX_FILE
    index = load_json(index_file)
    pipeline_class = index.get("_class_name")
    components = {"transformer": (spec.transformer_class,), "vae": ("AutoencoderKL",), "scheduler": (SCHEDULER_CLASS,)}
    for encoder in spec.encoders:
        components[encoder.component] = encoder.classes
        components[encoder.tokenizer] = ENCODER_KINDS[encoder.kind][0]
    present = {}
    for key, value in index.items():
        named = check_index_entry(index_file, key, value, components=components, unused=UNUSED, keys=INDEX_KEYS,
                                  owner=f" for {pipeline_class}", nullable=True)  # fmt: skip
        if named is not None:
            present[key] = named
    optional = {name for e in spec.encoders if e.optional for name in (e.component, e.tokenizer)}
    for key in components:
        if key not in present and key not in optional:
            raise WeightsError(f"{index_file}: {key} is missing or null; {pipeline_class} needs it")
    for e in spec.encoders:
        if (e.component in present) != (e.tokenizer in present):
            raise WeightsError(f"{index_file}: {e.component} and {e.tokenizer} must both be given or both null")
    for key in present:
        if not (folder / key).is_dir():
            raise WeightsError(f"{folder} has no {key}/ folder ({MODEL_INDEX_FILE} names {key} {present[key]!r})")
    return present


def read_flow_folder(path: str | os.PathLike, spec: FolderSpec, check: Callable[[pathlib.Path, dict], None], *,
                     variant: str | None = None, dtype: str = "float32", config_folder: str | os.PathLike | None = None,
                     transformer_only: bool = False) -> FlowModels:  # fmt: skip
    """The `FlowModels` of a diffusers folder of `spec`; `check(folder, configs)` checks the networks' configs
    (component -> ConfigDict) against each other before any weights are read. `variant` picks the weight files'
    variant (fp16, bf16: each reader's `variant`), `dtype` the compute dtype of the transformer and text encoders
    (the VAE runs in float32 where its config's force_upcast is true, diffusers' default).

    With `config_folder`, `path` is an original single-file transformer (`jaxdiff.latent.transformer_single_file`:
    BFL's Flux.1, Stability's SD3 / SD3.5 release; `transformer_only` skips an all-in-one file's autoencoder and
    text encoders, which are otherwise refused) and everything else comes from `config_folder`, a diffusers folder
    of the same model, whose transformer config must equal the one the file's tensors give (the keys that differ
    are named in one WeightsError); its transformer weights are not read."""
    if config_folder is None:
        return _read_folder(pathlib.Path(path), spec, check, variant=variant, dtype=dtype)
    family = "flux" if spec.transformer_class == FLUX_TRANSFORMER_CLASS else "sd3"
    folder = pathlib.Path(config_folder)
    expected = read_config(folder / "transformer", spec.transformer_config, dtype=dtype).to_dict()
    rope = {"axes_dims_rope": tuple(expected["axes_dims_rope"])} if family == "flux" else {}
    file_family, config, params = read_transformer_single_file(path, transformer_only=transformer_only, dtype=dtype,
                                                               **rope)  # fmt: skip
    if file_family != family:
        raise WeightsError(f"{path} holds an original {file_family} transformer; {folder} is a {family} folder")
    given = config.to_dict()
    differ = sorted(key for key in set(given) | set(expected) if given.get(key) != expected.get(key))
    if differ:
        settings = ", ".join(f"{key}={given.get(key)!r} (folder: {expected.get(key)!r})" for key in differ)
        raise WeightsError(f"{path}: the transformer its tensors give differs from {folder}'s: {settings}")
    models = _read_folder(folder, spec, check, variant=variant, dtype=dtype, transformer=False)
    return dataclasses.replace(models, transformer_config=config, transformer_params=params)


def _read_folder(folder: pathlib.Path, spec: FolderSpec, check: Callable[[pathlib.Path, dict], None], *,
                 variant: str | None, dtype: str, transformer: bool = True) -> FlowModels:  # fmt: skip
    """`read_flow_folder` of a folder; without `transformer`, its transformer's config only (params None)."""
    present = _present_components(folder, spec)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise WeightsError(f"{folder / 'scheduler'} has no {scheduler_file.name}")
    scheduler = flow_match_settings(load_json(scheduler_file), str(scheduler_file))
    configs = {"transformer": read_config(folder / "transformer", spec.transformer_config),
               "vae": read_config(folder / "vae", autoencoder_config)}  # fmt: skip
    encoders = [e for e in spec.encoders if e.component in present]
    for e in encoders:
        configs[e.component] = read_config(folder / e.component, ENCODER_KINDS[e.kind][1])
    for key in ("latents_mean", "latents_std"):
        if configs["vae"].get(key) is not None:
            raise WeightsError(f"{folder / 'vae' / 'config.json'}: {key}={configs['vae'][key]!r}; the pipeline scales "
                               "latents by shift_factor and scaling_factor only (null)")  # fmt: skip
    check(folder, configs)
    vae_dtype = "float32" if configs["vae"].force_upcast else dtype
    if transformer:
        transformer_config, transformer_params = spec.read_transformer(folder / "transformer", variant=variant,
                                                                       dtype=dtype)  # fmt: skip
    else:
        transformer_config, transformer_params = read_config(folder / "transformer", spec.transformer_config,
                                                             dtype=dtype), None  # fmt: skip
    vae = read_autoencoder(folder / "vae", variant=variant, dtype=vae_dtype)
    return FlowModels(
        pipeline_class=load_json(folder / MODEL_INDEX_FILE)["_class_name"], transformer_config=transformer_config,
        transformer_params=transformer_params, vae_config=vae[0], vae_params=vae[1],
        encoders={e.key: ENCODER_KINDS[e.kind][2](folder / e.component, variant, dtype) for e in encoders},
        tokenizers={e.key: ENCODER_KINDS[e.kind][3].from_folder(folder / e.tokenizer) for e in encoders},
        scheduler=scheduler,
    )  # fmt: skip


def check_max_sequence_length(value) -> int:
    if not is_int(value, numpy=False) or not 2 <= value <= MAX_SEQUENCE_LENGTH:
        raise UsageError(f"max_sequence_length={value!r} must be an int in 2..{MAX_SEQUENCE_LENGTH}")
    return value


class FlowPipeline(LoraAdapters, PipelineBase):
    """The shared loop of the flow-matching pipelines (module docstring). A subclass sets `pipeline_classes`,
    `token_patch` (latent pixels per token side: SD3's patch_size, Flux's 2×2 packing), `default_size` and
    `pipeline_sigmas` (whether the pipeline passes linspace(1, 1/steps, steps) to the scheduler, as Flux's does),
    and gives `_velocity(params, x [B,h,w,C], timesteps [B] (σ·N), cond, embedded) -> v [B,h,w,C]`.
    With `offload_text_encoders`, the text encoders' parameters stay in host memory and go to the device only while
    prompts are encoded (each call copies them there and frees them after): T5-XXL's 9.5 GB (bfloat16) are not held
    beside the transformer. With a `mesh` (`jaxdiff.models.param_sharding.inference_mesh()`), every network's
    parameters are split over its
    devices by the FSDP rule (`shard_params`: each device holds its slice of each large leaf) and the compiled runs
    gather each weight where it is used: for models larger than one device's memory; the images equal the
    unsharded run's up to float rounding.
    LoRA adapters (`jaxdiff.latent.lora`: `load_lora`, `set_lora_scale`, `fuse_lora`, `unfuse_lora`) apply to the
    transformer ("transformer") and the CLIP text encoders ("text", and SD3's "text_2"); the runs use
    `_run_params`."""

    loaded = "a flow-matching text-to-image model (SD3 / Flux)"
    pipeline_classes: tuple[str, ...] = ()
    pipeline_sigmas = False
    folder_spec: FolderSpec  # the family's folder (`read`)
    check_configs: Callable[[pathlib.Path, dict], None]  # `read_flow_folder`'s check of the family's configs
    # LatentPipeline's, on this pipeline's autoencoder (self.vae, self.model.vae_config) and `_check_size`: decoding
    # to [0, 1] images, encoding [0, 1] images to posterior samples, the images' and the noise's checks.
    _decode_latents = LatentPipeline._decode_latents
    _encode_latents = LatentPipeline._encode_latents
    _checked_images = LatentPipeline._checked_images
    _noise = LatentPipeline._noise

    def __init__(self, model: FlowModels, token_patch: int, default_size: int, mesh: Mesh | None = None,
                 offload_text_encoders: bool = False):  # fmt: skip
        if model.pipeline_class not in self.pipeline_classes:
            raise UsageError(f"{type(self).__name__} does not run {model.pipeline_class} folders (it runs "
                             f"{', '.join(self.pipeline_classes)}); load them with jaxdiff.Pipeline.from_pretrained")
        self.model = model
        self.scheduler = model.scheduler
        self.vae = create_autoencoder(model.vae_config)
        self.latent_factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
        self.latent_channels = model.vae_config.latent_channels
        self.token_patch, self.default_size = token_patch, default_size
        if not isinstance(offload_text_encoders, bool):
            raise UsageError(f"offload_text_encoders={offload_text_encoders!r} must be True or False")
        networks = {"transformer": model.transformer_params, "vae": model.vae_params}
        encoders = {key: params for key, (_, params) in model.encoders.items()}
        place = jax.device_put if mesh is None else functools.partial(shard_params, mesh=mesh)
        self.mesh = mesh
        self.params = {**place(networks), **(encoders if offload_text_encoders else place(encoders))}
        self._init_lora()
        self._decode = inference_jit(self._decode_latents)
        self._encode_image = inference_jit(self._encode_latents)
        self._run = inference_jit(self._denoise, static_argnames=("guidance", "blend", "skip_guidance"))

    @classmethod
    def read(cls, path: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32",
             config_folder: str | os.PathLike | None = None, transformer_only: bool = False) -> FlowModels:
        """The `FlowModels` of a folder of this family, or of an original single-file transformer with the rest of
        such a folder `config_folder` (`read_flow_folder`); configs and model_index.json are checked before any
        weights are read."""
        return read_flow_folder(path, cls.folder_spec, cls.check_configs, variant=variant, dtype=dtype,
                                config_folder=config_folder, transformer_only=transformer_only)  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32",
                        mesh: Mesh | None = None, config_folder: str | os.PathLike | None = None,
                        transformer_only: bool = False, offload_text_encoders: bool = False) -> FlowPipeline:  # fmt: skip
        """The pipeline of a folder (`read`: `variant` picks the weight files' variant, fp16, bf16, ...; `dtype` the
        compute dtype; with `config_folder`, `path` is an original single-file transformer); `mesh` and
        `offload_text_encoders` as the class docstring says."""
        return cls(cls.read(path, variant=variant, dtype=dtype, config_folder=config_folder,
                            transformer_only=transformer_only), mesh, offload_text_encoders)  # fmt: skip

    # ------------------------------------------------------------------ pure pieces

    @abc.abstractmethod
    def _velocity(self, params: dict, x: Array, timesteps: Array, cond, embedded: Array | None) -> Array:
        """The transformer's velocity [B,h,w,C] at latents x [B,h,w,C], timesteps [B] (σ·N) and conditioning
        `cond` (a pytree of [B, ...] arrays); `embedded` the embedded guidance scale (Flux.1-dev) or None."""

    def _denoise(self, transformer_params, cond, uncond, x: Array, sigmas: Array, timesteps: Array,
                 embedded: Array | None, image_latents: Array | None, noise: Array | None, mask: Array | None,
                 skipping: Array | None = None, *, guidance: float, blend: bool,
                 skip_guidance: tuple[tuple[int, ...], float] | None = None) -> Array:  # fmt: skip
        """The run from x at sigmas[0] through sigmas [n + 1] (timesteps [n] the network's); `embedded` the
        embedded guidance (Flux.1-dev); with `blend`, inpainting's blending (module docstring); with
        `skip_guidance` (layers, scale), skip-layer guidance at the steps where `skipping` [n] (bool) is set:
        + scale·(v_cond − v_cond without those layers), as diffusers' SD3 pipeline."""

        def skip_term(model, out_cond, x, t, skip_on):
            layers, scale = skip_guidance
            return jax.lax.cond(skip_on, lambda: scale * (out_cond - model(x, t, cond, skip_layers=layers)),
                                lambda: jnp.zeros_like(out_cond))  # fmt: skip

        def velocity(x, t, skip_on):
            model = functools.partial(self._velocity, per_step_params(transformer_params, x), embedded=embedded)
            term = None if skip_guidance is None else functools.partial(skip_term, model, skip_on=skip_on)
            return guided_unet(model, cond, uncond, guidance, cond_term=term)(x, t)

        def step(x, row):
            t = jnp.full(x.shape[:1], row["timestep"])
            x_next = x + (row["sigma_next"] - row["sigma"]) * velocity(x, t, row["skip"])
            if blend:
                noised = row["sigma_next"] * noise + (1.0 - row["sigma_next"]) * image_latents
                x_next = (1.0 - mask) * noised + mask * x_next
            return x_next, None

        skips = jnp.zeros(timesteps.shape, bool) if skipping is None else skipping
        x, _ = jax.lax.scan(step, x, {"sigma": sigmas[:-1], "sigma_next": sigmas[1:], "timestep": timesteps,
                                      "skip": skips})  # fmt: skip
        return x

    def run_levels(self, steps: int, height: int, width: int) -> np.ndarray:
        """float32 [steps + 1]: the noise levels a run of `steps` at height × width pixels visits, then 0
        (`flow_scheduler.run_sigmas` of the folder's scheduler; the pipeline's own linspace(1, 1/steps, steps)
        where `pipeline_sigmas`, as Flux's)."""
        pixels_per_token = self.latent_factor * self.token_patch
        tokens = (height // pixels_per_token) * (width // pixels_per_token)
        own = np.linspace(1.0, 1.0 / steps, steps) if self.pipeline_sigmas else None
        return run_sigmas(self.scheduler, steps, image_seq_len=tokens, sigmas=own)

    # ------------------------------------------------------------------ checks

    def _check_size(self, height, width) -> tuple[int, int]:
        multiple = self.latent_factor * self.token_patch
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not is_int(value, numpy=False) or value < multiple or value % multiple:
                raise UsageError(f"{name}={value!r} must be a positive multiple of {multiple} (the autoencoder's "
                                 f"factor {self.latent_factor} × {self.token_patch} latent pixels per token)")
        return height, width

    @staticmethod
    def _negatives(negative_prompts, batch: int, guided: bool, what: str) -> list[str] | None:
        """The negative prompts of a guided run (None: the empty prompt), checked; None without guidance."""
        if not guided:
            if negative_prompts is not None:
                raise UsageError(f"negative_prompts need {what} > 1 (without guidance they are not used)")
            return None
        negative = [""] * batch if negative_prompts is None else prompt_list(negative_prompts, "negative_prompts")
        if len(negative) != batch:
            raise UsageError(f"{len(negative)} negative_prompts for {batch} prompts; give one per prompt")
        return negative

    # ------------------------------------------------------------------ the run

    def _generate(self, encode: Callable[[], tuple], guidance: float, embedded: float | None, *, batch: int,
                  steps, seed, latents, output_type, sampler=None, size=(None, None), images=None, masks=None,
                  strength=None, inpainting: bool = False,
                  skip_guidance: tuple[tuple[int, ...], float, float, float] | None = None) -> np.ndarray:  # fmt: skip
        """Text-to-image (images None), image-to-image (images) or inpainting (images, masks and `inpainting`),
        every input checked before `encode()` gives the (cond, uncond) conditioning (uncond None without
        guidance); `skip_guidance` (layers, scale, start, stop), checked by the caller: skip-layer guidance at the
        steps i with start·steps < i < stop·steps (`_denoise`)."""
        if not is_int(seed):
            raise UsageError(f"seed={seed!r} must be an int")
        if not is_int(steps, numpy=False) or steps < 1:
            raise UsageError(f"steps={steps!r} must be an int >= 1")
        if sampler is not None:
            raise UsageError(f"sampler={sampler!r}: {self.loaded} steps as its folder's {SCHEDULER_CLASS} only "
                             "(sampler=None)")  # fmt: skip
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        start, pixels, mask = 0, None, None
        if images is None:
            height, width = self._check_size(*size)
        else:
            strength = _check_number("strength", strength, 0.0, 1.0, low_open=True)
            pixels = self._checked_images(images, batch)
            height, width = pixels.shape[1:3]
            start = strength_start(steps, strength)
            if inpainting:
                f = self.latent_factor
                mask = jnp.asarray(_mask_array(masks, pixels.shape)[:, ::f, ::f])  # nearest, as torch's interpolate
        f = self.latent_factor
        shape = (batch, height // f, width // f, self.latent_channels)
        noise_rng, encode_rng = jax.random.split(jax.random.PRNGKey(seed))
        noise = self._noise(latents, shape, noise_rng)
        sigmas = self.run_levels(steps, height, width)[start:]
        if skip_guidance is not None:
            index = np.arange(start, steps)
            skipping = (index > steps * skip_guidance[2]) & (index < steps * skip_guidance[3])
        cond, uncond = encode()
        image_latents = None
        if pixels is None:
            x = noise
        else:
            image_latents = self._encode_image(self.params["vae"], jnp.asarray(pixels), encode_rng)
            x = sigmas[0] * noise + (1.0 - sigmas[0]) * image_latents
        out = self._run(self._run_params["transformer"], cond, uncond, x, jnp.asarray(sigmas),
                        jnp.asarray(network_timesteps(self.scheduler, sigmas[:-1])),
                        None if embedded is None else jnp.float32(embedded), image_latents, noise, mask,
                        None if skip_guidance is None else jnp.asarray(skipping),
                        guidance=guidance, blend=mask is not None,
                        skip_guidance=None if skip_guidance is None else skip_guidance[:2])  # fmt: skip
        if output_type == "latent":
            return np.asarray(out)
        decoded = np.asarray(self._decode(self.params["vae"], out))
        return decoded if output_type == "float" else to_uint8(decoded)


def check_guidance(name: str, value) -> float:
    """`value` as a float >= 0; UsageError naming `name` otherwise."""
    return _check_number(name, value, 0.0, math.inf, low_open=False)


def folder_pipeline_class(path: str | os.PathLike) -> str | None:
    """model_index.json's `_class_name` of a pipeline folder; None for anything else."""
    index_file = pathlib.Path(path) / MODEL_INDEX_FILE
    return load_json(index_file).get("_class_name") if index_file.is_file() else None
