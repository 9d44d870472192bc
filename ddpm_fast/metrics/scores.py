"""The numbers: Fréchet distance, kernel inception distance, precision and recall, and the
feature statistics of the FID in pytorch-fid's ``.npz`` layout.

Everything is computed in float64 numpy from features [N, D] (any feature network's).

* ``frechet_distance`` is pytorch-fid's formula ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
  The trace of the matrix square root is the sum of the square roots of the eigenvalues of
  ``S1 S2``, which are those of the symmetric positive semi-definite ``F^T S2 F`` for any factor
  ``S1 = F F^T`` (Cholesky, or the eigendecomposition when ``S1`` is singular). Unlike
  ``scipy.linalg.sqrtm`` of the non-symmetric product this never yields complex values or NaN
  for singular or near-singular covariances (fewer samples than dimensions), and it is several
  times faster at 2048 dimensions.
* ``kernel_inception_distance`` is torch-fidelity's (and Bińkowski et al.'s) unbiased MMD^2
  estimate with the cubic polynomial kernel ``(x.y / D + 1)^3``, averaged over random subsets
  drawn exactly as torch-fidelity draws them (``numpy.random.RandomState(seed)``, same seed
  2020 by default), so the same features give torch-fidelity's mean and standard deviation.
* ``precision_recall`` is Kynkäänniemi et al. (2019) with k = 3: a generated sample counts
  towards precision when it lies within the k-th-nearest-neighbour radius of some real sample
  (the sample itself excluded from its own neighbours), and symmetrically for recall; a
  distance equal to the radius counts as inside (torch-fidelity's convention).
"""

import os

import numpy as np


class MetricsError(ValueError):
    """Inputs the metrics cannot use (shapes, sizes, a statistics file); the message says why."""


def _features(x, name):
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise MetricsError(f"{name} must be a [N, D] array of features with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise MetricsError(f"{name} holds NaN or infinite values")
    return x


# ---------------------------------------------------------------- FID

def feature_statistics(features):
    """(mu, sigma): the mean [D] and the unbiased covariance [D, D] (np.cov, N - 1) in float64."""
    features = _features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product(sigma1, sigma2):
    """Tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite sigma1, sigma2."""
    try:
        factor = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:  # singular: the symmetric square root, negative rounding clipped
        values, vectors = np.linalg.eigh(sigma1)
        factor = vectors * np.sqrt(np.clip(values, 0.0, None))
    inner = factor.T @ sigma2 @ factor
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see the module)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricsError(f"mu/sigma shapes do not match: {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
                           f"{sigma2.shape} (expected [D] and [D, D] twice, from the same feature network)")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise MetricsError(f"{name} holds NaN or infinite values")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    trace = np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + trace)


def save_statistics(path, mu, sigma, **extra):
    """Writes ``mu`` and ``sigma`` (pytorch-fid's .npz layout, float64) and any extra arrays
    (``features`` for KID and precision/recall), atomically."""
    from ..images import atomic_write

    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64), **extra}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_statistics(path):
    """{"mu", "sigma", and "features" when the file has them} from a .npz file with pytorch-fid's
    keys ``mu`` and ``sigma`` (as its ``--save-stats`` and published reference files have)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise MetricsError(f"cannot read statistics file {path!r}: {error}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise MetricsError(f"statistics file {path!r} has keys {sorted(arrays)}, expected 'mu' and 'sigma' "
                           f"(pytorch-fid's layout)")
    out = {"mu": arrays["mu"].astype(np.float64), "sigma": arrays["sigma"].astype(np.float64)}
    if "features" in arrays:
        out["features"] = arrays["features"]
    return out


# ---------------------------------------------------------------- KID

def _polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(k_xx, k_xy, k_yy):
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)


def kernel_inception_distance(features1, features2, subsets=100, subset_size=1000, seed=2020):
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets of
    ``subset_size`` features of each set (drawn without replacement, torch-fidelity's order).

    Raises MetricsError when a set has fewer than ``subset_size`` features; callers with few
    samples pass ``subset_size=min(1000, n1, n2)`` and report it.
    """
    x, y = _features(features1, "features1"), _features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise MetricsError(f"features of dimension {x.shape[1]} and {y.shape[1]} cannot be compared")
    if subsets < 1 or subset_size < 2:
        raise MetricsError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if len(x) < subset_size or len(y) < subset_size:
        raise MetricsError(f"KID subset size {subset_size} is larger than the sets ({len(x)} and {len(y)} "
                           f"features)")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(_polynomial_kernel(a, a), _polynomial_kernel(a, b), _polynomial_kernel(b, b))
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------- precision and recall

def _squared_distances(a, b):
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _knn_radii(x, k, chunk):
    """Squared distance of each row of x to its k-th nearest other row."""
    radii = np.empty(len(x))
    for start in range(0, len(x), chunk):
        d = _squared_distances(x[start:start + chunk], x)
        # the row itself is at distance 0: the (k+1)-th smallest is the k-th other neighbour
        radii[start:start + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(queries, support, radii, chunk):
    """Share of queries within the radius of some support point."""
    inside = 0
    for start in range(0, len(queries), chunk):
        d = _squared_distances(queries[start:start + chunk], support)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(queries)


def precision_recall(generated, real, k=3, chunk=512):
    """(precision, recall) of generated against real features (Kynkäänniemi et al. 2019).

    Both sets need more than k features. The two sets should be of similar sizes (the radii
    shrink as a set grows); ddpm_fast's evaluation uses equally many real and generated ones.
    """
    fake, real = _features(generated, "generated"), _features(real, "real")
    if fake.shape[1] != real.shape[1]:
        raise MetricsError(f"features of dimension {fake.shape[1]} and {real.shape[1]} cannot be compared")
    if len(fake) <= k or len(real) <= k:
        raise MetricsError(f"precision/recall with k = {k} need more than {k} features per set, got "
                           f"{len(fake)} and {len(real)}")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall
