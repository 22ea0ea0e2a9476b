"""`Pipeline`: a trained model as an object to call — denoise one step, or sample images.

    pipe = Pipeline.from_checkpoint("runs/cifar10")        # config + EMA params of the latest step
    images = pipe.sample(16, sampler="ddim", steps=50)      # uint8 [16, 32, 32, 3]

The model's family (`jaxdiff.families`) supplies its denoiser, samplers and their settings: continuous-time
models (`config.diffusion.process` ve, vp, subvp, edm) sample with the continuous samplers
(`jaxdiff.samplers.sample_continuous`); their options (predictor, corrector, snr, n_corrector, rtol, atol,
s_churn, s_min, s_max, s_noise) default to `config.sampling` and may be passed to `sample`.

A model of the latent space of a frozen autoencoder (DiT: `Pipeline.from_pretrained("DiT-XL-2-256x256.pt",
vae=FOLDER)`, SiT: `Pipeline.from_pretrained("SiT-XL-2-256x256.pt", vae=FOLDER)`, or a diffusers DiTPipeline
folder) samples its latents with the family's samplers, or step for step as
its folder's diffusers scheduler (`jaxdiff.latent.scheduler_sampling`), and returns the decoded images; `denoise`
stays in the model's space, and `latents=` is the initial noise there for every model.

`Pipeline` and `jaxdiff.latent.pipeline.LatentPipeline` share one set of public methods
(`jaxdiff.latent.pipeline_base.PipelineBase`): a pixel-space model's `text_to_image`, `image_to_image` and
`inpaint` raise `UsageError`.

Batches are split over this process's devices. Batch i of a call with seed s
uses rng fold_in(PRNGKey(s), i), so results depend only on (seed, batch size,
settings), never on the device count.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxdiff.checks import is_int
from jaxdiff import images, sharding
from jaxdiff.diffusion.scheduler_config import SchedulerSettings
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.families import family_of
from jaxdiff.latent.decoding_autoencoder import DecodingAutoencoder
from jaxdiff.latent.pipeline import to_uint8 as pixels_to_uint8
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.latent.scheduler_sampling import SchedulerSampling
from jaxdiff.training import checkpoint
from jaxdiff.training.runs import load_run
from jaxdiff.models.networks import create_model
from jaxdiff.schedule import schedule_from_config
from jaxdiff.xla_options import inference_jit

Array = jax.Array


def load_weights(
    path: str | os.PathLike, *, step: int | None = None, dataset: str | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, EMA params) from pixel-space weights in any format of `jaxdiff.readers.formats`: a jaxdiff workdir
    (its run, `jaxdiff.training.runs.load_run`) or weights in another format (`jaxdiff.readers`).

    `step` picks a jaxdiff checkpoint (default: the latest); `dataset` picks the training recipe that
    tf and diffusers weights are given (default: the released DDPM model with their architecture), the
    recipe EDM and ScoreSdeVePipeline weights must fit (default: the one of their network and process),
    and names the training config of score_sde checkpoints (required: "vp/ddpmpp_continuous" or
    jaxdiff's "sde_vp_ddpmpp_continuous", ...). Diffusers folders hold one set of weights, used as the
    EMA params; score_sde checkpoints give their params_ema, EDM snapshots their `ema` network. Arrays
    are on this process's first device for jaxdiff workdirs and NumPy otherwise.
    """
    from jaxdiff.readers.diffusers_format import read_diffusers
    from jaxdiff.readers.formats import CONTINUOUS_FORMATS, check_source_format, read_continuous
    from jaxdiff.readers.tf_checkpoint import read_official_checkpoint

    fmt = check_source_format(path, None, step, dataset)
    if fmt == "jaxdiff":
        config, _, params = load_run(path, step=step)
        return config, params
    if fmt in CONTINUOUS_FORMATS:
        return read_continuous(path, fmt, dataset)
    if fmt == "diffusers":
        return read_diffusers(path, dataset=dataset)
    config, _, ema_params = read_official_checkpoint(path, dataset=dataset)
    return config, ema_params


class Pipeline(PipelineBase):
    """A model (`config`) with one set of parameters (normally the EMA ones) and its family (`self.family`): the
    noise schedule or process, the denoiser, the samplers.

    `autoencoder`: the frozen autoencoder whose latents the model draws (the model's space is then its latent space;
    `sample` returns decoded images). `scheduler`: a diffusers pipeline folder's scheduler settings, with which a
    discrete-schedule model samples as that scheduler steps (`sampler_source`, else the family). `class_names`:
    name -> class, for `class_label` given by name."""

    def __init__(self, config: ml_collections.ConfigDict, params, *, step: int | None = None,
                 autoencoder: DecodingAutoencoder | None = None, scheduler: SchedulerSettings | None = None,
                 class_names: dict[str, int] | None = None):  # fmt: skip
        self.config = config
        self.step = step
        self.model = create_model(config.model)
        self.family = family_of(config)
        self.schedule = schedule_from_config(config.diffusion)
        self.process = self.family.process  # None for the discrete schedule
        if scheduler is not None and self.process is not None:
            raise UsageError("a diffusers scheduler steps discrete-schedule models only; this model's process is "
                             f"{config.diffusion.process!r}")  # fmt: skip
        self.sampler_source = self.family if scheduler is None else SchedulerSampling(scheduler, self.family,
                                                                                     "scheduler")  # fmt: skip
        self.autoencoder = autoencoder
        self.class_names = dict(class_names or {})
        self.mesh = sharding.local_mesh()
        self.params = jax.device_put(params, sharding.replicated_sharding(self.mesh))
        if autoencoder is not None:
            autoencoder.check_latents(self.family.image_shape, "autoencoder")
        decoder_params = None if autoencoder is None else autoencoder.params
        self.decoder_params = jax.device_put(decoder_params, sharding.replicated_sharding(self.mesh))
        self._compiled: dict[tuple, object] = {}  # jitted functions by their static settings
        self._on_model_call: Callable[[], None] | None = None  # the running sample call's progress hook

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, step: int | None = None) -> "Pipeline":
        """The EMA parameters of a `jaxdiff train` workdir (latest step unless `step`); a latent run (task
        "latent") gives a `jaxdiff.latent.pipeline.LatentPipeline` on its autoencoder and text encoder, an SD3 / Flux
        LoRA run (task "flow_lora") its folder's pipeline with the adapters loaded; a
        class-conditional latent run (task "class_latent") samples latents decoded by the autoencoder it kept, its
        classes named by the class folders it was trained on."""
        config, step, params = load_run(path, step=step)
        if config.task == "latent":
            from jaxdiff.readers.workdir_pipelines import latent_pipeline

            return latent_pipeline(config, params, checkpoint.read_extras(path, step))
        if config.task == "flow_lora":
            from jaxdiff.readers.workdir_pipelines import flow_lora_pipeline

            return flow_lora_pipeline(config, params, checkpoint.read_extras(path, step))
        if config.task == "class_latent":  # the network on its autoencoder's latents, labels named by class
            from jaxdiff.readers.workdir_pipelines import class_latent_parts

            model_params, autoencoder, names = class_latent_parts(params, checkpoint.read_extras(path, step))
            return cls(config, model_params, step=step, autoencoder=autoencoder, class_names=names)
        if config.task != "diffusion":
            raise WeightsError(f"{path} is a run of task {config.task!r}, which draws no samples; give a diffusion or "
                             f"latent run's workdir (an autoencoder run serves as config.latent.autoencoder)")
        return cls(config, params, step=step)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, step: int | None = None, config: str | None = None,
                        vae: str | os.PathLike | None = None, variant: str | None = None,
                        dtype: str = "float32") -> "Pipeline":  # fmt: skip
        """Weights in any supported format (`jaxdiff.readers`): a jaxdiff workdir, a diffusers UNet2DModel or
        ScoreSdeVePipeline folder, an official TF checkpoint, a score_sde `checkpoint_N`, an EDM
        `network-snapshot-*.pkl`, an original DiT or SiT `.pt` with `vae` (a diffusers AutoencoderKL folder, e.g.
        stabilityai/sd-vae-ft-ema: DiT's diffusion and sampling, or SiT's flow matching and SDE sampling,
        `jaxdiff.readers.dit_checkpoint.read_dit_run`), a diffusers DiTPipeline folder (sampled as its scheduler
        steps); a Stable Diffusion folder or single file gives a `jaxdiff.latent.pipeline.LatentPipeline`, an x4
        upscaler folder a `jaxdiff.latent.upscale.UpscalePipeline`, an SD3 / SD3.5 or Flux.1 folder a
        `jaxdiff.latent.sd3.SD3Pipeline` or `jaxdiff.latent.flux_pipeline.FluxPipeline` (`variant`: its weight files'
        variant, fp16 or bf16). `config`
        names the recipe of weights in other formats (`load_weights`' `dataset`): required for score_sde
        checkpoints, whose architecture it gives. `variant` ("dit" | "sit"), for a `.pt` only: which of the two
        its state dict is (None: from train.py's args, else the file name, "SiT-..." being SiT's); for a Stable
        Diffusion, SD3 or Flux folder, the weight files' variant. `dtype` ("float32" | "bfloat16"), for Stable
        Diffusion, SD3, Flux and DiT / SiT weights only: the networks' compute dtype and the dtype their parameters
        are held in (bfloat16: half the memory; a VAE whose config says force_upcast stays float32 where diffusers
        upcasts it, and a DiT's VAE runs in float32)."""
        from jaxdiff.latent.flow_pipeline import folder_pipeline_class
        from jaxdiff.latent.flux_pipeline import FluxPipeline
        from jaxdiff.latent.sd3 import SD3Pipeline
        from jaxdiff.latent.stable_diffusion import is_stable_diffusion, is_upscaler
        from jaxdiff.readers.formats import DIT_FORMATS, detect_format

        flow = [c for c in (SD3Pipeline, FluxPipeline) if folder_pipeline_class(path) in c.pipeline_classes]
        if flow:  # an SD3 / Flux folder; `variant` picks its weight files' variant (fp16, bf16, ...)
            for name, value in (("config", config), ("vae", vae), ("step", step)):
                if value is not None:
                    raise UsageError(f"{name}={value!r}: an SD3 / Flux folder carries its own configs and "
                                     "autoencoder and has no checkpoint steps")  # fmt: skip
            return flow[0].from_pretrained(path, variant=variant, dtype=dtype)
        if is_stable_diffusion(path):  # a LatentPipeline (text_to_image, image_to_image, inpaint) or UpscalePipeline
            from jaxdiff.latent.pipeline import LatentPipeline
            from jaxdiff.latent.upscale import UpscalePipeline

            if config is not None:
                raise UsageError(f"config={config!r}: Stable Diffusion weights carry their own configs")
            pipeline_class = UpscalePipeline if is_upscaler(path) else LatentPipeline
            return pipeline_class.from_pretrained(path, variant=variant, dtype=dtype)
        fmt = detect_format(path)
        if dtype != "float32" and fmt not in DIT_FORMATS:
            raise UsageError(f"dtype={dtype!r}: {path} is {fmt!r} weights, which run in their config's dtype (dtype "
                             "is for Stable Diffusion, SD3, Flux and DiT / SiT weights)")  # fmt: skip
        if variant is not None and fmt != "dit":
            raise UsageError(f"variant={variant!r} tells a DiT from a SiT checkpoint (.pt); {path} is {fmt!r} "
                             "weights")  # fmt: skip
        if fmt not in DIT_FORMATS:
            if vae is not None:
                raise UsageError(f"vae={str(vae)!r} is the autoencoder of a DiT checkpoint (.pt); {path} is "
                                 f"{fmt!r} weights, which draw no latents")  # fmt: skip
            if fmt == "jaxdiff" and config is None:
                return cls.from_checkpoint(path, step=step)
            model_config, params = load_weights(path, step=step, dataset=config)
            return cls(model_config, params)
        if config is not None or step is not None:
            given = "config" if config is not None else "step"
            raise UsageError(f"{given}={config if config is not None else step!r}: DiT weights carry their own "
                             "config and have no checkpoint steps")  # fmt: skip
        return cls._from_dit(path, fmt, vae, variant, dtype)

    @classmethod
    def _from_dit(cls, path: str | os.PathLike, fmt: str, vae: str | os.PathLike | None, variant: str | None,
                  dtype: str) -> "Pipeline":  # fmt: skip
        """A DiT or SiT `.pt` with its `vae` folder, or a diffusers DiTPipeline folder (`fmt` "dit_pipeline", no
        `vae`); the transformer in `dtype`."""
        from jaxdiff.readers.dit_checkpoint import read_dit_autoencoder, read_dit_run
        from jaxdiff.readers.dit_pipeline import read_dit_pipeline

        if fmt == "dit_pipeline":
            if vae is not None:
                raise UsageError(f"vae={str(vae)!r}: the DiTPipeline folder {path} has its own vae/")
            folder = read_dit_pipeline(path, dtype=dtype)
            return cls(folder.config, folder.params, autoencoder=folder.autoencoder, scheduler=folder.scheduler,
                       class_names=folder.class_names)  # fmt: skip
        if vae is None:
            raise UsageError(f"{path} is a DiT checkpoint, which holds only the network: give vae= (a diffusers "
                             "AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema)")  # fmt: skip
        config, params = read_dit_run(path, variant=variant, dtype=dtype)
        return cls(config, params, autoencoder=read_dit_autoencoder(vae, config.model))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images `sample` returns: the model's own, or those its latents decode to."""
        if self.autoencoder is None:
            return self.family.image_shape
        return self.autoencoder.image_shape(self.family.image_shape)

    @property
    def loaded(self) -> str:
        kind = "a class-conditional" if self.conditional else "an unconditional"
        space = "pixel" if self.autoencoder is None else "latent"
        return f"{kind} {space}-space model of the {self.family.name} family (no text conditioning)"

    @property
    def conditional(self) -> bool:
        return self.config.model.num_classes > 0

    @property
    def continuous(self) -> bool:
        """Whether the model is of a continuous process (else of the discrete schedule)."""
        return self.family.process is not None

    @property
    def default_sampler(self) -> str:
        """`config.sampling.sampler` for continuous models, "ddpm" for discrete ones, the folder's scheduler's for
        a diffusers pipeline folder."""
        return self.sampler_source.default_sampler

    @property
    def draws_trajectories(self) -> bool:
        """Whether `sample_batch` can return the intermediate states (the discrete family's own samplers)."""
        return self.sampler_source.draws_trajectories

    def denoise(self, x_t, t, class_label=None) -> Array:
        """Discrete models: the model output for x_t [B, H, W, C] in the diffusion's scale and t int [B]
        (0-based steps, 0..T-1). Continuous models: EDM's D(x; σ) = x̂_0 for x = x_0 + σ·n [B, H, W, C]
        and t = σ > 0 float [B], in the model's data range (`continuous_model.data_range`)."""
        labels = None if class_label is None else self._labels(class_label, np.shape(x_t)[0])
        x, t = self.family.denoise_inputs(x_t, t)
        key = ("denoise", labels is not None)
        if key not in self._compiled:
            denoise = lambda params, x, t, y: self.family.denoiser(self.model, params, labels=y)(x, t)  # noqa: E731
            self._compiled[key] = inference_jit(denoise)
        return self._compiled[key](self.params, x, t, labels)

    def _labels(self, class_label, n: int, rng: Array | None = None) -> Array | None:
        """int32 [n] labels: a given label (or [n] labels; a class name of `class_names` for any), else uniformly
        random ones from `rng`."""
        if not self.conditional:
            if class_label is not None:
                raise UsageError("class_label was given but the model is unconditional (model.num_classes=0)")
            return None
        num_classes = self.config.model.num_classes
        if class_label is None:
            return jax.random.randint(jax.random.fold_in(rng, num_classes), (n,), 0, num_classes, jnp.int32)
        labels = self._class_ids(class_label)
        if labels.shape not in ((), (n,)):
            raise UsageError(f"class_label must be one label or {n}, one per image; got shape {labels.shape}")
        labels = np.broadcast_to(labels, (n,))
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
            raise UsageError(f"class_label must be an int in [0, {num_classes}), got {class_label!r}")
        return jnp.asarray(labels, jnp.int32)

    def _class_ids(self, class_label) -> np.ndarray:
        """`class_label` (one label or a sequence) as an array, class names (str) replaced by their classes
        (`class_names`)."""

        def class_id(value):
            if not isinstance(value, (str, np.str_)):
                return value
            if value not in self.class_names:
                known = f"e.g. {sorted(self.class_names)[:3]}" if self.class_names else "this model has none"
                raise UsageError(f"class_label {str(value)!r} is not a class name ({known})")
            return self.class_names[value]

        if np.ndim(class_label) == 0:
            return np.asarray(class_id(class_label))
        return np.asarray([class_id(value) for value in class_label])

    def sampling_settings(self, sampler: str | None = None, steps: int | None = None, *, eta: float = 0.0,
                          spacing: str | None = None, **options) -> tuple[str, int | None, dict]:  # fmt: skip
        """(sampler, steps, options) that a sampling call uses, checked; raises ValueError before any work.

        `sampler` None: `default_sampler`. Continuous models: the sampler's options from `config.sampling`,
        overridden by `options`; `steps` None means config.sampling.steps for the config's own sampler
        (0 there: the sampler's default). A diffusers pipeline folder: `jaxdiff.latent.scheduler_sampling`.
        """
        return self.sampler_source.sampling_settings(sampler, steps, eta=eta, spacing=spacing, **options)

    def sample_batch(
        self, n: int, rng: Array, *, sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
        spacing: str | None = None, class_label=None, guidance: float | None = None, return_trajectory: bool = False,
        on_model_call: Callable[[], None] | None = None, latents=None, **options,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
        """(uint8 [n, H, W, C] images, int32 [n] labels or None, uint8 [K, n, H, W, C] trajectory or None).

        `sampler`, `steps`, `options`: see `sampling_settings`; `guidance`: see `sample`. `latents` float [n, h, w, c] (NHWC, the model's
        space: its image shape, or its autoencoder's latents): the N(0, I) noise the initial state is made of,
        instead of a draw from `rng`.
        `on_model_call`, if given, runs on the host after each of the sampler's model evaluations.
        """
        sampler, steps, options = self.sampling_settings(sampler, steps, eta=eta, spacing=spacing, **options)
        if return_trajectory and not self.draws_trajectories:
            raise UsageError("trajectories are drawn by the discrete family's own samplers only")
        noise = self._initial_noise(latents, n)
        labels = self._labels(class_label, n, rng)
        guidance = self.config.sampling.guidance if guidance is None else guidance
        settings = dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing, guidance=guidance,
                        return_trajectory=return_trajectory, reports=on_model_call is not None)  # fmt: skip
        self._on_model_call = on_model_call
        key = ("sample", n, labels is not None, noise is not None, *settings.items(), *sorted(options.items()))
        if key not in self._compiled:
            self._compiled[key] = self._jit_sampler(n, options=options, **settings)
        out = self._compiled[key](self.params, self.decoder_params, rng, labels, noise)
        x, trajectory = out if return_trajectory else (out, None)
        to_uint8 = images.to_uint8 if self.autoencoder is None else pixels_to_uint8
        to_host = lambda a: None if a is None else to_uint8(jax.device_get(a))  # noqa: E731
        return to_host(x), None if labels is None else np.asarray(labels), to_host(trajectory)

    def _initial_noise(self, latents, n: int) -> Array | None:
        """`latents` checked to be float [n, *model shape] (None stays None), as float32."""
        if latents is None:
            return None
        values, shape = np.asarray(latents), (n, *self.family.image_shape)
        if values.shape != shape or not np.issubdtype(values.dtype, np.floating):
            raise UsageError(f"latents must be a float array of shape {shape} (NHWC noise in the model's space), got "
                             f"shape {values.shape} dtype {values.dtype}")  # fmt: skip
        return jnp.asarray(values, jnp.float32)

    def _jit_sampler(self, n, *, sampler, steps, eta, spacing, guidance, return_trajectory, reports, options):
        """One jitted sampling function per setting (`sampler_source.sampler_fn`), its latents decoded by the
        autoencoder (images in [0, 1]) when there is one; the batch is split over this process's devices.

        With `reports`, every model evaluation calls back `self._on_model_call` on the host.
        """
        draw = self.sampler_source.sampler_fn(
            self.model, (n, *self.family.image_shape), guidance=guidance, wrap=self._reporting if reports else None,
            sampler=sampler, steps=steps, eta=eta, spacing=spacing, options=options,
            return_trajectory=return_trajectory,
        )  # fmt: skip

        def run(params, decoder_params, rng, labels, noise):
            out = draw(params, rng, labels, noise)
            if self.autoencoder is None:
                return out
            if not return_trajectory:
                return self.autoencoder.decode(decoder_params, out)
            x, frames = out  # frames [K, n, h, w, c] decoded as one batch
            decoded = self.autoencoder.decode(decoder_params, frames.reshape(-1, *frames.shape[2:]))
            return self.autoencoder.decode(decoder_params, x), decoded.reshape(*frames.shape[:2], *decoded.shape[1:])

        out = self._output_sharding(n)
        if return_trajectory:
            trajectory = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data"))
            out = (out, trajectory if n % self.mesh.devices.size == 0 else out)
        return inference_jit(run, out_shardings=out)

    def _output_sharding(self, n: int):
        """Batch-sharded over this process's devices when they divide n, else replicated."""
        divisible = n % self.mesh.devices.size == 0
        return sharding.batch_sharding(self.mesh) if divisible else sharding.replicated_sharding(self.mesh)

    def _reporting(self, denoise):
        """`denoise` that calls `self._on_model_call` on the host after each evaluation."""

        def report(_):
            if self._on_model_call is not None:
                self._on_model_call()

        def counted(x_t, t):
            output = denoise(x_t, t)
            jax.debug.callback(report, output[0, 0, 0, 0])
            return output

        return counted

    def model_calls(self, sampler: str | None = None, steps: int | None = None, *, eta: float = 0.0,
                    spacing: str | None = None, **options) -> int | None:  # fmt: skip
        """Model evaluations of one sampling batch: `steps` (default: the sampler's), 2·steps − 1 for heun;
        continuous samplers: their count for these settings (None for the adaptive ode)."""
        sampler, steps, options = self.sampling_settings(sampler, steps, eta=eta, spacing=spacing, **options)
        return self.sampler_source.model_calls(sampler, steps, options)

    def sample(
        self, num_images: int, *, sampler: str | None = None, steps: int | None = None, seed: int = 0,
        class_label=None, guidance: float | None = None, eta: float = 0.0, spacing: str | None = None,
        batch_size: int | None = None, progress: bool = False, latents=None, **options,
    ) -> np.ndarray:  # fmt: skip
        """uint8 [num_images, H, W, C]: batches of `batch_size` (default config.sampling.batch_size).

        `sampler`, `steps`, `options`: see `sampling_settings`. `class_label`: one label (int, or a name of
        `class_names`) or one per image. `guidance` is w of (1 + w)·out(x, y) − w·out(x, ∅) (diffusers'
        guidance_scale is 1 + w) on the first config.sampling.guidance_channels channels (0: all); None: the
        model's default, config.sampling.guidance (SiT's `.pt`: 3, its sample.py's cfg_scale 4). `latents` float [num_images, h, w, c]: the initial N(0, I) noise in the model's
        space (NHWC), split over the batches like the images.

        `progress` shows a progress bar over the model evaluations of all batches (stderr).
        """
        if not is_int(num_images) or num_images < 1:
            raise UsageError(f"num_images must be an int >= 1, got {num_images!r}")
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._initial_noise(latents, num_images)
        class_label = None if class_label is None else self._class_ids(class_label)
        per_image = class_label is not None and np.ndim(class_label) > 0
        if per_image and np.shape(class_label) != (num_images,):
            raise UsageError(f"class_label must be one label or {num_images}, one per image; got shape "
                             f"{np.shape(class_label)}")  # fmt: skip
        batch_size = min(batch_size or self.config.sampling.batch_size, num_images)
        key = jax.random.PRNGKey(seed)
        starts = range(0, num_images, batch_size)
        calls = self.model_calls(sampler, steps, eta=eta, spacing=spacing, **options)
        bar = tqdm(total=None if calls is None else len(starts) * calls, unit="step", desc="sampling",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        out = []
        with bar:
            for i, start in enumerate(starts):
                n = min(batch_size, num_images - start)
                batch = slice(start, start + n)
                x, _, _ = self.sample_batch(
                    n, jax.random.fold_in(key, i), sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                    class_label=class_label[batch] if per_image else class_label, guidance=guidance,
                    on_model_call=bar.update if progress else None,
                    latents=None if latents is None else np.asarray(latents)[batch], **options,
                )  # fmt: skip
                out.append(x)
        return np.concatenate(out)
