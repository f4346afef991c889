"""Tests for the point-cloud data: procedural shapes, augmentations, ModelNet40 loaders."""

import os
import sys

import numpy as np
import pytest

from data import shapes
from data.modelnet import load_modelnet40
from data.pointcloud import (
    drop_points,
    normalize_to_unit_sphere,
    random_rotations,
    rotate,
    stratified_holdout,
)
from data.shapes import CHIRAL_PAIRS, SHAPE_CLASS_NAMES, make_shapes, sample_shape_class
from modelnet_layouts import write_text_layout

MIRROR = np.diag([-1.0, 1.0, 1.0])


# ------------------------------------------------------------------ reference statistics


def spring_helicity(points):
    """Rotation-invariant, reflection-odd helicity of (N, P, 3) clouds.

    S = sym Σ_{‖x_i − x_j‖ < 0.3} (x_i × x_j)(x_j − x_i)^T is a pseudo-tensor (S ↦ −M S Mᵀ
    under a reflection M); along a helix axis a, (x_i × x_j)·a · (x_j − x_i)·a ∝ R²·pitch > 0
    for a right-handed helix. a = the top principal axis of the cloud, h = aᵀ S a.
    """
    points = np.asarray(points, np.float64)
    diff = points[:, None] - points[:, :, None]  # x_j - x_i
    near = np.linalg.norm(diff, axis=-1) < 0.3
    cross = np.cross(points[:, :, None], points[:, None])  # x_i × x_j
    tensor = np.einsum("nij,nija,nijb->nab", near, cross, diff)
    tensor = tensor + np.swapaxes(tensor, 1, 2)
    centred = points - points.mean(1, keepdims=True)
    axis = np.linalg.eigh(np.einsum("npa,npb->nab", centred, centred))[1][:, :, -1]
    return np.einsum("na,nab,nb->n", axis, tensor, axis)


def radial_moment_handedness(points):
    """det[v_1, v_3, v_5] with v_k = mean_p ‖x_p‖^k x_p (about the centroid).

    Each v_k rotates with the cloud, so the determinant is rotation-invariant, and it changes
    sign under a reflection: a pseudoscalar. Non-zero only for shapes without mirror symmetry.
    """
    points = np.asarray(points, np.float64)
    centred = points - points.mean(1, keepdims=True)
    radius = np.linalg.norm(centred, axis=-1, keepdims=True)
    moments = np.stack([(radius**k * centred).mean(1) for k in (1, 3, 5)], axis=-1)
    return np.linalg.det(moments)


HANDEDNESS = {"spring_right": spring_helicity, "corner_right": radial_moment_handedness}


# ------------------------------------------------------------------------- shapes data


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    return make_shapes(3, 1, 2, num_points=300, seed=5, cache_dir=tmp_path_factory.mktemp("shapes"))


def test_shapes_have_40_classes_and_correct_arrays(small_shapes):
    assert len(SHAPE_CLASS_NAMES) == 40 == len(set(SHAPE_CLASS_NAMES))
    assert small_shapes["class_names"] == list(SHAPE_CLASS_NAMES)
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        points, labels = small_shapes[split]
        assert points.shape == (40 * per_class, 300, 3) and points.dtype == np.float32
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(labels, minlength=40), np.full(40, per_class))
        assert np.all(np.isfinite(points))


def test_shapes_are_unit_sphere_normalised(small_shapes):
    for split in ("train", "val", "test"):
        points = small_shapes[split][0]
        np.testing.assert_allclose(points.mean(axis=1), 0.0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(points, axis=-1).max(axis=1), 1.0, atol=1e-6)


def test_shapes_deterministic_per_seed_and_splits_differ(tmp_path):
    first = make_shapes(2, 1, 1, num_points=64, seed=3, cache_dir=tmp_path / "a")
    again = make_shapes(2, 1, 1, num_points=64, seed=3, cache_dir=tmp_path / "b")  # no cache shared
    other = make_shapes(2, 1, 1, num_points=64, seed=4, cache_dir=tmp_path / "a")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first[split][0], again[split][0])
        np.testing.assert_array_equal(first[split][1], again[split][1])
        assert not np.allclose(first[split][0], other[split][0])
    assert not np.allclose(first["val"][0], first["test"][0])
    # A split's content does not depend on the sizes of the other splits.
    bigger_val = make_shapes(2, 3, 1, num_points=64, seed=3, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(first["train"][0], bigger_val["train"][0])


def test_shapes_cache_is_reused(tmp_path, monkeypatch):
    first = make_shapes(1, 1, 1, num_points=32, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("generator called although a cache file exists")

    monkeypatch.setattr(shapes, "_generate", fail)
    cached = make_shapes(1, 1, 1, num_points=32, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(first["test"][0], cached["test"][0])
    assert cached["class_names"] == list(SHAPE_CLASS_NAMES)
    with pytest.raises(AssertionError, match="generator called"):
        make_shapes(1, 1, 1, num_points=32, seed=1, cache_dir=tmp_path)  # different key


def test_proportion_classes_have_their_aspect_ratios():
    """Classes differing only in proportions: check principal extents of the canonical clouds."""

    def sorted_extents(name):
        points = sample_shape_class(name, np.random.default_rng(0), 20, noise_std=0.0)
        extent = points.max(axis=1) - points.min(axis=1)  # canonical axes are the box axes
        return np.sort(extent, axis=1)[:, ::-1] / np.sort(extent, axis=1)[:, -1:]

    cube, slab, beam = sorted_extents("cube"), sorted_extents("slab"), sorted_extents("beam")
    assert np.all(cube[:, 2] > 0.85)  # all three extents about equal (up to the 5 % jitter)
    assert np.all(slab[:, 1] > 0.85) and np.all(slab[:, 2] < 0.35)  # one short side
    assert np.all(beam[:, 1] < 0.4) and np.all(beam[:, 2] < 0.4)  # two short sides


def test_surface_sampling_is_area_weighted():
    """Two unit squares vs one 3x-larger square: points split about 1:1:3 by area."""
    unit = np.array([[[0, 0, 0], [1, 0, 0], [1, 1, 0]], [[0, 0, 0], [1, 1, 0], [0, 1, 0]]], float)
    big = unit * np.sqrt(3.0) + np.array([5.0, 0, 0])
    triangles = np.concatenate([unit, unit + np.array([0, 0, 2.0]), big])[None]
    points = shapes.sample_surface(np.random.default_rng(0), triangles, 50_000)[0]
    fractions = np.array(
        [np.mean((points[:, 0] < 2) & (points[:, 2] < 1)), np.mean(points[:, 2] > 1), np.mean(points[:, 0] > 2)]
    )
    np.testing.assert_allclose(fractions, [0.2, 0.2, 0.6], atol=0.01)
    # Uniform inside a triangle: the mean of the first unit square's points is its centre.
    first = points[(points[:, 0] < 2) & (points[:, 2] < 1)]
    np.testing.assert_allclose(first.mean(0), [0.5, 0.5, 0.0], atol=0.01)


@pytest.mark.parametrize("right, left", CHIRAL_PAIRS)
def test_chiral_pairs_are_mirror_images(right, left):
    right_clouds = sample_shape_class(right, np.random.default_rng(11), 4, noise_std=0.0)
    left_clouds = sample_shape_class(left, np.random.default_rng(11), 4, noise_std=0.0)
    np.testing.assert_allclose(left_clouds, right_clouds @ MIRROR, atol=1e-6)


@pytest.mark.parametrize("right, left", CHIRAL_PAIRS)
def test_chiral_pairs_are_not_rotations_of_each_other(right, left):
    """A rotation-invariant pseudoscalar has opposite, non-zero signs on the two classes.

    If a left cloud were a rotated right cloud, any rotation-invariant statistic would agree.
    """
    handedness = HANDEDNESS[right]
    right_clouds = sample_shape_class(right, np.random.default_rng(0), 16).astype(np.float64)
    left_clouds = sample_shape_class(left, np.random.default_rng(1), 16).astype(np.float64)
    rotations = random_rotations(np.random.default_rng(2), 16)

    # The statistic is rotation-invariant and reflection-odd (checked, not assumed).
    value = handedness(right_clouds)
    np.testing.assert_allclose(handedness(rotate(right_clouds, rotations)), value, rtol=1e-6, atol=0)
    np.testing.assert_allclose(handedness(right_clouds @ MIRROR), -value, rtol=1e-6, atol=0)

    # Every instance of the right class has one sign, every left instance the other,
    # also after independent random rotations.
    sign = np.sign(value[0])
    assert sign != 0 and np.all(sign * value > 0)
    assert np.all(sign * handedness(rotate(left_clouds, rotations)) < 0)

    # With known point correspondence: the best proper rotation (Kabsch) leaves a large
    # residual, the reflection matches exactly.
    cloud = sample_shape_class(right, np.random.default_rng(3), 1, noise_std=0.0)[0].astype(np.float64)
    mirror_image = cloud @ MIRROR
    u, _, vt = np.linalg.svd(mirror_image.T @ cloud)
    best = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    residual = np.sqrt(np.mean(np.sum((cloud @ best - mirror_image) ** 2, -1)))
    assert residual > 0.1


def test_sample_shape_class_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown shape class"):
        sample_shape_class("teapot", np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="num_points"):
        sample_shape_class("cube", np.random.default_rng(0), 1, num_points=0)
    with pytest.raises(ValueError, match="num_per_class_val"):
        make_shapes(1, -1, 1)
    with pytest.raises(ValueError, match="noise_std"):
        make_shapes(1, 1, 1, noise_std=-0.1)


# ------------------------------------------------------------------------ augmentations


def test_rotations_are_proper_orthogonal_and_seeded():
    rotations = random_rotations(np.random.default_rng(7), 500)
    assert rotations.shape == (500, 3, 3)
    identity = np.broadcast_to(np.eye(3), (500, 3, 3))
    np.testing.assert_allclose(rotations @ np.swapaxes(rotations, 1, 2), identity, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
    np.testing.assert_array_equal(rotations, random_rotations(np.random.default_rng(7), 500))
    assert not np.allclose(rotations, random_rotations(np.random.default_rng(8), 500))


def test_rotations_are_haar_uniform():
    """Haar moments on SO(3): E[R] = 0, E[R_ij²] = 1/3, E[tr R] = 0, E[(tr R)²] = 1,
    and R e_z is uniform on the sphere (its z component is uniform on [−1, 1])."""
    rotations = random_rotations(np.random.default_rng(0), 40_000)
    np.testing.assert_allclose(rotations.mean(0), 0.0, atol=0.015)
    np.testing.assert_allclose((rotations**2).mean(0), 1 / 3, atol=0.01)
    trace = np.trace(rotations, axis1=1, axis2=2)
    assert abs(trace.mean()) < 0.02 and abs((trace**2).mean() - 1.0) < 0.03
    z = rotations[:, 2, 2]
    np.testing.assert_allclose(np.quantile(z, [0.1, 0.25, 0.5, 0.75, 0.9]), [-0.8, -0.5, 0.0, 0.5, 0.8], atol=0.02)


def test_rotate_matches_matrix_vector_product():
    rng = np.random.default_rng(0)
    points, rotations = rng.normal(size=(4, 10, 3)), random_rotations(rng, 4)
    expected = np.stack([[rotations[n] @ points[n, p] for p in range(10)] for n in range(4)])
    np.testing.assert_allclose(rotate(points, rotations), expected, atol=1e-12)
    np.testing.assert_allclose(rotate(points, rotations[0]), points @ rotations[0].T, atol=1e-12)
    with pytest.raises(ValueError, match="rotations"):
        rotate(points, np.eye(2))


def test_drop_points_keeps_shape_and_only_original_points():
    rng = np.random.default_rng(0)
    clouds = rng.normal(size=(6, 300, 3))
    dropped = drop_points(np.random.default_rng(1), clouds, 0.3)
    assert dropped.shape == clouds.shape and dropped.dtype == clouds.dtype
    for original, new in zip(clouds, dropped):
        # Each output point equals an original point of the same cloud ...
        distance = np.linalg.norm(new[:, None] - original[None], axis=-1)
        assert np.all(distance.min(axis=1) == 0.0)
        # ... exactly 210 distinct originals survive, 90 slots are duplicates of kept ones.
        assert len(np.unique(distance.argmin(axis=1))) == 210
    np.testing.assert_array_equal(dropped, drop_points(np.random.default_rng(1), clouds, 0.3))
    assert not np.array_equal(dropped, drop_points(np.random.default_rng(2), clouds, 0.3))
    np.testing.assert_array_equal(drop_points(rng, clouds, 0.0), clouds)
    assert drop_points(rng, clouds[0], 0.5).shape == (300, 3)
    with pytest.raises(ValueError, match="drop fraction"):
        drop_points(rng, clouds, 1.0)


def test_normalize_and_holdout():
    cloud = np.array([[[1.0, 0, 0], [3.0, 0, 0], [2.0, 2.0, 0]]])
    # centroid (2, 2/3, 0); distances sqrt(13)/3, sqrt(13)/3, 4/3 -> radius 4/3.
    expected = (cloud - np.array([2.0, 2 / 3, 0])) / (4 / 3)
    np.testing.assert_allclose(normalize_to_unit_sphere(cloud), expected, atol=1e-12)
    with pytest.raises(ValueError, match="coincide"):
        normalize_to_unit_sphere(np.ones((1, 5, 3)))

    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    keep, held = stratified_holdout(labels, 0.1, seed=0)
    assert np.intersect1d(keep, held).size == 0 and np.union1d(keep, held).size == labels.size
    np.testing.assert_array_equal(np.bincount(labels[held]), [1, 2, 3, 4])
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.1, seed=0)[1])


# ---------------------------------------------------------------------- ModelNet40 files


def _normalised(rows):
    centred = rows - rows.mean(0)
    return centred / np.linalg.norm(centred, axis=1).max()


def test_load_text_layout(tmp_path):
    folder, samples, clouds = write_text_layout(tmp_path / "data", np.random.default_rng(0))
    for path in (tmp_path / "data", folder):  # parent folder or layout folder
        data = load_modelnet40(path, num_points=5, val_fraction=0.2, seed=1, cache_dir=tmp_path / "cache")
        assert data["class_names"] == ["chair", "night_stand"]
        test_points, test_labels = data["test"]
        np.testing.assert_array_equal(test_labels, [1, 0])
        for i, sample in enumerate(samples["test"]):
            np.testing.assert_allclose(test_points[i], _normalised(clouds[sample][:5, :3]), atol=1e-5)
        # 20 training files: 2 per class held out for validation, disjoint from train.
        (train_points, train_labels), (val_points, val_labels) = data["train"], data["val"]
        assert train_points.shape == (16, 5, 3) and val_points.shape == (4, 5, 3)
        assert train_points.dtype == np.float32 and train_labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(val_labels), [2, 2])
        all_train = np.stack([_normalised(clouds[s][:5, :3]) for s in samples["train"]])
        used = np.concatenate([train_points, val_points])
        match = np.linalg.norm((used[:, None] - all_train[None]).reshape(20, 20, -1), axis=-1).argmin(1)
        assert sorted(match) == list(range(20))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # same files -> one cache entry

    other_seed = load_modelnet40(folder, num_points=5, val_fraction=0.2, seed=2, cache_dir=tmp_path / "cache")
    assert not np.array_equal(other_seed["val"][0], data["val"][0])
    with pytest.raises(ValueError, match="fewer than num_points"):
        load_modelnet40(folder, num_points=9, cache_dir=tmp_path / "cache")


def test_text_layout_cache_sees_a_sample_file_replaced_in_place(tmp_path):
    folder, samples, clouds = write_text_layout(tmp_path, np.random.default_rng(0))
    first = load_modelnet40(folder, num_points=5, cache_dir=tmp_path / "cache")
    file = folder / "chair" / "chair_0100.txt"
    replacement = np.random.default_rng(1).normal(size=(8, 6))
    np.savetxt(file, replacement, delimiter=",", fmt="%.6f")  # the list files are untouched
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    second = load_modelnet40(folder, num_points=5, cache_dir=tmp_path / "cache")
    index = samples["test"].index("chair_0100")
    assert not np.allclose(first["test"][0][index], second["test"][0][index])
    np.testing.assert_allclose(second["test"][0][index], _normalised(replacement[:5, :3]), atol=1e-5)


def test_load_text_layout_missing_sample_file(tmp_path):
    folder, samples, _ = write_text_layout(tmp_path, np.random.default_rng(0))
    (folder / "chair" / "chair_0100.txt").unlink()
    with pytest.raises(FileNotFoundError, match="chair_0100.txt"):
        load_modelnet40(folder, num_points=5, cache_dir=tmp_path / "cache")


def test_load_hdf5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    rng = np.random.default_rng(0)
    parts = {"train0": 6, "train1": 4, "test0": 3}
    written = {}
    for part, batch in parts.items():
        data = rng.normal(size=(batch, 12, 3)).astype(np.float32)
        label = rng.integers(0, 3, size=(batch, 1)).astype(np.uint8)
        with h5py.File(folder / f"ply_data_{part}.h5", "w") as handle:
            handle["data"], handle["label"] = data, label
        written[part] = (data, label)
    (folder / "shape_names.txt").write_text("a\nb\nc\n")

    data = load_modelnet40(tmp_path, num_points=7, val_fraction=0.0)
    assert data["class_names"] == ["a", "b", "c"]
    train_points, train_labels = data["train"]
    expected = np.concatenate([written["train0"][0], written["train1"][0]])[:, :7]
    np.testing.assert_allclose(train_points, np.stack([_normalised(c) for c in expected]), atol=1e-5)
    np.testing.assert_array_equal(train_labels, np.concatenate([written["train0"][1], written["train1"][1]])[:, 0])
    assert data["val"][0].shape == (0, 7, 3)
    np.testing.assert_array_equal(data["test"][1], written["test0"][1][:, 0])
    with pytest.raises(ValueError, match="fewer than num_points"):
        load_modelnet40(folder, num_points=13)


def test_hdf5_layout_without_h5py_gives_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    for part in ("train0", "test0"):
        (folder / f"ply_data_{part}.h5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(ImportError, match="pip install h5py"):
        load_modelnet40(folder)


def test_modelnet_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*modelnet40_normal_resampled"):
        load_modelnet40(tmp_path / "nowhere")
    (tmp_path / "random.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="(?s)no recognised ModelNet40 layout.*ply_data_train"):
        load_modelnet40(tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_modelnet40(tmp_path, val_fraction=1.0)


def test_drop_points_rounds_the_count_and_refills_from_many_donors():
    cloud = np.arange(27.0).reshape(1, 9, 3)  # 9 distinct points
    dropped = drop_points(np.random.default_rng(0), cloud, 0.3)
    assert len(np.unique(dropped[0], axis=0)) == 6  # round(2.7) = 3 slots refilled with kept points
    cloud = np.random.default_rng(2).normal(size=(1, 300, 3))
    dropped = drop_points(np.random.default_rng(1), cloud, 0.5)
    moved = np.any(dropped[0] != cloud[0], axis=1)
    assert moved.sum() <= 150 and len(np.unique(dropped[0][moved], axis=0)) > 50  # donors drawn uniformly


def test_stratified_holdout_rounds_per_class():
    labels = np.repeat([0, 1], [9, 3])
    kept, held = stratified_holdout(labels, 0.3, 0)
    np.testing.assert_array_equal(np.bincount(labels[held], minlength=2), [3, 1])  # round(2.7), round(0.9)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(12))
