"""Continuous-time models through `Pipeline` and `jaxdiff sample/eval/train`: the samples equal
`sample_continuous` on the network's D(x; σ), sampler options reach it, and bad settings are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import images

from jaxdiff.training import checkpoint
from jaxdiff.cli import load_config, main
from jaxdiff.config import validate
from jaxdiff.diffusion.continuous import conditioned_denoiser, model_denoiser, process_from_config
from jaxdiff.models import create_model
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.config.recipes import digits_edm
from jaxdiff.samplers import sample_continuous
from jaxdiff.training.step import init_train_state, make_optimizer
from tests.helpers import write_workdir


def tiny_edm(num_classes=0):
    """digits_edm with a 16-channel SongUNet; label_dropout makes the null label meaningful for guidance."""
    config = digits_edm()
    config.model.num_classes = num_classes
    config.model.song_unet.update(model_channels=16, attn_resolutions=(), label_dim=num_classes)
    config.sampling.batch_size = 4
    return validate(config)


def save(path, config):
    """A workdir at step 3 whose EMA weights are perturbed (the zero-initialised output layer would hide them)."""
    model = create_model(config.model)
    state = init_train_state(config, model, make_optimizer(config.training))
    ema = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), state.params)
    checkpoint.save_model(path, config, state.params, ema, step=3)
    return model, ema


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm")
    config = tiny_edm()
    model, ema = save(path, config)
    return path, config, model, ema


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm")
    write_workdir(path)
    return path


def expected_images(config, model, params, n, sampler, steps, seed=0, **options):
    """What `Pipeline.sample` should draw in one batch: sample_continuous on the network's D, key fold_in(seed, 0)."""
    process = process_from_config(config.diffusion)
    denoiser = model_denoiser(config, model, params, process)
    x = sample_continuous(denoiser, process, (n, 8, 8, 1), jax.random.fold_in(jax.random.PRNGKey(seed), 0),
                          sampler=sampler, steps=steps, **options)  # fmt: skip
    return images.to_uint8(np.asarray(x))


def test_denoise_of_a_continuous_pipeline_is_the_preconditioned_network(edm_run):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, ln σ/4), written out in float64 around the network's output."""
    path, config, model, ema = edm_run
    pipe = Pipeline.from_checkpoint(path)
    assert pipe.continuous and pipe.step == 3 and pipe.default_sampler == "heun"
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1))
    sigma = np.array([0.01, 1.0, 40.0])
    s, sd = sigma[:, None, None, None], 0.5
    f = np.asarray(model.apply({"params": ema}, jnp.asarray(x / np.sqrt(s**2 + sd**2), jnp.float32),
                               jnp.asarray(np.log(sigma) / 4, jnp.float32), None), np.float64)  # fmt: skip
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / np.sqrt(s**2 + sd**2) * f
    np.testing.assert_allclose(np.asarray(pipe.denoise(x, sigma)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise levels σ > 0"):
        pipe.denoise(x, np.array([1.0, 0.0, 2.0]))


@pytest.mark.parametrize(
    "sampler, steps, options",
    [
        ("heun", 4, {}),
        ("pc", 3, dict(predictor="ancestral", corrector="ald", snr=0.1, n_corrector=2)),
        ("edm_stochastic", 4, dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)),
    ],
)
def test_pipeline_samples_are_sample_continuous_with_the_options(edm_run, sampler, steps, options):
    path, config, model, ema = edm_run
    pipe = Pipeline.from_checkpoint(path)
    got = pipe.sample(3, sampler=sampler, steps=steps, seed=5, **options)
    np.testing.assert_array_equal(got, expected_images(config, model, ema, 3, sampler, steps, seed=5, **options))
    assert len(np.unique(got)) > 10  # not a constant (a NaN becomes 0)


def test_model_calls_of_the_continuous_samplers(edm_run):
    pipe = Pipeline.from_checkpoint(edm_run[0])
    assert pipe.model_calls() == 35  # the config's heun, 18 steps
    assert pipe.model_calls("pc", 10, corrector="langevin", n_corrector=2) == 31
    assert pipe.model_calls("euler_maruyama", 10) == 11
    assert pipe.model_calls("ode") is None


def test_classifier_free_guidance_of_a_class_conditional_continuous_model(tmp_path):
    """(1 + w)·D(x; σ, y) − w·D(x; σ, null): SongUNet's null label is its all-zero label vector."""
    config = tiny_edm(num_classes=3)
    model, ema = save(tmp_path, config)
    pipe = Pipeline.from_checkpoint(tmp_path)
    got = pipe.sample(2, sampler="heun", steps=3, class_label=1, guidance=2.0)
    process = process_from_config(config.diffusion)
    denoise = conditioned_denoiser(config, model, process)
    labels = jnp.ones((2,), jnp.int32)

    def guided(x, sigma):
        return 3.0 * denoise(ema, x, sigma, labels) - 2.0 * denoise(ema, x, sigma, None)

    x = sample_continuous(guided, process, (2, 8, 8, 1), jax.random.fold_in(jax.random.PRNGKey(0), 0),
                          sampler="heun", steps=3)  # fmt: skip
    np.testing.assert_array_equal(got, images.to_uint8(np.asarray(x)))
    assert not np.array_equal(got, pipe.sample(2, sampler="heun", steps=3, class_label=1))


def test_sample_cli_passes_the_sampler_options(edm_run, tmp_path, capsys):
    path, config, model, ema = edm_run
    runs = {
        "pc": (["--predictor", "reverse_diffusion", "--corrector", "langevin", "--snr", "0.16", "--steps", "3"],
               dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16, n_corrector=1), 3),
        "edm_stochastic": (["--s-churn", "40", "--s-min", "0.05", "--s-max", "50", "--s-noise", "1.003", "--steps", "4"],
                           dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003), 4),
        "ode": (["--rtol", "1e-3", "--atol", "1e-3"], dict(rtol=1e-3, atol=1e-3), None),
    }  # fmt: skip
    for sampler, (flags, options, steps) in runs.items():
        out = tmp_path / f"{sampler}.npz"
        argv = ["sample", "--workdir", str(path), "--num", "2", "--sampler", sampler, *flags, "--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        with np.load(out) as saved:
            got = saved["images"]
        np.testing.assert_array_equal(got, expected_images(config, model, ema, 2, sampler, steps, **options))


def one_line_error(capsys, argv, *fragments):
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err


def no_parameter_reads(monkeypatch):
    """Reading a checkpoint's parameters fails the test: flags are checked on the saved config before that."""

    def read_params(*args, **kwargs):
        raise AssertionError("the parameters were read before the flags were checked")

    monkeypatch.setattr(checkpoint, "read_params", read_params)


def test_sampler_mistakes_are_one_line_errors_before_any_output(edm_run, ddpm_run, tmp_path, capsys, monkeypatch):
    no_parameter_reads(monkeypatch)
    edm, ddpm = str(edm_run[0]), str(ddpm_run)
    for workdir, flags, fragments in [
        (edm, ["--sampler", "ddpm"], ["sampler 'ddpm' is for discrete-schedule models", "process is 'edm'"]),
        (edm, ["--sampler", "nope"], ["unknown sampler 'nope'"]),
        (edm, ["--sampler", "pc", "--predictor", "leapfrog"], ["unknown predictor 'leapfrog'"]),
        (edm, ["--sampler", "pc", "--corrector", "hmc"], ["unknown corrector 'hmc'"]),
        (edm, ["--sampler", "heun", "--steps", "0"], ["steps=0 must be an int in [1, 100000]"]),
        (edm, ["--sampler", "heun", "--steps", "100000000"], ["steps=100000000 must be an int in [1, 100000]"]),
        (edm, ["--sampler", "heun", "--snr", "0.2"], ["unknown option(s) ['snr'] for sampler 'heun'"]),
        (edm, ["--sampler", "ode", "--rtol", "0"], ["rtol"]),
        (edm, ["--trajectory", str(tmp_path / "t.png")], ["--trajectory is for the discrete family's own samplers"]),
        (ddpm, ["--sampler", "pc"], ["sampler 'pc' is for continuous-time models"]),
        (ddpm, ["--snr", "0.2"], ["--snr: options of the continuous-time samplers"]),
    ]:
        out = tmp_path / "x" / "grid.png"
        one_line_error(capsys, ["sample", "--workdir", workdir, "--num", "2", *flags, "--out", str(out)], *fragments)
        assert not out.parent.exists()


def test_eval_flag_mistakes_are_one_line_errors_before_the_parameters_are_read(edm_run, ddpm_run, capsys,
                                                                             monkeypatch):  # fmt: skip
    no_parameter_reads(monkeypatch)
    edm, ddpm = str(edm_run[0]), str(ddpm_run)
    for workdir, flags, fragments in [
        (edm, ["--sampler", "nope"], ["unknown sampler 'nope'"]),
        (edm, ["--sampler", "heun", "--snr", "0.2"], ["unknown option(s) ['snr'] for sampler 'heun'"]),
        (edm, ["--bpd-num-t", "10"], ["--bpd-num-t is for discrete-schedule models"]),
        (ddpm, ["--sampler", "pc"], ["sampler 'pc' is for continuous-time models"]),
    ]:
        one_line_error(capsys, ["eval", "--workdir", workdir, "--metrics", "bpd", *flags], *fragments)


def test_eval_bpd_of_a_continuous_model_is_the_ode_bits_per_dim(edm_run, tmp_path, capsys):
    """Test-split images in order, batch b keyed fold_in(key(seed), b); a rerun resumes to the same result."""
    from jaxdiff.data.sources import load_digits
    from jaxdiff.evaluation.ode_likelihood import ode_bits_per_dim

    path, config, model, ema = edm_run
    workdir = tmp_path / "w"
    checkpoint_copy = save(workdir, config)
    argv = ["eval", "--workdir", str(workdir), "--metrics", "bpd", "--bpd-images", "6", "--bpd-batch-size", "4",
            "--sampler", "ode", "--rtol", "1e-3", "--atol", "1e-3", "--seed", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    got = float(capsys.readouterr().out.split("bpd: ")[1].split()[0])
    process = process_from_config(config.diffusion)
    denoiser = model_denoiser(config, model, checkpoint_copy[1], process)
    test_images = load_digits("test").images
    expected = []
    for b, (start, count) in enumerate(((0, 4), (4, 2))):
        padded = np.zeros((4, 8, 8, 1), np.uint8)
        padded[:count] = test_images[start : start + count]
        bpd, _ = ode_bits_per_dim(denoiser, process, padded, jax.random.fold_in(jax.random.key(2), b), rtol=1e-3,
                                  atol=1e-3)  # fmt: skip
        expected += list(np.asarray(bpd)[:count])
    assert got == pytest.approx(np.mean(expected), abs=1e-4)
    assert 0 < got < 20
    assert len(list(workdir.glob("bpd_step3_test.json.progress-*"))) == 1
    # --rtol/--atol are the bits/dim's tolerances whatever the sampler (here the config's heun, which lacks them).
    assert main([flag for flag in argv if flag not in ("--sampler", "ode")]) == 0, capsys.readouterr().err
    assert float(capsys.readouterr().out.split("bpd: ")[1].split()[0]) == pytest.approx(got, abs=1e-4)
    argv_t = argv + ["--bpd-num-t", "4"]
    one_line_error(capsys, argv_t, "--bpd-num-t is for discrete-schedule models")


def test_info_counts_the_network_of_the_config(capsys):
    """`jaxdiff info` of a SongUNet recipe: the count of `parameter_shapes`, not of the DDPM U-Net keys."""
    from jaxdiff.models import count_parameters
    from jaxdiff.models.summary import parameter_shapes

    overrides = ["--config.model.song_unet.model_channels=16", "--config.model.song_unet.attn_resolutions=()"]
    assert main(["info", "--config", "digits_edm", *overrides]) == 0
    expected = count_parameters(parameter_shapes(load_config("digits_edm", overrides).model))
    assert f"parameters: {expected:,}" in capsys.readouterr().out
    assert expected != count_parameters(parameter_shapes(load_config("digits", []).model))


@pytest.mark.slow
def test_train_cli_runs_resumes_and_samples_a_continuous_model(tmp_path, capsys):
    """A few steps of the EDM digits demo through `jaxdiff train`: checkpoints, a sample grid, then a resume."""
    overrides = [
        "--config.model.song_unet.model_channels=16", "--config.model.song_unet.attn_resolutions=()",
        "--config.training.batch_size=8", "--config.training.num_train_steps=4",
        "--config.training.checkpoint_every_steps=2", "--config.training.sample_every_steps=4",
        "--config.training.num_sample_images=2", "--config.training.log_every_steps=2", "--config.sampling.steps=3",
    ]  # fmt: skip
    workdir = tmp_path / "run"
    assert main(["train", "--config", "digits_edm", "--workdir", str(workdir), *overrides]) == 0
    assert "finished at step 4" in capsys.readouterr().out
    assert (workdir / "samples" / "step_00000004.png").is_file()
    pipe = Pipeline.from_checkpoint(workdir)
    assert pipe.step == 4 and pipe.continuous
    more = [arg.replace("num_train_steps=4", "num_train_steps=6") for arg in overrides]
    assert main(["train", "--config", "digits_edm", "--workdir", str(workdir), *more]) == 0
    assert "finished at step 6" in capsys.readouterr().out
    config = load_config("digits_edm", more)
    assert Pipeline.from_checkpoint(workdir).config.to_dict() == config.to_dict()


def test_a_config_saved_before_the_continuous_keys_has_no_differences_on_resume():
    from jaxdiff.config import default_config

    saved = default_config().to_dict()
    del saved["model"]["network"], saved["model"]["song_unet"], saved["diffusion"]["process"]
    assert checkpoint.config_differences(saved, default_config()) == []
    assert "model.network: 'ddpm_unet' -> 'song_unet'" in checkpoint.config_differences(saved, digits_edm())
