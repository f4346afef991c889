"""Tests for data/mocap.py: EGNO MoCap protocol, skeleton graph, symmetry helpers, errors."""

from collections import deque

import jax
import numpy as np
import pytest

from data.mocap import (
    DEFAULT_MOCAP_PATH,
    apply_rigid,
    load_mocap,
    mocap_batches,
    mocap_node_features,
    random_vertical_rotation,
    skeleton_graph,
    target_frame_offsets,
)



def _require_shipped_file():
    if not DEFAULT_MOCAP_PATH.is_file():
        pytest.skip(f"shipped MoCap file missing: {DEFAULT_MOCAP_PATH}")


@pytest.fixture(scope="module")
def raw():
    _require_shipped_file()
    with np.load(DEFAULT_MOCAP_PATH) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def data():
    _require_shipped_file()
    return load_mocap()


def _rotation_about_x(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)


def _tiny_archive(num_frames=12, num_starts=3):
    """4 joints on a chain 0-1-2-3; trial n has coordinates 100 n + 10 frame + joint (+0/.1/.2)."""
    frames = np.arange(num_frames)[:, None, None] * 10.0
    joints = np.arange(4)[None, :, None] * 1.0
    axes = np.array([0.0, 0.1, 0.2])[None, None, :]
    archive = {"edges": np.array([[1, 0], [2, 1], [3, 2]], dtype=np.int32)}
    for number in range(3):
        trial = 100.0 * number + frames + joints + axes
        archive[f"trial_{number:02d}"] = trial.astype(np.float32)
    for split, number in (("train", 0), ("val", 1), ("test", 2)):
        archive[f"split_{split}_trial_{number:02d}"] = np.arange(num_starts, dtype=np.int32)[::-1]
    return archive


_TINY_SETTINGS = dict(delta_frame=3, num_timesteps=2, num_train_per_trial=2, num_eval_per_trial=2)


def _write(tmp_path, archive, name="mocap.npz"):
    path = tmp_path / name
    np.savez(path, **archive)
    return path


# ------------------------------------------------------------------ shipped data: protocol


def test_split_sizes_shapes_and_dtypes(data):
    expected_sizes = {"train": 200, "val": 240, "test": 240}
    for split, size in expected_sizes.items():
        arrays = data.splits[split]
        assert arrays["loc"].shape == (size, 31, 3)
        assert arrays["vel"].shape == (size, 31, 3)
        assert arrays["target"].shape == (size, 5, 31, 3)
        assert arrays["node_features"].shape == (size, 31, 2)
        for key in ("loc", "vel", "target", "node_features"):
            assert arrays[key].dtype == np.float32
    assert data.train is data.splits["train"]
    np.testing.assert_array_equal(data.target_offsets, [26, 27, 28, 29, 30])
    assert data.edges.dtype == np.int32 and data.edge_attr.dtype == np.float32
    assert data.edge_attr.shape == (len(data.edges), 1)


def test_samples_match_raw_trials_by_hand(data, raw):
    # train: trials 1, 2, 5, 6, 10, 40 each -> sample 0 is trial 1's first start frame.
    assert raw["split_train_trial_01"][0] == 57
    trial = raw["trial_01"]
    np.testing.assert_array_equal(data.train["loc"][0], trial[57])
    np.testing.assert_array_equal(data.train["vel"][0], trial[58] - trial[57])
    np.testing.assert_array_equal(data.train["target"][0, 0], trial[57 + 26])
    np.testing.assert_array_equal(data.train["target"][0, 4], trial[57 + 30])
    # sample 41 = trial 2, second start frame.
    assert raw["split_train_trial_02"][1] == 88
    np.testing.assert_array_equal(data.train["loc"][41], raw["trial_02"][88])
    np.testing.assert_array_equal(data.train["target"][41, 4], raw["trial_02"][118])
    # sample 40 in train uses 40 per trial: trial 1's 41st start frame is never used.
    assert data.train["trial"][39] == 1 and data.train["trial"][40] == 2
    # test: trials 3, 7, 8, 80 each -> sample 80 is trial 7's first start frame (2).
    assert raw["split_test_trial_07"][0] == 2
    np.testing.assert_array_equal(data.test["loc"][80], raw["trial_07"][2])
    np.testing.assert_array_equal(data.test["target"][80, 2], raw["trial_07"][2 + 28])
    # val: trials 0, 4, 9 -> last sample is trial 9's 80th start frame.
    s = raw["split_val_trial_09"][79]
    np.testing.assert_array_equal(data.val["loc"][239], raw["trial_09"][s])
    np.testing.assert_array_equal(data.val["target"][239, 4], raw["trial_09"][s + 30])


def test_all_velocities_and_targets_follow_the_protocol(data, raw):
    for split in ("train", "val", "test"):
        arrays = data.splits[split]
        for i in range(len(arrays["loc"])):
            trial = raw[f"trial_{arrays['trial'][i]:02d}"]
            s = int(arrays["start_frame"][i])
            np.testing.assert_array_equal(arrays["vel"][i], trial[s + 1] - trial[s])
            for k in range(5):
                np.testing.assert_array_equal(arrays["target"][i, k], trial[s + 26 + k])


def test_node_features_are_speed_and_train_normalised_height(data):
    heights = data.train["loc"][..., 1]
    assert data.height_mean == pytest.approx(float(np.mean(heights)), rel=1e-5)
    assert data.height_std == pytest.approx(float(np.std(heights)), rel=1e-5)
    i, j = 123, 7  # an arbitrary test sample and joint
    v = data.test["vel"][i, j]
    expected_speed = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2)
    expected_height = (data.test["loc"][i, j, 1] - data.height_mean) / data.height_std
    np.testing.assert_allclose(
        data.test["node_features"][i, j], [expected_speed, expected_height], rtol=1e-5
    )
    # train heights are standardised exactly; test ones use the train stats, not their own.
    assert abs(data.train["node_features"][..., 1].mean()) < 1e-4
    assert data.train["node_features"][..., 1].std() == pytest.approx(1.0, rel=1e-4)


# ------------------------------------------------------------------ graph


def test_edges_are_bones_plus_two_hop_neighbours(data, raw):
    bones = raw["edges"]
    neighbours = {j: set() for j in range(31)}
    for a, b in bones.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    def graph_distances(source):  # breadth-first search, independent of the loader
        distance = {source: 0}
        queue = deque([source])
        while queue:
            node = queue.popleft()
            for other in neighbours[node]:
                if other not in distance:
                    distance[other] = distance[node] + 1
                    queue.append(other)
        return distance

    expected = {
        (i, j): d for i in range(31) for j, d in graph_distances(i).items() if d in (1, 2)
    }
    found = {
        (int(i), int(j)): float(a) for (i, j), a in zip(data.edges, data.edge_attr[:, 0])
    }
    assert len(found) == len(data.edges)  # no duplicates
    assert found == {pair: float(d) for pair, d in expected.items()}
    # Hand check: joint 0 is the root of three chains starting with joints 1, 6, 11.
    assert {j for (i, j), a in found.items() if i == 0 and a == 1} == {1, 6, 11}
    assert {j for (i, j), a in found.items() if i == 0 and a == 2} == {2, 7, 12}
    assert found[(1, 6)] == 2.0 and found[(6, 11)] == 2.0


def test_two_hop_excludes_direct_neighbours_in_a_skeleton_with_a_cycle():
    # triangle 0-1-2 plus a tail 2-3: pairs 0-1, 1-2, 2-0 are 1-hop even though paths of
    # length two also join them; the only distance-2 pairs are 0-3 and 1-3.
    edges, edge_attr = skeleton_graph(np.array([[0, 1], [1, 2], [2, 0], [3, 2]]), 5)
    pairs = {tuple(e): a for e, a in zip(edges.tolist(), edge_attr[:, 0].tolist())}
    one_hop = {(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0), (2, 3), (3, 2)}
    two_hop = {(0, 3), (3, 0), (1, 3), (3, 1)}
    assert pairs == {**{p: 1.0 for p in one_hop}, **{p: 2.0 for p in two_hop}}
    with pytest.raises(ValueError, match="self loops"):
        skeleton_graph(np.array([[1, 1]]), 3)
    with pytest.raises(ValueError, match="integer array"):
        skeleton_graph(np.array([[0.0, 1.0]]), 3)


def test_edges_symmetric_without_self_loops_or_duplicates(data):
    pairs = [tuple(e) for e in data.edges.tolist()]
    assert len(set(pairs)) == len(pairs)
    assert all(i != j for i, j in pairs)
    attr = {pair: a for pair, a in zip(pairs, data.edge_attr[:, 0].tolist())}
    assert all((j, i) in attr and attr[(j, i)] == a for (i, j), a in attr.items())
    assert data.edges.min() >= 0 and data.edges.max() < 31
    assert set(np.unique(data.edge_attr).tolist()) == {1.0, 2.0}
    assert (data.edge_attr == 1).sum() == 2 * 30  # 30 tree bones, both directions


# ------------------------------------------------------------------ symmetry


def _transformed_archive(raw, rotations, translations):
    archive = dict(raw)
    for number, (R, t) in enumerate(zip(rotations, translations)):
        key = f"trial_{number:02d}"
        archive[key] = (raw[key].astype(np.float64) @ R.T.astype(np.float64) + t).astype(
            np.float32
        )
    return archive


def test_node_features_invariant_under_vertical_rotations_and_horizontal_shifts(
    data, raw, tmp_path
):
    rng = np.random.default_rng(0)
    rotations = random_vertical_rotation(rng, 11, include_reflections=True)
    translations = rng.normal(scale=50.0, size=(11, 3))
    translations[:, 1] = 0.0
    moved = load_mocap(_write(tmp_path, _transformed_archive(raw, rotations, translations)))
    assert moved.height_mean == pytest.approx(data.height_mean, rel=1e-5)
    np.testing.assert_array_equal(moved.edges, data.edges)
    for split in ("train", "val", "test"):
        original, transformed = data.splits[split], moved.splits[split]
        np.testing.assert_allclose(
            transformed["node_features"], original["node_features"], atol=2e-4
        )
        # positions / velocities / targets are equivariant: loading the moved trials equals
        # moving the loaded samples with apply_rigid (one (R, t) per sample's trial).
        trial = original["trial"]
        expected = apply_rigid(original, rotations[trial], translations[trial])
        for key in ("loc", "vel", "target"):
            np.testing.assert_allclose(transformed[key], expected[key], atol=2e-3)
        np.testing.assert_array_equal(expected["node_features"], original["node_features"])


def test_node_features_change_under_rotation_about_x_or_vertical_shift(data, raw, tmp_path):
    tilt = [_rotation_about_x(0.3)] * 11
    tilted = load_mocap(_write(tmp_path, _transformed_archive(raw, tilt, np.zeros((11, 3)))))
    height_change = np.abs(
        tilted.test["node_features"][..., 1] - data.test["node_features"][..., 1]
    )
    assert height_change.max() > 0.1
    # Speed (a norm) survives any rotation; only the height feature breaks O(3).
    np.testing.assert_allclose(
        tilted.test["node_features"][..., 0], data.test["node_features"][..., 0], atol=2e-4
    )
    # A y-shift of some trials only (train stats fixed) changes the val/test heights.
    shifts = np.zeros((11, 3))
    shifts[[0, 3, 4, 7, 8, 9], 1] = 5.0  # the val and test trials
    lifted_archive = _transformed_archive(raw, [np.eye(3)] * 11, shifts)
    lifted = load_mocap(_write(tmp_path, lifted_archive, "lifted.npz"))
    np.testing.assert_allclose(
        lifted.test["node_features"][..., 1] - data.test["node_features"][..., 1],
        5.0 / data.height_std,
        rtol=1e-3,
    )


def test_random_vertical_rotation_properties():
    for key_or_rng in (jax.random.key(3), np.random.default_rng(3), 3):
        R = random_vertical_rotation(key_or_rng, 64)
        assert R.shape == (64, 3, 3) and R.dtype == np.float32
        identities = np.broadcast_to(np.eye(3), R.shape)
        np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), identities, atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
        np.testing.assert_allclose(R[:, :, 1], np.tile([0.0, 1.0, 0.0], (64, 1)), atol=1e-7)
        assert np.ptp(np.arctan2(R[:, 0, 2], R[:, 0, 0])) > 5.0  # angles spread over [0, 2π)
    # same key / seed -> same matrices
    from_key = random_vertical_rotation(jax.random.key(3), 8)
    np.testing.assert_array_equal(from_key, random_vertical_rotation(jax.random.key(3), 8))
    np.testing.assert_array_equal(random_vertical_rotation(3, 8), random_vertical_rotation(3, 8))
    with_reflections = random_vertical_rotation(jax.random.key(1), 64, include_reflections=True)
    determinants = np.round(np.linalg.det(with_reflections))
    assert set(determinants.tolist()) == {-1.0, 1.0}
    e_y_rows = np.tile([0.0, 1.0, 0.0], (64, 1))
    np.testing.assert_allclose(with_reflections[:, 1, :], e_y_rows, atol=1e-7)
    with pytest.raises(ValueError, match="key_or_rng"):
        random_vertical_rotation("seed", 2)


def test_apply_rigid_by_hand_and_rejects_non_symmetries():
    arrays = {
        "loc": np.array([[[1.0, 2.0, 3.0]]], np.float32),
        "vel": np.array([[[1.0, 0.0, 0.0]]], np.float32),
        "target": np.array([[[[0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0]]]], np.float32),
        "node_features": np.zeros((1, 1, 2), np.float32),
    }
    quarter_turn = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], np.float32)  # θ = π/2 about y
    moved = apply_rigid(arrays, quarter_turn, np.array([10.0, 0.0, 20.0]))
    np.testing.assert_allclose(moved["loc"][0, 0], [3 + 10, 2, -1 + 20])
    np.testing.assert_allclose(moved["vel"][0, 0], [0, 0, -1])  # no translation on velocities
    np.testing.assert_allclose(moved["target"][0, 0, 0], [1 + 10, 0, 0 + 20])
    np.testing.assert_allclose(moved["target"][0, 1, 0], [1 + 10, 1, -1 + 20])
    assert moved["node_features"] is arrays["node_features"]
    np.testing.assert_array_equal(arrays["loc"][0, 0], [1, 2, 3])  # input untouched
    with pytest.raises(ValueError, match="node_features"):
        apply_rigid(arrays, _rotation_about_x(0.1))
    with pytest.raises(ValueError, match="node_features"):
        apply_rigid(arrays, np.eye(3), np.array([0.0, 1.0, 0.0]))
    without_features = {k: v for k, v in arrays.items() if k != "node_features"}
    tilted = apply_rigid(without_features, _rotation_about_x(np.pi / 2))
    np.testing.assert_allclose(tilted["loc"][0, 0], [1, -3, 2], atol=1e-6)
    with pytest.raises(ValueError, match="R has 2 per-sample"):
        apply_rigid(without_features, np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="R must have shape"):
        apply_rigid(without_features, np.eye(2))


def test_mocap_node_features_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        mocap_node_features(np.zeros((2, 3)), np.zeros((3, 3)), 0.0, 1.0)
    with pytest.raises(ValueError, match="height_std"):
        mocap_node_features(np.zeros((2, 3)), np.zeros((2, 3)), 0.0, 0.0)


def test_mocap_batches_cover_each_sample_once(data):
    batches = list(mocap_batches(data.val, 64, rng=5))
    assert [len(b["loc"]) for b in batches] == [64, 64, 64, 48]
    seen = np.concatenate([b["trial"] * 1000 + b["start_frame"] for b in batches])
    stored = data.val["trial"] * 1000 + data.val["start_frame"]
    assert sorted(seen.tolist()) == sorted(stored.tolist())
    assert not np.array_equal(seen, stored)  # shuffled
    again = np.concatenate([b["start_frame"] for b in mocap_batches(data.val, 64, rng=5)])
    np.testing.assert_array_equal(again, np.concatenate([b["start_frame"] for b in batches]))
    ordered = list(mocap_batches(data.val, 100, drop_last=True))
    assert len(ordered) == 2
    np.testing.assert_array_equal(ordered[1]["loc"], data.val["loc"][100:200])


# ------------------------------------------------------------------ user files and errors


def test_tiny_user_file_walk_layout(tmp_path):
    archive = _tiny_archive()
    archive["trial_07"] = archive["trial_00"] + 700.0  # extra train trial, any numbering
    archive["split_train_trial_07"] = np.array([4, 5, 0], np.int32)
    loaded = load_mocap(_write(tmp_path, archive), **_TINY_SETTINGS)
    np.testing.assert_array_equal(loaded.target_offsets, [2, 3])
    assert loaded.train["trial"].tolist() == [0, 0, 7, 7]
    assert loaded.train["start_frame"].tolist() == [2, 1, 4, 5]
    # trial 7, start 5, joint 3: value 700 + 10*frame + 3 + (0, .1, .2)
    np.testing.assert_allclose(loaded.train["loc"][3, 3], [753.0, 753.1, 753.2], rtol=1e-6)
    np.testing.assert_allclose(loaded.train["vel"][3], np.full((4, 3), 10.0), rtol=1e-5)
    np.testing.assert_allclose(loaded.train["target"][3, :, 0, 0], [770.0, 780.0], rtol=1e-6)
    np.testing.assert_allclose(loaded.test["loc"][0, 0], [220.0, 220.1, 220.2], rtol=1e-6)
    # chain 0-1-2-3: 1-hop (0,1),(1,2),(2,3); 2-hop (0,2),(1,3).
    pairs = {tuple(e): a for e, a in zip(loaded.edges.tolist(), loaded.edge_attr[:, 0].tolist())}
    assert pairs == {
        (0, 1): 1.0, (1, 0): 1.0, (1, 2): 1.0, (2, 1): 1.0, (2, 3): 1.0, (3, 2): 1.0,
        (0, 2): 2.0, (2, 0): 2.0, (1, 3): 2.0, (3, 1): 2.0,
    }


def test_missing_file_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere" / "walk.npz"
    with pytest.raises(FileNotFoundError, match="walk.npz") as info:
        load_mocap(missing)
    assert "trial_NN" in str(info.value) and "split_" in str(info.value)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: a.pop("edges"), "missing key 'edges'"),
        (lambda a: a.pop("split_val_trial_01"), "split_val"),
        (lambda a: a.pop("trial_02"), "missing trial array 'trial_02'"),
        (lambda a: a.update(split_train_trial_00=np.array([0, 9, 1], np.int32)), r"\[9\] overflow"),
        (lambda a: a.update(split_test_trial_02=np.array([-1, 0], np.int32)), "overflow"),
        (lambda a: a.update(split_test_trial_02=np.array([0], np.int32)), "fewer than the 2"),
        (lambda a: a.update(trial_01=a["trial_01"].astype(np.int32)), "float array"),
        (lambda a: a.update(trial_01=a["trial_01"][:, :, :2]), r"\(frames, joints, 3\)"),
        (lambda a: a.update(trial_01=a["trial_01"][:, :3]), "disagree on the number of joints"),
        (lambda a: a.update(split_val_trial_01=np.array([0.0, 1.0])), "1-D integer"),
        (lambda a: a.update(edges=np.array([[0, 4]], np.int32)), "malformed 'edges'"),
        (lambda a: a.update(edges=np.array([0, 1], np.int32)), "malformed 'edges'"),
        (lambda a: a.update(split_tran_trial_00=np.array([0], np.int32)), "unknown keys"),
        (lambda a: a.update(split_test_trial_00=np.array([0], np.int32)), r"trial\(s\) \[0\] listed in both"),
    ],
)
def test_malformed_files_raise_value_error(tmp_path, corrupt, message):
    archive = _tiny_archive()
    corrupt(archive)
    with pytest.raises(ValueError, match=message):
        load_mocap(_write(tmp_path, archive), **_TINY_SETTINGS)


def test_start_frames_beyond_the_used_head_are_not_checked(tmp_path):
    archive = _tiny_archive()
    archive["split_train_trial_00"] = np.array([0, 1, 99], np.int32)  # 99 is never used
    loaded = load_mocap(_write(tmp_path, archive), **_TINY_SETTINGS)
    assert loaded.train["start_frame"].tolist() == [0, 1]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="must not exceed delta_frame"):
        target_frame_offsets(3, 4)
    with pytest.raises(ValueError, match="delta_frame must be a positive integer"):
        target_frame_offsets(0, 1)
    np.testing.assert_array_equal(target_frame_offsets(10, 1), [10])
    with pytest.raises(ValueError, match="num_train_per_trial"):
        load_mocap(num_train_per_trial=0)
