"""Every user mistake on the command line: exit status 2, exactly one line on stderr, nothing done.

A traceback appears only with --verbose, or for an internal error (status 1, "this is a bug").
"""

import os

import pytest

from jaxdiff import cli
from jaxdiff.cli import main
from jaxdiff.errors import WeightsError
from jaxdiff.sampling.pipeline import Pipeline
from tests.helpers import TINY_CONFIG, write_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    write_workdir(path)
    return path


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling that fails the test: the errors must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")

    monkeypatch.setattr(Pipeline, "sample", refuse)
    monkeypatch.setattr(Pipeline, "sample_batch", refuse)


def one_line_error(capsys, argv, *fragments) -> str:
    """Run `jaxdiff argv`; assert status 2 and one stderr line holding every fragment; returns the line."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdiff: error: "), err
    assert all(fragment in lines[0] for fragment in fragments), (fragments, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("training.checkpoint_every_steps=0", ["training.checkpoint_every_steps=0", "an int >= 1"]),
        ("training.log_every_steps=0", ["training.log_every_steps=0", "an int >= 1"]),
        ("training.sample_every_steps=0", ["training.sample_every_steps=0", "an int >= 1"]),
        ("training.grad_accum_steps=0", ["training.grad_accum_steps=0", "an int >= 1"]),
        ("training.num_train_steps=-5", ["training.num_train_steps=-5", "an int >= 1"]),
        ("training.ema_decay=1.5", ["training.ema_decay=1.5", "a number in [0, 1]"]),
        ("training.learning_rate=-1", ["training.learning_rate=-1.0", "a number > 0"]),
        ("training.batch_size=0", ["training.batch_size=0", "an int >= 1"]),
        ("nonexistent=1", ["unknown config key 'nonexistent'", "valid keys are"]),
        ("training.checkpoint_every=5", ["did you mean training.checkpoint_every_steps"]),
    ],
)
def test_bad_config_values_fail_before_the_workdir_is_made(capsys, tmp_path, override, fragments):
    run = tmp_path / "run"
    one_line_error(capsys, ["train", "--config", TINY_CONFIG, "--workdir", str(run), f"--config.{override}"],
                   *fragments)  # fmt: skip
    assert not run.exists()


def test_missing_config_file_and_unknown_recipe(capsys, tmp_path):
    one_line_error(capsys, ["info", "--config", str(tmp_path / "nope.py")], "nope.py", "neither a config file")
    one_line_error(capsys, ["train", "--config", "digitz", "--workdir", str(tmp_path / "r")],
                   "'digitz'", "recipes: cifar10, cifar10_cond", "digits")  # fmt: skip
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    one_line_error(capsys, ["info", "--config", str(broken)], "bad config", "broken.py")


def test_a_workdir_that_is_a_file(capsys, tmp_path, no_sampling):
    file = tmp_path / "file"
    file.write_text("x")
    one_line_error(capsys, ["train", "--config", TINY_CONFIG, "--workdir", str(file)], "is a file, not a directory")
    one_line_error(capsys, ["train", "--config", TINY_CONFIG, "--workdir", str(file / "run")],
                   "cannot be created", "is a file")  # fmt: skip
    one_line_error(capsys, ["sample", "--workdir", str(file), "--out", str(tmp_path / "g.png")], "unknown weights format")


def test_a_missing_workdir_for_sample_and_eval(capsys, tmp_path, no_sampling):
    missing = str(tmp_path / "missing")
    one_line_error(capsys, ["sample", "--workdir", missing, "--out", str(tmp_path / "g.png")],
                   f"--workdir {missing!r} does not exist")  # fmt: skip
    one_line_error(capsys, ["eval", "--workdir", missing, "--metrics", "bpd"], f"--workdir {missing!r} does not exist")
    assert not os.path.exists(missing)


def test_outputs_are_checked_before_sampling(capsys, tmp_path, workdir, no_sampling):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(blocker / "x.png")],
                   "--out", "cannot be created", "is a file")  # fmt: skip
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(blocker / "shards") + "/"],
                   "--out", "cannot be created")  # fmt: skip
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(tmp_path / "g.png"),
                            "--trajectory", str(blocker / "t.gif")], "--trajectory", "cannot be created")  # fmt: skip
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(tmp_path / "g.jpg")], ".png grid")
    one_line_error(capsys, ["eval", "--workdir", str(workdir), "--metrics", "fid", "--samples", str(blocker / "s")],
                   "--samples", "cannot be created")  # fmt: skip
    assert not (tmp_path / "g.png").exists()


def test_an_unwritable_output_folder(capsys, tmp_path, workdir, no_sampling, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access
    # root may write anywhere: answer for the locked folder as an ordinary user's os.access would
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(locked / "g.png")],
                   f"cannot be created: no permission to write in {str(locked)!r}")  # fmt: skip
    one_line_error(capsys, ["eval", "--workdir", str(workdir), "--metrics", "bpd", "--samples", str(locked)],
                   f"--samples {str(locked)!r}: no permission to write in it")  # fmt: skip


def test_convert_checks_its_paths_and_maps_a_corrupt_safetensors_file(capsys, tmp_path, workdir):
    from jaxdiff.convert.formats import convert

    exported = convert(workdir, tmp_path / "exported", target_format="diffusers")
    weights = next(exported.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsError, match="damaged or not a safetensors file"):
        Pipeline.from_pretrained(exported)
    one_line_error(capsys, ["convert", str(exported), str(tmp_path / "back")],
                   f"{weights}: damaged or not a safetensors file")  # fmt: skip
    one_line_error(capsys, ["sample", "--workdir", str(exported), "--out", str(tmp_path / "g.png")], "damaged")
    assert not (tmp_path / "back").exists()
    one_line_error(capsys, ["convert", str(tmp_path / "nothing"), str(tmp_path / "dst")], "SRC", "does not exist")
    (tmp_path / "blocker").write_text("x")
    one_line_error(capsys, ["convert", str(workdir), str(tmp_path / "blocker" / "dst"), "--to", "diffusers"],
                   "DST", "cannot be created")  # fmt: skip


def test_bad_arguments_are_one_line_too(capsys, workdir, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--workdir", str(workdir), "--out", str(tmp_path / "g.png"), "--num", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "invalid int value: 'many'" in err
    one_line_error(capsys, ["sample", "--workdir", str(workdir), "--out", str(tmp_path / "g.png"), "--bogus"],
                   "unrecognised arguments: --bogus")  # fmt: skip


@pytest.mark.parametrize("where", ["before the verb", "after it"])
def test_verbose_adds_the_traceback(capsys, tmp_path, where):
    argv = ["info", "--config", str(tmp_path / "nope.py")]
    assert main(["-v", *argv] if where == "before the verb" else [*argv, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("jaxdiff: error:")


def test_an_internal_error_says_it_is_a_bug(capsys, monkeypatch):
    def broken(config):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("jaxdiff.models.summary.model_summary", broken)
    assert main(["info", "--config", TINY_CONFIG]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == (
        "jaxdiff: internal error (TypeError: unsupported operand); this is a bug, please report it"
    )


def test_every_user_error_type_is_mapped():
    from jaxdiff.training.checkpoint import CheckpointError
    from jaxdiff.data import DatasetNotFoundError
    from jaxdiff.errors import JaxdiffError

    mapped = cli._user_errors()
    for error in (JaxdiffError, CheckpointError, DatasetNotFoundError, cli.UsageError):
        assert issubclass(error, mapped)
    for error in (ValueError, OSError, TypeError, AssertionError):
        assert not issubclass(error, mapped)


def test_a_message_of_several_lines_is_joined_into_one(capsys, monkeypatch):
    from jaxdiff.errors import DataError

    def fails(model_config):
        raise DataError("dataset not prepared.\nPrepare it:\n  jaxdiff data prepare x\nor set data_dir")

    monkeypatch.setattr("jaxdiff.models.summary.model_summary", fails)
    line = one_line_error(capsys, ["info", "--config", TINY_CONFIG])
    assert line == "jaxdiff: error: dataset not prepared. Prepare it: jaxdiff data prepare x; or set data_dir"


def test_a_sampling_job_with_other_settings_is_one_line(capsys, tmp_path, workdir):
    job = ["sample", "--workdir", str(workdir), "--num", "2", "--sampler", "ddim", "--steps", "2",
           "--out", str(tmp_path / "job") + "/"]  # fmt: skip
    assert main(job) == 0
    capsys.readouterr()
    one_line_error(capsys, [*job, "--seed", "1"], "holds shards drawn with other settings (seed: 0 -> 1)")
