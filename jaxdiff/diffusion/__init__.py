"""The math of every diffusion family, as pure functions of arrays.

- `ddpm`: the discrete DDPM process on a `jaxdiff.schedule.Schedule`: q(x_t | x_0), the posterior, the model's
  p(x_{t-1} | x_t), the variational bound and the training losses. Its names are importable from here
  (`jaxdiff.diffusion.q_sample`, ...); t is the 0-based step index [B], images NHWC in [-1, 1].
- `denoisers`: EDM's D(x; σ) = E[x_0 | x = x_0 + σ·n] built from every parameterisation (ε, x_0, v, score,
  EDM's preconditioning), and what follows from it (score, probability-flow drift).
- `guidance`: classifier-free guidance of a model output.
- `losses`: denoising score matching and EDM's loss, on D(x; σ); conditional flow matching.
- `flow`: flow matching on the interpolants `flow` and `gvp`: velocity, x0, ε and v predictions and their
  conversions, a flow model as D(x; σ) and as a velocity field, guidance in a t interval, training-time
  distributions and shifts.
- `continuous`: a continuous process (`jaxdiff.processes`) and its denoiser as a config describes them.
"""

from jaxdiff.diffusion.ddpm import (
    MEAN_TYPES,
    VAR_TYPES,
    LOSS_TYPES,
    mean_flat,
    q_mean_variance,
    q_sample,
    q_posterior_mean_variance,
    predict_start_from_noise,
    predict_noise_from_start,
    predict_start_from_v,
    v_target,
    predict_start,
    split_model_output,
    p_variance,
    p_mean_variance,
    normal_kl,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    vb_terms_bpd,
    prior_bpd,
    min_snr_weight,
    regression_target,
    training_losses,
)

__all__ = [
    "LOSS_TYPES",
    "MEAN_TYPES",
    "VAR_TYPES",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "p_mean_variance",
    "p_variance",
    "predict_noise_from_start",
    "predict_start",
    "predict_start_from_noise",
    "predict_start_from_v",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "regression_target",
    "split_model_output",
    "training_losses",
    "v_target",
    "vb_terms_bpd",
]
