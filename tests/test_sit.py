"""SiT (github:willisma/SiT) end to end: its reversed time (τ = 1 − t, τ = 0 noise) as `diffusion.time_reversed`
against a float64 NumPy Euler loop in SiT's own time; a tiny SiT `.pt` (torch.save) with a tiny VAE folder sampled
by `Pipeline.from_pretrained` against a float64 NumPy/torch re-implementation of SiT's sample.py SDE mode
(transport.Sampler.sample_sde: Euler–Maruyama, diffusion_form sigma, last step Mean of 0.04, forward_with_cfg
guiding the first 3 channels); `guidance=None` as the config's default; the flow samplers' CLI flags and their
refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.cli import main
from jaxdiff.config.defaults import default_config
from jaxdiff.config.validation import validate
from jaxdiff.diffusion.continuous import flow_network, network_denoiser
from jaxdiff.errors import ConfigError
from jaxdiff.processes import make_process
from jaxdiff.readers.dit_checkpoint import DIT_LATENT_SCALE
from jaxdiff.samplers import sample_continuous
from jaxdiff.sampling.pipeline import Pipeline
from tests import test_dit_pipeline
from tests.test_dit_pipeline import IMAGE, LATENT, assert_images_match, assert_sample_refusals, pixels
from tests.test_dit_readers import CLASSES, C, dit_state_dict, reference_forward, save

# The tiny VAE folder (latents 8×8×4 <-> images 16×16×3) and the tiny DiT size, shared with the DiT tests.
vae_folder = test_dit_pipeline.vae_folder
tiny_size = test_dit_pipeline.tiny_size


# --------------------------------------------------------------------------- SiT's time as a config key

SHAPE = (2, 4, 4, 2)


def sit_net_numpy(x: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """A stand-in network in SiT's time τ (float64): nonlinear in x and τ, so a wrong time or sign shows."""
    tau = tau.reshape(-1, 1, 1, 1)
    return np.tanh(0.7 * x + 2.0 * tau) * (1.0 + tau**2) - 0.3 * x * np.cos(3.0 * tau)


def sit_net_jax(x, tau):
    tau = jnp.reshape(tau, (-1, 1, 1, 1))
    return jnp.tanh(0.7 * x + 2.0 * tau) * (1.0 + tau**2) - 0.3 * x * jnp.cos(3.0 * tau)


def flow_settings(**overrides) -> ml_collections.ConfigDict:
    dc = default_config().diffusion
    dc.process, dc.parameterization, dc.loss_type, dc.time_scale = "flow", "velocity", "flow_matching", 1.0
    dc.update(overrides)
    return dc


def sit_euler_reference(x: np.ndarray, steps: int) -> np.ndarray:
    """SiT's ODE with a fixed Euler step, in float64 and in its own time: x += dτ·v(x, τ) from τ = 0 (noise) to 1."""
    taus = np.linspace(0.0, 1.0, steps + 1)
    x = x.astype(np.float64)
    for tau, tau_next in zip(taus[:-1], taus[1:]):
        x = x + (tau_next - tau) * sit_net_numpy(x, np.full(x.shape[0], tau))
    return x


def test_time_reversed_network_samples_as_sit_and_as_the_forward_network():
    process = make_process("flow")
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    steps = 6

    def draw(net_fn, dc, sampler="euler"):
        model = network_denoiser(net_fn, dc, process)
        return np.asarray(sample_continuous(model, process, SHAPE, jax.random.PRNGKey(4), sampler=sampler, steps=steps,
                                            noise=jnp.asarray(noise)), np.float64)  # fmt: skip

    reversed_sit = draw(sit_net_jax, flow_settings(time_reversed=True))
    np.testing.assert_allclose(reversed_sit, sit_euler_reference(noise, steps), rtol=0, atol=2e-5)
    # The equivalent t = 1-noise network, u(x, t) = −v(x, 1 − t), gives the same samples, on the SDE sampler too.
    forward = lambda x, t: -sit_net_jax(x, 1.0 - t)  # noqa: E731
    np.testing.assert_allclose(draw(forward, flow_settings()), reversed_sit, rtol=0, atol=2e-5)
    np.testing.assert_allclose(draw(forward, flow_settings(), "euler_maruyama"),
                               draw(sit_net_jax, flow_settings(time_reversed=True), "euler_maruyama"), rtol=0,
                               atol=2e-5)  # fmt: skip
    # Not blind: the same network read in the forward time samples something else.
    assert np.abs(draw(sit_net_jax, flow_settings()) - reversed_sit).max() > 0.1


@pytest.mark.parametrize(("parameterization", "sign"), [("velocity", -1.0), ("x0", 1.0), ("eps", 1.0), ("v", 1.0)])
def test_only_a_velocity_changes_sign_with_the_direction_of_time(parameterization, sign):
    x = np.random.default_rng(1).standard_normal(SHAPE)
    t = np.array([0.1, 0.8])
    dc = flow_settings(time_reversed=True, parameterization=parameterization, time_scale=3.0)
    ours = flow_network(sit_net_jax, dc)(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours, np.float64), sign * sit_net_numpy(x, 3.0 * (1.0 - t)), atol=1e-5)


def test_time_reversed_is_refused_off_the_flow_processes():
    config = default_config()
    config.diffusion.time_reversed = True
    for process, loss, kind, sampler in [("discrete", "mse", "eps", "ddpm"), ("ve", "dsm", "score", "pc")]:
        config.diffusion.process, config.diffusion.loss_type = process, loss
        config.diffusion.parameterization, config.sampling.sampler = kind, sampler
        with pytest.raises(ConfigError) as err:
            validate(config)
        assert str(err.value) == (f"config diffusion.time_reversed=True is a setting of the flow processes ('flow', "
                                  f"'gvp'); diffusion.process={process!r} takes only False")  # fmt: skip


# --------------------------------------------------------------------------- a SiT checkpoint, end to end


@pytest.fixture(scope="module")
def sit_file(tmp_path_factory, torch):
    """A tiny SiT `.pt` as released (a plain state dict, learned σ, 5 classes + the null row), named SiT-*."""
    sd = dit_state_dict(11)
    for name in sd:
        if name != "pos_embed":
            sd[name] = sd[name] * 0.5
    return save(torch, sd, tmp_path_factory.mktemp("sit") / "SiT-tiny.pt"), sd


def sit_step_noises(seed: int, steps: int, shape) -> np.ndarray:
    """The noise jaxdiff's euler_maruyama adds at step i of batch 0 of `Pipeline.sample(seed=seed)`: rng
    fold_in(PRNGKey(seed), 0) split into (init, noise) keys, normal(fold_in(fold_in(noise_key, i), 0))."""
    _, noise_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 0))
    keys = [jax.random.fold_in(jax.random.fold_in(noise_key, i), 0) for i in range(steps)]
    return np.stack([np.asarray(jax.random.normal(key, shape), np.float64) for key in keys])


def sit_sample_reference(torch, sd, vae, latents, labels, cfg_scale, steps, noises, *, guided_channels=3,
                         last_step_size=0.04):  # fmt: skip
    """SiT's sample.py SDE mode (Linear path, velocity model, Euler–Maruyama, diffusion_form "sigma", norm 1,
    last_step "Mean") in float64, SiT's time τ: τ_i = linspace(0, 1 − last_step_size, steps); each step
    x += (v + w·s)·dτ + sqrt(2w)·sqrt(dτ)·noises[i] with w = σ_τ = 1 − τ and s the score of the velocity
    (get_score_from_velocity: (τ·v − x)/(1 − τ) for α_τ = τ, σ_τ = 1 − τ); the last x += (v + w·s)·last_step_size
    at τ = 1 − last_step_size; v is forward_with_cfg's (guidance on `guided_channels`, SiT's forward dropping the
    σ channels); then vae.decode(x / 0.18215)."""
    taus = np.linspace(0.0, 1.0 - last_step_size, steps)
    d_tau = taus[1] - taus[0]
    x = latents.astype(np.float64)
    n, c = x.shape[0], x.shape[-1]
    null = np.full(n, CLASSES)

    def drift(x, tau):
        times = np.full(n, tau)
        cond = reference_forward(torch, sd, x, times, labels)[..., :c]
        uncond = reference_forward(torch, sd, x, times, null)[..., :c]
        v, g = cond.copy(), guided_channels
        v[..., :g] = uncond[..., :g] + cfg_scale * (cond[..., :g] - uncond[..., :g])
        w = 1.0 - tau
        score = (tau * v - x) / (1.0 - tau)
        return v + w * score, w

    for i, tau in enumerate(taus[:-1]):
        sde_drift, w = drift(x, tau)
        x = x + sde_drift * d_tau + np.sqrt(2.0 * w) * np.sqrt(d_tau) * noises[i]
    x = x + drift(x, taus[-1])[0] * last_step_size
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(x.transpose(0, 3, 1, 2) / DIT_LATENT_SCALE)).sample.numpy()
    return pixels(decoded)


def test_sit_checkpoint_samples_as_sit_sample_py(torch, tiny_size, sit_file, vae_folder):
    path, sd = sit_file
    pipe = Pipeline.from_pretrained(path, vae=vae_folder[0])
    config = pipe.config
    dc, sc = config.diffusion, config.sampling
    assert (pipe.family.name, pipe.image_shape, config.model.out_channels) == ("flow", IMAGE, C)
    assert (dc.process, dc.parameterization, dc.time_scale, dc.time_reversed) == ("flow", "velocity", 1.0, True)
    assert (sc.sampler, sc.steps, sc.diffusion_form, sc.diffusion_norm, sc.last_step, sc.last_step_size, sc.shift,
            sc.guidance, sc.guidance_channels, sc.clip_denoised) == ("euler_maruyama", 250, "sigma", 1.0, "mean",
                                                                     0.04, 1.0, 3.0, 3, False)  # fmt: skip
    assert validate(config) is config
    latents = np.random.default_rng(2).standard_normal((3, *LATENT)).astype(np.float32)
    labels, steps, seed = np.array([1, 4, 2]), 5, 3
    # guidance=None: the config's, sample.py's cfg_scale 4 (w = 3).
    ours = pipe.sample(3, class_label=labels, latents=latents, steps=steps, seed=seed)
    noises = sit_step_noises(seed, steps, latents.shape)
    expected = sit_sample_reference(torch, sd, vae_folder[1], latents, labels, 4.0, steps, noises)
    assert_images_match(ours, expected)
    # Not blind to what is matched: guiding all four channels, another cfg scale or no guidance give other images.
    for cfg_scale, channels in [(4.0, 4), (1.5, 3), (1.0, 3)]:
        other = sit_sample_reference(torch, sd, vae_folder[1], latents, labels, cfg_scale, steps, noises,
                                     guided_channels=channels)  # fmt: skip
        assert np.abs(other - expected).max() > 5, (cfg_scale, channels)


def test_variant_overrides_the_file_name(torch, tiny_size, sit_file, vae_folder, tmp_path):
    """A plain state dict says nothing of its variant: the file name decides unless `variant` is given."""
    renamed = save(torch, sit_file[1], tmp_path / "model.pt")
    as_dit = Pipeline.from_pretrained(renamed, vae=vae_folder[0])
    assert (as_dit.family.name, as_dit.config.model.out_channels) == ("discrete", 2 * C)
    as_sit = Pipeline.from_pretrained(renamed, vae=vae_folder[0], variant="sit")
    assert as_sit.config.to_dict() == Pipeline.from_pretrained(sit_file[0], vae=vae_folder[0]).config.to_dict()
    assert Pipeline.from_pretrained(sit_file[0], vae=vae_folder[0], variant="dit").family.name == "discrete"


# --------------------------------------------------------------------------- the CLI's flow flags


@pytest.mark.timeout(300)
def test_flow_flags_on_the_cli(capsys, tmp_path, torch, tiny_size, sit_file, vae_folder):
    common = ["sample", "--pretrained", sit_file[0], "--vae", str(vae_folder[0]), "--class-label", "2", "--steps",
              "4", "--num", "2"]  # fmt: skip
    outs = {}
    for name, flags in [("plain", []), ("shift", ["--shift", "3"])]:
        outs[name] = tmp_path / f"{name}.npz"
        assert main([*common, *flags, "--out", str(outs[name])]) == 0, capsys.readouterr().err
    plain, shifted = (np.load(outs[name])["images"] for name in ("plain", "shift"))
    assert plain.shape == (2, *IMAGE) and np.abs(plain.astype(int) - shifted).max() > 5
    capsys.readouterr()
    dit = save(torch, dit_state_dict(7), tmp_path / "DiT-tiny.pt")
    refused = [
        (["--pretrained", dit, "--vae", str(vae_folder[0]), "--shift", "3", "--last-step", "euler"],
         "--shift, --last-step: options of the flow processes' samplers (flow, gvp); no sampler of this model's "
         "family (discrete) takes them"),
        (["--workdir", str(tmp_path), "--prompt", "a cat", "--diffusion-form", "linear"],
         "--diffusion-form: options of pixel-space sampling; text-to-image (--prompt) does not take them"),
        (["--pretrained", sit_file[0], "--vae", str(vae_folder[0]), "--sampler", "ode", "--shift", "2"],
         "unknown option(s) ['shift'] for sampler 'ode'"),
        (["--workdir", str(tmp_path), "--prompt", "a cat", "--variant", "sit"],
         "--variant: the autoencoder and variant of a DiT/SiT checkpoint (.pt); text-to-image weights carry their own"),
    ]  # fmt: skip
    assert_sample_refusals(capsys, tmp_path, refused)
