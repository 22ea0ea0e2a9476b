"""The discrete DDPM family: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε on the tables of `config.diffusion`'s beta
schedule, t the 0-based step index 0..T-1; the network's output is read by `mean_type` / `var_type`; samples drawn by
`jaxdiff.samplers.sample` (ancestral DDPM by default), on the sampler's spacing of the steps or on improved DDPM's
respacing (`jaxdiff.schedule.ADM_SPACING`, how DiT samples); the likelihood is the variational bound in bits/dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers
from jaxdiff.diffusion import q_sample, training_losses
from jaxdiff.diffusion.denoisers import model_denoiser
from jaxdiff.errors import UsageError
from jaxdiff.families.base import Family
from jaxdiff.schedule import ADM_SPACING, adm_timesteps, respace, schedule_from_config

# Networks whose only training-time behaviour is dropping their class labels (DiT's class_dropout_prob): the
# training step drops them instead (training.label_dropout), so these run with train=False in the loss.
SELF_DROPPING_NETWORKS = ("dit",)


class DiscreteFamily(Family):
    """The discrete schedule (`self.schedule`); `denoise(x_t, t)` is the model output for int steps t [B]."""

    name = "discrete"
    processes = ("discrete",)
    likelihood = "vlb"
    draws_trajectories = True

    def __init__(self, config):
        super().__init__(config)
        self.schedule = schedule_from_config(config.diffusion)

    @property
    def samplers(self) -> tuple[str, ...]:
        return samplers.SAMPLERS

    @property
    def default_sampler(self) -> str:
        return "ddpm"

    def loss_fn(self, model):
        dc, schedule = self.config.diffusion, self.schedule
        train = self.config.model.network not in SELF_DROPPING_NETWORKS

        def loss(params, x_start, labels, t_rng, noise_rng, dropout_rng):
            t = jax.random.randint(t_rng, (x_start.shape[0],), 0, schedule.num_timesteps, dtype=jnp.int32)
            noise = jax.random.normal(noise_rng, x_start.shape, jnp.float32)
            x_t = q_sample(schedule, x_start, t, noise)
            output = model.apply({"params": params}, x_t, t, labels, train=train, rngs={"dropout": dropout_rng})
            losses = training_losses(
                schedule, output.astype(jnp.float32), x_start=x_start, x_t=x_t, t=t, noise=noise,
                mean_type=dc.mean_type, var_type=dc.var_type, loss_type=dc.loss_type,
                hybrid_lambda=dc.hybrid_lambda, min_snr_gamma=dc.min_snr_gamma,
            )  # fmt: skip
            return jnp.mean(losses)

        return loss

    def denoiser(self, model, params, *, labels=None, guidance: float = 0.0):
        """`model_denoiser`, guiding the first config.sampling.guidance_channels output channels (0: all)."""
        return model_denoiser(model, params, labels=labels, guidance=guidance,
                              guidance_channels=self.config.sampling.guidance_channels)  # fmt: skip

    def denoise_inputs(self, x, t):
        """x as an array; t as int32 after checking (when concrete) that it is integer and lies in [0, T)."""
        num_timesteps = self.schedule.num_timesteps
        expected = f"the model expects 0-based step indices 0..T-1 = 0..{num_timesteps - 1}"
        if isinstance(t, jax.core.Tracer):
            if not jnp.issubdtype(t.dtype, jnp.integer):
                raise UsageError(f"t has dtype {t.dtype}; {expected} (an integer array)")
            return jnp.asarray(x), t.astype(jnp.int32)
        values = np.asarray(t)
        if not np.issubdtype(values.dtype, np.integer):
            raise UsageError(f"t has dtype {values.dtype}; {expected} (an integer array)")
        if values.size and (values.min() < 0 or values.max() >= num_timesteps):
            bad = values.min() if values.min() < 0 else values.max()
            raise UsageError(f"t={bad} is out of range: {expected}")
        return jnp.asarray(x), jnp.asarray(values, jnp.int32)

    def sampling_settings(self, sampler, steps, *, eta=0.0, spacing=None, **options):
        """The discrete samplers take no options beyond `eta` and `spacing` (passed to `run_sampler` as given);
        `steps` None means config.sampling.steps for the config's own sampler (0 there: the sampler's default)."""
        sampler = sampler or self.default_sampler
        if sampler in samplers.CONTINUOUS_SAMPLERS and sampler not in self.samplers:
            raise UsageError(f"sampler {sampler!r} is for continuous-time models; this model has the discrete "
                             f"schedule: use one of {self.samplers}")  # fmt: skip
        if options:
            raise UsageError(f"sampler options {sorted(options)} are for continuous-time models; "
                             "this model has the discrete schedule")  # fmt: skip
        if steps is None and sampler == self.config.sampling.sampler:
            steps = self.config.sampling.steps or None
        return sampler, steps, {}

    def configured_sampling(self):
        sc = self.config.sampling
        return dict(sampler=sc.sampler, steps=sc.steps or None, eta=sc.eta, spacing=sc.spacing or None, options={})

    def _steps(self, sampler, steps) -> int:
        """`steps`, or the sampler's default (all T for ddpm and ddim)."""
        num_timesteps = self.schedule.num_timesteps
        return steps or min(samplers.DEFAULT_STEPS.get(sampler, num_timesteps), num_timesteps)

    def model_calls(self, sampler, steps, options):
        """`steps` (default: the sampler's), 2·steps − 1 for heun."""
        steps = self._steps(sampler, steps)
        return 2 * steps - 1 if sampler == "heun" else steps

    def run_sampler(self, denoise, shape, rng, *, sampler, steps, eta, spacing, options, return_trajectory=False,
                    noise=None):  # fmt: skip
        """`jaxdiff.samplers.sample` on the schedule with `config.sampling.clip_denoised` and the model's
        mean and variance types, starting from x_T = `noise` when given; `options` is empty for this family.
        `spacing` None is config.sampling.spacing ('': the sampler's default). With spacing `ADM_SPACING` the
        sampler runs through every step of the schedule respaced to `adm_timesteps` (the model still sees the
        original steps), as improved DDPM's SpacedDiffusion."""
        dc, schedule = self.config.diffusion, self.schedule
        spacing = spacing or self.config.sampling.spacing or None
        if spacing == ADM_SPACING:
            kept = adm_timesteps(schedule.num_timesteps, self._steps(sampler, steps))
            with jax.ensure_compile_time_eval():  # the samplers' tables need a concrete schedule, also under jit
                schedule = respace(schedule, kept)
            original, inner = jnp.asarray(kept, jnp.int32), denoise
            denoise = lambda x_t, k: inner(x_t, original[k])  # noqa: E731
            steps, spacing = len(kept), "uniform"
        return samplers.sample(
            denoise, schedule, shape, rng, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
            clip_denoised=self.config.sampling.clip_denoised, var_type=dc.var_type, mean_type=dc.mean_type,
            return_trajectory=return_trajectory, x_T=noise, **options,
        )  # fmt: skip
