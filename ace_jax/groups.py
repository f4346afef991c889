"""Group samplers and actions: SO(3), O(3), translations, C4 and D4 on images.

Conventions: a 3-D rotation is a (3, 3) matrix R acting on row vectors as ``x @ R.T``
(so points ``(..., 3)`` map to ``(..., 3)``). Images are ``(..., H, W, C)`` and a C4
element k ∈ {0, 1, 2, 3} acts by ``rot90`` over the spatial axes (-3, -2). D4 elements
are pairs (k, flip): first an optional left–right flip, then the rotation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_rotation(key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
    """Uniform (Haar) random rotations in SO(3), shape ``shape + (3, 3)``.

    Uses unit quaternions drawn from a normalised 4-D Gaussian, which is Haar-uniform.
    """
    q = jax.random.normal(key, shape + (4,))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def random_orthogonal(key: jax.Array, shape: tuple[int, ...] = ()) -> jax.Array:
    """Uniform random elements of O(3): a Haar rotation times ±I with probability ½ each."""
    k_rot, k_sign = jax.random.split(key)
    rot = random_rotation(k_rot, shape)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, shape), -1.0, 1.0)
    return rot * sign[..., None, None]


def rotation_about_axis(angle: jax.Array, axis: int = 2) -> jax.Array:
    """Rotation by ``angle`` (radians, any shape) about coordinate ``axis`` (0=x, 1=y, 2=z),
    right-handed: a positive angle turns e_{axis+1} towards e_{axis+2} (indices mod 3)."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    c, s = jnp.cos(angle), jnp.sin(angle)
    one, zero = jnp.ones_like(angle), jnp.zeros_like(angle)
    i, j = (axis + 1) % 3, (axis + 2) % 3  # cyclic, so every axis is right-handed
    m = [[None] * 3 for _ in range(3)]
    for a in range(3):
        for b in range(3):
            m[a][b] = one if a == b == axis else zero
    m[i][i], m[i][j], m[j][i], m[j][j] = c, -s, s, c
    return jnp.stack([jnp.stack(r, axis=-1) for r in m], axis=-2)


def random_translation(key: jax.Array, shape: tuple[int, ...] = (), scale: float = 1.0) -> jax.Array:
    """Gaussian random translations, shape ``shape + (3,)``, standard deviation ``scale``."""
    return scale * jax.random.normal(key, shape + (3,))


def rotate_points(points: jax.Array, rotation: jax.Array) -> jax.Array:
    """Apply R to row vectors: ``points (..., 3) @ R.T``."""
    if points.shape[-1] != 3 or rotation.shape[-2:] != (3, 3):
        raise ValueError(f"rotate_points: need points (...,3) and R (3,3); got {points.shape}, {rotation.shape}")
    return points @ jnp.swapaxes(rotation, -1, -2)


def c4_act(image: jax.Array, k: int) -> jax.Array:
    """Rotate an image ``(..., H, W, C)`` by k·90° counter-clockwise over axes (-3, -2)."""
    if image.ndim < 3:
        raise ValueError(f"c4_act expects (..., H, W, C), got shape {image.shape}")
    return jnp.rot90(image, k % 4, axes=(-3, -2))


def d4_act(image: jax.Array, k: int, flip: bool) -> jax.Array:
    """D4 element (k, flip): optional flip of the W axis, then rotation by k·90°."""
    if flip:
        image = jnp.flip(image, axis=-2)
    return c4_act(image, k)


def c4_regular_act(features: jax.Array, k: int) -> jax.Array:
    """C4 acting on a group feature map ``(..., H, W, 4, C)`` (regular representation).

    Rotating the input of a group convolution by k rotates every spatial map and shifts
    the orientation axis cyclically by k: ``out[..., r, :] = rot(in)[..., r - k, :]``.
    """
    if features.ndim < 4 or features.shape[-2] != 4:
        raise ValueError(f"c4_regular_act expects (..., H, W, 4, C), got shape {features.shape}")
    rotated = jnp.rot90(features, k % 4, axes=(-4, -3))
    return jnp.roll(rotated, k % 4, axis=-2)


C4_ELEMENTS = (0, 1, 2, 3)
D4_ELEMENTS = tuple((k, f) for f in (False, True) for k in range(4))
