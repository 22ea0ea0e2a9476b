"""The user-error hierarchy (`jaxdiff.errors`) and the command line's split: a `JaxdiffError` is the user's
mistake (exit status 2, one line naming the value or file), anything else a bug (status 1 and the traceback)."""

import json
import os
import pickle
import zipfile

import pytest

from jaxdiff import errors
from jaxdiff.cli import main
from tests.helpers import TINY_CONFIG
from tests.test_user_errors import one_line_error

KINDS = (errors.ConfigError, errors.DataError, errors.WeightsError, errors.UsageError, errors.MissingDataError,
         errors.MissingWeightsError, errors.OutputExistsError)  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_a_jaxdiff_error_and_a_value_error(kind):
    assert issubclass(kind, errors.JaxdiffError) and issubclass(kind, ValueError)


def test_the_older_error_classes_belong_to_the_hierarchy():
    from jaxdiff.cli import UsageError
    from jaxdiff.config import ConfigError
    from jaxdiff.readers.edm_pickle import EdmPickleError
    from jaxdiff.readers.score_folders import ScoreFolderError
    from jaxdiff.readers.score_sde_checkpoint import ScoreSdeCheckpointError
    from jaxdiff.readers.tf_bundle import CheckpointFormatError
    from jaxdiff.data import DatasetNotFoundError
    from jaxdiff.evaluation.inception_weights import HashMismatchError
    from jaxdiff.weights.torch_pickle import UnsafePickleError
    from jaxdiff.training.checkpoint import CheckpointError
    from jaxdiff.training.loop import NonFiniteLossError

    assert ConfigError is errors.ConfigError and UsageError is errors.UsageError
    for kind in (CheckpointError, EdmPickleError, ScoreFolderError, ScoreSdeCheckpointError, CheckpointFormatError,
                 HashMismatchError, UnsafePickleError):  # fmt: skip
        assert issubclass(kind, errors.WeightsError)
    assert issubclass(DatasetNotFoundError, errors.DataError) and issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(NonFiniteLossError, errors.JaxdiffError) and issubclass(NonFiniteLossError, FloatingPointError)
    assert issubclass(errors.MissingWeightsError, FileNotFoundError)


def test_an_internal_value_error_while_sampling_is_a_bug(capsys, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr("jaxdiff.sampling.pipeline.Pipeline.from_pretrained", broken)
    status = main(["sample", "--workdir", str(tmp_path), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback (most recent call last)" in err and "bug" in err.rstrip().splitlines()[-1]
    assert "ValueError: operands could not be broadcast together" in err


def test_a_bad_config_value_is_one_line(capsys):
    one_line_error(capsys, ["info", "--config", TINY_CONFIG, "--config.model.dropout=2.0"], "model.dropout=2.0")


def test_a_config_file_that_raises_is_one_line_naming_it(capsys, tmp_path):
    path = tmp_path / "raising.py"
    path.write_text('def get_config():\n    raise RuntimeError("no such GPU")\n')
    one_line_error(capsys, ["info", "--config", str(path)], str(path), "RuntimeError: no such GPU")


class _Exploit:
    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_malicious_inception_weights_are_refused_in_one_line(capsys, tmp_path, monkeypatch, given):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _Exploit()}, protocol=2))
    argv = ["eval", "stats", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]
    if given == "flag":
        argv += ["--inception-weights", str(path)]
    else:
        monkeypatch.setenv("JAXDIFF_INCEPTION_WEIGHTS", str(path))
    one_line_error(capsys, argv, str(path), "refusing to load global")


def test_a_unet_config_holding_a_json_array_is_one_line_naming_it(capsys, tmp_path):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("[1, 2, 3]")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    one_line_error(capsys, ["convert", str(tmp_path / "model"), str(tmp_path / "out")],
                   str(unet / "config.json"), "must hold a JSON object, got list")  # fmt: skip


def test_a_tokenizer_json_that_is_no_tokenizer_is_one_line_naming_it(capsys, tmp_path):
    folder = tmp_path / "sd"
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / component).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"hello": "world"}))
    one_line_error(capsys, ["sample", "--pretrained", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "g.png")],
                   str(folder / "tokenizer" / "tokenizer.json"), "is not a tokenizer.json")  # fmt: skip
