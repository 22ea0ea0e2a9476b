"""The flow family's own methods: flow matching on the interpolants `flow` and `gvp` (`jaxdiff.processes`,
x_t = α(t)·x_0 + σ(t)·ε, t in [0, 1], 1 = noise) with a network predicting velocity, x0, eps or v and seeing its
time as t·config.diffusion.time_scale, or in SiT's reversed time as (1 − t)·time_scale with
config.diffusion.time_reversed (`jaxdiff.diffusion.continuous.flow_network`).

`FlowFamily` (`jaxdiff.families.continuous`) is `ContinuousFamily` with `FlowMethods` in front. What it keeps: the
samplers and their settings from `config.sampling` (on a flow process `sample_continuous` runs euler, heun, midpoint
and euler_maruyama in the interpolant's time with their flow options, the σ-based samplers through D(x; σ)), the
ODE likelihood, the data range, `denoise(x, σ)` as D(x; σ). What these methods change:
  loss_fn     `jaxdiff.diffusion.losses.flow_matching_loss` with config.diffusion's parameterization,
              t_sampling, logit_mean, logit_std, mode_scale, shift, loss_weighting (with sigma_data) and
              reduce_mean; the training time and the noise both come from `t_rng`;
  denoiser    the `FlowModel` of the network, classifier-free guidance (`guided_call`) on its prediction (its
              first config.sampling.guidance_channels channels; 0: all) applied only where t in
              [config.sampling.guidance_t_min, guidance_t_max];
  sampler_fn  a `wrap` (the pipeline's per-evaluation report) wraps the network inside the FlowModel, so that the
              flow samplers keep its velocity at t = 1.
"""

from __future__ import annotations

from jaxdiff.diffusion.continuous import flow_output, guided_call, to_model_range
from jaxdiff.diffusion.flow import FlowModel, guidance_interval
from jaxdiff.diffusion.losses import flow_matching_loss
from jaxdiff.processes import FLOW_PROCESSES


class FlowMethods:
    """The methods `FlowFamily` puts in front of `ContinuousFamily`'s (module docstring)."""

    name = "flow"
    processes = FLOW_PROCESSES

    def loss_fn(self, model):
        config, dc = self.config, self.config.diffusion

        def loss(params, x_start, labels, t_rng, noise_rng, dropout_rng):
            output = flow_output(config, model, train=True, dropout_rng=dropout_rng)
            return flow_matching_loss(
                lambda p, x_t, t: output(p, x_t, t, labels), params, self.process,
                to_model_range(x_start, config.data), t_rng, parameterization=dc.parameterization,
                t_sampling=dc.t_sampling, logit_mean=dc.logit_mean, logit_std=dc.logit_std,
                mode_scale=dc.mode_scale, shift=dc.shift, t_max=dc.train_t_max, weighting=dc.loss_weighting,
                sigma_data=dc.sigma_data,
                reduce_mean=dc.reduce_mean,
            )  # fmt: skip

        return loss

    def denoiser(self, model, params, *, labels=None, guidance: float = 0.0) -> FlowModel:
        config, sc = self.config, self.config.sampling
        output = flow_output(config, model)
        predict = guided_call(config, output, params, labels=labels, guidance=guidance)
        if guidance and (sc.guidance_t_min, sc.guidance_t_max) != (0.0, 1.0):
            plain = guided_call(config, output, params, labels=labels)
            predict = guidance_interval(predict, plain, sc.guidance_t_min, sc.guidance_t_max)
        return FlowModel(predict, self.process, config.diffusion.parameterization)

    def sampler_fn(self, model, shape, *, guidance: float = 0.0, wrap=None, **settings):
        inside = None if wrap is None else (lambda flow_model: flow_model.wrapped(wrap))
        return super().sampler_fn(model, shape, guidance=guidance, wrap=inside, **settings)
