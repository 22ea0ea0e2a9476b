"""Training tasks through `jaxdiff train`: the autoencoder run end to end (checkpoints, grids, metrics, the
scaling factor in the extras, exact resume), what resume compares per task, and bad input before any work.

That autoencoder training lowers the reconstruction error is tests/test_autoencoder_training.py's
`test_training_on_shapes_lowers_the_reconstruction_error`; the diffusion task is tests/test_training_run.py's.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import data, images

from jaxdiff.training import checkpoint
from jaxdiff.training.runs import load_run
from jaxdiff.training.autoencoder_step import encode_fn, estimate_scaling_factor, reconstruct
from jaxdiff.training.checkpoint import CheckpointError, config_differences
from jaxdiff.cli import load_config, main
from jaxdiff.config import ConfigError
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.training.runs import make_task
from jaxdiff.training.tasks.autoencoder import SCALING_IMAGES
from jaxdiff.training.loop import _summarise, train_and_evaluate
from tests.helpers import ROOT

AE_CONFIG = str(ROOT / "configs" / "shapes_autoencoder.py")
# The shipped config at a test's size: two levels of widths 8 and 16, batch 4.
TINY_AE = [
    "--config.autoencoder.block_out_channels=(8, 16)", "--config.autoencoder.norm_num_groups=4",
    "--config.autoencoder.latent_channels=2", "--config.training.batch_size=4", "--config.training.warmup_steps=2",
    "--config.training.log_every_steps=1", "--config.training.num_sample_images=4",
]  # fmt: skip
AE_METRICS = {"loss", "reconstruction_error", "kl", "latent_mean", "latent_std", "grad_norm", "learning_rate",
              "skipped_updates", "nonfinite_streak", "steps_per_sec", "images_per_sec"}  # fmt: skip


def ae_args(workdir, steps, *overrides):
    return ["train", "--config", AE_CONFIG, "--workdir", str(workdir), *TINY_AE,
            f"--config.training.num_train_steps={steps}", *overrides]  # fmt: skip


def ae_config(*overrides):
    return load_config(AE_CONFIG, [*TINY_AE, *overrides])


def restore(workdir, config, step=None) -> checkpoint.Restored:
    """The checkpoint of `config`'s task in `workdir`, on this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        jax.eval_shape(make_task(config).init_state))  # fmt: skip
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        return checkpoint.restore_newest(manager, lambda saved: like, step=step)
    finally:
        manager.close()


def metrics_lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoencoder_run_writes_checkpoints_grids_metrics_and_the_scaling_factor(tmp_path):
    assert main(ae_args(tmp_path, 4, "--config.training.checkpoint_every_steps=2",
                        "--config.training.sample_every_steps=4")) == 0  # fmt: skip
    config = ae_config("--config.training.num_train_steps=4")
    lines = metrics_lines(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert set(m) == AE_METRICS | {"step"} and all(np.isfinite(v) for v in m.values())
    assert sorted(checkpoint.make_manager(tmp_path, read_only=True).all_steps()) == [2, 4]

    restored = restore(tmp_path, config)
    assert restored.step == 4 and int(restored.state.step) == 4
    task = make_task(config)
    source = data.load_dataset(config.data)
    # The extras: 1/std of posterior samples of the first 512 training images under the EMA parameters.
    expected = estimate_scaling_factor(encode_fn(task.model), restored.state.ema_params,
                                       source.get(np.arange(SCALING_IMAGES))[0], jax.random.PRNGKey(config.seed))  # fmt: skip
    assert restored.extras == checkpoint.read_extras(tmp_path, 4) == checkpoint.read_extras(tmp_path)
    np.testing.assert_allclose(restored.extras["scaling_factor"], expected, rtol=1e-6)
    assert checkpoint.read_extras(tmp_path, 2)["scaling_factor"] != restored.extras["scaling_factor"]

    # The grid: the first 2 training images, each followed by its reconstruction from the EMA parameters.
    originals = source.get(np.arange(2))[0]
    pairs = images.to_uint8(np.asarray(reconstruct(task.model, restored.state.ema_params, originals)))
    np.testing.assert_allclose(pairs[0::2].astype(int), originals, atol=1)  # uint8 -> [-1, 1] -> uint8
    assert np.mean(np.abs(pairs[1].astype(float) - originals[0])) > 1  # a reconstruction, not a copy
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000004.png"))[::4, ::4]  # saved at 4× scale
    np.testing.assert_allclose(grid.astype(int), images.make_grid(pairs).astype(int), atol=1)  # 2×2: pair per row
    first, second = source.captions(np.arange(2))
    assert (tmp_path / "samples" / "step_00000004.txt").read_text().splitlines() == [
        f"row 1, column 1: {first}", f"row 1, column 2: {first} (reconstruction)",
        f"row 2, column 1: {second}", f"row 2, column 2: {second} (reconstruction)",
    ]  # fmt: skip

    # Readers of any task: the EMA parameters and the config.
    loaded_config, step, params = load_run(tmp_path)
    assert step == 4 and loaded_config.task == "autoencoder"
    for a, b in zip(leaves(params), leaves(restored.state.ema_params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="is a run of task 'autoencoder', which draws no samples"):
        Pipeline.from_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoencoder_resume_is_bitwise_exact(tmp_path):
    common = ["--config.training.checkpoint_every_steps=3", "--config.training.sample_every_steps=1000"]
    assert main(ae_args(tmp_path / "straight", 6, *common)) == 0
    assert main(ae_args(tmp_path / "resumed", 3, *common)) == 0
    assert main(ae_args(tmp_path / "resumed", 6, *common)) == 0
    config = ae_config()
    a, b = restore(tmp_path / "straight", config), restore(tmp_path / "resumed", config)
    assert a.step == b.step == 6
    for x, y in zip(leaves(a.state), leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.extras == b.extras
    without_throughput = lambda d: [  # noqa: E731
        {k: v for k, v in m.items() if k not in ("steps_per_sec", "images_per_sec")} for m in metrics_lines(d)
    ]
    assert without_throughput(tmp_path / "straight") == without_throughput(tmp_path / "resumed")
    assert [m["step"] for m in metrics_lines(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]


def test_summary_averages_every_metric_and_keeps_the_counters_last():
    pending = [
        {"loss": jnp.float32(1.0), "kl": jnp.float32(10.0), "skipped_updates": jnp.int32(1), "nonfinite_streak": jnp.int32(1)},
        {"loss": jnp.float32(3.0), "kl": jnp.float32(30.0), "skipped_updates": jnp.int32(1), "nonfinite_streak": jnp.int32(0)},
    ]  # fmt: skip
    summary = _summarise(pending, steps=2, seconds=4.0, batch=8)
    assert summary == {"loss": 2.0, "kl": 20.0, "skipped_updates": 1.0, "nonfinite_streak": 0.0,
                       "steps_per_sec": 0.5, "images_per_sec": 4.0}  # fmt: skip


def test_resume_compares_what_each_task_trains():
    ae = ae_config()
    saved = ae.to_dict()
    changed = ae_config("--config.model.ch=64", "--config.autoencoder_loss.kl_weight=0.001")
    changed.autoencoder.block_out_channels = (8, 32)
    assert config_differences(saved, changed) == [
        "autoencoder.block_out_channels: (8, 16) -> (8, 32)", "autoencoder_loss.kl_weight: 1e-06 -> 0.001",
    ]  # the model section is the diffusion task's: ignored
    diffusion = load_config(str(ROOT / "configs" / "tiny.py"), [])
    assert config_differences(saved, diffusion) == ["task: 'autoencoder' -> 'diffusion'"]
    diffusion_saved = diffusion.to_dict()
    del diffusion_saved["task"]  # saved before tasks existed: the diffusion task
    assert config_differences(diffusion_saved, diffusion) == []


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("autoencoder_loss.reconstruction_loss", "l3",
         r"autoencoder_loss.reconstruction_loss='l3' is not allowed: expected one of \('l1', 'l2'\)"),
        ("autoencoder_loss.kl_weight", -1.0, r"autoencoder_loss.kl_weight=-1.0 is not allowed: expected a number >= 0"),
        ("task", "vae", r"task='vae' is not allowed: expected one of \('diffusion', 'autoencoder', 'latent', "
                        r"'class_latent', 'flow_lora'\)"),
        ("autoencoder.norm_num_groups", 3, r"config autoencoder: .*norm_num_groups=3"),
        ("autoencoder.sample_size", 31, r"autoencoder.sample_size=31 must be divisible by 2\^1"),
        ("autoencoder.out_channels", 1, r"autoencoder.out_channels=1 must equal autoencoder.in_channels=3"),
    ],
)  # fmt: skip
def test_bad_autoencoder_config_fails_before_the_workdir_exists(tmp_path, key, value, message):
    workdir = tmp_path / "run"
    config = ae_config()
    *sections, leaf = key.split(".")
    section = config
    for name in sections:
        section = section[name]
    section[leaf] = value
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, workdir, progress=False)
    assert main(ae_args(workdir, 1, f"--config.{key}={value}")) == 2  # the CLI: a one-line error, exit status 2
    assert not workdir.exists()


def test_dataset_must_fit_the_autoencoder(tmp_path):
    config = ae_config("--config.data.dataset=digits")
    with pytest.raises(ValueError, match=r"\(8, 8, 1\) but the autoencoder expects \(32, 32, 3\)"):
        train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_workdir_of_another_task_is_refused(tmp_path):
    config = ae_config("--config.training.num_train_steps=1")
    manager = checkpoint.make_manager(tmp_path)
    state = jax.jit(make_task(config).init_state)()
    checkpoint.save(manager, 1, state, load_config(str(ROOT / "configs" / "tiny.py"), []))
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(CheckpointError, match=r"different autoencoder config \(task: 'diffusion' -> 'autoencoder'\)"):
        train_and_evaluate(config, tmp_path, progress=False)
