"""diffusers' ScoreSdeVePipeline folders as jaxdiff models of uncentred data (`data.centered` False, [0, 1]).

A tiny NCSN++ `UNet2DModel` (block widths 128, where diffusers' 32 GroupNorm groups equal score_sde's
min(C // 4, 32)) with random weights is saved by diffusers itself. The converted model's D(y; σ) must be
y + σ²·(diffusers' UNet output), and jaxdiff's `pc` sampler must reproduce diffusers' ScoreSdeVeScheduler
loop fed the same noise, up to the documented differences (`jaxdiff.readers.score_folders`). The
uncentred range is also checked where the library uses it: training inputs, sample outputs and clipping,
and bits/dim (score_sde's offset 8 for [0, 1] data).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # parity with diffusers' PyTorch pipeline

from jaxdiff import Pipeline, cli, images  # noqa: E402
from jaxdiff.diffusion.continuous import model_denoiser, process_from_config  # noqa: E402
from jaxdiff.families.continuous import sample_in_image_range  # noqa: E402
from jaxdiff.convert.formats import convert  # noqa: E402
from jaxdiff.readers.formats import detect_format
from jaxdiff.sampling.pipeline import load_weights  # noqa: E402
from jaxdiff.evaluation.ode_likelihood import ode_bits_per_dim  # noqa: E402
from jaxdiff.models import create_model  # noqa: E402
from jaxdiff.processes import make_process  # noqa: E402
from jaxdiff.config.recipes import recipe  # noqa: E402
from jaxdiff.samplers import sample_continuous  # noqa: E402
from jaxdiff.samplers.grids import step_noise  # noqa: E402

SIZE = 8
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0


def save_ve_pipeline(folder, *, num_train_timesteps=500, snr=0.17):
    """A ScoreSdeVePipeline of a tiny NCSN++ with random weights (scaled as in test_score_networks), saved by
    diffusers; returns its UNet in eval mode."""
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(128, 128),
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        time_embedding_type="fourier", mid_block_scale_factor=2**0.5, norm_num_groups=None, norm_eps=1e-6,
        attention_head_dim=None, act_fn="silu",
    ).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in unet.named_parameters():
            offset = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.2) + offset)
    scheduler = ScoreSdeVeScheduler(num_train_timesteps=num_train_timesteps, snr=snr, sigma_min=SIGMA_MIN,
                                    sigma_max=SIGMA_MAX)  # fmt: skip
    ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return unet


def diffusers_score(unet, y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """diffusers' UNet output (the score: it divides by σ) for NHWC y, as NHWC float64."""
    with torch.no_grad():
        out = unet(torch.from_numpy(y.transpose(0, 3, 1, 2).copy()), torch.from_numpy(sigma)).sample
    return out.numpy().transpose(0, 2, 3, 1).astype(np.float64)


def jaxdiff_denoiser(config, params):
    model, process = create_model(config.model), process_from_config(config.diffusion)
    denoise = jax.jit(lambda p, x, sigma: model_denoiser(config, model, p, process)(x, sigma))
    return lambda x, sigma: denoise(params, x, sigma)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ve") / "pipe"
    unet = save_ve_pipeline(path)
    return path, unet


def test_folder_converts_to_an_uncentred_model_whose_score_is_diffusers(folder, tmp_path):
    path, unet = folder
    assert detect_format(path) == "score_sde_ve"
    out = convert(path, tmp_path / "run")
    from_workdir, from_folder = Pipeline.from_checkpoint(out), Pipeline.from_pretrained(path)
    for config in (from_workdir.config, from_folder.config):
        assert config.data.centered is False
        dc, sc = config.diffusion, config.sampling
        assert (dc.process, dc.parameterization, dc.sigma_min, dc.sigma_max) == ("ve", "score", SIGMA_MIN, SIGMA_MAX)
        assert (sc.sampler, sc.predictor, sc.corrector, sc.n_corrector, sc.steps) == ("pc", "reverse_diffusion",
                                                                                      "langevin", 1, 499)  # fmt: skip
        assert sc.snr == pytest.approx(0.17)

    rng = np.random.default_rng(0)
    sigma = np.array([0.02, 0.5, 3.0, 40.0], np.float32)
    y = (rng.uniform(0, 1, (4, SIZE, SIZE, 3)) + sigma[:, None, None, None] * rng.standard_normal((4, SIZE, SIZE, 3)))
    y = y.astype(np.float32)
    expected = y + sigma[:, None, None, None].astype(np.float64) ** 2 * diffusers_score(unet, y, sigma)
    for pipe in (from_workdir, from_folder):
        ours = np.asarray(pipe.denoise(y, sigma), np.float64)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    # The centred reading (the network fed 2y − 1, as score_sde's own checkpoints) is far from it.
    assert np.abs(np.asarray(from_folder.denoise(2 * y - 1, sigma)) - expected).max() > 0.1 * np.abs(expected).max()


def test_export_back_to_a_score_sde_ve_pipeline(folder, tmp_path):
    """folder -> jaxdiff workdir -> folder: diffusers loads it with the original tensors and scheduler settings."""
    from diffusers import ScoreSdeVePipeline

    path, unet = folder
    run = convert(path, tmp_path / "run")
    loaded = ScoreSdeVePipeline.from_pretrained(convert(run, tmp_path / "export", target_format="diffusers"))
    original, exported = unet.state_dict(), loaded.unet.state_dict()
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    settings = {key: loaded.scheduler.config[key] for key in ("num_train_timesteps", "sigma_min", "sigma_max",
                                                              "sampling_eps", "correct_steps")}  # fmt: skip
    assert settings == dict(num_train_timesteps=500, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sampling_eps=1e-5,
                            correct_steps=1)  # fmt: skip
    assert loaded.scheduler.config["snr"] == pytest.approx(0.17)


def test_export_refuses_what_the_pipeline_cannot_express(folder, tmp_path):
    from jaxdiff.convert.score_sde_ve_export import score_sde_ve_export

    config, params = load_weights(folder[0])
    config.data.centered = True
    with pytest.raises(ValueError, match=r"cannot export as a diffusers ScoreSdeVePipeline: data.centered=True "
                                         r"\(needs False\)"):  # fmt: skip
        score_sde_ve_export(config, params)
    config.data.centered = False
    config.model.ncsnpp.nf = 32
    with pytest.raises(ValueError, match=r"widths \[32, 32\] \(diffusers' attention GroupNorms"):
        score_sde_ve_export(config, params)
    config.model.ncsnpp.update(nf=128, progressive="residual")
    with pytest.raises(ValueError, match=r"model.ncsnpp.progressive='residual' \(diffusers' layout has 'output_skip'"):
        score_sde_ve_export(config, params)
    assert not (tmp_path / "export").exists()


def diffusers_pc_loop(unet, scheduler, x_T, noises, *, final_corrector: bool):
    """diffusers' ScoreSdeVePipeline loop (corrector, then predictor, at each of N times), with the noise of
    each draw taken in order from `noises` (NHWC); returns the last predictor mean (before the clamp)."""
    from diffusers.schedulers import scheduling_sde_ve

    queue = iter(noises)

    def next_noise(shape, **_):
        return torch.from_numpy(next(queue).transpose(0, 3, 1, 2).copy())

    original = scheduling_sde_ve.randn_tensor
    scheduling_sde_ve.randn_tensor = next_noise
    try:
        n = len(scheduler.timesteps)
        sample = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                sigma_t = scheduler.sigmas[i] * torch.ones(sample.shape[0])
                if i < n - 1 or final_corrector:
                    sample = scheduler.step_correct(unet(sample, sigma_t).sample, sample).prev_sample
                out = scheduler.step_pred(unet(sample, sigma_t).sample, t, sample)
                sample, mean = out.prev_sample, out.prev_sample_mean
    finally:
        scheduling_sde_ve.randn_tensor = original
    return mean.numpy().transpose(0, 2, 3, 1)


def test_pc_sampler_follows_diffusers_scheduler_with_the_same_noise(tmp_path):
    """N = 4 scheduler times = jaxdiff's pc with 3 steps: the same grid, corrector and predictor formulas. Where
    the loops differ (`score_folders`), diffusers is fed what jaxdiff does: no corrector before the last
    (denoising) step, no noise in the predictor step that reaches t_min. Its predictor's G² from N geometric
    levels differs from the grid's by a relative 8e-5 here."""
    from diffusers import ScoreSdeVeScheduler

    unet = save_ve_pipeline(tmp_path / "pipe", num_train_timesteps=4, snr=0.16)
    config, params = load_weights(tmp_path / "pipe")
    sc = config.sampling
    assert sc.steps == 3
    process = process_from_config(config.diffusion)
    shape = (2, SIZE, SIZE, 3)
    rng = jax.random.key(5)
    ours = sample_continuous(jaxdiff_denoiser(config, params), process, shape, rng, sampler="pc", steps=sc.steps,
                             predictor=sc.predictor, corrector=sc.corrector, snr=sc.snr, n_corrector=sc.n_corrector)

    init_key, noise_key = jax.random.split(rng)
    x_T = np.asarray(process.prior_sample(init_key, shape))
    draws = []
    for i in range(sc.steps):  # corrector (sub-step 1), then predictor (sub-step 0), as samplers.pc draws them
        draws += [np.asarray(step_noise(noise_key, i, x_T, 1)), np.asarray(step_noise(noise_key, i, x_T, 0))]
    draws[-1] = np.zeros(shape, np.float32)  # the predictor step to t_min: jaxdiff keeps its mean
    draws.append(np.zeros(shape, np.float32))  # the last (denoising) step: its mean is the result
    scheduler = ScoreSdeVeScheduler.from_pretrained(tmp_path / "pipe" / "scheduler")
    scheduler.set_timesteps(4)
    scheduler.set_sigmas(4)
    expected = diffusers_pc_loop(unet, scheduler, x_T, draws, final_corrector=False)
    assert np.abs(expected).max() > 1.0  # a real comparison, not of two near-zero arrays
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_samples_leave_the_model_range_as_images():
    """Clipping to the model's range, then [0, 1] -> [-1, 1]; a centred model's samples pass through."""
    config = recipe("sde_ve_ncsnpp_continuous")
    process = make_process("ve")
    shape = (2, 2, 2, 1)
    for centered, clip, value, expected in ((False, True, 1.7, 1.0), (False, True, -0.4, -1.0),
                                            (False, False, 0.25, -0.5), (True, True, -1.6, -1.0),
                                            (True, False, 0.25, 0.25)):  # fmt: skip
        config.data.centered, config.sampling.clip_denoised = centered, clip
        constant = functools.partial(lambda v, x, sigma: jnp.full_like(x, v), value)
        out = sample_in_image_range(config, constant, process, shape, jax.random.key(0), sampler="heun", steps=3)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-6)


def test_pipeline_images_of_an_uncentred_model(folder):
    """uint8 images of the pipeline = to_uint8(2·x̂_0 − 1) of the sampler's [0, 1] output."""
    path, _ = folder
    pipe = Pipeline.from_pretrained(path)
    rng = jax.random.key(3)
    got, _, _ = pipe.sample_batch(2, rng, sampler="ddim", steps=4)
    config, params = load_weights(path)
    y = sample_continuous(jaxdiff_denoiser(config, params), process_from_config(config.diffusion),
                          (2, SIZE, SIZE, 3), rng, sampler="ddim", steps=4)  # fmt: skip
    np.testing.assert_array_equal(got, images.to_uint8(2 * np.asarray(y) - 1))
    assert got.min() < 128 and got.max() > 0


def test_training_sees_uncentred_data(monkeypatch):
    from jaxdiff.families import continuous
    from jaxdiff.training import diffusion_step as train

    seen = {}

    def capture(apply_fn, params, process, x_start, rng, **options):
        seen["x_start"] = x_start
        return jnp.zeros(())

    monkeypatch.setattr(continuous, "dsm_loss", capture)
    config = recipe("sde_ve_ncsnpp_continuous")
    config.data.random_flip = False
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3) * 2
    for centered, expected in ((True, pixels / 127.5 - 1), (False, pixels / 255.0)):
        config.data.centered = centered
        train.make_loss_fn(config, None)(None, jnp.asarray(pixels), jnp.zeros(2, jnp.int32), jax.random.key(0))
        np.testing.assert_allclose(np.asarray(seen["x_start"]), expected, rtol=0, atol=1e-6)


def gaussian_denoiser(mean: float, var: float):
    """The exact D(x; σ) of data N(mean, var·I): (var·x + σ²·mean)/(var + σ²)."""

    def denoiser(x, sigma):
        s2 = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)) ** 2
        return (var * x + s2 * mean) / (var + s2)

    return denoiser


def test_bits_per_dim_of_uncentred_data_has_score_sde_offset():
    """Gaussian data y ~ N(0.55, 0.04) in [0, 1], and its image x = 2y − 1 under doubled noise levels: the same
    bits/dim (the likelihoods differ by D·ln 2, the offsets 8 and 7 by one bit), equal to the analytic value.
    σ_max is large enough that the zero-mean prior's mismatch (about mean/σ_max nats) is negligible."""
    pixels = jnp.asarray(np.random.default_rng(1).integers(100, 180, (3, 2, 2, 1)), jnp.uint8)
    rng = jax.random.key(2)
    mean_y, var_y = 0.55, 0.04
    process_y = make_process("ve", sigma_min=0.01, sigma_max=1e4)
    process_x = make_process("ve", sigma_min=0.02, sigma_max=2e4)
    bpd_y, _ = ode_bits_per_dim(gaussian_denoiser(mean_y, var_y), process_y, pixels, rng, centered=False,
                                divergence="exact")  # fmt: skip
    bpd_x, _ = ode_bits_per_dim(gaussian_denoiser(2 * mean_y - 1, 4 * var_y), process_x, pixels, rng,
                                divergence="exact")  # fmt: skip
    np.testing.assert_allclose(np.asarray(bpd_y), np.asarray(bpd_x), rtol=0, atol=2e-4)

    from jaxdiff.evaluation.ode_likelihood import dequantize

    y = (np.asarray(dequantize(pixels, jax.random.split(rng)[0]), np.float64) + 1) / 2
    var = var_y + float(process_y.sigma(process_y.t_min)) ** 2
    log_p = np.sum(-0.5 * np.log(2 * np.pi * var) - (y - mean_y) ** 2 / (2 * var), axis=(1, 2, 3))
    analytic = -log_p / (4 * math.log(2)) + 8
    np.testing.assert_allclose(np.asarray(bpd_y), analytic, rtol=0, atol=1e-3)


def test_discrete_models_refuse_uncentred_data():
    from jaxdiff.config import ConfigError, validate

    config = recipe("cifar10")
    config.data.centered = False
    with pytest.raises(ConfigError, match=r"data.centered=False needs a continuous diffusion.process"):
        validate(config)


def test_cli_samples_a_score_sde_ve_folder(folder, tmp_path, capsys):
    path, _ = folder
    out = tmp_path / "grid.png"
    argv = ["sample", "--pretrained", str(path), "--sampler", "pc", "--steps", "2", "--num", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert out.is_file() and "2 images" in capsys.readouterr().out
