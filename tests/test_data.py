"""Input pipelines: batch order, the grain iterator and its state, sources (synthetic, digits, CIFAR-10
prepared without TensorFlow from files in the original binary format, TFDS under mock data), errors."""

import gc
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.config import default_config
from tests.helpers import ROOT

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


def write_cifar10_binary(root, *, per_train_file=3, test=4, seed=0):
    """Fake CIFAR-10 binary files (<label byte><1024 red><1024 green><1024 blue> per image) in
    root/cifar-10-batches-bin; returns {"train": (images, labels), "test": (images, labels)} in file order."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    written = {"train": [], "test": []}
    files = [(f"data_batch_{i}.bin", per_train_file, "train") for i in range(1, 6)] + [("test_batch.bin", test, "test")]
    for name, count, split in files:
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        planes = images.transpose(0, 3, 1, 2).reshape(count, 3 * 1024)
        (folder / name).write_bytes(np.concatenate([labels[:, None], planes], axis=1).tobytes())
        written[split].append((images, labels))
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_LABELS) + "\n\n")
    return {k: tuple(np.concatenate(parts) for parts in zip(*v)) for k, v in written.items()}


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


def test_dropping_the_iterator_stops_its_threads():
    before = set(threading.enumerate())
    batches = data.iterate_batches(
        data.SyntheticSource(24, (2, 2, 1)), seed=0, start_step=0, global_batch_size=4, process_index=0, process_count=1
    )
    next(batches)
    workers = set(threading.enumerate()) - before
    assert workers
    del batches
    gc.collect()
    for worker in workers:
        worker.join(timeout=5)
        assert not worker.is_alive()


def test_iterator_state_is_json_and_resuming_from_it_continues_identically():
    source = data.SyntheticSource(29, (2, 3, 1))
    kwargs = dict(seed=3, global_batch_size=6, process_index=0, process_count=1)
    with data.iterate_batches(source, start_step=2, **kwargs) as batches:
        for _ in range(4):
            next(batches)
        state = json.loads(json.dumps(batches.get_state()))
        after = [next(batches) for _ in range(5)]
    assert state == {"step": 6, "seed": 3, "global_batch_size": 6, "num_examples": 29}
    with data.iterate_batches(source, start_step=0, **kwargs) as resumed:
        next(resumed)
        resumed.set_state(state)
        assert resumed.get_state() == state
        for expected in after:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], expected["image"])
            np.testing.assert_array_equal(got["label"], expected["label"])
        assert resumed.get_state()["step"] == 11
        for key, value, message in [("seed", 4, "seed=4 \\(this run: 3\\)"), ("num_examples", 30, "num_examples=30"),
                                    ("step", -1, "step must be an int >= 0")]:  # fmt: skip
            with pytest.raises(ValueError, match=message):
                resumed.set_state({**state, key: value})
        with pytest.raises(ValueError, match="keys"):
            resumed.set_state({"step": 3})


@pytest.mark.parametrize("process_count", [1, 2])
def test_iterator_order_on_one_and_two_processes_is_the_reference_order(process_count):
    num_examples, batch, seed = 23, 8, 11  # epochs end inside batches
    source = indexed_source(num_examples)
    local = batch // process_count
    iterators = [
        data.iterate_batches(source, seed=seed, start_step=1, global_batch_size=batch, process_index=p,
                             process_count=process_count, prefetch=2)  # fmt: skip
        for p in range(process_count)
    ]
    for step in range(1, 9):
        expected = reference_indices(num_examples, seed, step * batch, (step + 1) * batch)
        for p, iterator in enumerate(iterators):
            np.testing.assert_array_equal(next(iterator)["label"], expected[p * local : (p + 1) * local])
    for iterator in iterators:
        iterator.close()


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


def test_digits_splits_are_a_fixed_held_out_fifth_with_rounded_sixteenths():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits()
    held_out = np.random.default_rng(0).permutation(1797)[1797 - 360 :]
    expected_indices = {"test": np.sort(held_out), "train": np.array(sorted(set(range(1797)) - set(held_out)))}
    for split, size in (("train", 1437), ("test", 360)):
        source = data.load_dataset(data_config(dataset="digits", split=split))
        assert (source.num_examples, source.image_shape, source.num_classes) == (size, (8, 8, 1), 10)
        images, labels = source.get(np.arange(size))
        rows = expected_indices[split]
        expected = np.floor(raw.images[rows].astype(np.float64) * 255.0 / 16.0 + 0.5)
        np.testing.assert_array_equal(images[..., 0], expected)
        np.testing.assert_array_equal(labels, raw.target[rows])
        assert images.dtype == np.uint8 and images.max() == 255
        np.testing.assert_array_equal(images[..., 0][raw.images[rows] == 8], 128)
    assert not set(expected_indices["train"]) & set(expected_indices["test"])
    with pytest.raises(ValueError, match="split='validation'"):
        data.load_dataset(data_config(dataset="digits", split="validation"))


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"jaxdiff\[demo\]"):
        data.load_dataset(data_config(dataset="digits"))


def test_cifar10_through_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=13):
        source = data.load_dataset(data_config(dataset="cifar10"))
        direct = tfds.data_source("cifar10", split="train")
        expected_images = np.stack([direct[i]["image"] for i in range(13)])
        expected_labels = [direct[i]["label"] for i in range(13)]
    assert (source.num_examples, source.image_shape, source.num_classes) == (13, (32, 32, 3), 10)
    images, labels = source.get(np.arange(13))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    batch = data.batch_for_step(source, seed=0, step=1, global_batch_size=4, process_index=0, process_count=1)
    np.testing.assert_array_equal(batch["image"], images[reference_indices(13, 0, 4, 8)])


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
    """(data_dir, fake files written) of a CIFAR-10 prepared without TensorFlow from fake binary files."""
    root = tmp_path_factory.mktemp("cifar10")
    written = write_cifar10_binary(root / "source")
    with tarfile.open(root / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(root / "source" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    where = data.prepare_dataset("cifar10", root / "tfds", source=root / "cifar-10-binary.tar.gz")
    assert where == str(root / "tfds" / "cifar10" / "3.0.2")
    return root, written


@pytest.mark.timeout(120)
def test_cifar10_prepared_from_the_binary_archive_reads_back_exactly(prepared_cifar10):
    root, written = prepared_cifar10
    for split, size in (("train", 15), ("test", 4)):
        source = data.load_dataset(data_config(dataset="cifar10", split=split, data_dir=str(root / "tfds")))
        assert (source.num_examples, source.image_shape, source.num_classes) == (size, (32, 32, 3), 10)
        images, labels = source.get(np.arange(size))
        records = tfds.data_source("cifar10", split=split, data_dir=str(root / "tfds"))
        ids = [records[i]["id"] for i in range(size)]
        order = [int(i.decode().split("_")[1]) if isinstance(i, bytes) else int(i.split("_")[1]) for i in ids]
        assert sorted(order) == list(range(size)) and order != list(range(size))  # TFDS shuffled them by key
        np.testing.assert_array_equal(images, written[split][0][order])  # PNG round trip is lossless
        np.testing.assert_array_equal(labels, written[split][1][order])
    assert tfds.builder("cifar10", data_dir=str(root / "tfds")).info.features["label"].names == CIFAR10_LABELS


@pytest.mark.timeout(120)
def test_cifar10_prepared_from_a_folder_equals_from_the_archive_and_reprepare_is_a_no_op(prepared_cifar10, tmp_path):
    root, _ = prepared_cifar10
    where = data.prepare_dataset("cifar10", tmp_path, source=root / "source" / "cifar-10-batches-bin")
    for split in ("train", "test"):
        a = data.load_dataset(data_config(dataset="cifar10", split=split, data_dir=str(root / "tfds")))
        b = data.load_dataset(data_config(dataset="cifar10", split=split, data_dir=str(tmp_path)))
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert data.prepare_dataset("cifar10", tmp_path) == where  # prepared: nothing downloaded or written
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_prepare_rejects_bad_arguments_before_writing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an archive")
    write_cifar10_binary(tmp_path / "short")
    with open(tmp_path / "short" / "cifar-10-batches-bin" / "data_batch_3.bin", "ab") as f:
        f.write(b"\0" * 10)
    with tarfile.open(tmp_path / "partial.tar", "w") as tar:
        tar.add(tmp_path / "short" / "cifar-10-batches-bin" / "test_batch.bin", "cifar-10-batches-bin/test_batch.bin")
    for name, source, error, message in [
        ("lsun_cat256", None, ValueError, "cannot prepare dataset 'lsun_cat256'"),
        ("cifar10", tmp_path / "missing.tar.gz", FileNotFoundError, "missing.tar.gz' does not exist"),
        ("cifar10", tmp_path / "empty", ValueError, "holds no CIFAR-10 binary files"),
        ("cifar10", tmp_path / "notes.txt", ValueError, "is not a tar archive"),
        ("cifar10", tmp_path / "short", ValueError, r"data_batch_3.bin \(9229 bytes\) not a whole number of 3073"),
        ("cifar10", tmp_path / "partial.tar", ValueError, r"no CIFAR-10 binary files \['data_batch_1.bin'"),
    ]:
        with pytest.raises(error, match=message):
            data.prepare_dataset(name, tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()


def test_old_tfrecord_cache_names_both_ways_out(prepared_cifar10, tmp_path):
    root, _ = prepared_cifar10
    shutil.copytree(root / "tfds" / "cifar10", tmp_path / "cifar10")
    info_path = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    version_dir = tmp_path / "cifar10" / "3.0.2"
    for call in (
        lambda: data.load_dataset(data_config(dataset="cifar10", data_dir=str(tmp_path))),
        lambda: data.prepare_dataset("cifar10", tmp_path),
    ):
        with pytest.raises(data.DatasetNotFoundError) as info_error:
            call()
        message = str(info_error.value)
        assert "\n" not in message and "tfrecord format" in message
        assert f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record" in message
        assert "jaxdiff data prepare cifar10 --data-dir NEW_DIR" in message


@pytest.mark.timeout(180)
def test_data_and_tf_checkpoints_need_no_tensorflow(prepared_cifar10):
    root, _ = prepared_cifar10
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from jaxdiff import data
        from jaxdiff.config import default_config
        from jaxdiff.readers.tf_bundle import TFCheckpoint
        config = default_config().data
        config.dataset, config.data_dir = "cifar10", {str(root / "tfds")!r}
        source = data.load_dataset(config)
        with data.iterate_batches(source, seed=0, start_step=0, global_batch_size=4, process_index=0,
                                  process_count=1) as batches:
            assert [next(batches)["image"].shape for _ in range(5)] == [(4, 32, 32, 3)] * 5
        ckpt = TFCheckpoint({str(ROOT / "tests" / "data" / "tf_checkpoint" / "single" / "model.ckpt-5")!r})
        assert ckpt.tensor("global_step") == 790000
        print("tensorflow" in sys.modules, "tensorflow" in {{m.split(".")[0] for m in sys.modules}})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]


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
        ("cifar10", "cifar10", "jaxdiff data prepare cifar10 --data-dir {}"),
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
    for part in (repr(dataset), tfds_name, str(tmp_path), hint.format(tmp_path)):
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


@pytest.mark.timeout(120)
def test_data_prepare_verb_prepares_cifar10_and_answers_a_missing_source_in_one_line(prepared_cifar10, tmp_path, capsys):
    from jaxdiff.cli import main

    root, _ = prepared_cifar10
    source = str(root / "source" / "cifar-10-batches-bin")
    assert main(["data", "prepare", "cifar10", "--source", source, "--data-dir", str(tmp_path / "d")]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"prepared cifar10 in {tmp_path / 'd' / 'cifar10' / '3.0.2'}"
    direct = data.load_dataset(data_config(dataset="cifar10", split="test", data_dir=str(tmp_path / "d")))
    assert direct.num_examples == 4
    assert main(["data", "prepare", "cifar10", "--source", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err
