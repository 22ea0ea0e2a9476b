"""Released score_sde / EDM / ScoreSdeVePipeline weights through `convert`, `load_weights`, the Pipeline and the CLI.

Inputs are written as tests/test_score_converters.py writes them (tiny networks). Each converted model's
D(x; σ) is checked against one built in the test from the reader's own output, in the reader's conventions:
score_sde's VP ε-model fed α·x with labels 999·t, its VE score model on [0, 1] data fed 2y − 1, EDM's
preconditioning written out. ScoreSdeVePipeline folders: tests/test_score_sde_ve_folder.py.
"""

import pickle

import jax
import numpy as np
import pytest

from jaxdiff import Pipeline, cli
from jaxdiff.errors import UsageError
from jaxdiff.diffusion.continuous import model_denoiser, process_from_config
from jaxdiff.readers import continuous_configs, edm_pickle, score_sde_checkpoint
from jaxdiff.convert.formats import convert
from jaxdiff.readers.formats import detect_format
from jaxdiff.sampling.pipeline import load_weights
from jaxdiff.models import create_model, ncsnpp, song_unet
from tests.test_score_converters import (  # noqa: F401 - edm_modules is a fixture
    EDM, SCORE_SDE, CallsGlobal, case_tensors, edm_modules, random_tree, tiny_ncsnpp_config,
    write_checkpoint, write_snapshot,
)  # fmt: skip

SIGMAS = np.array([0.05, 0.7, 3.0, 20.0], np.float32)


def noisy_inputs(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5, 1.5, (len(SIGMAS), size, size, 3)).astype(np.float32)


def jaxdiff_denoiser(config, params):
    """D(x; σ) of a jaxdiff config and params, as the library builds it (jitted with the params as an argument,
    as the Pipeline runs it)."""
    model, process = create_model(config.model), process_from_config(config.diffusion)
    denoise = jax.jit(lambda p, x, sigma: model_denoiser(config, model, p, process)(x, sigma))
    return lambda x, sigma: denoise(params, x, sigma)


# --------------------------------------------------------------------------- score_sde checkpoints


@pytest.fixture
def score_sde_checkpoint_dir(tmp_path, monkeypatch):
    """A score_sde workdir (checkpoints/checkpoint_4) of a tiny network; config names map to that network."""

    def write(case: str, seed: int = 0):
        config = tiny_ncsnpp_config(case)
        monkeypatch.setattr(score_sde_checkpoint, "network_config", lambda name: config)
        names = SCORE_SDE[case]["params"]
        write_checkpoint(tmp_path / "sde" / "checkpoints" / "checkpoint_4", random_tree(names, seed),
                         random_tree(names, seed + 1))  # fmt: skip
        return tmp_path / "sde"

    return write


def vp_reference(net, beta_min: float, beta_max: float):
    """score_sde's VP ε-model as D(x; σ): t solves ½(β_max − β_min)t² + β_min·t = ln(1 + σ²) (float64),
    the network sees α·x, α = 1/sqrt(1 + σ²), with label 999·t; D = x − σ·ε̂."""

    def denoiser(x, sigma):
        s = sigma.astype(np.float64)
        a, b, c = 0.5 * (beta_max - beta_min), beta_min, -np.log1p(s**2)
        t = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
        alpha = (1.0 / np.sqrt(1.0 + s**2))[:, None, None, None]
        eps = np.asarray(net(np.float32(alpha * x), np.float32(999.0 * t)), np.float64)
        return x - s[:, None, None, None] * eps

    return denoiser


def ve_reference(net):
    """score_sde's VE model on data y in [0, 1] (fed 2y − 1, label s, score = output/s) as D(x; σ) of x = 2y − 1:
    2·D_y((x + 1)/2; σ/2) − 1 with D_y(y; s) = y + s²·score."""

    def denoiser(x, sigma):
        s = sigma.astype(np.float64)[:, None, None, None] / 2
        y = (np.asarray(x, np.float64) + 1) / 2
        score = np.asarray(net(np.float32(2 * y - 1), np.float32(s[:, 0, 0, 0])), np.float64) / s
        return 2 * (y + s**2 * score) - 1

    return denoiser


def ncsnpp_net(config, params):
    model = ncsnpp.create_ncsnpp(config)
    return jax.jit(lambda x, labels: model.apply({"params": params}, x, labels))


@pytest.mark.parametrize("case, name", [("ddpmpp", "vp/ddpmpp_continuous"), ("ncsnpp", "ve/ncsnpp_continuous")])
def test_score_sde_checkpoint_converts_and_loads(tmp_path, score_sde_checkpoint_dir, case, name):
    src = score_sde_checkpoint_dir(case)
    assert detect_format(src) == detect_format(src / "checkpoints" / "checkpoint_4") == "score_sde"
    _, net_config, params, info = score_sde_checkpoint.read_score_sde_checkpoint(src, name)

    out = convert(src, tmp_path / "run", dataset=name)
    pipe = Pipeline.from_checkpoint(out)
    config, loaded = load_weights(src, dataset=name)
    assert pipe.config.model.network == config.model.network == "ncsnpp"
    assert pipe.config.diffusion.process == info["process"]
    recipe = {"vp": "sde_vp_ddpmpp_continuous", "ve": "sde_ve_ncsnpp_continuous"}[info["process"]]
    assert pipe.config.training.ema_decay == continuous_configs.recipe(recipe).training.ema_decay

    x = noisy_inputs(net_config.image_size)
    from_workdir = np.asarray(pipe.denoise(x, SIGMAS))
    np.testing.assert_allclose(from_workdir, np.asarray(jaxdiff_denoiser(config, loaded)(x, SIGMAS)), rtol=0,
                               atol=1e-6 * np.abs(from_workdir).max())  # fmt: skip
    net = ncsnpp_net(net_config, params)
    if info["process"] == "vp":
        assert (pipe.config.diffusion.beta_min, pipe.config.diffusion.beta_max) == (0.1, 20.0)
        expected = vp_reference(net, 0.1, 20.0)(x, SIGMAS)
        tolerance = 5e-6
    else:  # noise levels of x = 2y − 1 are twice those of y; the label halving is folded into the kernel
        assert (pipe.config.diffusion.sigma_min, pipe.config.diffusion.sigma_max) == (0.02, 100.0)
        expected = ve_reference(net)(x, SIGMAS)
        tolerance = 2e-5  # float32 rounding of the phases 2π·W·log σ, here as in score_sde
    np.testing.assert_allclose(from_workdir, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def test_score_sde_needs_its_config_name(tmp_path, score_sde_checkpoint_dir):
    src = score_sde_checkpoint_dir("ddpmpp")
    for dataset in (None, "vp/ddpmp"):
        with pytest.raises(ValueError, match=r"needs the config it was trained with .*--dataset NAME.*"
                                             r"'vp/ddpmpp_continuous'.*'sde_vp_ddpmpp_continuous'"):  # fmt: skip
            load_weights(src, dataset=dataset)
    with pytest.raises(ValueError, match="needs the config it was trained with"):
        Pipeline.from_pretrained(src)


def test_score_sde_recipe_name_checks_the_network(tmp_path, score_sde_checkpoint_dir):
    """The jaxdiff recipe name selects score_sde's config and requires the recipe's CIFAR-10 network."""
    src = score_sde_checkpoint_dir("ddpmpp")
    with pytest.raises(ValueError) as err:
        convert(src, tmp_path / "run", dataset="sde_vp_ddpmpp_continuous")
    message = str(err.value)
    assert "does not fit recipe 'sde_vp_ddpmpp_continuous'" in message and "\n" not in message
    assert "model.image_size read 8, recipe 32" in message and "model.ncsnpp.nf read 16, recipe 128" in message
    assert not (tmp_path / "run").exists()


def test_score_sde_models_jaxdiff_cannot_express_are_refused(score_sde_checkpoint_dir):
    src = score_sde_checkpoint_dir("ddpm_blocks")
    with pytest.raises(ValueError, match=r"noise_labels: 'sigma_index'.*embedding_type: 'positional', expected "
                                         r"'fourier'"):  # fmt: skip
        load_weights(src, dataset="ve/ncsnpp")


# --------------------------------------------------------------------------- EDM snapshots


def edm_reference(net, sigma_data: float):
    """EDM's EDMPrecond: c_skip·x + c_out·F(c_in·x, ln(σ)/4), in float64 around the network."""

    def denoiser(x, sigma):
        s = sigma.astype(np.float64)[:, None, None, None]
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / np.sqrt(s**2 + sigma_data**2)
        c_in = 1 / np.sqrt(s**2 + sigma_data**2)
        out = np.asarray(net(np.float32(c_in * x), np.float32(np.log(s[:, 0, 0, 0]) / 4)), np.float64)
        return c_skip * x + c_out * out

    return denoiser


def write_edm(path, edm_modules, case="ddpmpp", precond="EDMPrecond", precond_kwargs=None):
    kwargs = {"sigma_data": 0.25, "sigma_max": 60.0} if precond_kwargs is None else precond_kwargs
    write_snapshot(path, edm_modules, precond, kwargs, "SongUNet", EDM[case]["kwargs"], case_tensors(case))
    return path


def test_edm_snapshot_converts_and_loads(tmp_path, edm_modules):
    src = write_edm(tmp_path / "network-snapshot-000100.pkl", edm_modules)
    assert detect_format(src) == "edm"
    _, net_config, params, _ = edm_pickle.read_edm_snapshot(src)

    out = tmp_path / "run"
    assert cli.main(["convert", str(src), str(out)]) == 0
    from_workdir, from_file = Pipeline.from_checkpoint(out), Pipeline.from_pretrained(src)
    dc = from_workdir.config.diffusion
    assert (dc.process, dc.parameterization, dc.sigma_data, dc.sigma_min, dc.sigma_max) == ("edm", "edm", 0.25,
                                                                                           0.002, 60.0)  # fmt: skip
    assert from_workdir.config.sampling.sampler == "heun"  # the edm_cifar10_uncond_vp recipe's
    x = noisy_inputs(net_config.img_resolution)
    d_workdir, d_file = np.asarray(from_workdir.denoise(x, SIGMAS)), np.asarray(from_file.denoise(x, SIGMAS))
    np.testing.assert_array_equal(d_workdir, d_file)
    model = song_unet.create_song_unet(net_config)
    net = jax.jit(lambda x, labels: model.apply({"params": params}, x, labels))
    expected = edm_reference(net, 0.25)(x, SIGMAS)
    np.testing.assert_allclose(d_workdir, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_edm_conditional_ncsnpp_starts_from_its_recipe(tmp_path, edm_modules):
    src = write_edm(tmp_path / "snapshot.pkl", edm_modules, case="ncsnpp", precond_kwargs={})
    with pytest.raises(ValueError, match="unknown weights format"):
        detect_format(src)
    out = tmp_path / "run"
    assert cli.main(["convert", "--from", "edm", str(src), str(out)]) == 0
    config = Pipeline.from_checkpoint(out).config
    assert config.model.num_classes == config.model.song_unet.label_dim == 3
    assert config.model.song_unet.embedding_type == "fourier"
    assert (config.diffusion.sigma_data, config.diffusion.sigma_max) == (0.5, 80.0)
    assert config.training.batch_size == continuous_configs.recipe("edm_cifar10_cond_ve").training.batch_size


def test_edm_other_preconditionings_and_recipes_are_refused(tmp_path, edm_modules):
    src = write_edm(tmp_path / "network-snapshot-1.pkl", edm_modules, precond="VPPrecond", precond_kwargs={})
    with pytest.raises(ValueError, match=r"diffusion.parameterization: EDM's 'vp_precond'"):
        load_weights(src)
    src = write_edm(tmp_path / "network-snapshot-2.pkl", edm_modules)
    with pytest.raises(ValueError, match=r"not a jaxdiff recipe; expected one of"):
        load_weights(src, dataset="edm_cifar")
    with pytest.raises(ValueError, match=r"does not fit recipe 'edm_cifar10_cond_vp': .*model.num_classes read 0, "
                                         r"recipe 10;.*model.song_unet.channel_mult read \(1, 2\), recipe \(2, 2, 2\)"):
        load_weights(src, dataset="edm_cifar10_cond_vp")


# --------------------------------------------------------------------------- Pipeline.from_pretrained and the CLI


def test_pipeline_from_pretrained_names_the_score_sde_config(tmp_path, score_sde_checkpoint_dir):
    """A score_sde checkpoint file with its config name (score_sde's or jaxdiff's) = the converted workdir."""
    src = score_sde_checkpoint_dir("ncsnpp")
    converted = Pipeline.from_checkpoint(convert(src, tmp_path / "run", dataset="ve/ncsnpp_continuous"))
    from_file = Pipeline.from_pretrained(src / "checkpoints" / "checkpoint_4", config="ve/ncsnpp_continuous")
    assert from_file.config.diffusion.sigma_max == converted.config.diffusion.sigma_max == 100.0
    x = noisy_inputs(from_file.config.model.image_size)
    np.testing.assert_array_equal(np.asarray(from_file.denoise(x, SIGMAS)), np.asarray(converted.denoise(x, SIGMAS)))
    with pytest.raises(ValueError, match=r"dataset='ve/ncsnpp_cont': a score_sde checkpoint needs the config .*"
                                         r"--config NAME.*'ve/ncsnpp_continuous'"):  # fmt: skip
        Pipeline.from_pretrained(src, config="ve/ncsnpp_cont")
    with pytest.raises(ValueError, match=r"dataset='sde_vp_ddpmpp_continuous' applies to weights in other formats"):
        Pipeline.from_pretrained(tmp_path / "run", config="sde_vp_ddpmpp_continuous")


def test_pipeline_from_pretrained_checks_an_edm_recipe_name(tmp_path, edm_modules):
    src = write_edm(tmp_path / "network-snapshot-000100.pkl", edm_modules)
    with pytest.raises(ValueError, match=r"does not fit recipe 'edm_cifar10_uncond_vp': .*model.image_size read 8"):
        Pipeline.from_pretrained(src, config="edm_cifar10_uncond_vp")
    with pytest.raises(ValueError, match=r"dataset='edm_cifar' is not a jaxdiff recipe"):
        Pipeline.from_pretrained(src, config="edm_cifar")
    with pytest.raises(UsageError, match=r"^dtype='bfloat16': .* is 'edm' weights, which run in their config's dtype"):
        Pipeline.from_pretrained(src, dtype="bfloat16")


def test_cli_sample_pretrained_score_sde(tmp_path, capsys, score_sde_checkpoint_dir):
    src = score_sde_checkpoint_dir("ncsnpp")
    out = tmp_path / "grid.png"
    argv = ["sample", "--pretrained", str(src), "--sampler", "ddim", "--steps", "2", "--num", "2", "--out"]
    assert cli.main([*argv, str(out), "--config", "sde_ve_ncsnpp_continuous"]) == 2  # the tiny network is no recipe's
    assert "does not fit recipe 'sde_ve_ncsnpp_continuous'" in capsys.readouterr().err
    assert cli.main([*argv, str(out), "--config", "ve/ncsnpp_continuous"]) == 0
    assert out.is_file() and capsys.readouterr().out.startswith("2 images -> ")
    assert "needs the config it was trained with" in cli_error(capsys, [*argv, str(tmp_path / "b.png")])
    assert "'vp/ddpmpp_continuous'" in cli_error(capsys, [*argv, str(tmp_path / "c.png"), "--config", "vp/ddpmp"])
    assert "--dtype: the dtype of Stable Diffusion, SD3, Flux and DiT / SiT weights; 'score_sde' weights run" in \
        cli_error(capsys, [*argv, str(tmp_path / "e.png"), "--config", "ve/ncsnpp_continuous", "--dtype", "bfloat16"])
    assert "--config names the recipe of --pretrained weights" in cli_error(
        capsys, ["sample", "--workdir", str(src), "--out", str(tmp_path / "d.png"), "--config", "x"]
    )  # fmt: skip
    assert not any((tmp_path / name).exists() for name in ("b.png", "c.png", "d.png", "e.png"))


# --------------------------------------------------------------------------- jaxdiff convert


def test_cli_convert_score_sde(tmp_path, capsys, score_sde_checkpoint_dir):
    src = score_sde_checkpoint_dir("ddpmpp")
    out = tmp_path / "run"
    assert cli.main(["convert", "--dataset", "vp/ddpmpp_continuous", str(src), str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(out) in lines[0]
    assert Pipeline.from_checkpoint(out).config.diffusion.process == "vp"


def cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    return captured.err


def test_cli_convert_bad_input(tmp_path, capsys, edm_modules, score_sde_checkpoint_dir):
    src = score_sde_checkpoint_dir("ddpmpp")
    out = tmp_path / "run"
    assert "'vp/ddpmpp_continuous'" in cli_error(capsys, ["convert", "--dataset", "vp/ddpmp", str(src), str(out)])
    assert not out.exists()

    snapshot = tmp_path / "network-snapshot-000000.pkl"
    with open(snapshot, "wb") as f:
        pickle.dump({"ema": CallsGlobal(eval, "__import__('sys').exit('called')")}, f)
    assert "refusing to load global builtins.eval" in cli_error(capsys, ["convert", str(snapshot), str(out)])
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists and is not an empty folder" in cli_error(
        capsys, ["convert", "--dataset", "vp/ddpmpp_continuous", str(src), str(out)]
    )  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not any(p.name.startswith(".run.partial") for p in tmp_path.iterdir())


def test_detection_of_score_sde_layouts_and_unknown_formats(tmp_path):
    (tmp_path / "sde" / "checkpoints-meta").mkdir(parents=True)
    (tmp_path / "sde" / "checkpoints-meta" / "checkpoint_3").write_bytes(b"")
    (tmp_path / "sde" / "checkpoints").mkdir()  # empty, as when only the preemption checkpoints were kept
    assert detect_format(tmp_path / "sde") == "score_sde"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        detect_format(tmp_path / "weights.bin")
    assert all(name in str(err.value) for name in ("tf", "diffusers", "jaxdiff", "score_sde", "edm", "score_sde_ve"))
    assert set(continuous_configs.SCORE_SDE_RECIPES.values()) <= set(score_sde_checkpoint.CONFIGS)
