"""The continuous family: a VE, VP, sub-VP or EDM process (`config.diffusion.process`, `jaxdiff.processes`) with
the network seen as EDM's denoiser D(x; σ) = x̂_0 for x = x_0 + σ·n, σ the noise level float32 [B]
(`jaxdiff.diffusion.continuous`); trained with the dsm or edm loss, sampled by `jaxdiff.samplers.sample_continuous`
with `config.sampling`'s sampler, steps and options; its likelihood is that of the probability-flow ODE.

The model's data are images in [-1, 1], or in [0, 1] with `config.data.centered` False; samples are returned in
[-1, 1] (`to_image_range`).

`FlowFamily` is this family on the flow processes (flow, gvp) with the methods of `jaxdiff.families.flow`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import samplers
from jaxdiff.diffusion.continuous import (
    Denoiser,
    conditioned_denoiser,
    data_range,
    model_denoiser,
    process_from_config,
    to_image_range,
    to_model_range,
)
from jaxdiff.diffusion.flow import clipped_denoiser
from jaxdiff.diffusion.losses import dsm_loss, edm_loss
from jaxdiff.errors import UsageError
from jaxdiff.families.base import Family
from jaxdiff.families.flow import FlowMethods
from jaxdiff.samplers.registry import options_from_config

Array = jax.Array


def sample_in_image_range(config: ml_collections.ConfigDict, denoiser: Denoiser, process, shape, rng: Array, *,
                          sampler: str, steps: int | None, **options) -> Array:  # fmt: skip
    """`sample_continuous` of a model's `denoiser`, every x̂_0 clipped to the model's data range when
    `config.sampling.clip_denoised`; the samples float32 `shape` returned in [-1, 1] (`to_image_range`)."""
    if config.sampling.clip_denoised:
        denoiser = clipped_denoiser(denoiser, *data_range(config.data))
    x0 = samplers.sample_continuous(denoiser, process, shape, rng, sampler=sampler, steps=steps, **options)
    return to_image_range(x0, config.data)


class ContinuousFamily(Family):
    """A continuous process (`self.process`); `denoise(x, σ)` is D(x; σ) in the model's data range."""

    name = "continuous"
    processes = ("ve", "vp", "subvp", "edm")
    likelihood = "ode"
    draws_trajectories = False

    def __init__(self, config):
        super().__init__(config)
        self.process = process_from_config(config.diffusion)

    @property
    def samplers(self) -> tuple[str, ...]:
        return samplers.CONTINUOUS_SAMPLERS

    @property
    def default_sampler(self) -> str:
        return self.config.sampling.sampler

    def loss_fn(self, model):
        """The dsm or edm loss (`config.diffusion.loss_type`); the noise level and noise both come from `t_rng`."""
        config, dc, process = self.config, self.config.diffusion, self.process

        def loss(params, x_start, labels, t_rng, noise_rng, dropout_rng):
            x_start = to_model_range(x_start, config.data)
            denoise = conditioned_denoiser(config, model, process, train=True, dropout_rng=dropout_rng)
            apply_fn = lambda p, x, sigma: denoise(p, x, sigma, labels)  # noqa: E731
            if dc.loss_type == "dsm":
                return dsm_loss(apply_fn, params, process, x_start, t_rng, eps=dc.t_eps, reduce_mean=dc.reduce_mean,
                                likelihood_weighting=dc.likelihood_weighting)  # fmt: skip
            return edm_loss(apply_fn, params, x_start, t_rng, p_mean=dc.p_mean, p_std=dc.p_std,
                            sigma_data=dc.sigma_data, reduce_mean=dc.reduce_mean)  # fmt: skip

        return loss

    def denoiser(self, model, params, *, labels=None, guidance: float = 0.0):
        return model_denoiser(self.config, model, params, self.process, labels=labels, guidance=guidance)

    def denoise_inputs(self, x, t):
        """x as float32; t = σ as float32 after checking that every value is finite and > 0."""
        values = np.asarray(t, np.float64)
        if values.size and not (np.all(np.isfinite(values)) and values.min() > 0):
            raise UsageError(f"t must hold noise levels σ > 0 for a continuous-time model, got {values.min()}")
        return jnp.asarray(x, jnp.float32), jnp.asarray(values, jnp.float32)

    def sampling_settings(self, sampler, steps, *, eta=0.0, spacing=None, **options):
        """The sampler's options from `config.sampling`, overridden by `options` (ddim's `eta` among them);
        `steps` None means config.sampling.steps for the config's own sampler (0 there: the sampler's default)."""
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            if sampler in samplers.SAMPLERS:
                raise UsageError(f"sampler {sampler!r} is for discrete-schedule models; this model's process is "
                                 f"{self.config.diffusion.process!r}: use one of {self.samplers}")
            raise UsageError(f"unknown sampler {sampler!r}; expected one of {self.samplers}")
        if spacing is not None:
            raise UsageError(f"spacing={spacing!r} is for discrete-schedule models; the continuous samplers space "
                             "their noise levels themselves")  # fmt: skip
        if eta and sampler != "ddim":
            raise UsageError(f"eta={eta} is an option of sampler 'ddim', not of {sampler!r}")
        if steps is None and sampler == self.config.sampling.sampler and sampler != "ode":
            steps = self.config.sampling.steps or None
        defaults = options_from_config(sampler, self.config.sampling, self.process)
        if sampler == "ddim":
            defaults["eta"] = eta
        options = {**defaults, **options}
        self.model_calls(sampler, steps, options)
        return sampler, steps, options

    def configured_sampling(self):
        sc = self.config.sampling
        return dict(sampler=sc.sampler, steps=None if sc.sampler == "ode" else (sc.steps or None), eta=0.0,
                    spacing=None, options=options_from_config(sc.sampler, sc, self.process))  # fmt: skip

    def model_calls(self, sampler, steps, options):
        """From tracing `sample_continuous` with a stand-in denoiser: this checks every setting and evaluates
        nothing."""
        calls = []

        def trace(key):
            x, nfe = samplers.sample_continuous(lambda x, sigma: x, self.process, (1, *self.image_shape), key,
                                                sampler=sampler, steps=steps, return_nfe=True, **options)  # fmt: skip
            calls.append(nfe if isinstance(nfe, int) else None)
            return x

        jax.eval_shape(trace, jax.random.PRNGKey(0))
        return calls[0]

    def run_sampler(self, denoise, shape, rng, *, sampler, steps, eta, spacing, options, return_trajectory=False,
                    noise=None):  # fmt: skip
        """`sample_in_image_range`; `eta` and `spacing` are the discrete family's (ddim's eta is in `options`,
        `sampling_settings` refuses a spacing), and no trajectory is drawn."""
        return sample_in_image_range(self.config, denoise, self.process, shape, rng, sampler=sampler, steps=steps,
                                     noise=noise, **options)  # fmt: skip


class FlowFamily(FlowMethods, ContinuousFamily):
    """The flow family: `ContinuousFamily` on the flow processes, with the loss, denoiser and sampler wrapping of
    `jaxdiff.families.flow.FlowMethods` (composed here, next to its base, so that no family module sits an import
    level above the others)."""
