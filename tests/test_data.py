"""Input pipelines: batch order, sources (synthetic, digits, TFDS under mock data), errors."""

import gc
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.config import default_config


def reference_indices(num_examples, seed, start, stop):
    """Positions [start, stop) of the concatenated permutations default_rng([seed, e]).permutation(N)."""
    epochs = range(start // num_examples, (stop - 1) // num_examples + 1)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(num_examples) for e in epochs])
    offset = epochs[0] * num_examples
    return order[start - offset : stop - offset]


def indexed_source(num_examples):
    """Example i is a 2×2×1 image filled with i % 256 and label i: the batch reveals its indices."""
    images = np.broadcast_to(
        (np.arange(num_examples) % 256).astype(np.uint8)[:, None, None, None], (num_examples, 2, 2, 1)
    )
    return data.ArraySource("indexed", np.ascontiguousarray(images), np.arange(num_examples, dtype=np.int32), 0)


def data_config(**overrides):
    config = default_config()
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config.data


def splitmix64_reference(x):
    mask = (1 << 64) - 1
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & mask
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & mask
    return x ^ (x >> 31)


# --- batch order -------------------------------------------------------------------------


@pytest.mark.parametrize("num_examples, batch, seed", [(37, 8, 0), (10, 4, 5), (6, 16, 2)])
def test_batch_for_step_is_the_reference_slice_of_epoch_permutations(num_examples, batch, seed):
    source = indexed_source(num_examples)
    for step in (0, 1, 2, 7, 40):
        got = data.batch_for_step(
            source, seed=seed, step=step, global_batch_size=batch, process_index=0, process_count=1
        )
        expected = reference_indices(num_examples, seed, step * batch, (step + 1) * batch)
        np.testing.assert_array_equal(got["label"], expected)
        np.testing.assert_array_equal(got["image"][:, 0, 0, 0], expected % 256)
        assert got["image"].dtype == np.uint8 and got["label"].dtype == np.int32
        assert got["image"].shape == (batch, 2, 2, 1)


def test_every_example_once_per_epoch():
    num_examples, batch = 10, 4  # epochs end inside batches 2 and 4
    source = indexed_source(num_examples)
    labels = np.concatenate(
        [
            data.batch_for_step(source, seed=3, step=s, global_batch_size=batch, process_index=0, process_count=1)[
                "label"
            ]
            for s in range(5)
        ]
    )
    for epoch in range(2):
        np.testing.assert_array_equal(
            np.sort(labels[epoch * num_examples : (epoch + 1) * num_examples]), np.arange(num_examples)
        )
    assert not np.array_equal(labels[:num_examples], labels[num_examples:]), "epochs should be shuffled differently"


def test_different_seeds_give_different_orders():
    source = indexed_source(100)
    a = data.batch_for_step(source, seed=0, step=0, global_batch_size=20, process_index=0, process_count=1)
    b = data.batch_for_step(source, seed=1, step=0, global_batch_size=20, process_index=0, process_count=1)
    assert not np.array_equal(a["label"], b["label"])


@pytest.mark.parametrize("process_count", [2, 3, 6])
def test_process_slices_concatenate_to_the_global_batch(process_count):
    source = data.SyntheticSource(25, (3, 3, 2))
    whole = data.batch_for_step(source, seed=4, step=9, global_batch_size=12, process_index=0, process_count=1)
    parts = [
        data.batch_for_step(source, seed=4, step=9, global_batch_size=12, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for key in ("image", "label"):
        assert all(part[key].shape[0] == 12 // process_count for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


@pytest.mark.parametrize("prefetch", [1, 3])
def test_iterator_yields_batch_for_step_and_resumes_exactly(prefetch):
    source = data.SyntheticSource(37, (3, 3, 1))
    kwargs = dict(seed=7, global_batch_size=8, process_index=1, process_count=2)
    iterator = data.iterate_batches(source, start_step=0, prefetch=prefetch, **kwargs)
    from_zero = [next(iterator) for _ in range(12)]
    resumed_iterator = data.iterate_batches(source, start_step=5, prefetch=prefetch, **kwargs)
    resumed = [next(resumed_iterator) for _ in range(7)]
    for step, batch in enumerate(from_zero):
        expected = data.batch_for_step(source, step=step, **kwargs)
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])
    for batch, expected in zip(resumed, from_zero[5:]):
        np.testing.assert_array_equal(batch["image"], expected["image"])


def test_iterator_reraises_source_errors_and_stops_on_close():
    class Broken(data.SyntheticSource):
        def get(self, indices):
            if indices.max() >= 20:
                raise RuntimeError("disk gone")
            return super().get(indices)

    kwargs = dict(seed=0, start_step=0, global_batch_size=4, process_index=0, process_count=1)
    failing = data.iterate_batches(Broken(24, (2, 2, 1)), **kwargs)
    with pytest.raises(RuntimeError, match="disk gone"):
        for _ in range(10):
            next(failing)
    with data.iterate_batches(data.SyntheticSource(24, (2, 2, 1)), **kwargs) as batches:
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_dropping_the_iterator_stops_its_thread():
    before = set(threading.enumerate())
    batches = data.iterate_batches(
        data.SyntheticSource(24, (2, 2, 1)), seed=0, start_step=0, global_batch_size=4, process_index=0, process_count=1
    )
    next(batches)
    (worker,) = set(threading.enumerate()) - before
    del batches
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=10, process_count=4, process_index=0), "not divisible by process_count=4"),
        (dict(global_batch_size=8, process_count=2, process_index=2), "process_index=2"),
        (dict(global_batch_size=0, process_count=1, process_index=0), "positive"),
        (dict(global_batch_size=8, process_count=1, process_index=0, seed=-1), "seed"),
    ],
)
def test_bad_batch_arguments_raise_before_any_work(kwargs, message):
    kwargs = {"seed": 0, **kwargs}
    source = data.SyntheticSource(10, (2, 2, 1))
    with pytest.raises(ValueError, match=message):
        data.batch_for_step(source, step=0, **kwargs)
    with pytest.raises(ValueError, match=message):
        data.iterate_batches(source, start_step=0, **kwargs)  # no next(): checked at the call
    with pytest.raises(ValueError, match="step"):
        data.batch_for_step(source, seed=0, step=-1, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="prefetch"):
        data.iterate_batches(
            source, seed=0, start_step=0, global_batch_size=2, process_index=0, process_count=1, prefetch=0
        )


def test_get_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="index -1"):
        indexed_source(5).get(np.array([0, -1]))
    with pytest.raises(ValueError, match="index 5"):
        data.SyntheticSource(5, (1, 1, 1)).get(np.array([5]))


# --- sources ------------------------------------------------------------------------------


def test_synthetic_pixels_and_labels_match_the_splitmix_formula():
    shape, seed = (3, 3, 2), 5  # 18 pixels: 3 words, the last one partly used
    source = data.SyntheticSource(40, shape, num_classes=7, seed=seed)
    indices = np.array([0, 39, 11, 11])
    images, labels = source.get(indices)
    pixels = int(np.prod(shape))
    words = (pixels + 7) // 8
    for row, i in enumerate(indices):
        example = (seed << 32) + int(i)
        expected = [
            splitmix64_reference((example * words + k // 8) * 2 + 1) >> (8 * (k % 8)) & 0xFF for k in range(pixels)
        ]
        np.testing.assert_array_equal(images[row].reshape(-1), expected)
        assert labels[row] == splitmix64_reference(example * 2) % 7
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert len(np.unique(images)) > 20  # looks random, not constant


def test_load_dataset_synthetic_needs_a_shape():
    source = data.load_dataset(data_config(dataset="synthetic"), image_shape_for_synthetic=(8, 8, 3))
    assert (source.num_examples, source.image_shape) == (data.SYNTHETIC_NUM_EXAMPLES, (8, 8, 3))
    with pytest.raises(ValueError, match="image_shape_for_synthetic"):
        data.load_dataset(data_config(dataset="synthetic"))


def test_load_dataset_rejects_unknown_names():
    config = default_config()
    config.data.dataset = "imagenet"
    with pytest.raises(ValueError, match="'imagenet'"):
        data.load_dataset(config.data)


def test_digits_values_are_rounded_sixteenths():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits()
    source = data.load_dataset(data_config(dataset="digits"))
    assert (source.num_examples, source.image_shape, source.num_classes) == (1797, (8, 8, 1), 10)
    images, labels = source.get(np.arange(1797))
    assert images.dtype == np.uint8 and images.min() == 0 and images.max() == 255
    expected = np.floor(raw.images.astype(np.float64) * 255.0 / 16.0 + 0.5)
    np.testing.assert_array_equal(images[..., 0], expected)
    np.testing.assert_array_equal(images[..., 0][raw.images == 16], 255)
    np.testing.assert_array_equal(images[..., 0][raw.images == 8], 128)
    np.testing.assert_array_equal(labels, raw.target)
    with pytest.raises(ValueError, match="split='test'"):
        data.load_dataset(data_config(dataset="digits", split="test"))


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"jaxdiff\[demo\]"):
        data.load_dataset(data_config(dataset="digits"))


@pytest.mark.timeout(120)
def test_cifar10_through_tfds_mock_data(monkeypatch):
    monkeypatch.setattr(data, "_TFDS_READ_BATCH", 5)  # the 13 examples arrive in 3 tf.data batches
    with tfds.testing.mock_data(num_examples=13):
        source = data.load_dataset(data_config(dataset="cifar10"))
        direct = list(tfds.as_numpy(tfds.load("cifar10", split="train")))
    assert (source.num_examples, source.image_shape, source.num_classes) == (13, (32, 32, 3), 10)
    images, labels = source.get(np.arange(13))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10
    np.testing.assert_array_equal(images, np.stack([example["image"] for example in direct]))
    np.testing.assert_array_equal(labels, [example["label"] for example in direct])
    batch = data.batch_for_step(source, seed=0, step=1, global_batch_size=4, process_index=0, process_count=1)
    np.testing.assert_array_equal(batch["image"], images[reference_indices(13, 0, 4, 8)])


def test_lsun_through_tfds_mock_data_source():
    with tfds.testing.mock_data(num_examples=6):
        source = data.load_dataset(data_config(dataset="lsun_church256"))
        raw = tfds.data_source("lsun/church_outdoor", split="train")
        expected = np.stack([data.center_crop_resize(raw[i]["image"], 256) for i in (4, 0, 4)])
        images, labels = source.get(np.array([4, 0, 4]))
    assert (source.num_examples, source.image_shape, source.num_classes) == (6, (256, 256, 3), 0)
    assert images.dtype == np.uint8 and images.shape == (3, 256, 256, 3)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "dataset, tfds_name, hint",
    [
        ("cifar10", "cifar10", "tfds build cifar10"),
        ("lsun_bedroom256", "lsun/bedroom", "--file_format=array_record"),
        ("celebahq256", "celeb_a_hq/256", "data256x256.tar"),
    ],
)
def test_missing_dataset_fails_fast_naming_dataset_dir_and_fix(tmp_path, monkeypatch, dataset, tfds_name, hint):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset(data_config(dataset=dataset, data_dir=str(tmp_path)))
    assert time.monotonic() - start < 20
    message = str(info.value)
    for part in (repr(dataset), tfds_name, str(tmp_path), hint):
        assert part in message
    if dataset == "celebahq256":
        assert f"--manual_dir={tmp_path}" in message


# --- center crop and resize ------------------------------------------------------------------


@pytest.mark.parametrize("height, width, top, left", [(256, 300, 0, 22), (301, 256, 22, 0), (256, 256, 0, 0)])
def test_center_crop_takes_the_middle_square(height, width, top, left):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(image, 256), image[top : top + 256, left : left + 256])


def test_resize_keeps_constant_images_and_ramps():
    constant = np.full((90, 120, 3), 77, np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(constant, 256), 77)
    ramp = np.broadcast_to(np.arange(0, 256, 2, dtype=np.uint8)[None, :, None], (128, 128, 1))
    up = data.center_crop_resize(ramp, 256).astype(np.float64)[..., 0]
    # sample centres of output pixel j lie at input coordinate (j + 0.5) / 2 - 0.5; ramp value is 2·x
    expected = 2.0 * ((np.arange(256) + 0.5) / 2.0 - 0.5)
    np.testing.assert_allclose(up[:, 8:-8], np.broadcast_to(expected[8:-8], (256, 240)), atol=1.0)
