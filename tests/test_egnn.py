"""Tests of models/egnn.py: E(3) and permutation equivariance, symmetry breaking, projection."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax import gammas, named_leaves, projected_variables, random_orthogonal, random_rotation
from models.egnn import EGNN

MODEL = EGNN(hidden=16, num_layers=2)
APPLY = jax.jit(MODEL.apply, static_argnames=("project",))  # one compilation per `project`


def graph(seed: int = 0):
    """One plausible N-body input: positions ~ N(0, 1), speeds ~ 0.5, charges ±1."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    loc = jax.random.normal(k1, (5, 3))
    vel = 0.5 * jax.random.normal(k2, (5, 3))
    charges = jnp.where(jax.random.bernoulli(k3, 0.5, (5, 1)), 1.0, -1.0)
    return loc, vel, charges


@pytest.fixture(scope="module")
def variables():
    loc, vel, charges = graph()
    return jax.jit(MODEL.init)(jax.random.PRNGKey(1), loc, vel, charges)


def transformed_error(variables, project, rotation, shift):
    """max over nodes/components of |f(R x + t, R v, q) − (R f(x, v, q) + t)|."""
    loc, vel, charges = graph(3)
    expected = APPLY(variables, loc, vel, charges, project=project) @ rotation.T + shift
    got = APPLY(variables, loc @ rotation.T + shift, vel @ rotation.T, charges, project=project)
    return float(jnp.max(jnp.abs(got - expected)))


def test_projection_is_e3_equivariant(variables):
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    rotations = random_orthogonal(keys[0], (4,))
    rotations = rotations.at[0].set(-jnp.eye(3))  # make sure a reflection is included
    shifts = 3.0 * jax.random.normal(keys[1], (4, 3))
    for rotation, shift in zip(rotations, shifts):
        assert transformed_error(variables, True, rotation, shift) <= 1e-5


def test_full_model_breaks_rotations_but_keeps_translations(variables):
    rotation = random_rotation(jax.random.PRNGKey(11))
    assert transformed_error(variables, False, rotation, jnp.zeros(3)) > 1e-2
    # Branches see positions relative to the centroid: translations stay exact symmetries.
    assert transformed_error(variables, False, jnp.eye(3), jnp.array([2.0, -1.0, 0.5])) <= 1e-5


def test_each_branch_alone_breaks_rotations(variables):
    """Switch on one γ at a time: every branch type can break the symmetry by itself."""
    rotation = random_rotation(jax.random.PRNGKey(12))
    for name in named_leaves(gammas(variables)):
        layer, branch, _ = name.split("/")
        gamma = jax.tree.map(jnp.zeros_like, variables["gamma"])
        gamma[layer][branch]["gamma"] = jnp.asarray(1.0)
        single = {"params": variables["params"], "gamma": gamma}
        assert transformed_error(single, False, rotation, jnp.zeros(3)) > 1e-3, name


def test_zero_gamma_equals_projection(variables):
    loc, vel, charges = graph(4)
    full_at_zero = APPLY(projected_variables(variables), loc, vel, charges)
    projection = APPLY(variables, loc, vel, charges, project=True)
    np.testing.assert_allclose(full_at_zero, projection, atol=1e-6)


def test_permutation_equivariant(variables):
    loc, vel, charges = graph(5)
    perm = np.array([3, 0, 4, 1, 2])
    for project in (True, False):
        out = APPLY(variables, loc, vel, charges, project=project)
        out_perm = APPLY(variables, loc[perm], vel[perm], charges[perm], project=project)
        np.testing.assert_allclose(out_perm, out[perm], atol=1e-5)


def test_projection_does_not_evaluate_branches(variables):
    """Projection works with the branch parameters and γ removed; vanilla init has none."""
    loc, vel, charges = graph(6)
    params = {
        layer: {k: v for k, v in sub.items() if not k.endswith("_branch")} for layer, sub in variables["params"].items()
    }
    assert len(named_leaves(params)) < len(named_leaves(variables["params"]))
    stripped = MODEL.apply({"params": params}, loc, vel, charges, project=True)
    np.testing.assert_allclose(stripped, APPLY(variables, loc, vel, charges, project=True), atol=1e-6)
    vanilla = jax.eval_shape(partial(MODEL.init, project=True), jax.random.PRNGKey(1), loc, vel, charges)
    assert "gamma" not in vanilla
    assert not any("breaking" in name for name in named_leaves(vanilla["params"]))
    assert jax.tree.structure(vanilla["params"]) == jax.tree.structure(params)


def test_gammas_and_paper_size(variables):
    assert all(float(g) == 1.0 for g in jax.tree.leaves(variables["gamma"]))  # γ_init = 1
    loc, vel, charges = graph()
    shapes = jax.eval_shape(EGNN().init, jax.random.PRNGKey(0), loc, vel, charges)  # no compute
    names = sorted(named_leaves(gammas(shapes)))
    # 4 coordinate branches + 3 feature branches (the last layer has no feature update).
    assert names == sorted([f"layer_{l}/coord_breaking/gamma" for l in range(4)]
                           + [f"layer_{l}/feature_breaking/gamma" for l in range(3)])
    widths = {leaf.shape[-1] for leaf in jax.tree.leaves(shapes["params"]) if len(leaf.shape) == 2}
    assert 64 in widths and max(widths) == 64


def test_bad_shapes_raise():
    loc, vel, charges = graph()
    init = partial(jax.eval_shape, MODEL.init, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="loc"):
        init(loc[None], vel, charges)
    with pytest.raises(ValueError, match="vel"):
        init(loc, vel[:4], charges)
    with pytest.raises(ValueError, match="charges"):
        init(loc, vel, charges[:, 0])


@pytest.mark.parametrize("spectral", [False, True])
def test_branch_init_scale_shrinks_the_initial_branches(spectral):
    """Also with spectrally normalised branches (resilient ACE), whose last layers must not
    rescale the small kernel back up to σ_max = 1."""
    loc, vel, charges = graph(2)
    key = jax.random.PRNGKey(4)

    def branch_effect(scale):
        model = EGNN(hidden=16, num_layers=2, branch_init_scale=scale, spectral_branch=spectral)
        params = jax.jit(model.init)(key, loc, vel, charges)
        full, proj = (model.apply(params, loc, vel, charges, project=p) for p in (False, True))
        return float(jnp.max(jnp.abs(full - proj))), params

    zero, params = branch_effect(0.0)
    assert zero == 0.0  # g = 0 at init: the full model starts at its projection
    assert all(float(g) == 1.0 for g in jax.tree_util.tree_leaves(gammas(params)))  # γ still starts at 1
    small, lecun = branch_effect(1e-4)[0], branch_effect(1.0)[0]
    assert 0.0 < small < 0.05 * lecun  # std 1e-2 x LeCun's: the branch shift is ~100x smaller
    with pytest.raises(ValueError, match="branch_init_scale"):
        EGNN(hidden=16, num_layers=2, branch_init_scale=-1.0).init(key, loc, vel, charges)


def test_the_projection_sees_charges_only_through_the_products_q_i_q_j(variables):
    # the equivariant model's only charge input is the edge feature q_i q_j: flipping every charge
    # leaves it (and the prediction) unchanged, flipping one changes it
    loc, vel, charges = graph(5)
    out = APPLY(variables, loc, vel, charges, project=True)
    np.testing.assert_allclose(APPLY(variables, loc, vel, -charges, project=True), out, rtol=1e-6, atol=1e-6)
    one_flipped = charges.at[0].multiply(-1.0)
    assert float(jnp.max(jnp.abs(APPLY(variables, loc, vel, one_flipped, project=True) - out))) > 1e-4


def test_one_layer_against_a_loop_over_pairs_in_numpy():
    # the docstring's equations, written per pair with j ≠ i and C = 1/(N − 1)
    from models.egnn import EGNNLayer

    rng = np.random.default_rng(0)
    n, hidden = 5, 8
    h, x, v = (rng.normal(size=(n, d)).astype(np.float32) for d in (hidden, 3, 3))
    q = rng.choice([-1.0, 1.0], size=(n, 1)).astype(np.float32)
    edge_attr = rng.normal(size=(n, n, 2)).astype(np.float32)
    layer = EGNNLayer(hidden=hidden)
    variables = layer.init(jax.random.PRNGKey(2), h, x, v, q, edge_attr, project=True)
    h_new, x_new = layer.apply(variables, h, x, v, q, edge_attr, project=True)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])

    def dense(name, z):
        return z @ p[name]["kernel"] + (p[name]["bias"] if "bias" in p[name] else 0.0)

    silu = lambda z: z / (1.0 + np.exp(-z))  # noqa: E731
    x_ref, h_ref = np.array(x, np.float64), np.array(h, np.float64)
    for i in range(n):
        coord, agg = np.zeros(3), np.zeros(hidden)
        for j in range(n):
            if j == i:
                continue
            diff = x[i].astype(np.float64) - x[j]
            pair = np.concatenate([h[i], h[j], [diff @ diff], edge_attr[i, j]])
            m = silu(dense("edge_mlp_1", silu(dense("edge_mlp_0", pair))))
            coord += diff * dense("coord_mlp_1", silu(dense("coord_mlp_0", m)))
            agg += m
        x_ref[i] += coord / (n - 1) + dense("vel_mlp_1", silu(dense("vel_mlp_0", h[i].astype(np.float64)))) * v[i]
        h_ref[i] += dense("node_mlp_1", silu(dense("node_mlp_0", np.concatenate([h[i], agg]))))
    np.testing.assert_allclose(np.asarray(x_new), x_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h_new), h_ref, rtol=1e-5, atol=1e-5)
