"""The core install carries no TensorFlow: training, sampling and evaluation never import it."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_sampling_and_evaluation_never_import_tensorflow(tmp_path):
    workdir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys
        from jaxdiff.cli import main
        overrides = ["--config.training.num_train_steps=2", "--config.training.checkpoint_every_steps=2",
                     "--config.training.sample_every_steps=2", "--config.training.log_every_steps=1"]
        assert main(["train", "--config", "configs/tiny.py", "--workdir", {str(workdir)!r}, *overrides]) == 0
        assert main(["sample", "--workdir", {str(workdir)!r}, "--num", "2", "--sampler", "ddim", "--steps", "2",
                     "--out", {str(tmp_path / "grid.png")!r}]) == 0
        assert main(["eval", "--workdir", {str(workdir)!r}, "--metrics", "bpd", "--bpd-images", "2",
                     "--bpd-batch-size", "2", "--bpd-num-t", "2"]) == 0
        print("TENSORFLOW", sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TENSORFLOW []" in result.stdout, result.stdout[-2000:]
    assert (tmp_path / "grid.png").is_file() and (workdir / "eval_2.json").is_file()
