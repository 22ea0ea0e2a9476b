"""FSDP on 8 simulated CPU devices: the ("data", "fsdp") mesh, batch rows per device, the state-sharding rule,
the real train step sharded against the replicated one, per-device memory, and a sharded checkpoint round trip.

Each test runs this file as a script in a fresh interpreter (the CPU device count is fixed when JAX starts);
the script asserts and prints OK.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.py"
FSDP = 4
STEPS = 3
RTOL = 1e-6  # per tree (params, EMA, Adam mu, Adam nu): max |sharded − replicated| <= RTOL · max |replicated|
MIN_SIZE = 1024  # elements: the tiny U-Net's 3×3 kernels (>= 9216) are split, its biases and norms are not


def run_script(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), name]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr[-4000:]


def spec_of(array) -> P:
    return array.sharding.spec


def tree_difference(expected, actual) -> float:
    """max |actual − expected| over all leaves of a tree, relative to max |expected| over the tree."""
    pairs = [
        (np.asarray(a, np.float64), np.asarray(b, np.float64))
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual))
    ]
    return max(np.abs(a - b).max() for a, b in pairs) / max(np.abs(a).max() for a, _ in pairs)


def adam_state(state) -> optax.ScaleByAdamState:
    """The Adam moments (mu, nu) and count inside the optimizer state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (found,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    return found


def per_device_bytes(tree) -> dict:
    """Bytes each device holds of the arrays of `tree`."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


# --- script bodies (run in fresh interpreters) ---------------------------------------------------


def mesh_and_rules_main():
    jax.config.update("jax_num_cpu_devices", 8)
    ordered = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = sharding.make_mesh(FSDP)
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, FSDP)
    assert list(mesh.devices.flat) == ordered  # each fsdp group: FSDP consecutive devices of one process
    assert all(len({d.process_index for d in row}) == 1 for row in mesh.devices)
    assert sharding.make_mesh().axis_names == ("data",) and sharding.make_mesh().devices.shape == (8,)
    assert sharding.make_mesh(8).devices.shape == (1, 8)
    for bad in (3, 0, 16, -2):
        try:
            sharding.make_mesh(bad)
        except ValueError as err:
            assert f"fsdp={bad}" in str(err) and "8 devices" in str(err), err
        else:
            raise AssertionError(f"no ValueError for fsdp={bad}")

    # The batch: device k of the mesh's order (data-major) holds rows [2k, 2k + 2) of 16.
    local = {"image": np.arange(16 * 3, dtype=np.int32).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
    batch = sharding.global_batch(local, mesh)
    for name, value in local.items():
        shards = {shard.device: shard for shard in batch[name].addressable_shards}
        assert len(shards) == 8
        for k, device in enumerate(mesh.devices.flat):
            assert shards[device].index[0] == slice(2 * k, 2 * k + 2), (name, k, shards[device].index)
            np.testing.assert_array_equal(np.asarray(shards[device].data), value[2 * k : 2 * k + 2])

    # The rule on a hand-made state.
    sds = jax.ShapeDtypeStruct
    state = {
        "kernel": sds((3, 3, 8, 12), jnp.float32),  # 8 and 12 divisible by 4: the larger, axis 3
        "tie": sds((16, 16), jnp.float32),  # equal sizes: the later axis
        "first": sds((64, 6), jnp.float32),  # only axis 0 divisible
        "odd": sds((5, 7, 9), jnp.float32),  # nothing divisible: replicated
        "small": sds((8,), jnp.float32),  # under min_size: replicated
        "scalar": sds((), jnp.int32),
        "key": jax.random.PRNGKey(0),  # a concrete uint32 [2] leaf
        "absent": None,
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.state_sharding(mesh, state, min_size=16))
    expected = {"kernel": P(None, None, None, "fsdp"), "tie": P(None, "fsdp"), "first": P("fsdp"), "odd": P(),
                "small": P(), "scalar": P(), "key": P(), "absent": None}  # fmt: skip
    assert specs == expected, specs
    assert jax.tree.map(lambda s: s.spec, sharding.state_sharding(mesh, state))["kernel"] == P()  # default min_size
    one_d = sharding.state_sharding(sharding.make_mesh(), state, min_size=1)
    assert all(s.spec == P() for s in jax.tree.leaves(one_d))
    try:
        sharding.state_sharding(mesh, state, min_size=0)
    except ValueError as err:
        assert "min_size=0" in str(err), err
    else:
        raise AssertionError("no ValueError for min_size=0")

    # A flax.struct state with None leaves: the autoencoder's, without a discriminator.
    import ml_collections

    from jaxdiff.training.autoencoder_step import init_autoencoder_train_state
    from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
    from jaxdiff.training.step import make_optimizer

    tiny_ae = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
               "block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8}  # fmt: skip
    training = ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 0, "grad_clip_norm": 1.0,
                                          "adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8})  # fmt: skip
    model, tx = create_autoencoder(autoencoder_config(tiny_ae)), make_optimizer(training)
    init = lambda: init_autoencoder_train_state(model, None, tx, 0, (16, 16, 3))  # noqa: E731
    shardings = sharding.state_sharding(mesh, jax.eval_shape(init), min_size=MIN_SIZE)
    assert shardings.disc_params is None and shardings.disc_opt_state is None
    ae_state = jax.jit(init, out_shardings=shardings)()
    kernel = ae_state.params["encoder"]["conv_out"]["kernel"]  # 3×3×32×8: axis 2 (32) split
    assert kernel.shape == (3, 3, 32, 8) and spec_of(kernel) == P(None, None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 8, 8)}
    assert spec_of(ae_state.step) == P() and spec_of(ae_state.rng) == P()
    print("OK")


def train_main():
    jax.config.update("jax_num_cpu_devices", 8)
    from jaxdiff.training import checkpoint
    from jaxdiff.cli import load_config
    from jaxdiff.models import create_model
    from jaxdiff.schedule import schedule_from_config
    from jaxdiff.training.diffusion_step import make_train_step
    from jaxdiff.training.step import init_train_state, make_optimizer

    # adam_eps 1e-5: gradients that vanish in exact arithmetic (a key bias under softmax) are float32
    # roundoff in either run; Adam with eps 1e-8 would normalise them into differing lr-sized updates.
    overrides = ["--config.training.learning_rate=1e-3", "--config.training.adam_eps=1e-5"]
    config = load_config(str(TINY_CONFIG), overrides)
    model, tx = create_model(config.model), make_optimizer(config.training)
    init = lambda: init_train_state(config, model, tx)  # noqa: E731
    step_fn = make_train_step(config, model, tx)
    rng = np.random.default_rng(0)
    size, batch_size = config.model.image_size, config.training.batch_size
    local_batches = [
        {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
         "label": rng.integers(0, 10, (batch_size,), dtype=np.int32)}
        for _ in range(STEPS)
    ]  # fmt: skip

    # Perturbed weights: DDPM's zero-initialised output layer would leave the inner layers' gradients ~0,
    # all roundoff. The same host state, placed with each sharding.
    fresh = jax.jit(init)()
    treedef = jax.tree.structure(fresh.params)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(jax.random.PRNGKey(1), treedef.num_leaves)))
    params = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape), fresh.params, keys)
    start = jax.device_get(fresh.replace(params=params, ema_params=params))

    def run(mesh, state_shardings):
        state = jax.device_put(start, state_shardings)
        batches = [sharding.global_batch(b, mesh) for b in local_batches]
        train_step = jax.jit(
            step_fn,
            in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(state_shardings, sharding.replicated_sharding(mesh)),
        )
        for batch in batches:
            state, metrics = train_step(state, batch)
        return state, metrics

    shapes = jax.eval_shape(init)
    mesh_1d, mesh_2d = sharding.make_mesh(), sharding.make_mesh(FSDP)
    replicated_shardings = sharding.state_sharding(mesh_1d, shapes)
    fsdp_shardings = sharding.state_sharding(mesh_2d, shapes, min_size=MIN_SIZE)
    replicated, metrics_1d = run(mesh_1d, replicated_shardings)
    sharded, metrics_2d = run(mesh_2d, fsdp_shardings)

    # Equal states: integers and the key exactly; params, EMA and Adam's mu and nu each to float32 reduction order.
    for name in ("step", "rng", "skipped", "nonfinite_streak"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, name)), np.asarray(getattr(replicated, name)))
    assert int(sharded.step) == STEPS and int(sharded.skipped) == 0
    trees = {
        "params": (replicated.params, sharded.params),
        "ema": (replicated.ema_params, sharded.ema_params),
        "adam mu": (adam_state(replicated).mu, adam_state(sharded).mu),
        "adam nu": (adam_state(replicated).nu, adam_state(sharded).nu),
    }
    worst = {name: tree_difference(*pair) for name, pair in trees.items()}
    assert max(worst.values()) <= RTOL, worst
    np.testing.assert_array_equal(np.asarray(adam_state(sharded).count), np.asarray(adam_state(replicated).count))
    moved = np.abs(np.asarray(replicated.params["conv_in"]["kernel"]) - start.params["conv_in"]["kernel"])
    assert moved.max() > 1e-4  # the steps changed the weights
    np.testing.assert_allclose(float(metrics_2d["loss"]), float(metrics_1d["loss"]), rtol=RTOL)

    # The large leaves really are split over "fsdp" (and replicated over "data"); the small ones are not.
    split = 0
    for a, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(fsdp_shardings)):
        assert a.sharding.is_equivalent_to(want, a.ndim)
        if a.size < MIN_SIZE:
            assert spec_of(a) == P()
            continue
        assert "fsdp" in spec_of(a), (a.shape, spec_of(a))
        axis = list(spec_of(a)).index("fsdp")
        shard_shape = a.shape[:axis] + (a.shape[axis] // FSDP,) + a.shape[axis + 1 :]
        assert {shard.data.shape for shard in a.addressable_shards} == {shard_shape}
        assert len({shard.index[axis].start for shard in a.addressable_shards}) == FSDP
        split += 1
    assert split >= 3 * 10  # params, EMA, Adam mu and nu: at least 10 kernels each

    # Per-device memory: the split leaves hold 1/FSDP of their bytes on each device; the whole state
    # (small leaves replicated) stays under 1/FSDP + 5% of the replicated state.
    big = lambda tree: [a for a in jax.tree.leaves(tree) if a.size >= MIN_SIZE]  # noqa: E731
    big_replicated, big_sharded = per_device_bytes(big(replicated)), per_device_bytes(big(sharded))
    assert set(big_sharded.values()) == {next(iter(big_replicated.values())) // FSDP}, big_sharded
    total_replicated = max(per_device_bytes(replicated).values())
    total_sharded = max(per_device_bytes(sharded).values())
    assert total_sharded <= (1 / FSDP + 0.05) * total_replicated, (total_sharded, total_replicated)

    # Sharded checkpoint: saved through jaxdiff.training.checkpoint, restored to the same shardings bitwise, and to
    # replicated shardings (another topology) bitwise.
    with tempfile.TemporaryDirectory() as workdir:
        manager = checkpoint.make_manager(workdir)
        checkpoint.save(manager, STEPS, sharded, config)
        manager.wait_until_finished()
        for shardings in (fsdp_shardings, replicated_shardings):
            target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
            restored = checkpoint.restore_newest(manager, lambda saved, target=target: target)
            assert restored.step == STEPS
            for a, b, want in zip(
                jax.tree.leaves(restored.state), jax.tree.leaves(sharded), jax.tree.leaves(shardings)
            ):
                assert a.sharding.is_equivalent_to(want, a.ndim)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        manager.close()
    print(f"relative differences {worst}; per-device state bytes {total_sharded} vs {total_replicated}")
    print("OK")


# --- tests ---------------------------------------------------------------------------------------


def test_single_device_state_sharding_is_replicated():
    mesh = sharding.make_mesh()
    state = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32), "b": None}
    shardings = sharding.state_sharding(mesh, state, min_size=1)
    assert shardings["b"] is None and shardings["w"].spec == P()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_mesh_batch_rows_and_sharding_rule_on_eight_devices():
    run_script("mesh_and_rules")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_train_steps_equal_replicated_and_checkpoint_round_trips():
    run_script("train")


if __name__ == "__main__":
    {"mesh_and_rules": mesh_and_rules_main, "train": train_main}[sys.argv[1]]()
