"""FID reference statistics of a TFDS split (mock data, random Inception params), their cache and loading."""


import flax.traverse_util
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.evaluation import reference
from jaxdiff.evaluation.fid import save_statistics
from jaxdiff.evaluation.inception import inception_features
from jaxdiff.evaluation.inception_weights import random_params


@pytest.fixture(scope="module")
def params():
    return random_params(with_logits=False)


@pytest.mark.timeout(240)
def test_split_statistics_equal_a_direct_computation_and_are_cached(tmp_path, params, monkeypatch):
    with tfds.testing.mock_data(num_examples=3):
        mu, sigma = reference.dataset_statistics(
            "cifar10", "test", inception_params=params, batch_size=2, cache_dir=tmp_path, progress=False
        )
        records = tfds.data_source("cifar10", split="test")
        images = np.stack([records[i]["image"] for i in range(len(records))])

    # pool_3 of each image, from batches of the same size (one compiled shape) but not padded
    first, _ = inception_features(params, images[0:2])
    last, _ = inception_features(params, images[1:3])
    features = np.concatenate([np.asarray(first), np.asarray(last)[1:]]).astype(np.float64)
    assert features.shape == (3, 2048) and features.std() > 1e-3
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-7 * np.abs(sigma).max())
    assert mu.dtype == sigma.dtype == np.float64

    fingerprint = reference.params_fingerprint(params)[:8]
    cached = tmp_path / f"cifar10_test_{fingerprint}.npz"
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]
    with np.load(cached) as stored:
        np.testing.assert_array_equal(stored["mu"], mu)
        np.testing.assert_array_equal(stored["sigma"], sigma)

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed although the statistics are cached")

    monkeypatch.setattr(reference, "inception_features", must_not_run)
    monkeypatch.setattr(data, "load_dataset", must_not_run)
    mu2, sigma2 = reference.dataset_statistics("cifar10", "test", inception_params=params, cache_dir=tmp_path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    for name in ("cifar10_test", f"cifar10_test_{fingerprint}", cached):
        mu3, sigma3 = reference.load_reference(name, cache_dir=tmp_path)
        np.testing.assert_array_equal(mu3, mu)
        np.testing.assert_array_equal(sigma3, sigma)


def test_cache_names_identify_dataset_split_and_weights(params):
    fingerprint = reference.params_fingerprint(params)
    assert len(fingerprint) == 64 and reference.params_fingerprint(params) == fingerprint
    flat = flax.traverse_util.flatten_dict(params)
    path = ("Mixed_6b", "branch7x7_2", "bn", "bias")
    nudged = np.array(flat[path])
    nudged[3] += 1e-6
    changed = flax.traverse_util.unflatten_dict({**flat, path: nudged})
    assert reference.params_fingerprint(changed) != fingerprint
    assert reference.statistics_name("cifar10", "train", params) == f"cifar10_train_{fingerprint[:8]}"
    sliced = reference.statistics_name("lsun_church256", "train[:10%]", params)
    assert sliced.startswith("lsun_church256_train__10__-") and sliced.endswith(f"_{fingerprint[:8]}")
    assert sliced != reference.statistics_name("lsun_church256", "train[:10]", params)


def test_published_statistics_load_and_bad_files_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=2048), np.eye(2048) + 0.01
    save_statistics(tmp_path / "fid_stats_cifar10_train.npz", mu, sigma)
    loaded = reference.load_reference(tmp_path / "fid_stats_cifar10_train.npz")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)

    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"mu has shape \(64,\).*\(2048,\)"):
        reference.load_reference(tmp_path / "small.npz")
    np.savez(tmp_path / "ragged.npz", mu=np.zeros(2048), sigma=np.eye(2047))
    with pytest.raises(ValueError, match=r"\(2048,\) and \(2047, 2047\)"):
        reference.load_reference(tmp_path / "ragged.npz")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(2048), cov=np.eye(2048))
    with pytest.raises(ValueError, match="expected keys 'mu' and 'sigma'"):
        reference.load_reference(tmp_path / "keys.npz")

    with pytest.raises(FileNotFoundError, match="cifar10_train.*dataset_statistics"):
        reference.load_reference("cifar10_train", cache_dir=tmp_path)
    for weights in ("0123abcd", "89abcdef"):
        save_statistics(tmp_path / f"cifar10_train_{weights}.npz", mu, sigma)
    with pytest.raises(ValueError, match="several Inception weights.*cifar10_train_0123abcd"):
        reference.load_reference("cifar10_train", cache_dir=tmp_path)
    assert reference.load_reference("cifar10_train_89abcdef", cache_dir=tmp_path)[0].shape == (2048,)


def test_bad_arguments_fail_before_reading_anything(tmp_path, params, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("read the dataset despite bad arguments")

    monkeypatch.setattr(data, "load_dataset", must_not_run)
    for kwargs, message in [
        (dict(dataset="synthetic"), "dataset='synthetic' must be one of"),
        (dict(dataset="imagenet"), "dataset='imagenet'"),
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(inception_params={"Conv2d_1a_3x3": params["Conv2d_1a_3x3"]}), "not FID Inception params"),
    ]:
        arguments = {**dict(dataset="cifar10", inception_params=params, batch_size=2, cache_dir=tmp_path), **kwargs}
        with pytest.raises(ValueError, match=message):
            reference.dataset_statistics(arguments.pop("dataset"), "train", **arguments)
    assert not list(tmp_path.iterdir())
