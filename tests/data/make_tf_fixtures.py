"""Writes the TensorFlow-made fixtures in this folder; needs TensorFlow (the test suite itself does not).

  python tests/data/make_tf_fixtures.py

- `tf_checkpoint/single/model.ckpt-5.*`: a TF1-style V2 checkpoint written by `tf.raw_ops.SaveV2` (what
  `tf.compat.v1.train.Saver` calls): 150 small tensors named like the official DDPM variables (enough keys
  for several index blocks, restart points and shared key prefixes), float32/float64/float16/int32/int64,
  scalars and an empty tensor. `single.npz` holds the same values under the same names.
- `tf_checkpoint/sharded/ckpt-1.*`: a `tf.train.Checkpoint` split into two shards of at most 1 KB
  (`MaxShardSizePolicy`, which also partitions `v` across them), with its object-graph string tensor.
  `sharded.npz`: its numeric tensors by name.
- `tf1_resize_bilinear.npz`: `tf.compat.v1.image.resize_bilinear(..., align_corners=False)` of the inputs
  `tests/test_inception.py` draws, at a subset of output rows and columns (key `<h>x<w>x<c>_<dtype>`
  for the output, `..._rows` and `..._cols` for the sampled indices).
"""

import pathlib
import shutil

import numpy as np
import tensorflow as tf

HERE = pathlib.Path(__file__).resolve().parent
RESIZE_CASES = [((2, 8, 8, 3), "uint8"), ((2, 32, 32, 3), "uint8"), ((2, 17, 45, 3), "uint8"),
                ((2, 64, 100, 3), "uint8"), ((2, 299, 299, 3), "uint8"), ((2, 8, 8, 1), "uint8"),
                ((1, 40, 30, 3), "float32")]  # fmt: skip


def single_checkpoint_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {}
    for level in range(3):
        for block in range(4):
            scope = f"model/down_{level}/block_{block}"
            tensors[f"{scope}/conv1/W"] = rng.normal(size=(3, 3, 2, 2)).astype(np.float32)
            tensors[f"{scope}/conv1/b"] = rng.normal(size=(2,)).astype(np.float32)
            tensors[f"{scope}/norm1/gamma"] = rng.normal(size=(2,)).astype(np.float32)
            tensors[f"{scope}/norm1/beta"] = rng.normal(size=(2,)).astype(np.float32)
    for name in list(tensors):
        tensors[f"{name}/ExponentialMovingAverage"] = rng.normal(size=tensors[name].shape).astype(np.float32)
        tensors[f"{name}/Adam"] = rng.normal(size=tensors[name].shape).astype(np.float32)
    tensors["model/conv_in/W"] = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    tensors["model/temb/dense_0/W"] = rng.normal(size=(4, 6)).astype(np.float64)
    tensors["model/temb/dense_0/b"] = rng.normal(size=(6,)).astype(np.float16)
    tensors["model/counts"] = rng.integers(-(2**31), 2**31, size=(5,), dtype=np.int32)
    tensors["model/empty"] = np.zeros((0, 3), np.float32)
    tensors["global_step"] = np.int64(790_000)
    tensors["beta1_power"] = np.float32(0.5)
    return tensors


def write_single(directory: pathlib.Path) -> None:
    tensors = single_checkpoint_tensors()
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(directory / "single" / "model.ckpt-5"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[tensors[n] for n in names])  # fmt: skip
    np.savez(directory / "single.npz", **tensors)


def write_sharded(directory: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    module = tf.Module()
    module.w = tf.Variable(rng.normal(size=(8, 20)).astype(np.float32))  # 640 bytes
    module.v = tf.Variable(rng.normal(size=(10, 10)).astype(np.float32))  # 400 bytes
    module.step = tf.Variable(np.int64(12))
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=1024)
    )
    prefix = tf.train.Checkpoint(module=module).write(str(directory / "sharded" / "ckpt-1"), options=options)
    reader = tf.train.load_checkpoint(prefix)
    numeric = {n: reader.get_tensor(n) for n, dtype in reader.get_variable_to_dtype_map().items() if dtype != tf.string}
    np.savez(directory / "sharded.npz", **numeric)


def write_resize(path: pathlib.Path) -> None:
    golden = {}
    for shape, dtype in RESIZE_CASES:
        height, width = shape[1:3]
        rng = np.random.default_rng(height * width)
        if dtype == "uint8":
            images = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            images = rng.uniform(0, 255, shape).astype(np.float32)
        out = tf.compat.v1.image.resize_bilinear(tf.constant(images.astype(np.float32)), [299, 299]).numpy()
        picks = np.random.default_rng(7)
        rows = np.unique(np.concatenate([[0, 1, 297, 298], picks.choice(299, 12, replace=False)]))
        cols = np.unique(np.concatenate([[0, 1, 297, 298], picks.choice(299, 12, replace=False)]))
        key = f"{'x'.join(map(str, shape[1:]))}_{dtype}"
        golden[key] = out[:, rows][:, :, cols]
        golden[key + "_rows"], golden[key + "_cols"] = rows, cols
    np.savez(path, **golden)


def main() -> None:
    directory = HERE / "tf_checkpoint"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    write_single(directory)
    write_sharded(directory)
    write_resize(HERE / "tf1_resize_bilinear.npz")


if __name__ == "__main__":
    main()
