"""Procedural 40-class 3-D shape data set: an offline stand-in for ModelNet40.

Every class is a family of triangulated surfaces built from parametric primitives
(superquadrics, boxes, frusta/cylinders/cones, discs, tori, tubes around curves). One
sample is drawn as follows:

1. per-instance shape parameters uniformly from the class's ranges (e.g. a slab's
   thickness/width ratio, a table's leg height, a spring's number of turns);
2. scale jitter: each axis is stretched by an independent factor in [1 − 0.05, 1 + 0.05]
   (an isotropic scale alone would be undone by step 5, so the jitter is per axis);
3. area-weighted surface sampling: a triangle is picked with probability proportional to
   its area, then a point uniformly inside it (barycentric (1 − √r₁, √r₁(1 − r₂), √r₁ r₂)),
   so points are approximately uniform on the (piecewise-flat approximation of the) surface;
4. Gaussian noise of standard deviation ``noise_std`` times the cloud's radius;
5. unit-sphere normalisation (centroid 0, largest norm 1), as for ModelNet40.

Shapes are returned in their canonical orientation (no rotation); the experiments rotate
them (``data.pointcloud.random_rotations`` / ``rotate``).

The classes are chosen so that the task needs shape proportions and not only topology:
several classes share a primitive and differ only in aspect ratios (sphere / oblate /
prolate / triaxial ellipsoids; cube / slab / beam / plank; disc / cylinder / rod; cone /
flat cone; thin / fat torus). Two *chiral pairs* are included — a right- and left-handed
conical spring, and a three-armed corner with arms of different lengths and its mirror
image. Members of a pair are exact mirror images (x ↦ −x) of each other and are not related
by any rotation, so a model invariant to rotations *and reflections* (e.g. one using only
distances and angles) cannot separate them, while a model that is only rotation-invariant
can.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from data.cache import read_cache
from data.pointcloud import normalize_to_unit_sphere

# Bump when the generator changes, so stale caches are not reused.
GENERATOR_VERSION = 1
AXIS_JITTER = 0.05
DEFAULT_NOISE_STD = 0.01

Triangles = np.ndarray  # (n, T, 3, 3): n instances, T triangles, 3 vertices, xyz
ShapeBuilder = Callable[[np.random.Generator, int], Triangles]


# ----------------------------------------------------------------------------------------
# Triangulated primitives. Parameters are scalars or (n,) arrays (one value per instance).
# Each returns triangles of shape (n, T, 3, 3) with T fixed by the resolution.
# ----------------------------------------------------------------------------------------


def _per_instance(value, n: int) -> np.ndarray:
    """Broadcast a scalar or (n,) parameter to shape (n, 1, 1) for grid arithmetic."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))[:, None, None]


def _grid_to_triangles(vertices: np.ndarray) -> Triangles:
    """Split each cell of a (n, a, b, 3) vertex grid into two triangles -> (n, 2(a−1)(b−1), 3, 3)."""
    n = vertices.shape[0]
    v00, v10 = vertices[:, :-1, :-1], vertices[:, 1:, :-1]
    v01, v11 = vertices[:, :-1, 1:], vertices[:, 1:, 1:]
    lower = np.stack([v00, v10, v11], axis=-2).reshape(n, -1, 3, 3)
    upper = np.stack([v00, v11, v01], axis=-2).reshape(n, -1, 3, 3)
    return np.concatenate([lower, upper], axis=1)


def _signed_power(base: np.ndarray, exponent) -> np.ndarray:
    return np.sign(base) * np.abs(base) ** exponent


def _superquadric(n, a, b, c, e1=1.0, e2=1.0, eta_range=(-np.pi / 2, np.pi / 2), res=(13, 25)):
    """Superquadric surface (superellipsoid) centred at the origin.

    x = a·cos^e1(η)·cos^e2(ω), y = b·cos^e1(η)·sin^e2(ω), z = c·sin^e1(η) with signed powers,
    η ∈ eta_range (latitude), ω ∈ [−π, π]. e1 = e2 = 1 is an ellipsoid; exponents → 0 give
    box-like shapes, 2 an octahedron, > 2 pinched (concave) stars. Restricting η gives
    caps such as a hemisphere.
    """
    eta = np.linspace(*eta_range, res[0])[None, :, None]
    omega = np.linspace(-np.pi, np.pi, res[1])[None, None, :]
    e1, e2 = _per_instance(e1, n), _per_instance(e2, n)
    cos_eta = _signed_power(np.cos(eta), e1)
    x = _per_instance(a, n) * cos_eta * _signed_power(np.cos(omega), e2)
    y = _per_instance(b, n) * cos_eta * _signed_power(np.sin(omega), e2)
    z = _per_instance(c, n) * _signed_power(np.sin(eta), e1) * np.ones_like(omega)
    return _grid_to_triangles(np.stack(np.broadcast_arrays(x, y, z), axis=-1))


def _frustum_side(n, r0, r1, z0, z1, res=33):
    """Lateral surface of a frustum around the z axis: radius r0 at height z0 to r1 at z1.

    r0 = r1 gives an (open) cylinder, r1 = 0 a cone. The surface is ruled, so two rings of
    vertices represent it exactly up to the polygonal approximation of the circles.
    """
    s = np.array([0.0, 1.0])[None, :, None]
    theta = np.linspace(0.0, 2 * np.pi, res)[None, None, :]
    radius = _per_instance(r0, n) + (_per_instance(r1, n) - _per_instance(r0, n)) * s
    height = _per_instance(z0, n) + (_per_instance(z1, n) - _per_instance(z0, n)) * s
    x, y = radius * np.cos(theta), radius * np.sin(theta)
    z = height * np.ones_like(theta)
    return _grid_to_triangles(np.stack(np.broadcast_arrays(x, y, z), axis=-1))


def _annulus(n, r_inner, r_outer, z, res=33):
    """Flat ring r_inner <= r <= r_outer in the plane at height z (r_inner = 0: a disc)."""
    return _frustum_side(n, r_inner, r_outer, z, z, res)


def _cylinder(n, radius, z0, z1, closed=True):
    """Cylinder of the given radius along z from z0 to z1, with end discs if ``closed``."""
    parts = [_frustum_side(n, radius, radius, z0, z1)]
    if closed:
        parts += [_annulus(n, 0.0, radius, z0), _annulus(n, 0.0, radius, z1)]
    return np.concatenate(parts, axis=1)


def _torus(n, major_radius, minor_radius, res=(33, 13)):
    """Torus around the z axis: ((R + r cos v) cos u, (R + r cos v) sin u, r sin v)."""
    u = np.linspace(0.0, 2 * np.pi, res[0])[None, :, None]
    v = np.linspace(0.0, 2 * np.pi, res[1])[None, None, :]
    big, small = _per_instance(major_radius, n), _per_instance(minor_radius, n)
    ring = big + small * np.cos(v)
    x, y, z = ring * np.cos(u), ring * np.sin(u), small * np.sin(v) * np.ones_like(u)
    return _grid_to_triangles(np.stack(np.broadcast_arrays(x, y, z), axis=-1))


_BOX_CORNERS = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
_BOX_FACES = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5],  # x = -1/2, x = +1/2
     [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],  # y = -1/2, y = +1/2
     [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]  # z = -1/2, z = +1/2
)


def _box(n, size, centre=(0.0, 0.0, 0.0)):
    """Axis-aligned box surface (12 triangles) with edge lengths ``size`` = (sx, sy, sz)."""
    size = np.stack([np.broadcast_to(np.asarray(s, np.float64), (n,)) for s in size], -1)
    corners = _BOX_CORNERS[None] * size[:, None, :]
    return _shift(corners[:, _BOX_FACES], centre)


def _tube(curve: np.ndarray, reference: np.ndarray, radius, res=9):
    """Open tube of the given radius around a sampled curve (n, m, 3).

    The cross-section circle at each curve point spans N = normalise(ref − (ref·T) T) and
    B = T × N, where T is the unit tangent (finite differences) and ``reference`` (n, m, 3)
    is any direction field not parallel to the tangent.
    """
    n = curve.shape[0]
    tangent = np.gradient(curve, axis=1)
    tangent /= np.linalg.norm(tangent, axis=-1, keepdims=True)
    normal = reference - np.sum(reference * tangent, -1, keepdims=True) * tangent
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    binormal = np.cross(tangent, normal)
    phi = np.linspace(0.0, 2 * np.pi, res)[None, None, :, None]
    offset = np.cos(phi) * normal[:, :, None] + np.sin(phi) * binormal[:, :, None]
    vertices = curve[:, :, None] + _per_instance(radius, n)[..., None] * offset
    return _grid_to_triangles(vertices)


def _shift(triangles: Triangles, offset) -> Triangles:
    """Translate every instance by ``offset``: a (3,) vector or (n, 3) per-instance vectors."""
    offset = np.asarray(offset, dtype=np.float64)
    if offset.ndim == 1:
        offset = offset[None]
    offset = np.broadcast_to(offset, (triangles.shape[0], 3))
    return triangles + offset[:, None, None, :]


def _offset(n, x=0.0, y=0.0, z=0.0) -> np.ndarray:
    """(n, 3) per-instance offsets from scalar or (n,) components."""
    return np.stack([np.broadcast_to(np.asarray(c, np.float64), (n,)) for c in (x, y, z)], -1)


def _z_to_x(triangles: Triangles) -> Triangles:
    """Cyclic axis permutation (a proper rotation) taking the local z axis to world x."""
    return triangles[..., [2, 0, 1]]


def _z_to_y(triangles: Triangles) -> Triangles:
    """Cyclic axis permutation (a proper rotation) taking the local z axis to world y."""
    return triangles[..., [1, 2, 0]]


def _mirror_x(triangles: Triangles) -> Triangles:
    """Reflection x ↦ −x (determinant −1): turns a chiral shape into its mirror image."""
    return triangles * np.array([-1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------
# Class builders: (rng, n) -> triangles (n, T, 3, 3) in the canonical orientation.
# Ranges are chosen so that classes sharing a primitive have disjoint aspect ratios.
# ----------------------------------------------------------------------------------------


def _u(rng, low, high, n):
    return rng.uniform(low, high, n)


def _sphere(rng, n):
    return _superquadric(n, 1.0, 1.0, 1.0)


def _oblate_ellipsoid(rng, n):
    return _superquadric(n, 1.0, 1.0, _u(rng, 0.40, 0.55, n))


def _prolate_ellipsoid(rng, n):
    radius = _u(rng, 0.40, 0.55, n)
    return _superquadric(n, radius, radius, 1.0)


def _triaxial_ellipsoid(rng, n):
    return _superquadric(n, 1.0, _u(rng, 0.62, 0.75, n), _u(rng, 0.30, 0.40, n))


def _cube(rng, n):
    return _box(n, (1.0, 1.0, 1.0))


def _slab(rng, n):
    return _box(n, (1.0, 1.0, _u(rng, 0.15, 0.28, n)))


def _beam(rng, n):
    side = _u(rng, 0.20, 0.32, n)
    return _box(n, (side, side, 1.0))


def _plank(rng, n):
    return _box(n, (1.0, _u(rng, 0.45, 0.60, n), _u(rng, 0.07, 0.13, n)))


def _disc(rng, n):
    height = _u(rng, 0.20, 0.40, n)
    return _cylinder(n, 1.0, -height / 2, height / 2)


def _cylinder_class(rng, n):
    height = _u(rng, 1.6, 2.2, n)
    return _cylinder(n, 1.0, -height / 2, height / 2)


def _rod(rng, n):
    return _cylinder(n, _u(rng, 0.10, 0.18, n), -1.0, 1.0)


def _cone(rng, n):
    height = _u(rng, 1.6, 2.2, n)
    return np.concatenate([_frustum_side(n, 1.0, 0.0, 0.0, height), _annulus(n, 0.0, 1.0, 0.0)], 1)


def _flat_cone(rng, n):
    height = _u(rng, 0.40, 0.65, n)
    return np.concatenate([_frustum_side(n, 1.0, 0.0, 0.0, height), _annulus(n, 0.0, 1.0, 0.0)], 1)


def _thin_torus(rng, n):
    return _torus(n, 1.0, _u(rng, 0.10, 0.20, n))


def _fat_torus(rng, n):
    return _torus(n, 1.0, _u(rng, 0.40, 0.55, n))


def _rounded_cube(rng, n):
    exponent = _u(rng, 0.25, 0.40, n)
    return _superquadric(n, 1.0, 1.0, 1.0, exponent, exponent)


def _octahedroid(rng, n):
    exponent = _u(rng, 1.6, 1.9, n)
    return _superquadric(n, 1.0, 1.0, 1.0, exponent, exponent)


def _spinning_top(rng, n):
    return _superquadric(n, 1.0, 1.0, _u(rng, 0.8, 1.0, n), _u(rng, 1.6, 1.9, n), 1.0)


def _pinched_star(rng, n):
    exponent = _u(rng, 2.5, 3.0, n)
    return _superquadric(n, 1.0, 1.0, 1.0, exponent, exponent)


def _capsule(rng, n):
    radius, half = _u(rng, 0.35, 0.45, n), _u(rng, 0.6, 0.8, n)
    return np.concatenate(
        [
            _frustum_side(n, radius, radius, -half, half),
            _shift(_superquadric(n, radius, radius, radius, eta_range=(0, np.pi / 2)), _offset(n, z=half)),
            _shift(_superquadric(n, radius, radius, radius, eta_range=(-np.pi / 2, 0)), _offset(n, z=-half)),
        ],
        axis=1,
    )


def _pipe(rng, n):
    inner, half = _u(rng, 0.60, 0.75, n), _u(rng, 0.75, 1.0, n)
    return np.concatenate(
        [
            _frustum_side(n, 1.0, 1.0, -half, half),
            _frustum_side(n, inner, inner, -half, half),
            _annulus(n, inner, 1.0, -half),
            _annulus(n, inner, 1.0, half),
        ],
        axis=1,
    )


def _bowl(rng, n):
    return _superquadric(n, 1.0, 1.0, _u(rng, 0.5, 0.8, n), eta_range=(-np.pi / 2, 0.0))


def _table(rng, n):
    width, depth, height = _u(rng, 1.6, 2.0, n), _u(rng, 0.9, 1.2, n), _u(rng, 0.9, 1.2, n)
    top, leg = 0.08, 0.08
    parts = [_box(n, (width, depth, top), _offset(n, z=height - top / 2))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            centre = _offset(n, sx * (width / 2 - 0.1), sy * (depth / 2 - 0.1), (height - top) / 2)
            parts.append(_box(n, (leg, leg, height - top), centre))
    return np.concatenate(parts, axis=1)


def _chair(rng, n):
    seat, seat_height, back_height = _u(rng, 0.9, 1.1, n), _u(rng, 0.8, 1.0, n), _u(rng, 0.8, 1.1, n)
    thick, leg = 0.08, 0.07
    parts = [
        _box(n, (seat, seat, thick), _offset(n, z=seat_height - thick / 2)),
        _box(n, (seat, thick, back_height), _offset(n, y=-seat / 2 + thick / 2, z=seat_height + back_height / 2)),
    ]
    for sx in (-1, 1):
        for sy in (-1, 1):
            centre = _offset(n, sx * (seat / 2 - 0.06), sy * (seat / 2 - 0.06), (seat_height - thick) / 2)
            parts.append(_box(n, (leg, leg, seat_height - thick), centre))
    return np.concatenate(parts, axis=1)


def _stool(rng, n):
    radius, height, thick = _u(rng, 0.5, 0.6, n), _u(rng, 1.1, 1.4, n), 0.08
    parts = [_cylinder(n, radius, height - thick, height)]
    for angle in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
        leg = _cylinder(n, 0.04, 0.0, height - thick)
        parts.append(_shift(leg, _offset(n, 0.8 * radius * np.cos(angle), 0.8 * radius * np.sin(angle))))
    return np.concatenate(parts, axis=1)


def _lamp(rng, n):
    base, pole = _u(rng, 0.45, 0.55, n), _u(rng, 1.3, 1.6, n)
    shade_bottom, shade_top = _u(rng, 0.5, 0.6, n), _u(rng, 0.2, 0.3, n)
    return np.concatenate(
        [
            _cylinder(n, base, 0.0, 0.08),
            _cylinder(n, 0.035, 0.08, pole, closed=False),
            _frustum_side(n, shade_bottom, shade_top, pole - 0.35, pole + 0.15),
        ],
        axis=1,
    )


def _l_shape(rng, n):
    long_arm, short_arm, thick = _u(rng, 1.6, 2.0, n), _u(rng, 1.0, 1.3, n), _u(rng, 0.25, 0.35, n)
    return np.concatenate(
        [
            _box(n, (long_arm, thick, thick), _offset(n, long_arm / 2, thick / 2)),
            _box(n, (thick, short_arm, thick), _offset(n, thick / 2, thick + short_arm / 2)),
        ],
        axis=1,
    )


def _t_shape(rng, n):
    bar, stem, thick = _u(rng, 1.6, 2.0, n), _u(rng, 1.2, 1.6, n), _u(rng, 0.25, 0.35, n)
    return np.concatenate(
        [
            _box(n, (bar, thick, thick)),
            _box(n, (thick, thick, stem), _offset(n, z=-thick / 2 - stem / 2)),
        ],
        axis=1,
    )


def _jack(rng, n):
    radius = _u(rng, 0.10, 0.15, n)
    arms = [_cylinder(n, radius, -h, h) for h in (_u(rng, 0.95, 1.05, n) for _ in range(3))]
    return np.concatenate([_z_to_x(arms[0]), _z_to_y(arms[1]), arms[2]], axis=1)


def _plus(rng, n):
    radius = _u(rng, 0.10, 0.15, n)
    arms = [_cylinder(n, radius, -h, h) for h in (_u(rng, 0.95, 1.05, n) for _ in range(2))]
    return np.concatenate([_z_to_x(arms[0]), _z_to_y(arms[1])], axis=1)


def _dumbbell(rng, n):
    radius, half = _u(rng, 0.35, 0.5, n), _u(rng, 0.8, 1.0, n)
    return np.concatenate(
        [
            _shift(_superquadric(n, radius, radius, radius), _offset(n, x=-half)),
            _shift(_superquadric(n, radius, radius, radius), _offset(n, x=half)),
            _z_to_x(_cylinder(n, 0.1, -half, half, closed=False)),
        ],
        axis=1,
    )


def _mushroom(rng, n):
    stem_radius, stem_height = _u(rng, 0.15, 0.25, n), _u(rng, 0.7, 1.0, n)
    cap_radius, cap_height = _u(rng, 0.6, 0.8, n), _u(rng, 0.35, 0.55, n)
    cap = _superquadric(n, cap_radius, cap_radius, cap_height, eta_range=(0.0, np.pi / 2))
    return np.concatenate(
        [
            _cylinder(n, stem_radius, 0.0, stem_height, closed=False),
            _annulus(n, 0.0, stem_radius, 0.0),
            _shift(cap, _offset(n, z=stem_height)),
            _annulus(n, 0.0, cap_radius, stem_height),
        ],
        axis=1,
    )


def _bottle(rng, n):
    body_radius, body_height = _u(rng, 0.4, 0.5, n), _u(rng, 1.1, 1.4, n)
    neck_radius, neck_length = _u(rng, 0.15, 0.2, n), _u(rng, 0.35, 0.5, n)
    shoulder_top = body_height + 0.3
    return np.concatenate(
        [
            _annulus(n, 0.0, body_radius, 0.0),
            _frustum_side(n, body_radius, body_radius, 0.0, body_height),
            _frustum_side(n, body_radius, neck_radius, body_height, shoulder_top),
            _frustum_side(n, neck_radius, neck_radius, shoulder_top, shoulder_top + neck_length),
        ],
        axis=1,
    )


def _snowman(rng, n):
    bottom = _u(rng, 0.55, 0.65, n)
    middle = bottom * _u(rng, 0.7, 0.8, n)
    head = middle * _u(rng, 0.65, 0.75, n)
    middle_z = 2 * bottom + 0.9 * middle
    head_z = middle_z + 0.9 * (middle + head)
    return np.concatenate(
        [
            _shift(_superquadric(n, r, r, r), _offset(n, z=z))
            for r, z in ((bottom, bottom), (middle, middle_z), (head, head_z))
        ],
        axis=1,
    )


def _arch(rng, n):
    span, height, thick = _u(rng, 1.4, 1.8, n), _u(rng, 1.3, 1.7, n), _u(rng, 0.25, 0.35, n)
    return np.concatenate(
        [
            _box(n, (thick, thick, height), _offset(n, -span / 2, 0.0, height / 2)),
            _box(n, (thick, thick, height), _offset(n, span / 2, 0.0, height / 2)),
            _box(n, (span + thick, thick, thick), _offset(n, z=height + thick / 2)),
        ],
        axis=1,
    )


def _bookshelf(rng, n):
    width, depth, height = _u(rng, 1.0, 1.3, n), _u(rng, 0.35, 0.45, n), _u(rng, 1.8, 2.2, n)
    side, board = 0.06, 0.05
    parts = [
        _box(n, (side, depth, height), _offset(n, -width / 2, 0.0, height / 2)),
        _box(n, (side, depth, height), _offset(n, width / 2, 0.0, height / 2)),
    ]
    for level in range(4):
        z = board / 2 + level * (height - board) / 3
        parts.append(_box(n, (width, depth, board), _offset(n, z=z)))
    return np.concatenate(parts, axis=1)


def _spring_right(rng, n):
    """Right-handed conical spring: (R(t) cos t, R(t) sin t, H t / (2πk)), t ∈ [0, 2πk].

    The radius shrinks linearly from 1 to R₁, so (unlike a cylindrical helix) the shape has
    no two-fold symmetry axis; it is chiral: its mirror image is a left-handed spring.
    """
    turns, height = _u(rng, 2.5, 3.0, n), _u(rng, 2.6, 3.0, n)
    end_radius, wire = _u(rng, 0.45, 0.55, n), _u(rng, 0.10, 0.13, n)
    s = np.linspace(0.0, 1.0, 160)[None, :]
    t = 2 * np.pi * turns[:, None] * s
    radius = 1.0 + (end_radius[:, None] - 1.0) * s
    curve = np.stack([radius * np.cos(t), radius * np.sin(t), height[:, None] * s], axis=-1)
    outward = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], axis=-1)
    return _tube(curve, outward, wire)


def _corner_right(rng, n):
    """Three orthogonal arms of distinct lengths along +x (longest), +y, +z (shortest).

    Distinct lengths identify the arms, and any rotation fixing the +x and +y arms also
    fixes +z, so the mirror image (arms along −x, +y, +z) is not a rotated copy: chiral.
    """
    long_arm, mid_arm, short_arm = _u(rng, 1.6, 1.9, n), _u(rng, 1.0, 1.2, n), _u(rng, 0.5, 0.65, n)
    thick = _u(rng, 0.18, 0.24, n)
    return np.concatenate(
        [
            _box(n, (long_arm, thick, thick), _offset(n, x=long_arm / 2)),
            _box(n, (thick, mid_arm, thick), _offset(n, y=mid_arm / 2)),
            _box(n, (thick, thick, short_arm), _offset(n, z=short_arm / 2)),
        ],
        axis=1,
    )


def _mirrored(builder: ShapeBuilder) -> ShapeBuilder:
    def mirrored_builder(rng, n):
        return _mirror_x(builder(rng, n))

    return mirrored_builder


_CLASS_BUILDERS: dict[str, ShapeBuilder] = {
    "sphere": _sphere,
    "oblate_ellipsoid": _oblate_ellipsoid,
    "prolate_ellipsoid": _prolate_ellipsoid,
    "triaxial_ellipsoid": _triaxial_ellipsoid,
    "cube": _cube,
    "slab": _slab,
    "beam": _beam,
    "plank": _plank,
    "disc": _disc,
    "cylinder": _cylinder_class,
    "rod": _rod,
    "cone": _cone,
    "flat_cone": _flat_cone,
    "thin_torus": _thin_torus,
    "fat_torus": _fat_torus,
    "rounded_cube": _rounded_cube,
    "octahedroid": _octahedroid,
    "spinning_top": _spinning_top,
    "pinched_star": _pinched_star,
    "capsule": _capsule,
    "pipe": _pipe,
    "bowl": _bowl,
    "table": _table,
    "chair": _chair,
    "stool": _stool,
    "lamp": _lamp,
    "l_shape": _l_shape,
    "t_shape": _t_shape,
    "jack": _jack,
    "plus": _plus,
    "dumbbell": _dumbbell,
    "mushroom": _mushroom,
    "bottle": _bottle,
    "snowman": _snowman,
    "arch": _arch,
    "bookshelf": _bookshelf,
    "spring_right": _spring_right,
    "spring_left": _mirrored(_spring_right),
    "corner_right": _corner_right,
    "corner_left": _mirrored(_corner_right),
}

SHAPE_CLASS_NAMES: tuple[str, ...] = tuple(_CLASS_BUILDERS)
"""The 40 class names; a label is the index into this tuple."""

CHIRAL_PAIRS: tuple[tuple[str, str], ...] = (("spring_right", "spring_left"), ("corner_right", "corner_left"))
"""Pairs of classes that are mirror images (x ↦ −x) of each other."""


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def sample_surface(rng: np.random.Generator, triangles: Triangles, num_points: int) -> np.ndarray:
    """Area-weighted uniform sampling of points on triangle meshes.

    Triangle t of instance i is chosen with probability A_it / Σ_s A_is (A = area; zero-area
    triangles are never chosen), then a point (1 − √r₁) a + √r₁(1 − r₂) b + √r₁ r₂ c with
    r₁, r₂ ~ U[0, 1) is uniform inside it.

    Args:
      rng: numpy Generator.
      triangles: (n, T, 3, 3) vertices of T triangles per instance.
      num_points: points per instance.
    Returns:
      (n, num_points, 3) float64 points.
    """
    triangles = np.asarray(triangles, dtype=np.float64)
    if triangles.ndim != 4 or triangles.shape[-2:] != (3, 3):
        raise ValueError(f"triangles must have shape (n, T, 3, 3), got {triangles.shape}")
    n, num_triangles = triangles.shape[:2]
    a, b, c = triangles[:, :, 0], triangles[:, :, 1], triangles[:, :, 2]
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=-1)
    total = areas.sum(axis=1, keepdims=True)
    if np.any(total <= 0.0):
        raise ValueError("every instance must have positive surface area")
    cdf = np.cumsum(areas, axis=1) / total
    # Batched inverse-CDF lookup: shift row i into [i, i + 1] and search the flattened rows.
    row_offset = np.arange(n)[:, None]
    u = rng.random((n, num_points))
    flat = np.searchsorted((cdf + row_offset).ravel(), (u + row_offset).ravel(), side="right")
    index = np.clip(flat.reshape(n, num_points) - row_offset * num_triangles, 0, num_triangles - 1)
    chosen = triangles[row_offset, index]  # (n, P, 3, 3)
    r1, r2 = rng.random((2, n, num_points, 1))
    root = np.sqrt(r1)
    return (1 - root) * chosen[:, :, 0] + root * (1 - r2) * chosen[:, :, 1] + root * r2 * chosen[:, :, 2]


def sample_shape_class(
    class_name: str,
    rng: np.random.Generator,
    num_samples: int,
    num_points: int = 300,
    noise_std: float = DEFAULT_NOISE_STD,
) -> np.ndarray:
    """Draw ``num_samples`` clouds of one class (steps 1–5 of the module docstring).

    Args:
      class_name: one of ``SHAPE_CLASS_NAMES``.
      rng: numpy Generator (same state -> same clouds).
      num_samples: number of clouds (>= 0).
      num_points: points per cloud (>= 1).
      noise_std: Gaussian noise standard deviation relative to the cloud radius (>= 0).
    Returns:
      (num_samples, num_points, 3) float32 clouds, centroid 0 and max norm 1 each.
    """
    if class_name not in _CLASS_BUILDERS:
        raise ValueError(f"unknown shape class {class_name!r}; known: {', '.join(SHAPE_CLASS_NAMES)}")
    _check_count("num_samples", num_samples, minimum=0)
    _check_count("num_points", num_points, minimum=1)
    if not noise_std >= 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if num_samples == 0:
        return np.zeros((0, num_points, 3), np.float32)
    triangles = _CLASS_BUILDERS[class_name](rng, num_samples)
    stretch = rng.uniform(1 - AXIS_JITTER, 1 + AXIS_JITTER, (num_samples, 1, 1, 3))
    points = normalize_to_unit_sphere(sample_surface(rng, triangles * stretch, num_points))
    points = points + noise_std * rng.standard_normal(points.shape)
    return normalize_to_unit_sphere(points).astype(np.float32)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


_SPLITS = ("train", "val", "test")


def _generate(counts: dict[str, int], num_points: int, seed: int, noise_std: float) -> dict:
    data = {}
    for split_index, split in enumerate(_SPLITS):
        clouds, labels = [], []
        for label, name in enumerate(SHAPE_CLASS_NAMES):
            # Independent stream per (seed, split, class): changing one split's size leaves
            # the other splits unchanged.
            rng = np.random.default_rng([seed, split_index, label])
            clouds.append(sample_shape_class(name, rng, counts[split], num_points, noise_std))
            labels.append(np.full(counts[split], label, np.int32))
        data[split] = (np.concatenate(clouds), np.concatenate(labels))
    return data


def make_shapes(
    num_per_class_train: int,
    num_per_class_val: int,
    num_per_class_test: int,
    num_points: int = 300,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    noise_std: float = DEFAULT_NOISE_STD,
) -> dict:
    """Build (or load from cache) the 40-class procedural shape data set.

    Args:
      num_per_class_train / _val / _test: clouds per class in each split (>= 0).
      num_points: points per cloud.
      seed: integer seed; the same arguments always give identical arrays.
      cache_dir: folder for the ``.npz`` cache, keyed by all arguments; default
        ``~/.cache/ace_jax/shapes``.
      noise_std: Gaussian noise relative to the cloud radius.
    Returns:
      dict with ``train``, ``val``, ``test``: (points (N, num_points, 3) float32 in canonical
      orientation, labels (N,) int32), grouped by class in label order (shuffle when
      batching); and ``class_names``: list of the 40 names (label = index).
    """
    counts = dict(zip(_SPLITS, (num_per_class_train, num_per_class_val, num_per_class_test)))
    for split, count in counts.items():
        _check_count(f"num_per_class_{split}", count, minimum=0)
    _check_count("num_points", num_points, minimum=1)
    _check_count("seed", seed, minimum=0)
    if not noise_std >= 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")

    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "ace_jax" / "shapes"
    cache_file = cache_dir / (
        f"shapes_v{GENERATOR_VERSION}_train{counts['train']}_val{counts['val']}_test{counts['test']}"
        f"_points{num_points}_seed{seed}_noise{noise_std!r}.npz"
    )
    if cache_file.exists():
        def read(stored):
            if tuple(stored["class_names"]) != SHAPE_CLASS_NAMES:
                return None  # written by another generator version: regenerate
            return {**{s: (stored[f"{s}_points"], stored[f"{s}_labels"]) for s in _SPLITS},
                    "class_names": list(SHAPE_CLASS_NAMES)}

        data = read_cache(cache_file, read)
        if data is not None:
            return data

    data = _generate(counts, num_points, seed, noise_std)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"{s}_{kind}": data[s][i] for s in _SPLITS for i, kind in enumerate(("points", "labels"))}
    temporary = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        np.savez(handle, class_names=np.array(SHAPE_CLASS_NAMES), **arrays)
    os.replace(temporary, cache_file)
    return {**data, "class_names": list(SHAPE_CLASS_NAMES)}
