"""FID, Inception Score and precision/recall from Inception outputs, in float64 NumPy on the host.

- `ActivationStatistics`: streaming mean and covariance of pool_3 features.
- `frechet_distance`: the TTUR formula (Heusel et al. 2017, reference code).
- `inception_score`: the improved-GAN formula (Salimans et al. 2016, reference code).
- `precision_recall`: k-NN manifold precision and recall (Kynkäänniemi et al. 2019).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg
import scipy.special

from jaxdiff.errors import DataError, UsageError

SQRTM_OFFSET = 1e-6  # added to both covariances' diagonals when sqrtm is not finite (TTUR)
IMAGINARY_ATOL = 1e-3  # largest tolerated |imag| on sqrtm's diagonal (TTUR)


class ActivationStatistics:
    """Running count, sum and sum of outer products (float64) of features [N, D].

    `update` as batches arrive; `mean` [D] and `covariance` [D, D] (unbiased,
    like `np.cov(features, rowvar=False)`) equal those of all rows seen so far.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> None:
        """Add the rows of `features` [N, D] (any float dtype, host or device array)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise UsageError(f"features must be [N, D], got shape {features.shape}")
        if self._sum is None:
            self._sum = np.zeros(features.shape[1])
            self._outer = np.zeros((features.shape[1],) * 2)
        elif features.shape[1] != self._sum.shape[0]:
            raise UsageError(f"features have {features.shape[1]} dims, earlier batches had {self._sum.shape[0]}")
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features

    @property
    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise UsageError("no features yet: call update() first")
        return self._sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise UsageError(f"the covariance needs at least 2 feature rows, have {self.count}")
        mean = self.mean
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def save(self, path: os.PathLike | str) -> None:
        """Write `mu` and `sigma` to a `.npz` (the layout of TTUR's published statistics)."""
        save_statistics(path, self.mean, self.covariance)


def _check_statistics(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UsageError(f"need mu [D] and sigma [D, D], got shapes {mu.shape} and {sigma.shape}")
    return mu, sigma


def save_statistics(path: os.PathLike | str, mu, sigma) -> None:
    """Write feature statistics as `.npz` with keys `mu` [D] and `sigma` [D, D] (float64)."""
    mu, sigma = _check_statistics(mu, sigma)
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: os.PathLike | str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from a `.npz` with keys `mu` and `sigma` (ours or published ones)."""
    with np.load(path, allow_pickle=False) as data:
        if not {"mu", "sigma"} <= set(data.files):
            raise DataError(f"{path}: expected keys 'mu' and 'sigma', found {sorted(data.files)}")
        return _check_statistics(data["mu"], data["sigma"])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), as the TTUR reference code.

    If `sqrtm` is not finite it is retried with 1e-6 * I added to both sigmas;
    a small imaginary part is dropped, one above 1e-3 on the diagonal raises ValueError.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1)
    mu2, sigma2 = _check_statistics(mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise UsageError(f"statistics of different dimension: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * SQRTM_OFFSET
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

    logits: [N, C] (C = 1008 for the FID Inception); part i is rows
    [i*N//splits, (i+1)*N//splits), as in the reference code. float64 throughout.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UsageError(f"logits must be [N, C] with C >= 2, got shape {logits.shape}")
    if not 1 <= splits <= logits.shape[0]:
        raise UsageError(f"splits must be in [1, N={logits.shape[0]}], got {splits}")
    if not np.isfinite(logits).all():
        raise UsageError("logits contain NaN or infinity")
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.mean(np.exp(part), axis=0))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances, clipped at 0 against rounding."""
    d = a @ b.T
    d *= -2.0
    d += np.sum(a * a, axis=1)[:, None]
    d += np.sum(b * b, axis=1)[None, :]
    return np.maximum(d, 0.0, out=d)


def _knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (itself is the 0-th)."""
    radii = np.empty(features.shape[0])
    for start in range(0, features.shape[0], batch_size):
        d = _squared_distances(features[start:start + batch_size], features)
        radii[start:start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _fraction_inside(queries: np.ndarray, reference: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Share of queries within radius of at least one reference point (the reference 'manifold')."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        d = _squared_distances(queries[start:start + batch_size], reference)
        inside += int(np.count_nonzero(np.any(d <= radii[None, :], axis=1)))
    return inside / queries.shape[0]


def precision_recall(real_features, fake_features, k: int = 3, *, batch_size: int = 500) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake vs real features [N, D].

    Each set's manifold is the union of balls reaching each point's k-th nearest
    neighbour in that set. Precision: share of fake points inside the real
    manifold; recall: share of real points inside the fake manifold. Distances
    are computed `batch_size` rows at a time (memory O(batch_size * N)), in float64.
    """
    real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UsageError(f"features must be [N, D] with the same D, got shapes {real.shape} and {fake.shape}")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise UsageError(
            f"k={k} needs k >= 1 and more than k rows in each set, got {real.shape[0]} and {fake.shape[0]}"
        )
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    precision = _fraction_inside(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall
