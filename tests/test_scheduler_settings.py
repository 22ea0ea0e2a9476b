"""Every diffusers scheduler setting is honoured or refused: grids (`set_timesteps` sigmas and timesteps) and end to
end runs against diffusers with and without each key that changes sampling, on the tiny SD pipeline of
tests/test_latent_samplers.py; refusals name the key and its value."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion.scheduler_config import ACCEPTED_WITHOUT_EFFECT, scheduler_settings
from jaxdiff.errors import WeightsError
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.schedulers import sampler_scheduler, sigma_levels, step_of_sigma
from jaxdiff.samplers.grids import step_noise
from tests.test_latent_samplers import SCHEDULERS, jaxdiff_step_noise, sd1, sd1_folder  # noqa: F401 (module-scoped fixtures)
from tests.test_stable_diffusion import GUIDANCE, NEGATIVE, PROMPTS, SD1_SCHEDULER, STEPS, assert_close, nchw, random_noise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULERS = dict(SCHEDULERS, **{"dpm_solver++_sde": "DPMSolverMultistepScheduler"})
CLASS_OPTIONS = {"dpm_solver++_sde": {"algorithm_type": "sde-dpmsolver++"}}


def their_scheduler(sampler, config):
    """`sampler`'s diffusers scheduler made `from_config` of `config` (dpm_solver++_sde: with the SDE)."""
    return getattr(diffusers, SCHEDULERS[sampler]).from_config(config, **CLASS_OPTIONS.get(sampler, {}))


# --------------------------------------------------------------------------- grids


GRID_CASES = [
    ("dpm_solver++", dict(final_sigmas_type="sigma_min")),
    ("dpm_solver++", dict(use_karras_sigmas=True)),
    ("dpm_solver++", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("dpm_solver++_sde", dict(final_sigmas_type="sigma_min", timestep_spacing="trailing")),
    ("euler", dict(final_sigmas_type="sigma_min")),
    ("euler", dict(use_karras_sigmas=True)),
    ("heun", dict(use_karras_sigmas=True)),
    ("heun", dict(final_sigmas_type="sigma_min")),  # not a HeunDiscreteScheduler key: dropped by from_config
]


@pytest.mark.parametrize("sampler, options", GRID_CASES)
def test_noise_levels_with_and_without_the_key_match_diffusers(sampler, options):
    for config in (dict(SD1_SCHEDULER), dict(SD1_SCHEDULER, **options)):
        settings = sampler_scheduler(scheduler_settings(config, "test"), sampler)
        theirs = their_scheduler(sampler, config)
        theirs.set_timesteps(STEPS)
        sigmas, timesteps = theirs.sigmas.numpy(), theirs.timesteps.numpy()
        if sampler == "heun":
            sigmas, timesteps = np.append(sigmas[::2], sigmas[-1]), timesteps[::2]
        levels = sigma_levels(settings, STEPS, sampler=sampler, karras=False)
        np.testing.assert_allclose(levels, sigmas, rtol=5e-6)
        rounded = sampler.startswith("dpm")
        ours_t = np.asarray(step_of_sigma(settings, jnp.asarray(levels[:-1]), rounded=rounded))
        np.testing.assert_allclose(ours_t, timesteps, rtol=0, atol=2e-3)


def test_settings_read_from_the_config():
    config = dict(SD1_SCHEDULER, final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True,
                  solver_order=1, algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True)  # fmt: skip
    s = scheduler_settings(config, "test")
    assert (s.final_sigmas_type, s.lower_order_final, s.euler_at_final, s.solver_order, s.algorithm_type,
            s.solver_type, s.use_karras_sigmas) == ("sigma_min", False, True, 1, "sde-dpmsolver++", "heun", True)  # fmt: skip
    aliases = scheduler_settings(dict(SD1_SCHEDULER, algorithm_type="deis", solver_type="logrho"), "test")
    assert (aliases.algorithm_type, aliases.solver_type) == ("dpmsolver++", "midpoint")  # as diffusers reads them
    assert sampler_scheduler(scheduler_settings(SD1_SCHEDULER, "t"), "dpm_solver++_sde").algorithm_type == "sde-dpmsolver++"


NO_EFFECT = dict(
    _class_name="PNDMScheduler", _diffusers_version="0.30.0", _use_default_values=["beta_end"], trained_betas=None,
    variance_type=None, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=3.0, use_dynamic_shifting=False,
    time_shift_type="exponential", interpolation_type="linear", timestep_type="discrete", sigma_min=None,
    sigma_max=None, lambda_min_clipped=-5.1, predict_x0=True, disable_corrector=[], solver_p=None,
    shift_terminal=None,
)  # fmt: skip


@pytest.mark.parametrize("sampler", ["dpm_solver++", "euler", "heun"])
def test_keys_accepted_without_effect_leave_every_grid_as_diffusers(sampler):
    assert set(NO_EFFECT) == set(ACCEPTED_WITHOUT_EFFECT)
    config = dict(SD1_SCHEDULER, **NO_EFFECT)
    plain = sampler_scheduler(scheduler_settings(SD1_SCHEDULER, "test"), sampler)
    settings = sampler_scheduler(scheduler_settings(config, "test"), sampler)
    assert settings._replace(config=None, schedule=None) == plain._replace(config=None, schedule=None)
    theirs = their_scheduler(sampler, {k: v for k, v in config.items() if k not in ("predict_x0", "solver_p", "_use_default_values")})
    theirs.set_timesteps(STEPS)
    reference = their_scheduler(sampler, SD1_SCHEDULER)
    reference.set_timesteps(STEPS)
    np.testing.assert_array_equal(theirs.sigmas.numpy(), reference.sigmas.numpy())


REFUSED = [
    ("solver_order", 4), ("algorithm_type", "dpmsolver"), ("algorithm_type", "sde-dpmsolver"),
    ("final_sigmas_type", "sigma_max"), ("solver_type", "bh3"), ("lower_order_final", "yes"),
    ("thresholding", 1), ("rescale_betas_zero_snr", "yes"), ("use_exponential_sigmas", True),
    ("use_beta_sigmas", True), ("use_lu_lambdas", True), ("use_flow_sigmas", True), ("interpolation_type", "log_linear"),
    ("timestep_type", "continuous"), ("sigma_min", 0.1), ("sigma_max", 10.0), ("lambda_min_clipped", -1.0),
    ("variance_type", "learned_range"), ("variance_type", "fixed_large"), ("trained_betas", [0.1, 0.2]),
    ("prediction_type", "flow_prediction"), ("timestep_spacing", "karras"), ("steps_offset", -1),
    ("set_alpha_to_one", "no"), ("clip_sample", 1), ("predict_x0", False), ("beta_schedule", "exponential"),
    ("use_karras_sigmas", 1),
]  # fmt: skip


@pytest.mark.parametrize("key, value", REFUSED)
def test_unsupported_values_are_refused_naming_key_and_value(key, value):
    with pytest.raises(WeightsError) as caught:
        scheduler_settings(dict(SD1_SCHEDULER, **{key: value}), "scheduler_config.json")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("scheduler_config.json: ") and f"{key}={value!r}" in message


def test_unknown_keys_are_refused_naming_them():
    with pytest.raises(WeightsError, match=r"^f\.json: unknown scheduler setting\(s\) shift=2\.0, zoom='x'; "):
        scheduler_settings(dict(SD1_SCHEDULER, zoom="x", shift=2.0), "f.json")


def test_clip_sample_is_each_class_default():
    """DDIMScheduler clips x̂_0 by default (clip_sample absent), HeunDiscreteScheduler when asked; the σ-grid
    samplers without the key ignore it, as diffusers."""
    absent = scheduler_settings({k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"}, "test")
    assert sampler_scheduler(absent, "ddim").clip_sample is True
    assert sampler_scheduler(scheduler_settings(dict(SD1_SCHEDULER, clip_sample=True), "t"), "heun").clip_sample
    assert sampler_scheduler(absent, "ddpm").clip_sample is True
    assert sampler_scheduler(absent, "euler").clip_sample is False


# --------------------------------------------------------------------------- end to end


def with_config(sd1_pair, sampler, options):
    """(diffusers pipeline with `sampler`'s scheduler made from_config of the folder's config plus `options`,
    jaxdiff pipeline on the same config)."""
    pipe, ours = sd1_pair
    if not hasattr(pipe, "folder_scheduler"):
        pipe.folder_scheduler = pipe.scheduler
    # the folder's keys without those diffusers defaulted (`_use_default_values`, which from_config would also
    # apply to `options`): each class then takes its own default for them, as from the folder's file
    folder = pipe.folder_scheduler.config
    defaulted = {"_use_default_values", *folder.get("_use_default_values", [])}
    config = {**{k: v for k, v in folder.items() if k not in defaulted}, **options}
    pipe.scheduler = their_scheduler(sampler, config)
    settings = scheduler_settings({**ours.scheduler.config, **options}, "test")
    return pipe, LatentPipeline(dataclasses.replace(ours.model, scheduler=settings))


def run_both(sd1_pair, sampler, options, *, seed=0, noise_seed=10):
    pipe, ours = with_config(sd1_pair, sampler, options)
    noise = random_noise(noise_seed)
    theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=nchw(noise), output_type="np").images  # fmt: skip
    mine = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler,
                              seed=seed, latents=noise, output_type="float")  # fmt: skip
    return mine, theirs


WITHOUT = {}
END_TO_END = [
    ("dpm_solver++", dict(final_sigmas_type="sigma_min")),
    ("dpm_solver++", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpm_solver++", dict(final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True)),
    ("dpm_solver++", dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_type="heun")),
    ("dpm_solver++", dict(solver_order=1)),
    ("euler", dict(final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("sampler, options", END_TO_END, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_end_to_end_with_the_key_matches_diffusers(sd1, sampler, options):  # noqa: F811
    mine, theirs = run_both(sd1, sampler, options)
    assert_close(mine, theirs)
    if sampler not in WITHOUT:  # without the key: once per sampler
        WITHOUT[sampler] = run_both(sd1, sampler, {})
        assert_close(*WITHOUT[sampler])
    assert np.max(np.abs(mine - WITHOUT[sampler][0])) > 1e-4, "the key changes the images"


def dpm_step_noise(seed, shape):
    """The noise dpm_solver++_sde adds at step i (NHWC): text_to_image splits PRNGKey(seed) into (initial noise,
    sampler) keys; step i draws `step_noise(sampler key, i, x)`."""
    _, loop_rng = jax.random.split(jax.random.PRNGKey(seed))
    return [np.asarray(step_noise(loop_rng, i, jnp.zeros(shape))) for i in range(STEPS)]


def hand_noise(monkeypatch, module, noise):
    """diffusers' `randn_tensor` in `module` returns `noise` (NHWC), one per call."""
    draws = iter(noise)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: nchw(next(draws)).reshape(shape))
    return draws


@pytest.mark.parametrize("options", [{}, dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_type="heun")],
                         ids=["default", "sigma_min-heun"])  # fmt: skip
def test_dpm_solver_pp_2m_sde_with_the_same_noise_matches_diffusers(sd1, monkeypatch, options):  # noqa: F811
    seed = 4
    module = diffusers.schedulers.scheduling_dpmsolver_multistep
    draws = hand_noise(monkeypatch, module, dpm_step_noise(seed, random_noise(10).shape))
    mine, theirs = run_both(sd1, "dpm_solver++_sde", options, seed=seed)
    assert next(draws, None) is None  # diffusers drew once per step
    assert_close(mine, theirs)
    ode, _ = run_both(sd1, "dpm_solver++", options)
    assert np.max(np.abs(mine - ode)) > 1e-2  # the noise matters


def test_ddpm_clip_sample_with_the_same_noise_matches_diffusers(sd1, monkeypatch):  # noqa: F811
    seed = 3
    results = []
    for clip in (True, False):
        noise = jaxdiff_step_noise(seed, STEPS, random_noise(10).shape)
        draws = hand_noise(monkeypatch, diffusers.schedulers.scheduling_ddpm, noise)
        mine, theirs = run_both(sd1, "ddpm", dict(clip_sample=clip), seed=seed)
        assert next(draws, None) is None
        assert_close(mine, theirs)
        results.append(mine)
    assert np.max(np.abs(results[0] - results[1])) > 1e-4, "clipping changes the images"
