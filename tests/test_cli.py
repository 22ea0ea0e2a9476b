"""`jaxdiff info` and the command line's argument handling."""

import re

import pytest

from jaxdiff.cli import load_config, main
from tests.helpers import ROOT


def test_info_prints_the_cifar10_parameter_count_and_gflops(capsys):
    assert main(["info", "--config", str(ROOT / "configs" / "cifar10.py")]) == 0
    out = capsys.readouterr().out
    assert "parameters: 35,746,307" in out
    gflops = float(re.search(r"forward GFLOPs per image: ([\d.]+)", out).group(1))
    assert gflops == pytest.approx(12.44, abs=0.01)


def test_overrides_are_typed_and_unknown_keys_rejected():
    config = load_config(str(ROOT / "configs" / "tiny.py"), ["--config.model.ch_mult=(1,2,2)", "--config.seed=3"])
    assert config.model.ch_mult == (1, 2, 2) and config.seed == 3
    with pytest.raises(SystemExit, match="chanels"):
        load_config(str(ROOT / "configs" / "tiny.py"), ["--config.model.chanels=3"])
    with pytest.raises(SystemExit, match="seed"):
        load_config(str(ROOT / "configs" / "tiny.py"), ["--config.seed=abc"])
    with pytest.raises(SystemExit, match="--steps"):
        load_config(str(ROOT / "configs" / "tiny.py"), ["--steps=3"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="nope.py"):
        load_config(str(tmp_path / "nope.py"), [])
