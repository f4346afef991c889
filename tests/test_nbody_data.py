"""Tests of the charged N-body generator (data/nbody.py) against a per-trajectory reference."""

import numpy as np
import pytest

from data import nbody


# ------------------------------------------------------------------------------------------
# Reference: one trajectory at a time, written directly from the DATA.md specification.
# ------------------------------------------------------------------------------------------


def reference_draw(rng):
    """One trajectory's random numbers, in the specified order (velocity rescaled)."""
    charges = rng.choice(np.array([-1.0, 0.0, 1.0]), size=(5, 1), p=[0.5, 0, 0.5])
    loc = rng.randn(3, 5) * 1.0
    vel = rng.randn(3, 5)
    vel = vel * 0.5 / np.sqrt((vel**2).sum(axis=0)).reshape(1, -1)
    rng.randn(49, 3, 5)
    rng.randn(49, 3, 5)
    return charges, loc, vel


def reference_squared_distances(points):
    """points (5, 3): |a|^2 (column) + |b|^2 (row) - 2 A B^T with A = B = points."""
    norms = (points**2).sum(axis=1)
    return norms.reshape(-1, 1) + norms.reshape(1, -1) - 2 * points.dot(points.T)


def reference_force(loc, edges, charges, field):
    with np.errstate(divide="ignore", invalid="ignore"):
        size = edges / reference_squared_distances(loc.T) ** 1.5
    np.fill_diagonal(size, 0.0)
    force = np.stack([(size * np.subtract.outer(loc[d], loc[d])).sum(axis=-1) for d in range(3)])
    force[2] += charges[:, 0] * field
    force[force > 100.0] = 100.0
    force[force < -100.0] = -100.0
    return force


def reference_trajectory(charges, loc, vel, field=0.0, num_steps=5000, sample_every=100):
    """Reflect once into [-5, 5]^3, then the leapfrog loop recording every sample_every."""
    loc, vel = loc.copy(), vel.copy()
    over = loc > 5.0
    loc[over] = 10.0 - loc[over]
    vel[over] = -np.abs(vel[over])
    under = loc < -5.0
    loc[under] = -10.0 - loc[under]
    vel[under] = np.abs(vel[under])
    edges = charges.dot(charges.T)
    num_frames = num_steps // sample_every - 1
    loc_frames = np.zeros((num_frames, 3, 5))
    vel_frames = np.zeros((num_frames, 3, 5))
    vel += 0.001 * reference_force(loc, edges, charges, field)
    frame = 0
    for step in range(1, num_steps):
        loc += 0.001 * vel
        if step % sample_every == 0:
            loc_frames[frame], vel_frames[frame] = loc, vel
            frame += 1
        vel += 0.001 * reference_force(loc, edges, charges, field)
    return loc_frames, vel_frames


def draw_batch(seed, num):
    rng = np.random.RandomState(seed)
    draws = [reference_draw(rng) for _ in range(num)]
    return tuple(np.stack(parts) for parts in zip(*draws))


# ------------------------------------------------------------------------------------------
# Helpers for the physical checks
# ------------------------------------------------------------------------------------------


def coulomb_force(loc, charges, field):
    """Unclipped F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3 + q_i E z_hat; loc (3, 5)."""
    q = charges[:, 0]
    force = np.zeros((3, 5))
    for i in range(5):
        for j in range(5):
            if i != j:
                r = loc[:, i] - loc[:, j]
                force[:, i] += q[i] * q[j] * r / np.linalg.norm(r) ** 3
    force[2] += q * field
    return force


def total_energy(loc, vel, charges, field):
    """E = sum_i |v_i|^2 / 2 + sum_{i<j} q_i q_j / r_ij - sum_i q_i E z_i for one frame.

    The recorded velocity lags half a step behind the position (leapfrog), so it is first
    synchronised: v(t) = v(t - dt/2) + dt/2 F(x(t)).
    """
    q = charges[:, 0]
    vel = vel + 0.5 * 0.001 * coulomb_force(loc, charges, field)
    kinetic = 0.5 * (vel**2).sum()
    potential = sum(
        q[i] * q[j] / np.linalg.norm(loc[:, i] - loc[:, j]) for i in range(5) for j in range(i)
    )
    return kinetic + potential - field * (q * loc[2]).sum()


def spread_out_state(charges):
    """Particles on well-separated sites (pairwise distances >= 2) with speed 0.5."""
    rng = np.random.RandomState(7)
    sites = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [-2.2, -1.6, 1.4]]).T
    loc = sites + 0.1 * rng.randn(3, 5)
    vel = rng.randn(3, 5)
    vel = 0.5 * vel / np.linalg.norm(vel, axis=0)
    return charges, loc, vel


def rotation(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    raise ValueError(axis)


def random_rotation(seed):
    q, r = np.linalg.qr(np.random.RandomState(seed).randn(3, 3))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_vectorised_matches_reference_loop():
    charges, loc0, vel0 = draw_batch(nbody.DEFAULT_SEED, 3)
    loc, vel = nbody.simulate(charges, loc0, vel0, chunk_size=2)
    assert loc.shape == vel.shape == (3, 49, 3, 5)
    for n in (0, 2):  # one trajectory from each chunk
        ref_loc, ref_vel = reference_trajectory(charges[n], loc0[n], vel0[n])
        np.testing.assert_allclose(loc[n], ref_loc, rtol=0, atol=1e-10)
        np.testing.assert_allclose(vel[n], ref_vel, rtol=0, atol=1e-10)


def test_vectorised_matches_reference_with_field_and_box_reflection():
    charges, loc0, vel0 = draw_batch(5, 2)
    loc0[0, 0, 1] = 6.5  # reflected to 3.5 with a negative x velocity
    loc0[1, 2, 3] = -7.0  # reflected to -3.0 with a positive z velocity
    loc, vel = nbody.simulate(charges, loc0, vel0, field=0.7, num_steps=1500)
    assert loc.shape == (2, 14, 3, 5)
    for n in range(2):
        ref_loc, ref_vel = reference_trajectory(charges[n], loc0[n], vel0[n], 0.7, 1500)
        np.testing.assert_allclose(loc[n], ref_loc, rtol=0, atol=1e-10)
        np.testing.assert_allclose(vel[n], ref_vel, rtol=0, atol=1e-10)


def test_initial_conditions_charges_and_speed():
    rng = np.random.RandomState(nbody.DEFAULT_SEED)
    charges, loc0, vel0 = nbody.draw_initial_conditions(rng, 50)
    assert set(np.unique(charges)) == {-1.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(vel0, axis=1), 0.5, rtol=1e-14)
    ref = draw_batch(nbody.DEFAULT_SEED, 50)
    for got, want in zip((charges, loc0, vel0), ref):
        np.testing.assert_array_equal(got, want)
    # A single recorded step from a force-free state moves by exactly v * dt per step.
    neutral = np.zeros_like(charges)
    loc, vel = nbody.simulate(neutral, loc0, vel0, num_steps=2, sample_every=1)
    assert loc.shape == (50, 1, 3, 5)
    np.testing.assert_allclose(np.linalg.norm(vel[:, 0], axis=1), 0.5, rtol=1e-14)


@pytest.fixture(scope="module")
def small_set():
    """generate() with tiny splits (the stream is still advanced past 10000 + 2000)."""
    return nbody.generate(num_train=2, num_valid=1, num_test=2)


def test_generate_shapes_and_rng_order(small_set):
    data = small_set
    assert data["train"]["loc"].shape == (2, 49, 3, 5)
    assert data["train"]["vel"].shape == (2, 49, 3, 5)
    assert data["valid"]["edges"].shape == (1, 5, 5)
    assert data["test"]["charges"].shape == (2, 5, 1)
    for split in nbody.SPLITS:
        q = data[split]["charges"]
        np.testing.assert_array_equal(data[split]["edges"], q * q.transpose(0, 2, 1))
        assert set(np.unique(q)) <= {-1.0, 1.0}

    rng = np.random.RandomState(43)
    train_draws = [reference_draw(rng) for _ in range(2)]
    for _ in range(10000 - 2):
        reference_draw(rng)
    valid_first = reference_draw(rng)  # trajectory 10001 of the stream
    for _ in range(2000 - 1):
        reference_draw(rng)
    test_draws = [reference_draw(rng) for _ in range(2)]  # trajectories 12001, 12002

    # The community valid trajectory, by the literal per-trajectory loop.
    np.testing.assert_array_equal(data["valid"]["charges"][0], valid_first[0])
    ref_loc, ref_vel = reference_trajectory(*valid_first)
    np.testing.assert_allclose(data["valid"]["loc"][0], ref_loc, rtol=0, atol=1e-10)
    np.testing.assert_allclose(data["valid"]["vel"][0], ref_vel, rtol=0, atol=1e-10)
    # The others: same draws, simulated by the (separately tested) vectorised integrator.
    for split, draws in (("train", train_draws), ("test", test_draws)):
        charges, loc0, vel0 = (np.stack(parts) for parts in zip(*draws))
        np.testing.assert_array_equal(data[split]["charges"], charges)
        loc, vel = nbody.simulate(charges, loc0, vel0)
        np.testing.assert_array_equal(data[split]["loc"], loc)
        np.testing.assert_array_equal(data[split]["vel"], vel)


@pytest.mark.parametrize("field", [0.0, 0.8])
def test_energy_conserved_without_clipping(field):
    charges = np.array([[1.0], [-1.0], [1.0], [1.0], [-1.0]])
    state = spread_out_state(charges)
    loc, vel = nbody.simulate(*(x[None] for x in state), field=field, num_steps=2000)
    energy = np.array([total_energy(x, v, charges, field) for x, v in zip(loc[0], vel[0])])
    # No clipping event: every force component on the recorded frames is far below 100.
    assert max(np.abs(coulomb_force(x, charges, field)).max() for x in loc[0]) < 5.0
    assert np.ptp(energy) < 1e-6
    # Velocities really change (forces act), so the check is not vacuous.
    assert np.abs(vel[0, -1] - vel[0, 0]).max() > 1e-2


def test_field_breaks_rotation_symmetry_to_rotations_about_z():
    charges = np.array([[1.0], [-1.0], [1.0], [1.0], [-1.0]])
    _, loc0, vel0 = spread_out_state(charges)

    def run(rot, field):
        loc, vel = nbody.simulate(
            charges[None], (rot @ loc0)[None], (rot @ vel0)[None], field=field, num_steps=1500
        )
        return loc[0], vel[0]

    base_loc, base_vel = run(np.eye(3), 1.5)
    rz = rotation("z", 0.9)
    rot_loc, rot_vel = run(rz, 1.5)
    np.testing.assert_allclose(rot_loc, rz @ base_loc, atol=1e-9)
    np.testing.assert_allclose(rot_vel, rz @ base_vel, atol=1e-9)

    rx = rotation("x", 0.9)
    rot_loc, _ = run(rx, 1.5)
    assert np.abs(rot_loc - rx @ base_loc).max() > 1e-2

    free_loc, free_vel = run(np.eye(3), 0.0)
    rq = random_rotation(3)
    rot_loc, rot_vel = run(rq, 0.0)
    np.testing.assert_allclose(rot_loc, rq @ free_loc, atol=1e-9)
    np.testing.assert_allclose(rot_vel, rq @ free_vel, atol=1e-9)


def test_field_pushes_positive_charges_up():
    # Particles far apart in the plane z = 0: the field accelerates +q up and -q down.
    q = np.array([[[1.0], [-1.0], [1.0], [-1.0], [1.0]]])
    far = np.array([[[0.0, 4.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, -4.0], [0.0] * 5]])
    loc, vel = nbody.simulate(q, far, np.zeros_like(far), field=2.0, num_steps=200)
    assert np.all(np.sign(vel[0, 0, 2]) == q[0, :, 0])


def test_load_task_caches_frames(tmp_path, monkeypatch, small_set):
    calls = []
    small = small_set

    def fake_generate(seed, field):
        calls.append((seed, field))
        return small

    monkeypatch.setattr(nbody, "generate", fake_generate)
    monkeypatch.setattr(nbody, "STANDARD_SPLIT_SIZES", {"train": 2, "valid": 1, "test": 2})
    task = nbody.load_task("valid", cache_dir=tmp_path, seed=43)
    assert calls == [(43, 0.0)]
    assert task["loc"].dtype == np.float32
    assert task["loc"].shape == task["vel"].shape == task["target"].shape == (1, 5, 3)
    assert task["charges"].shape == (1, 5, 1)
    for key, source, frame in (("loc", "loc", 30), ("vel", "vel", 30), ("target", "loc", 40)):
        expected = small["valid"][source][:, frame].transpose(0, 2, 1)
        np.testing.assert_allclose(task[key], expected, rtol=1e-6)
    again = nbody.load_task("test", num=1, cache_dir=tmp_path, seed=43)
    assert calls == [(43, 0.0)]  # loaded from the cache, not regenerated
    assert again["loc"].shape == (1, 5, 3)
    np.testing.assert_allclose(again["target"][0], small["test"]["loc"][0, 40].T, rtol=1e-6)
    with pytest.raises(ValueError, match="split"):
        nbody.load_task("validation", cache_dir=tmp_path, seed=43)
    with pytest.raises(ValueError, match="exceeds"):
        nbody.load_task("test", num=3, cache_dir=tmp_path, seed=43)


def test_bad_inputs_raise():
    charges, loc0, vel0 = draw_batch(1, 2)
    with pytest.raises(ValueError, match="loc0"):
        nbody.simulate(charges, loc0[:, :2], vel0)
    with pytest.raises(ValueError, match="charges"):
        nbody.simulate(charges[..., 0], loc0, vel0)
    with pytest.raises(ValueError, match="multiple"):
        nbody.simulate(charges, loc0, vel0, num_steps=150)
    far = loc0.copy()
    far[0, 0, 0] = 20.0
    with pytest.raises(ValueError, match="inside"):
        nbody.simulate(charges, far, vel0)
    with pytest.raises(ValueError, match="field"):
        nbody.generate(1, 1, 1, field=float("nan"))
    with pytest.raises(ValueError, match="num_train"):
        nbody.generate(num_train=-1)


def test_cli_writes_community_layout(tmp_path, monkeypatch, small_set):
    calls = []

    def fake_generate(*args):
        calls.append(args)
        return small_set

    monkeypatch.setattr(nbody, "generate", fake_generate)
    nbody.main(["--out", str(tmp_path), "--num-train", "2", "--num-valid", "1", "--num-test", "2",
                "--field", "0.5"])
    assert calls == [(2, 1, 2, 43, 0.5)]
    suffix = "charged5_initvel1small_field0.5"
    for split in nbody.SPLITS:
        for key in ("loc", "vel", "edges", "charges"):
            saved = np.load(tmp_path / f"{key}_{split}_{suffix}.npy")
            np.testing.assert_array_equal(saved, small_set[split][key])
    assert np.load(tmp_path / f"loc_train_{suffix}.npy").shape == (2, 49, 3, 5)
    assert nbody.dataset_suffix(0.0) == "charged5_initvel1small"


def test_coincident_particles_raise():
    charges = np.ones((1, 5, 1))
    loc0 = np.zeros((1, 3, 5))
    loc0[0, 0] = [0.0, 0.0, 1.0, 2.0, 3.0]  # particles 0 and 1 coincide
    with pytest.raises(ValueError, match="coincident"):
        nbody.simulate(charges, loc0, np.zeros_like(loc0), num_steps=200)


def test_reflection_into_the_box_by_hand():
    # x > 5 -> 10 − x with the velocity made negative; x < −5 -> −10 − x with it made positive;
    # inside, nothing changes (the velocities below point the "wrong" way before reflection)
    loc = np.zeros((3, 5))
    vel = np.full((3, 5), 0.1)
    loc[0, 0], vel[0, 0] = 6.5, 0.3
    loc[1, 1], vel[1, 1] = -7.0, -0.2
    loc[2, 2], vel[2, 2] = 4.0, 0.4
    new_loc, new_vel = nbody.reflect_into_box(loc, vel)
    assert new_loc[0, 0] == pytest.approx(3.5) and new_vel[0, 0] == pytest.approx(-0.3)
    assert new_loc[1, 1] == pytest.approx(-3.0) and new_vel[1, 1] == pytest.approx(0.2)
    assert new_loc[2, 2] == 4.0 and new_vel[2, 2] == 0.4
    untouched = np.ones((3, 5), bool)
    untouched[0, 0] = untouched[1, 1] = False
    np.testing.assert_array_equal(new_vel[untouched], vel[untouched])


def test_the_field_force_is_clipped_with_the_pair_forces():
    # particles ~1000 apart (pair forces ~1e-6) in a field force q·150 along z: F_z = clip(±150) = ±100
    loc = np.zeros((1, 3, 5))
    loc[0, 0] = 1000.0 * np.arange(5)
    charges = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    edges = np.outer(charges, charges)[None]
    force = nbody._forces(np.ascontiguousarray(loc), edges, 150.0 * charges[None])
    np.testing.assert_allclose(force[0, 2], np.sign(charges) * nbody.MAX_FORCE)
    assert nbody.MAX_FORCE == 100.0
    assert np.all(np.abs(force[0, :2]) < 1e-5)
