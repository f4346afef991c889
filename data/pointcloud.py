"""Point-cloud utilities shared by the ModelNet40 loader and the procedural shape stand-in.

All functions are pure numpy and take an explicit ``numpy.random.Generator`` (or seed), so
the same seed always gives the same numbers. Conventions:

- a batch of clouds has shape ``(N, P, 3)`` (N clouds of P points, Cartesian x, y, z);
- a rotation acts on a point as ``x' = R x`` (column-vector convention), so a cloud stored
  row-wise is transformed as ``X' = X R^T``.
"""

from __future__ import annotations

import numpy as np


def _check_clouds(points: np.ndarray, name: str = "points") -> np.ndarray:
    points = np.asarray(points)
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., P, 3), got {points.shape}")
    if points.shape[-2] == 0:
        raise ValueError(f"{name} must contain at least one point, got shape {points.shape}")
    return points


def normalize_to_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre each cloud at its centroid and scale it so its farthest point has norm 1.

    For a cloud X = (x_1, ..., x_P):  c = (1/P) Σ_p x_p,  x'_p = (x_p − c) / max_q ‖x_q − c‖.

    Args:
      points: (..., P, 3) array.
    Returns:
      Array of the same shape and dtype (float) with centroid 0 and max norm 1 per cloud.
    Raises:
      ValueError: wrong shape, or a cloud whose points all coincide (scale undefined).
    """
    points = _check_clouds(points)
    dtype = points.dtype if np.issubdtype(points.dtype, np.floating) else np.float64
    centred = points.astype(np.float64) - points.mean(axis=-2, keepdims=True)
    radius = np.linalg.norm(centred, axis=-1).max(axis=-1, keepdims=True)
    if np.any(radius <= 0.0):
        raise ValueError("cannot normalise a point cloud whose points all coincide (radius 0)")
    return (centred / radius[..., None]).astype(dtype)


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw ``n`` rotation matrices uniformly (Haar measure) from SO(3).

    Method: a unit quaternion q = g / ‖g‖ with g ~ N(0, I_4) is uniform on S³, and the
    double cover S³ → SO(3), q ↦ R(q), pushes the uniform measure to the Haar measure.

    Args:
      rng: numpy Generator (the caller owns the stream; same state -> same matrices).
      n: number of matrices (>= 0).
    Returns:
      (n, 3, 3) float64 array, each orthogonal with determinant +1.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    q = rng.standard_normal((int(n), 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    rotations = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )
    return rotations


def rotate(points: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Rotate clouds: x'_p = R x_p for every point p (row-wise: X' = X R^T).

    Args:
      points: (..., P, 3) clouds.
      rotations: (3, 3) one matrix for all clouds, or (..., 3, 3) one per cloud (leading
        dimensions must broadcast against those of ``points``).
    Returns:
      Rotated clouds, shape (..., P, 3).
    """
    points = _check_clouds(points)
    rotations = np.asarray(rotations)
    if rotations.ndim < 2 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (..., 3, 3), got {rotations.shape}")
    return np.einsum("...ij,...pj->...pi", rotations, points)


def refill_drop_count(p: float, num_points: int) -> int:
    """round(p · num_points): the points the refill rule drops from a cloud (:func:`drop_points`);
    a ValueError when that would leave none to copy from."""
    num_drop = int(round(p * num_points))
    if num_points - num_drop < 1:
        raise ValueError(f"a drop fraction of {p} drops all {num_points} points; keep at least one")
    return num_drop


def drop_points(rng: np.random.Generator, points: np.ndarray, p: float) -> np.ndarray:
    """Randomly drop a fraction ``p`` of the points of every cloud, keeping the shape fixed.

    For each cloud independently, k = round(p · P) point slots are chosen uniformly without
    replacement and "dropped"; each dropped slot is then refilled with a copy of a kept
    point of the same cloud, chosen uniformly with replacement. The result therefore still
    has shape (N, P, 3) (so batches stay rectangular) but contains only P − k distinct
    original points, some of them duplicated. Note that duplicates carry extra weight in
    mean pooling; max pooling and nearest-neighbour graphs are affected only through the
    lost points. Draw afresh each epoch by passing the caller's own advancing ``rng``.

    Args:
      rng: numpy Generator.
      points: (N, P, 3) or (P, 3) clouds.
      p: fraction to drop, 0 <= p < 1, and at least one point must be kept.
    Returns:
      Array of the same shape and dtype as ``points``.
    """
    points = _check_clouds(points)
    if points.ndim not in (2, 3):
        raise ValueError(f"points must have shape (N, P, 3) or (P, 3), got {points.shape}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop fraction p must satisfy 0 <= p < 1, got {p}")
    single = points.ndim == 2
    clouds = points[None] if single else points
    num_clouds, num_points, _ = clouds.shape
    num_drop = refill_drop_count(p, num_points)
    num_keep = num_points - num_drop
    out = clouds.copy()
    if num_drop > 0:
        order = np.argsort(rng.random((num_clouds, num_points)), axis=1)
        kept, dropped = order[:, :num_keep], order[:, num_keep:]
        donor = np.take_along_axis(kept, rng.integers(0, num_keep, (num_clouds, num_drop)), 1)
        rows = np.arange(num_clouds)[:, None]
        out[rows, dropped] = clouds[rows, donor]
    return out[0] if single else out


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified hold-out split of sample indices (e.g. a validation set).

    For each class c with n_c samples, round(fraction · n_c) indices chosen uniformly at
    random (seeded) are held out; the rest are kept.

    Args:
      labels: (N,) integer class labels.
      fraction: held-out fraction, 0 <= fraction < 1.
      seed: integer seed.
    Returns:
      (keep_indices, holdout_indices): sorted int64 arrays partitioning range(N).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must satisfy 0 <= fraction < 1, got {fraction}")
    rng = np.random.default_rng(seed)
    holdout = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        num_hold = int(round(fraction * members.size))
        holdout.append(rng.permutation(members)[:num_hold])
    holdout_idx = np.sort(np.concatenate(holdout)) if holdout else np.zeros(0, np.int64)
    keep_mask = np.ones(labels.size, bool)
    keep_mask[holdout_idx] = False
    return np.flatnonzero(keep_mask), holdout_idx.astype(np.int64)
