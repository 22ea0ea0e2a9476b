"""`jaxdiff info`, config loading (files, recipe names, overrides) and a quiet `jaxdiff sample`."""

import logging
import os
import re
import subprocess
import sys

import pytest

from jaxdiff.cli import load_config, main
from jaxdiff.config import ConfigError
from jaxdiff.config.recipes import RECIPES, recipe
from tests.helpers import ROOT, TINY_CONFIG, write_workdir


def test_info_prints_the_cifar10_parameter_count_and_gflops(capsys):
    assert main(["info", "--config", str(ROOT / "configs" / "cifar10.py")]) == 0
    out = capsys.readouterr().out
    assert "parameters: 35,746,307" in out
    gflops = float(re.search(r"forward GFLOPs per image: ([\d.]+)", out).group(1))
    assert gflops == pytest.approx(12.44, abs=0.01)


def test_overrides_are_typed_and_unknown_keys_rejected():
    config = load_config(TINY_CONFIG, ["--config.model.ch_mult=(1,2,2)", "--config.model.image_size=32",
                                       "--config.seed=3"])  # fmt: skip
    assert config.model.ch_mult == (1, 2, 2) and config.seed == 3
    with pytest.raises(ConfigError, match="'model.chanels'; did you mean model.in_channels"):
        load_config(TINY_CONFIG, ["--config.model.chanels=3"])
    with pytest.raises(ConfigError, match="seed"):
        load_config(TINY_CONFIG, ["--config.seed=abc"])
    with pytest.raises(ValueError, match="--steps"):
        load_config(TINY_CONFIG, ["--steps=3"])


def test_loaded_configs_are_validated():
    with pytest.raises(ConfigError, match=r"training.checkpoint_every_steps=0 is not allowed: expected an int >= 1"):
        load_config(TINY_CONFIG, ["--config.training.checkpoint_every_steps=0"])


def test_config_by_recipe_name_equals_its_file():
    assert load_config("digits", []).to_dict() == load_config(str(ROOT / "configs" / "digits.py"), []).to_dict()
    assert load_config("digits", []).to_dict() == recipe("digits").to_dict()
    config = load_config("cifar10_cond", ["--config.training.batch_size=16"])
    assert config.training.batch_size == 16 and config.model.num_classes == 10


def test_missing_config_file_or_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.py") as err:
        load_config(str(tmp_path / "nope.py"), [])
    with pytest.raises(ConfigError, match="'digitz' is neither a config file nor a recipe; recipes: ") as err:
        load_config("digitz", [])
    assert all(name in str(err.value) for name in RECIPES)


@pytest.mark.parametrize("verbose", [False, True])
def test_jaxdiff_logs_at_info_libraries_at_warning_unless_verbose(capsys, monkeypatch, verbose):
    def chatty(model_config):
        logging.getLogger("jaxdiff.models").info("mine")
        logging.getLogger("absl").info("theirs")
        logging.getLogger("orbax").warning("warned")
        logging.getLogger("jaxdiff.models").debug("details")
        return {"parameters": 1, "gflops": 1.0, "xla_gflops": 1.0}

    monkeypatch.setattr("jaxdiff.models.summary.model_summary", chatty)
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("jax").level, logging.getLogger("jaxdiff").level)
    assert main(["info", "--config", TINY_CONFIG, *(["--verbose"] if verbose else [])]) == 0
    err = capsys.readouterr().err
    assert "jaxdiff.models: mine" in err and "orbax: warned" in err
    assert ("absl: theirs" in err) == verbose and ("details" in err) == verbose
    after = (list(root.handlers), root.level, logging.getLogger("jax").level, logging.getLogger("jaxdiff").level)
    assert after == before  # the command's logging set-up is undone


# ---------------------------------------------------------------- a real `jaxdiff sample`, counted


def _screen_lines(text: str) -> list[str]:
    """The lines a terminal would keep: carriage-return updates of a progress bar count as one line."""
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n") if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sample_prints_a_progress_bar_and_one_result_line(tmp_path):
    write_workdir(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax probes every platform, as for a user
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", "sample", "--workdir", str(tmp_path / "run"), "--num", "4",
         "--sampler", "ddim", "--steps", "20", "--out", str(out)],
        capture_output=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()  # bytes: text mode would turn \r into \n
    assert proc.returncode == 0, stderr[-3000:]
    assert out.exists()
    lines = _screen_lines(stderr) + _screen_lines(stdout)
    assert len(lines) <= 5, lines
    assert stdout.strip().splitlines() == [f"4 images (checkpoint step 7) -> {out}"]
    bar = [line for line in _screen_lines(stderr) if line.startswith("sampling:")]
    assert len(bar) == 1 and "20/20" in bar[0], stderr
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step)\]", bar[0]), bar[0]  # elapsed<ETA, rate
    assert "Unable to initialize backend" not in stderr
