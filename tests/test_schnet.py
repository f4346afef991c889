"""SchNet on padded graph batches: invariances, ACE symmetry breaking, padding, pooling."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from data.graphs import compute_neighbor_lists, make_batch
from data.qm9 import parse_csv
from models.schnet import (
    SchNet,
    centred_positions,
    cosine_cutoff,
    gaussian_expansion,
    pool_graphs,
    shifted_softplus,
)

FIXTURE = Path(__file__).parent / "fixtures" / "qm9_tiny.csv"
CUTOFF = 10.0
BATCH_SLOTS = 11  # graph slots of the shared padded shape: 8 molecules + 3 empty slots
BUDGET = (256, 8192)  # one (N_pad, E_pad) for every multi-molecule batch: one compiled shape


@pytest.fixture(scope="module")
def molecules():
    return parse_csv(FIXTURE)


def batch_of(dataset, ids=None, batch_size=BATCH_SLOTS, budget=BUDGET):
    ids = np.arange(len(dataset["num_atoms"])) if ids is None else np.asarray(ids)
    neighbor_lists = compute_neighbor_lists(dataset, CUTOFF)
    return make_batch(dataset, neighbor_lists, ids, batch_size, budget=budget)


def transformed(dataset, fn):
    """A copy of the molecule set with fn applied to the real atoms of every molecule."""
    out = dict(dataset)
    positions = dataset["positions"].copy()
    for m, n in enumerate(dataset["num_atoms"]):
        positions[m, :n] = fn(positions[m, :n].astype(np.float64))
    out["positions"] = positions.astype(np.float32)
    return out


def relative_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(a))


@pytest.fixture(scope="module")
def model_and_variables(molecules):
    # the paper's layer types (50 Gaussians, cutoff 10 Å, sum pooling); narrower and shallower for speed
    model = SchNet(features=16, filters=16, num_interactions=3, branch_hidden=(16,))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch_of(molecules))
    apply = jax.jit(model.apply, static_argnames="project")
    return model, variables, apply


def rotation_matrix(seed):
    return np.asarray(ace_jax.random_rotation(jax.random.PRNGKey(seed)), np.float64)


def test_building_blocks_hand_values():
    assert float(shifted_softplus(jnp.asarray(0.0))) == pytest.approx(0.0, abs=1e-7)
    assert float(shifted_softplus(jnp.asarray(2.0))) == pytest.approx(np.log1p(np.exp(2.0)) - np.log(2.0), rel=1e-6)
    d = jnp.asarray([0.0, 5.0, 10.0, 12.0])
    np.testing.assert_allclose(cosine_cutoff(d, 10.0), [1.0, 0.5, 0.0, 0.0], atol=1e-7)
    expansion = gaussian_expansion(jnp.asarray([0.0, 10.0 / 49]), 10.0, 50)
    assert expansion.shape == (2, 50)
    assert float(expansion[0, 0]) == pytest.approx(1.0)
    assert float(expansion[0, 1]) == pytest.approx(np.exp(-0.5), rel=1e-6)  # one spacing away
    assert float(expansion[1, 1]) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["rotation", "reflection", "translation"])
def test_projection_invariant_to_euclidean_group(molecules, model_and_variables, kind):
    _, variables, apply = model_and_variables
    if kind == "rotation":
        rotation = rotation_matrix(1)
        fn = lambda x: x @ rotation.T  # noqa: E731
    elif kind == "reflection":
        fn = lambda x: x * np.array([1.0, -1.0, 1.0]) @ rotation_matrix(2).T  # noqa: E731
    else:
        fn = lambda x: x + np.array([3.0, -7.5, 12.0])  # noqa: E731
    original = apply(variables, batch_of(molecules), project=True)
    moved = apply(variables, batch_of(transformed(molecules, fn)), project=True)
    assert relative_difference(original, moved) <= 1e-5


def test_projection_invariant_to_atom_permutations(molecules, model_and_variables):
    _, variables, apply = model_and_variables
    rng = np.random.default_rng(3)
    permuted = {k: v.copy() for k, v in molecules.items()}
    for m, n in enumerate(molecules["num_atoms"]):
        order = rng.permutation(n)
        permuted["positions"][m, :n] = molecules["positions"][m, order]
        permuted["atomic_numbers"][m, :n] = molecules["atomic_numbers"][m, order]
    assert not np.array_equal(permuted["atomic_numbers"], molecules["atomic_numbers"])
    for project in (True, False):  # the centred-coordinate branch is permutation invariant too
        original = apply(variables, batch_of(molecules), project=project)
        moved = apply(variables, batch_of(permuted), project=project)
        assert relative_difference(original, moved) <= 1e-5


def test_branches_break_rotations_but_not_translations(molecules, model_and_variables):
    _, variables, apply = model_and_variables
    assert len(ace_jax.named_leaves(variables["gamma"])) == 3  # one γ per interaction block
    rotation = rotation_matrix(4)
    full = apply(variables, batch_of(molecules), project=False)
    rotated = apply(variables, batch_of(transformed(molecules, lambda x: x @ rotation.T)), project=False)
    assert relative_difference(full, rotated) > 1e-2
    shifted = apply(variables, batch_of(transformed(molecules, lambda x: x + 5.0)), project=False)
    assert relative_difference(full, shifted) <= 1e-5
    # γ = 0 gives the projection, which differs from the full model at γ = 1
    projected = apply(ace_jax.projected_variables(variables), batch_of(molecules), project=False)
    projection = apply(variables, batch_of(molecules), project=True)
    np.testing.assert_allclose(projected, projection, rtol=1e-5, atol=1e-6)
    assert relative_difference(full, projection) > 1e-2


def test_vanilla_init_has_no_branches(molecules, model_and_variables):
    model, variables, _ = model_and_variables
    vanilla = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch_of(molecules), project=True))
    assert "gamma" not in vanilla
    assert not any("branch" in name for name in ace_jax.named_leaves(vanilla["params"]))
    assert any("branch" in name for name in ace_jax.named_leaves(variables["params"]))
    # the vanilla parameters are exactly the non-branch parameters of the ACE model
    shared = {k for k in ace_jax.named_leaves(variables["params"]) if "branch" not in k}
    assert set(ace_jax.named_leaves(vanilla["params"])) == shared


@pytest.mark.parametrize("project", [True, False])
def test_padded_batch_equals_unpadded_molecules(molecules, model_and_variables, project):
    _, variables, apply = model_and_variables
    count = len(molecules["num_atoms"])
    together = np.asarray(apply(variables, batch_of(molecules), project=project))  # 3 empty slots, padding
    assert together.shape == (BATCH_SLOTS + 1,)
    assert np.all(together[count:] == 0.0)  # empty slots and the padding graph
    alone = np.array([
        float(apply(variables, batch_of(molecules, [m], batch_size=1, budget=(32, 1024)), project=project)[0])
        for m in range(count)
    ])
    np.testing.assert_allclose(together[:count], alone, rtol=1e-5, atol=1e-5)


def test_gradients_finite_and_blind_to_padding(molecules, model_and_variables):
    model, variables, _ = model_and_variables
    batch = batch_of(molecules)
    mask = jnp.asarray(batch.graph_mask, jnp.float32)

    def loss(params, positions):
        prediction = model.apply({**variables, "params": params}, batch._replace(positions=positions))
        return jnp.sum(mask * prediction**2)

    grads, position_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], batch.positions)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert bool(jnp.all(jnp.isfinite(position_grads)))
    # the loss does not depend on the padding nodes' positions
    assert float(jnp.max(jnp.abs(position_grads[~batch.node_mask]))) == 0.0
    assert float(jnp.max(jnp.abs(position_grads[batch.node_mask]))) > 0.0


def test_pool_graphs_hand_values():
    values = jnp.asarray([1.0, 2.0, 3.0, 10.0, 100.0])
    node_graph = jnp.asarray([0, 0, 1, 1, 3])
    node_mask = jnp.asarray([True, True, True, False, False])  # node 3 is padding inside graph 1
    graph_mask = jnp.asarray([True, True, False, False])
    np.testing.assert_allclose(pool_graphs(values, node_graph, node_mask, graph_mask, "sum"), [3.0, 3.0, 0, 0])
    np.testing.assert_allclose(pool_graphs(values, node_graph, node_mask, graph_mask, "mean"), [1.5, 3.0, 0, 0])


def test_centred_positions_hand_values():
    positions = jnp.asarray([[0.0, 0, 0], [2.0, 0, 0], [5.0, 5, 5], [9.0, 9, 9]])
    node_graph = jnp.asarray([0, 0, 1, 2])
    node_mask = jnp.asarray([True, True, True, False])
    centred = centred_positions(positions, node_graph, node_mask, 3)
    np.testing.assert_allclose(centred, [[-1.0, 0, 0], [1.0, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_bad_inputs_raise(molecules):
    batch = batch_of(molecules)._asdict()
    del batch["edge_mask"]
    with pytest.raises(ValueError, match="edge_mask"):
        jax.eval_shape(lambda: SchNet(features=8, num_interactions=1).init(jax.random.PRNGKey(0), batch))
    with pytest.raises(ValueError, match="pooling"):
        jax.eval_shape(lambda: SchNet(features=8, num_interactions=1, pooling="max").init(
            jax.random.PRNGKey(0), batch_of(molecules)))


def test_branch_init_scale_zero_starts_at_the_projection(molecules):
    """With a zero last branch kernel the full model equals its projection at init (γ = 1 still),
    and the branch still gets gradient: it can grow where the data asks for it."""
    model = SchNet(features=16, filters=16, num_interactions=2, branch_hidden=(16,), branch_init_scale=0.0)
    batch = batch_of(molecules)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    assert all(float(g) == 1.0 for g in jax.tree_util.tree_leaves(variables["gamma"]))
    full = model.apply(variables, batch, project=False)
    np.testing.assert_array_equal(full, model.apply(variables, batch, project=True))

    def squared_output(params):
        return jnp.sum(model.apply({**variables, "params": params}, batch, project=False) ** 2)

    grads = ace_jax.named_leaves(jax.grad(squared_output)(variables["params"]))
    assert max(float(jnp.max(jnp.abs(g))) for name, g in grads.items() if "coordinate_branch" in name) > 0.0


def stretch_first_bond(positions, length=0.3):
    """Move the nearest neighbour of atom 0 ``length`` Å further away along their bond: a
    non-rigid deformation (one interatomic distance changes, the others barely)."""
    x = positions.copy()
    distance = np.linalg.norm(x - x[0], axis=1)
    distance[0] = np.inf
    j = int(np.argmin(distance))
    x[j] += length * (x[j] - x[0]) / distance[j]
    return x


def test_projection_depends_on_geometry(molecules, model_and_variables):
    """The invariance tests above would pass for a model that ignores positions: a stretched
    bond must change the projection of every molecule, far beyond the rigid-motion tolerance."""
    _, variables, apply = model_and_variables
    count = len(molecules["num_atoms"])
    original = np.asarray(apply(variables, batch_of(molecules), project=True))
    stretched = np.asarray(apply(variables, batch_of(transformed(molecules, stretch_first_bond)), project=True))
    scale = np.max(np.abs(original))
    assert relative_difference(original, stretched) > 1e-3  # 100x the 1e-5 of the invariance tests
    assert np.all(np.abs(stretched - original)[:count] > 1e-4 * scale)  # every molecule moved
    np.testing.assert_array_equal(stretched[count:], 0.0)


def test_position_gradient_of_projection_is_force_and_torque_free(molecules, model_and_variables):
    """An E(3)-invariant energy has per-molecule forces F_i = −∂E/∂x_i with Σ_i F_i = 0
    (translations) and Σ_i x_i × F_i = 0 (rotations); the F_i themselves are not 0 (the
    model sees the geometry). The full model keeps Σ F_i = 0 (its branches read centred
    coordinates) but its torque is not 0: the check can fail."""
    model, variables, _ = model_and_variables
    batch = batch_of(molecules)
    mask = jnp.asarray(batch.graph_mask, jnp.float32)

    @jax.jit
    def forces(positions):
        def energy(project):
            return lambda x: jnp.sum(mask * model.apply(variables, batch._replace(positions=x), project=project) ** 2)
        return jax.grad(energy(True))(positions), jax.grad(energy(False))(positions)

    positions = np.asarray(batch.positions, np.float64)
    node_graph, node_mask = np.asarray(batch.node_graph), np.asarray(batch.node_mask)
    projection, full = (np.asarray(g, np.float64) for g in forces(batch.positions))
    for grads, torque_free in ((projection, True), (full, False)):
        assert np.max(np.abs(grads)) > 1e-2
        assert np.all(grads[~node_mask] == 0.0)
        torques = []
        for m in range(len(molecules["num_atoms"])):
            atoms = node_mask & (node_graph == m)
            x, f = positions[atoms], grads[atoms]
            size = np.max(np.abs(f)) * np.max(np.abs(x - x.mean(axis=0)))
            assert np.max(np.abs(f)) > 1e-4 * np.max(np.abs(grads))  # the geometry matters for every molecule
            assert np.max(np.abs(f.sum(axis=0))) <= 1e-4 * np.max(np.abs(f))
            torques.append(np.max(np.abs(np.cross(x, f).sum(axis=0))) / size)
        if torque_free:
            assert max(torques) <= 1e-4, torques
        else:
            assert max(torques) > 1e-2, torques


def test_each_branch_alone_breaks_rotations(molecules, model_and_variables):
    """One γ at a time (the others 0): every interaction block's branch is wired to the
    output and breaks rotation invariance by itself; all γ = 0 restores it."""
    _, variables, apply = model_and_variables
    rotation = rotation_matrix(7)
    batch, rotated = batch_of(molecules), batch_of(transformed(molecules, lambda x: x @ rotation.T))
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables["gamma"])[0]]
    assert len(paths) == 3

    def only(on):  # γ = 1 at the leaf ``on``, 0 elsewhere
        return {**variables, "gamma": jax.tree_util.tree_map_with_path(
            lambda path, g: jnp.full_like(g, float(path == on)), variables["gamma"])}

    for path in paths:
        single = only(path)
        assert sum(float(g) for g in jax.tree.leaves(single["gamma"])) == 1.0
        error = relative_difference(apply(single, batch, project=False), apply(single, rotated, project=False))
        assert error > 1e-2, jax.tree_util.keystr(path)
    none = only(None)
    assert relative_difference(apply(none, batch, project=False), apply(none, rotated, project=False)) <= 1e-5


def _diatomics(pairs, distance):
    """A molecule set of two-atom molecules (atomic numbers ``pairs``) ``distance`` Å apart along x."""
    m = len(pairs)
    positions = np.zeros((m, 29, 3), np.float32)
    positions[:, 1, 0] = distance
    numbers = np.zeros((m, 29), np.int32)
    numbers[:, :2] = np.asarray(pairs, np.int32)
    return {"positions": positions, "atomic_numbers": numbers, "num_atoms": np.full(m, 2, np.int32),
            "targets": np.zeros((m, 12)), "index": np.arange(m), "target_names": np.array(["x"] * 12)}


def test_atoms_exchange_messages():
    # With message passing an atom's output depends on its neighbour's type, so the energy of
    # CH is not the mean of CC and HH at the same bond length (an atom-additive model gives 0).
    dataset = _diatomics([(6, 6), (1, 1), (6, 1)], 1.1)
    model = SchNet(features=16, filters=16, num_interactions=1)
    batch = make_batch(dataset, compute_neighbor_lists(dataset, CUTOFF), np.arange(3), 4, budget=(16, 16))
    variables = model.init(jax.random.PRNGKey(0), batch)
    y = np.asarray(model.apply(variables, batch, project=True), np.float64)
    assert abs(y[0] + y[1] - 2 * y[2]) > 1e-4 * max(1.0, np.max(np.abs(y[:3])))


def test_an_edge_beyond_the_cutoff_contributes_nothing():
    # two atoms 10.5 Å apart: a radius graph built at 11 Å holds the edge, one at 10 Å does not;
    # the cosine envelope (zero beyond the model's 10 Å cutoff) makes both predictions equal
    dataset = _diatomics([(6, 8)], 10.5)
    model = SchNet(features=16, filters=16, num_interactions=2, cutoff=CUTOFF)
    with_edge = make_batch(dataset, compute_neighbor_lists(dataset, 11.0), [0], 2, budget=(8, 8))
    without = make_batch(dataset, compute_neighbor_lists(dataset, CUTOFF), [0], 2, budget=(8, 8))
    assert int(np.sum(with_edge.edge_mask)) == 2 and int(np.sum(without.edge_mask)) == 0
    variables = model.init(jax.random.PRNGKey(0), with_edge)
    for project in (True, False):
        a = model.apply(variables, with_edge, project=project)
        b = model.apply(variables, without, project=project)
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-6, atol=1e-6)
