"""Pipeline, sharded sampling jobs and `jaxdiff sample`."""

import json

import jax
import numpy as np
import pytest

from jaxdiff.training.runs import load_run
from jaxdiff.cli import main
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.sampling.shard_jobs import read_shards, sample_to_shards
from tests.helpers import run_python, write_workdir

FAST = dict(sampler="ddim", steps=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    write_workdir(path)
    return path


@pytest.fixture(scope="module")
def pipe(workdir):
    return Pipeline.from_checkpoint(workdir)


def test_from_checkpoint_loads_config_step_and_ema(pipe, workdir):
    assert pipe.step == 7 and pipe.image_shape == (16, 16, 3)
    _, _, raw = load_run(workdir, ema=False)
    ema = jax.tree.leaves(pipe.params)
    assert any(not np.array_equal(a, b) for a, b in zip(ema, jax.tree.leaves(raw)))


def test_sample_is_uint8_deterministic_and_batched_by_seed(pipe):
    a = pipe.sample(5, seed=3, batch_size=2, **FAST)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, pipe.sample(5, seed=3, batch_size=2, **FAST))
    assert not np.array_equal(a, pipe.sample(5, seed=4, batch_size=2, **FAST))
    second, _, _ = pipe.sample_batch(2, jax.random.fold_in(jax.random.PRNGKey(3), 1), **FAST)
    np.testing.assert_array_equal(a[2:4], second)


def test_denoise_is_the_model_output(pipe):
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    out = pipe.denoise(x, [0, 999])
    want = pipe.model.apply({"params": pipe.params}, x, np.array([0, 999]), train=False)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # jit vs eager fusion


@pytest.mark.parametrize("t", [-1, 1000, 10**6, 2**40, [0, 1000]])
def test_denoise_refuses_steps_outside_0_to_T(pipe, t):
    x = np.zeros((np.size(t), 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match=r"is out of range: the model expects 0-based step indices 0..T-1 = 0..999"):
        pipe.denoise(x, np.broadcast_to(np.asarray(t), (len(x),)))


def test_denoise_refuses_non_integer_steps(pipe):
    with pytest.raises(ValueError, match="t has dtype float32; the model expects 0-based step indices"):
        pipe.denoise(np.zeros((1, 16, 16, 3), np.float32), np.array([3.0], np.float32))


@pytest.mark.parametrize("sampler, steps", [("ddim", 4), ("dpm_solver++", 3), ("heun", 3)])
def test_progress_reports_every_model_call(pipe, sampler, steps):
    calls = []
    pipe.sample_batch(2, jax.random.PRNGKey(0), sampler=sampler, steps=steps, on_model_call=lambda: calls.append(1))
    assert len(calls) == pipe.model_calls(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)


def test_sample_progress_bar_counts_every_batch(pipe, capsys):
    pipe.sample(5, seed=0, batch_size=2, progress=True, **FAST)
    assert "12/12" in capsys.readouterr().err  # 3 batches of 4 steps


def test_a_truncated_shard_is_redrawn(pipe, tmp_path, monkeypatch):
    settings = dict(num_images=5, shard_size=2, seed=1, progress=False, **FAST)
    out = str(tmp_path / "job")
    sample_to_shards(pipe, out, **settings)
    whole = read_shards(out)
    shard = tmp_path / "job" / "shard_00001.npz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    redrawn = []
    real = Pipeline.sample_batch
    monkeypatch.setattr(Pipeline, "sample_batch", lambda self, n, *a, **k: redrawn.append(n) or real(self, n, *a, **k))
    sample_to_shards(pipe, out, **settings)
    assert redrawn == [2]
    np.testing.assert_array_equal(read_shards(out), whole)


def test_sharded_job_resumes_to_the_same_images(pipe, tmp_path, monkeypatch):
    settings = dict(num_images=7, shard_size=3, seed=5, progress=False, **FAST)
    straight = read_shards(sample_to_shards(pipe, str(tmp_path / "a"), **settings) and str(tmp_path / "a"))
    np.testing.assert_array_equal(straight, pipe.sample(7, seed=5, batch_size=3, **FAST))

    calls = []
    real = Pipeline.sample_batch

    def dies_after_one(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "sample_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        sample_to_shards(pipe, str(tmp_path / "b"), **settings)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "shard_00000.npz"]
    monkeypatch.setattr(Pipeline, "sample_batch", real)
    redrawn = []
    monkeypatch.setattr(Pipeline, "sample_batch", lambda self, n, *a, **k: redrawn.append(n) or real(self, n, *a, **k))
    sample_to_shards(pipe, str(tmp_path / "b"), **settings)
    assert redrawn == [3, 1]  # only the unfinished shards
    np.testing.assert_array_equal(read_shards(str(tmp_path / "b")), straight)
    with pytest.raises(ValueError, match="seed: 5 -> 6"):
        sample_to_shards(pipe, str(tmp_path / "b"), **{**settings, "seed": 6})


def test_cli_sample_grid_shards_and_trajectory(workdir, tmp_path, capsys):
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    assert main(["sample", "--workdir", str(workdir), "--num", "4", "--sampler", "ddim", "--steps", "3",
                 "--out", str(grid), "--trajectory", str(strip)]) == 0  # fmt: skip
    assert grid.exists() and strip.exists()
    assert "checkpoint step 7" in capsys.readouterr().out
    out_dir = str(tmp_path / "shards") + "/"
    assert main(["sample", "--workdir", str(workdir), "--num", "5", "--shard-size", "2", "--sampler", "ddim",
                 "--steps", "3", "--out", out_dir]) == 0  # fmt: skip
    assert read_shards(out_dir).shape == (5, 16, 16, 3)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["sampler"] == "ddim"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "euler"], "euler"),
        (["--steps", "1001"], "1001"),
        (["--steps", "0"], "steps=0"),
        (["--class-label", "3"], "unconditional"),
        (["--guidance", "2.0"], "guidance"),
    ],
)
def test_cli_sample_bad_input(workdir, tmp_path, capsys, args, message):
    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(workdir), "--num", "2", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_sample_without_checkpoint(tmp_path, capsys):
    assert main(["sample", "--workdir", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "unknown weights format" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_conditional_pipeline_labels_and_guidance(tmp_path):
    write_workdir(tmp_path, "--config.model.num_classes=10")
    pipe = Pipeline.from_checkpoint(tmp_path)
    x, labels, _ = pipe.sample_batch(4, jax.random.PRNGKey(0), class_label=3, **FAST)
    np.testing.assert_array_equal(labels, [3, 3, 3, 3])
    guided, _, _ = pipe.sample_batch(4, jax.random.PRNGKey(0), class_label=3, guidance=3.0, **FAST)
    assert not np.array_equal(x, guided)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        pipe.sample(2, class_label=10, **FAST)


SHARDED = """
import numpy as np, jax
from jaxdiff.sampling.pipeline import Pipeline
pipe = Pipeline.from_checkpoint({workdir!r})
x = pipe.sample(8, seed=2, batch_size=8, sampler="ddim", steps=3)
print(jax.local_device_count(), int(x.astype(np.int64).sum()))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batch_split_over_devices_gives_the_same_images(workdir):
    one = run_python(SHARDED.format(workdir=str(workdir)), devices=1).split()[-2:]
    eight = run_python(SHARDED.format(workdir=str(workdir)), devices=8).split()[-2:]
    assert one[0] == "1" and eight[0] == "8"
    assert abs(int(one[1]) - int(eight[1])) <= 8  # uint8 truncation may flip a rare pixel by one
