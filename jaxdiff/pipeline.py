"""`Pipeline`: a trained model as an object to call — denoise one step, or sample images.

    pipe = Pipeline.from_checkpoint("runs/cifar10")        # config + EMA params of the latest step
    images = pipe.sample(16, sampler="ddim", steps=50)      # uint8 [16, 32, 32, 3]

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

from jaxdiff import checkpoint, images, samplers, sharding
from jaxdiff.denoiser import model_denoiser
from jaxdiff.models import create_model
from jaxdiff.schedule import schedule_from_config

Array = jax.Array


class Pipeline:
    """A model (`config`) with one set of parameters (normally the EMA ones) and its noise schedule."""

    def __init__(self, config: ml_collections.ConfigDict, params, *, step: int | None = None):
        self.config = config
        self.step = step
        self.model = create_model(config.model)
        self.schedule = schedule_from_config(config.diffusion)
        self.mesh = sharding.local_mesh()
        self.params = jax.device_put(params, sharding.replicated_sharding(self.mesh))
        self._compiled: dict[tuple, object] = {}  # jitted functions by their static settings
        self._on_model_call: Callable[[], None] | None = None  # the running sample call's progress hook

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, step: int | None = None) -> "Pipeline":
        """The EMA parameters of a `jaxdiff train` workdir (latest step unless `step`)."""
        config, step, params = checkpoint.load_weights(path, step=step)
        return cls(config, params, step=step)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, step: int | None = None) -> "Pipeline":
        """Weights in any supported format: a jaxdiff workdir, a diffusers UNet2DModel folder, an official TF checkpoint."""
        from jaxdiff.convert import detect_format, load_weights

        if detect_format(path) == "jaxdiff":
            return cls.from_checkpoint(path, step=step)
        config, params = load_weights(path, step=step)
        return cls(config, params)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.image_size, m.image_size, m.in_channels)

    @property
    def conditional(self) -> bool:
        return self.config.model.num_classes > 0

    def denoise(self, x_t, t, class_label=None) -> Array:
        """The model output for x_t [B, H, W, C] in the diffusion's scale and t int [B] (0-based steps, 0..T-1)."""
        t = self._check_steps(t)
        labels = None if class_label is None else self._labels(class_label, np.shape(x_t)[0])
        key = ("denoise", labels is not None)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(lambda params, x_t, t, y: model_denoiser(self.model, params, labels=y)(x_t, t))
        return self._compiled[key](self.params, jnp.asarray(x_t), t, labels)

    def _check_steps(self, t) -> Array:
        """t as int32, after checking (when concrete) that it is integer and lies in [0, T)."""
        num_timesteps = self.schedule.num_timesteps
        expected = f"the model expects 0-based step indices 0..T-1 = 0..{num_timesteps - 1}"
        if isinstance(t, jax.core.Tracer):
            if not jnp.issubdtype(t.dtype, jnp.integer):
                raise ValueError(f"t has dtype {t.dtype}; {expected} (an integer array)")
            return t.astype(jnp.int32)
        values = np.asarray(t)
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"t has dtype {values.dtype}; {expected} (an integer array)")
        if values.size and (values.min() < 0 or values.max() >= num_timesteps):
            bad = values.min() if values.min() < 0 else values.max()
            raise ValueError(f"t={bad} is out of range: {expected}")
        return jnp.asarray(values, jnp.int32)

    def _labels(self, class_label, n: int, rng: Array | None = None) -> Array | None:
        """int32 [n] labels: a given label (or [n] labels), else uniformly random ones from `rng`."""
        if not self.conditional:
            if class_label is not None:
                raise ValueError("class_label was given but the model is unconditional (model.num_classes=0)")
            return None
        num_classes = self.config.model.num_classes
        if class_label is None:
            return jax.random.randint(jax.random.fold_in(rng, num_classes), (n,), 0, num_classes, jnp.int32)
        labels = np.broadcast_to(np.asarray(class_label), (n,))
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_label must be an int in [0, {num_classes}), got {class_label!r}")
        return jnp.asarray(labels, jnp.int32)

    def sample_batch(
        self, n: int, rng: Array, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
        spacing: str | None = None, class_label=None, guidance: float = 0.0, return_trajectory: bool = False,
        on_model_call: Callable[[], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
        """(uint8 [n, H, W, C] images, int32 [n] labels or None, uint8 [K, n, H, W, C] trajectory or None).

        `on_model_call`, if given, runs on the host after each of the sampler's model evaluations.
        """
        labels = self._labels(class_label, n, rng)
        settings = dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing, guidance=guidance,
                        return_trajectory=return_trajectory, reports=on_model_call is not None)  # fmt: skip
        self._on_model_call = on_model_call
        key = ("sample", n, labels is not None, *settings.items())
        if key not in self._compiled:
            self._compiled[key] = self._jit_sampler(n, **settings)
        out = self._compiled[key](self.params, rng, labels)
        x, trajectory = out if return_trajectory else (out, None)
        to_host = lambda a: None if a is None else images.to_uint8(jax.device_get(a))  # noqa: E731
        return to_host(x), None if labels is None else np.asarray(labels), to_host(trajectory)

    def _jit_sampler(self, n, *, sampler, steps, eta, spacing, guidance, return_trajectory, reports):
        """One jitted sampling function per setting; the batch is split over this process's devices.

        With `reports`, every model evaluation calls back `self._on_model_call` on the host.
        """
        dc = self.config.diffusion
        shape = (n, *self.image_shape)

        def draw(params, rng, labels):
            denoise = model_denoiser(self.model, params, labels=labels, guidance=guidance)
            if reports:
                denoise = self._reporting(denoise)
            return samplers.sample(
                denoise, self.schedule, shape, rng, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                clip_denoised=self.config.sampling.clip_denoised, var_type=dc.var_type, mean_type=dc.mean_type,
                return_trajectory=return_trajectory,
            )  # fmt: skip

        divisible = n % self.mesh.devices.size == 0
        out = sharding.batch_sharding(self.mesh) if divisible else sharding.replicated_sharding(self.mesh)
        if return_trajectory:
            trajectory = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data"))
            out = (out, trajectory if divisible else out)
        return jax.jit(draw, out_shardings=out)

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

    def model_calls(self, sampler: str = "ddpm", steps: int | None = None) -> int:
        """Model evaluations of one sampling batch: `steps` (default: the sampler's), 2·steps − 1 for heun."""
        num_timesteps = self.schedule.num_timesteps
        steps = steps or min(samplers.DEFAULT_STEPS.get(sampler, num_timesteps), num_timesteps)
        return 2 * steps - 1 if sampler == "heun" else steps

    def sample(
        self, num_images: int, *, sampler: str = "ddpm", steps: int | None = None, seed: int = 0,
        class_label=None, guidance: float = 0.0, eta: float = 0.0, spacing: str | None = None,
        batch_size: int | None = None, progress: bool = False,
    ) -> np.ndarray:  # fmt: skip
        """uint8 [num_images, H, W, C]: batches of `batch_size` (default config.sampling.batch_size).

        `progress` shows a progress bar over the model evaluations of all batches (stderr).
        """
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        batch_size = min(batch_size or self.config.sampling.batch_size, num_images)
        key = jax.random.PRNGKey(seed)
        starts = range(0, num_images, batch_size)
        bar = tqdm(total=len(starts) * self.model_calls(sampler, steps), unit="step", desc="sampling",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        out = []
        with bar:
            for i, start in enumerate(starts):
                n = min(batch_size, num_images - start)
                x, _, _ = self.sample_batch(
                    n, jax.random.fold_in(key, i), sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                    class_label=class_label, guidance=guidance, on_model_call=bar.update if progress else None,
                )  # fmt: skip
                out.append(x)
        return np.concatenate(out)
