"""FID, IS, streaming statistics and precision/recall against float64 NumPy references."""

import numpy as np
import pytest
import scipy.linalg

from jaxdiff.evaluation import fid
from jaxdiff.evaluation.fid import (
    ActivationStatistics,
    frechet_distance,
    inception_score,
    load_statistics,
    precision_recall,
    save_statistics,
)


def _random_covariance(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _reference_fid(mu1, s1, mu2, s2):
    """tr sqrt(s1 s2) = sum of sqrt of the eigenvalues of s1 s2 (real, positive for SPD s1, s2)."""
    eig = np.linalg.eigvals(s1 @ s2)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real))


def test_frechet_distance_matches_eigenvalue_reference():
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    expected = _reference_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 10
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_retries_with_offset_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def sqrtm_failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", sqrtm_failing_once)
    got = frechet_distance(mu1, s1, mu2, s2)
    offset = 1e-6 * np.eye(d)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset), rtol=1e-15)
    # The retried square root belongs to the offset matrices; the traces stay those of s1, s2.
    eig = np.linalg.eigvals((s1 + offset) @ (s2 + offset))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_imaginary_part(monkeypatch):
    d = 3
    mu, sigma = np.zeros(d), np.eye(d)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: a + 1e-4j * np.eye(d))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-12)  # small: dropped
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: a + 1e-2j * np.eye(d))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, sigma, mu, sigma)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3,\) and \(3, 2\)"):
        frechet_distance(np.zeros(3), np.zeros((3, 2)), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="different dimension: 3 and 4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _reference_inception_score(logits, splits):
    """openai improved-GAN formula with an explicit softmax, float64."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("n, splits", [(200, 10), (103, 10), (50, 1)])
def test_inception_score_matches_reference(n, splits):
    logits = 3.0 * np.random.default_rng(n).normal(size=(n, 1008))
    mean, std = inception_score(logits.astype(np.float32), splits=splits)
    ref_mean, ref_std = _reference_inception_score(logits.astype(np.float32).astype(np.float64), splits)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    assert mean > 1.0


def test_inception_score_of_confident_balanced_classes_is_class_count():
    # 40 images per split, confidently spread over 8 classes -> p(y) uniform over 8, IS = 8.
    labels = np.arange(400) % 8
    logits = np.where(np.arange(1008)[None, :] == labels[:, None], 100.0, 0.0)
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(8.0, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        inception_score(np.zeros(10))
    with pytest.raises(ValueError, match="splits must be in"):
        inception_score(np.zeros((5, 1008)), splits=10)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.full((20, 1008), np.nan), splits=2)


def test_activation_statistics_streaming_matches_numpy():
    rng = np.random.default_rng(3)
    chunks = [rng.normal(loc=0.5, size=(n, 16)).astype(np.float32) for n in (7, 1, 30, 12)]
    stats = ActivationStatistics()
    for chunk in chunks:
        stats.update(chunk)
    everything = np.concatenate(chunks).astype(np.float64)
    assert stats.count == 50
    np.testing.assert_allclose(stats.mean, np.mean(everything, axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.covariance, np.cov(everything, rowvar=False), rtol=1e-10, atol=1e-13)


def test_activation_statistics_rejects_bad_input():
    stats = ActivationStatistics()
    with pytest.raises(ValueError, match="update"):
        stats.mean
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        stats.update(np.zeros(4))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.covariance
    with pytest.raises(ValueError, match="5 dims, earlier batches had 4"):
        stats.update(np.zeros((3, 5)))


def test_statistics_save_load_roundtrip_and_published_layout(tmp_path):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(20, 5))
    stats = ActivationStatistics()
    stats.update(features)
    stats.save(tmp_path / "ours.npz")
    mu, sigma = load_statistics(tmp_path / "ours.npz")
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.covariance)
    # Published statistics (e.g. TTUR's) are float32 and may carry extra keys.
    np.savez(tmp_path / "published.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), n=20)
    mu2, sigma2 = load_statistics(tmp_path / "published.npz")
    assert mu2.dtype == np.float64
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-6)


def test_load_statistics_rejects_bad_files(tmp_path):
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(4,\) and \(4, 3\)"):
        load_statistics(tmp_path / "shape.npz")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(4), cov=np.eye(4))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_statistics(tmp_path / "keys.npz")
    with pytest.raises(ValueError, match="sigma"):
        save_statistics(tmp_path / "x.npz", np.zeros(3), np.eye(2))


def _brute_force_precision_recall(real, fake, k):
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        return np.sort(dist(x, x), axis=1)[:, k]  # column 0 is the point itself

    precision = np.mean([(dist(f[None], real)[0] <= radii(real)).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= radii(fake)).any() for r in real])
    return precision, recall


@pytest.mark.parametrize("k, batch_size", [(1, 7), (3, 500), (5, 16)])
def test_precision_recall_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(70, 8))
    fake = 1.3 * rng.normal(size=(55, 8)) + 0.4
    got = precision_recall(real, fake, k=k, batch_size=batch_size)
    expected = _brute_force_precision_recall(real, fake, k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0  # a non-trivial case: some fake points fall outside


def test_precision_recall_of_identical_sets_is_one():
    features = np.random.default_rng(5).normal(size=(40, 6))
    assert precision_recall(features, features.copy(), k=3, batch_size=9) == (1.0, 1.0)


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(10, 4\) and \(10, 5\)"):
        precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)), k=3)
    with pytest.raises(ValueError, match="batch_size"):
        precision_recall(np.zeros((10, 4)), np.zeros((10, 4)), batch_size=0)
