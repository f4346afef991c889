"""SEGNN for QM9: O(3) invariance of the projection, ACE breaking, padding, weight balancing.

One tiny model (1 layer, 2x0e+1x1o+1x2e, attributes l ≤ 2 to compile faster) and one padded shape, so that only
three programs are compiled (init, projection, full model).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from data.graphs import compute_neighbor_lists, make_batch
from data.qm9 import parse_csv
from models.segnn_qm9 import SEGNNQM9, element_one_hot, instance_norm_statistics, weight_balanced_irreps

FIXTURE = Path(__file__).parent / "fixtures" / "qm9_tiny.csv"
SLOTS, BUDGET = 11, (256, 1024)


@pytest.fixture(scope="module")
def setup():
    molecules = parse_csv(FIXTURE)
    model = SEGNNQM9(hidden_irreps="2x0e+1x1o+1x2e", hidden_scalars=4, num_layers=1, lmax_attr=2)

    def batch_of(dataset, ids=None):
        ids = np.arange(len(dataset["num_atoms"])) if ids is None else np.asarray(ids)
        return make_batch(dataset, compute_neighbor_lists(dataset, 2.0), ids, SLOTS, budget=BUDGET)

    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch_of(molecules))
    apply = jax.jit(model.apply, static_argnames="project")
    return molecules, batch_of, variables, apply


def moved(dataset, fn):
    out = dict(dataset)
    positions = dataset["positions"].astype(np.float64).copy()
    for m, n in enumerate(dataset["num_atoms"]):
        positions[m, :n] = fn(positions[m, :n])
    out["positions"] = positions.astype(np.float32)
    return out


def test_weight_balanced_irreps_hand_count():
    # l1, l2, l_out with l ≤ 2 hidden, l ≤ 3 attributes, parity (−1)^l: 3 + 5 + 5 = 13 paths
    assert str(weight_balanced_irreps(128, 2, 3)) == "36x0e+36x1o+36x2e"  # round(128 / √13) = 36
    assert str(weight_balanced_irreps(16, 0, 0)) == "16x0e"  # one path: the scalar layer itself


def test_element_one_hot():
    np.testing.assert_array_equal(
        element_one_hot(jnp.asarray([1, 6, 0, 9])), [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    )


def test_instance_norm_statistics_per_graph():
    import e3nn_jax as e3nn

    x = e3nn.IrrepsArray("1x0e+1x1o", jnp.asarray(
        [[1.0, 1, 0, 0], [3.0, 0, 2, 0], [5.0, 0, 0, 3], [100.0, 9, 9, 9]]
    ))
    node_graph, node_mask = jnp.asarray([0, 0, 1, 2]), jnp.asarray([True, True, True, False])
    y = instance_norm_statistics(x, node_graph, node_mask, 3, eps=0.0).array
    np.testing.assert_allclose(y[:2, 0], [-1.0, 1.0], rtol=1e-6)  # centred (mean 2), unit variance
    # vectors of graph 0: mean squared component = (1/3 + 4/3) / 2 = 5/6
    np.testing.assert_allclose(y[:2, 1:], np.array([[1.0, 0, 0], [0, 2, 0]]) / np.sqrt(5 / 6), rtol=1e-6)


def test_projection_o3_invariant_full_model_not(setup):
    molecules, batch_of, variables, apply = setup
    assert len(ace_jax.named_leaves(variables["gamma"])) == 2  # message + update branch
    rotation = np.asarray(ace_jax.random_rotation(jax.random.PRNGKey(5)), np.float64)
    reflect = np.diag([1.0, 1.0, -1.0])
    g = lambda x: (x @ reflect.T) @ rotation.T + np.array([2.0, -3.0, 0.5])  # noqa: E731
    base, other = batch_of(molecules), batch_of(moved(molecules, g))
    projection, projection_moved = apply(variables, base, project=True), apply(variables, other, project=True)
    scale = np.max(np.abs(projection))
    assert np.max(np.abs(projection - projection_moved)) / scale <= 1e-4
    full, full_moved = apply(variables, base, project=False), apply(variables, other, project=False)
    assert np.max(np.abs(full - full_moved)) / np.max(np.abs(full)) > 1e-3
    assert np.all(np.asarray(full)[8:] == 0.0) and np.all(np.asarray(projection)[8:] == 0.0)


def test_node_level_message_branch_equals_per_edge_branches(setup):
    """Σ_j γ g(m_ij) over real edges == γ deg_i g(m_i / deg_i) for the affine branch."""
    molecules, batch_of, variables, apply = setup
    literal = SEGNNQM9(hidden_irreps="2x0e+1x1o+1x2e", hidden_scalars=4, num_layers=1, lmax_attr=2,
                       message_branch_per_edge=True)
    batch = batch_of(molecules)
    gammas = jax.tree.map(lambda g: jnp.full_like(g, 0.8), variables["gamma"])
    v = {**variables, "gamma": gammas}
    expected = jax.jit(literal.apply)(v, batch)
    np.testing.assert_allclose(apply(v, batch, project=False), expected, rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(np.asarray(expected - apply(v, batch, project=True)))) > 1e-3  # branches matter


def test_padding_does_not_leak(setup):
    molecules, batch_of, variables, apply = setup
    together = apply(variables, batch_of(molecules), project=False)
    for m in (3, 7):
        alone = apply(variables, batch_of(molecules, [m]), project=False)
        assert float(alone[0]) == pytest.approx(float(together[m]), rel=1e-4, abs=1e-5)
