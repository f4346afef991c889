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
KWARGS = dict(hidden_irreps="2x0e+1x1o+1x2e", hidden_scalars=4, num_layers=1, lmax_attr=2)


@pytest.fixture(scope="module")
def setup():
    molecules = parse_csv(FIXTURE)
    model = SEGNNQM9(**KWARGS)

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


def test_low_rank_branches_break_invariance_and_sum_at_node_level(setup):
    """branch_rank=2: two rank-2 affine branches; the node-level message branch equals the
    per-edge sum, and γ ≠ 0 breaks rotation invariance (the projection is the plain SEGNN)."""
    molecules, batch_of, _, _ = setup
    kwargs = dict(hidden_irreps="2x0e+1x1o+1x2e", hidden_scalars=4, num_layers=1, lmax_attr=2, branch_rank=2)
    model, literal = SEGNNQM9(**kwargs), SEGNNQM9(**kwargs, message_branch_per_edge=True)
    batch = batch_of(molecules)
    variables = jax.jit(model.init)(jax.random.PRNGKey(3), batch)
    kernel = variables["params"]["layer_0"]["message_branch"]["down"]["kernel"]
    assert kernel.shape == (10, 2)  # 2x0e+1x1o+1x2e is 2 + 3 + 5 = 10 numbers wide
    assert len(ace_jax.named_leaves(variables["gamma"])) == 2
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(variables, batch), jax.jit(literal.apply)(variables, batch), rtol=1e-4, atol=1e-5)
    rotation = np.asarray(ace_jax.random_rotation(jax.random.PRNGKey(6)), np.float64)
    rotated = apply(variables, batch_of(moved(molecules, lambda x: x @ rotation.T)))
    full = apply(variables, batch)
    assert np.max(np.abs(full - rotated)) / np.max(np.abs(full)) > 1e-3
    with pytest.raises(ValueError, match="branch_rank"):
        SEGNNQM9(**kwargs, branch_hidden=(4,)).init(jax.random.PRNGKey(0), batch)


@pytest.mark.parametrize("project", [False, True])
def test_padding_does_not_leak(setup, project):
    molecules, batch_of, variables, apply = setup
    together = apply(variables, batch_of(molecules), project=project)
    for m in (3, 7):
        alone = apply(variables, batch_of(molecules, [m]), project=project)
        assert float(alone[0]) == pytest.approx(float(together[m]), rel=1e-4, abs=1e-5)


def test_fan_in_parameterization_rescales_each_weight_block_of_the_same_function():
    """"fan_in" (stored W ~ N(0, c²), used as is) and "normal" (W ~ N(0, 1), used as c·W): each
    weight block enters both layers linearly with one constant ratio c < 1, so the "fan_in" layer
    with weights c·W equals the "normal" layer with W, and its init draws W with std c."""
    import e3nn_jax as e3nn

    from models.segnn_qm9 import SteerableLayer

    k_x, k_a, k_w = jax.random.split(jax.random.PRNGKey(3), 3)
    x = e3nn.normal("12x0e+8x1o+6x2e", k_x, (7,))
    attr = e3nn.spherical_harmonics("0e+1o+2e", jax.random.normal(k_a, (7, 3)), normalize=True)
    layers = {name: SteerableLayer("8x0e+8x1o+6x2e", parameterization=name) for name in ("fan_in", "normal")}
    params = {name: layer.init(jax.random.PRNGKey(0), x, attr)["params"] for name, layer in layers.items()}
    flat = {name: dict(jax.tree_util.tree_flatten_with_path(p)[0]) for name, p in params.items()}
    assert flat["fan_in"].keys() == flat["normal"].keys()

    def apply(name, leaves):
        tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params[name]), list(leaves.values()))
        return layers[name].apply({"params": tree}, x, attr).array

    zeros = {path: jnp.zeros_like(leaf) for path, leaf in flat["normal"].items()}
    ratios = {}
    for index, path in enumerate(zeros):
        block = jax.random.normal(jax.random.fold_in(k_w, index), zeros[path].shape)
        y_fan_in = apply("fan_in", {**zeros, path: block})
        y_normal = apply("normal", {**zeros, path: block})
        c = float(jnp.vdot(y_normal, y_fan_in) / jnp.vdot(y_fan_in, y_fan_in))
        np.testing.assert_allclose(y_normal, c * y_fan_in, rtol=1e-5, atol=1e-6)
        ratios[path] = c
    weights = [path for path in ratios if "w[" in jax.tree_util.keystr(path)]
    assert weights and all(0 < ratios[path] < 1 for path in weights)
    for path in weights:  # init: the "fan_in" weights are drawn c times smaller
        std_fan_in, std_normal = float(jnp.std(flat["fan_in"][path])), float(jnp.std(flat["normal"][path]))
        assert std_fan_in == pytest.approx(ratios[path] * std_normal, rel=0.25)

    scaled = {path: ratios[path] * leaf for path, leaf in flat["normal"].items()}
    np.testing.assert_allclose(apply("fan_in", scaled), apply("normal", flat["normal"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="parameterization"):
        SteerableLayer("2x0e", parameterization="xavier").init(jax.random.PRNGKey(0), x, attr)


def without_branches(tree):
    """``tree`` without its ACE sub-trees (``*_branch`` parameters, ``*_breaking`` γ holders)."""
    if not isinstance(tree, dict):
        return tree
    return {k: without_branches(v) for k, v in tree.items() if "branch" not in k and "breaking" not in k}


def test_zero_gamma_equals_the_projection(setup):
    """γ = 0 with the branches evaluated gives the projection (the branches are not)."""
    molecules, batch_of, variables, apply = setup
    batch = batch_of(molecules)
    projection = np.asarray(apply(variables, batch, project=True))
    full_at_zero = np.asarray(apply(ace_jax.projected_variables(variables), batch, project=False))
    np.testing.assert_allclose(full_at_zero, projection, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(np.asarray(apply(variables, batch, project=False)) - projection)) > 1e-3  # γ = 1 differs


def test_projection_never_reads_branch_parameters_or_gamma(setup):
    """NaN in every branch parameter and every γ leaves the projection bit-identical (and
    finite), while the full model turns NaN: the projection does not evaluate the branches."""
    molecules, batch_of, variables, apply = setup
    params = ace_jax.named_leaves(variables["params"])
    poisoned_names = [name for name in params if "branch" in name]
    assert {name.split("/")[1] for name in poisoned_names} == {"message_branch", "update_branch"}
    poison = lambda tree: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)  # noqa: E731
    poisoned = {
        "params": {name: ({k: (poison(v) if "branch" in k else v) for k, v in sub.items()}
                          if name.startswith("layer_") else sub) for name, sub in variables["params"].items()},
        "gamma": poison(variables["gamma"]),
    }
    assert sum(bool(jnp.all(jnp.isnan(x))) for x in ace_jax.named_leaves(poisoned["params"]).values()) == len(
        poisoned_names)
    batch = batch_of(molecules)
    clean, dirty = np.asarray(apply(variables, batch, project=True)), np.asarray(apply(poisoned, batch, project=True))
    assert np.all(np.isfinite(dirty))
    np.testing.assert_array_equal(dirty, clean)
    assert not np.all(np.isfinite(np.asarray(apply(poisoned, batch, project=False))))


def test_vanilla_init_is_the_full_model_without_branches(setup):
    """``init(project=True)`` creates neither γ nor branch parameters; its tree is the full
    model's without the branches, and those parameters alone give the same projection."""
    molecules, batch_of, variables, apply = setup
    batch = batch_of(molecules)
    vanilla = jax.eval_shape(lambda: SEGNNQM9(**KWARGS).init(jax.random.PRNGKey(0), batch, project=True))
    assert set(vanilla) == {"params"}
    assert not any("branch" in name or "breaking" in name for name in ace_jax.named_leaves(vanilla))
    assert any("branch" in name for name in ace_jax.named_leaves(variables["params"]))
    restricted = without_branches(variables["params"])
    assert jax.tree.structure(restricted) == jax.tree.structure(vanilla["params"])
    assert jax.tree.map(jnp.shape, restricted) == jax.tree.map(jnp.shape, vanilla["params"])
    np.testing.assert_array_equal(apply({"params": restricted}, batch, project=True),
                                  apply(variables, batch, project=True))


def permuted_atoms(dataset, seed):
    """A copy of the molecule set with the real atoms of every molecule in a random order."""
    rng = np.random.default_rng(seed)
    out = {k: np.array(v, copy=True) for k, v in dataset.items()}
    for m, n in enumerate(dataset["num_atoms"]):
        order = rng.permutation(n)
        out["positions"][m, :n] = dataset["positions"][m, order]
        out["atomic_numbers"][m, :n] = dataset["atomic_numbers"][m, order]
    assert not np.array_equal(out["atomic_numbers"], dataset["atomic_numbers"])
    return out


@pytest.mark.parametrize("project", [True, False])
def test_invariant_to_atom_permutations(setup, project):
    """Sums over neighbours, per-node branches and mean pooling: both the projection and the
    full model are invariant to the order of the atoms."""
    molecules, batch_of, variables, apply = setup
    original = np.asarray(apply(variables, batch_of(molecules), project=project))
    permuted = np.asarray(apply(variables, batch_of(permuted_atoms(molecules, 4)), project=project))
    np.testing.assert_allclose(permuted, original, rtol=1e-4, atol=1e-5 * np.max(np.abs(original)))


def test_each_branch_alone_breaks_invariance(setup):
    """One γ at a time (γ_init, the others 0): the message branch and the update branch each
    break O(3) invariance by themselves; all γ = 0 restores it."""
    molecules, batch_of, variables, apply = setup
    rotation = np.asarray(ace_jax.random_rotation(jax.random.PRNGKey(8)), np.float64)
    g = lambda x: (x * np.array([1.0, -1.0, 1.0])) @ rotation.T  # noqa: E731
    base, other = batch_of(molecules), batch_of(moved(molecules, g))
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables["gamma"])[0]]
    assert len(paths) == 2

    def error(on):  # γ = γ_init at the leaf ``on``, 0 elsewhere
        gamma = jax.tree_util.tree_map_with_path(lambda path, x: x if path == on else jnp.zeros_like(x),
                                                 variables["gamma"])
        v = {**variables, "gamma": gamma}
        a, b = np.asarray(apply(v, base, project=False)), np.asarray(apply(v, other, project=False))
        return np.max(np.abs(a - b)) / np.max(np.abs(a))

    for path in paths:
        assert error(path) > 1e-3, jax.tree_util.keystr(path)
    assert error(None) <= 1e-4


def _methane_and_a_far_copy(molecules):
    """Molecule 0 (methane) and a 10-atom molecule of methane plus a copy 100 Å away along x."""
    out = {k: v.copy() for k, v in molecules.items()}
    n = int(molecules["num_atoms"][0])
    out["positions"][1, : 2 * n] = np.concatenate([molecules["positions"][0, :n],
                                                    molecules["positions"][0, :n] + np.float32([100.0, 0, 0])])
    out["atomic_numbers"][1] = 0
    out["atomic_numbers"][1, : 2 * n] = np.tile(molecules["atomic_numbers"][0, :n], 2)
    out["num_atoms"][1] = 2 * n
    return out


@pytest.mark.parametrize("project", [True, False])
def test_mean_pooling_two_disconnected_copies_give_the_molecules_prediction(setup, project):
    # with mean pooling over real atoms, two far-apart copies (no edge between them at 2 Å)
    # predict what one copy predicts; a sum would double the atom contributions
    molecules, batch_of, variables, apply = setup
    doubled = _methane_and_a_far_copy(molecules)
    out = np.asarray(apply(variables, batch_of(doubled, [0, 1]), project=project), np.float64)
    assert out[1] == pytest.approx(out[0], rel=1e-5, abs=1e-6)


def test_the_layer_update_is_residual(setup):
    # zeroing the only layer's update leaves h = the embedding: molecules still differ (h = u would not)
    molecules, batch_of, variables, apply = setup
    params = dict(variables["params"])
    params["layer_0"] = dict(params["layer_0"])
    params["layer_0"]["update_2"] = jax.tree.map(jnp.zeros_like, params["layer_0"]["update_2"])  # u = 0
    out = np.asarray(apply({**variables, "params": params}, batch_of(molecules), project=True))[:8]
    assert np.std(out) > 1e-3
