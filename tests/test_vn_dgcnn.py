"""Vector Neurons layers and VN-DGCNN: equivariance, invariance, graph, branch layout, projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax import GAMMA, AxisMixBranch, projected_variables, random_rotation, rotate_points
from models.vn_dgcnn import (
    VNDGCNN,
    VNLinear,
    VNLinearLeakyReLU,
    VNNorm,
    VectorBranch,
    edge_features,
    feature_knn,
    gather_edges,
    init_variables,
    knn_indices,
    point_edge_features,
    vn_leaky_relu,
)

NUM_POINTS, K = 24, 5


def _rotations(n, seed=0):
    return random_rotation(jax.random.PRNGKey(seed), (n,))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _strip_branches(tree):
    """Drop every ``*_breaking`` sub-tree (the ACE branches) from a params tree."""
    if not isinstance(tree, dict):
        return tree
    return {k: _strip_branches(v) for k, v in tree.items() if not k.endswith("_breaking")}


@pytest.fixture(scope="module")
def model_and_variables():
    model = VNDGCNN(num_classes=4, k=K, width=2, head_hidden=(8,))
    points = jax.random.normal(jax.random.PRNGKey(0), (NUM_POINTS, 3))
    variables = init_variables(model, jax.random.PRNGKey(1), NUM_POINTS)
    apply = jax.jit(model.apply, static_argnames="project")
    return model, variables, points, apply


# --------------------------------------------------------------------------- layers


def test_vn_leaky_relu_hand_values():
    q = jnp.array([[1.0, 0.0, 0.0]])
    # <q, k> = -1 < 0, ‖k‖² = 2: q − (−1/2) k = (0.5, 0.5, 0); out = 0.2 q + 0.8 (0.5, 0.5, 0).
    np.testing.assert_allclose(vn_leaky_relu(q, jnp.array([[-1.0, 1.0, 0.0]])), [[0.6, 0.4, 0.0]], atol=1e-5)
    # <q, k> >= 0: identity.
    np.testing.assert_allclose(vn_leaky_relu(q, jnp.array([[1.0, 5.0, 0.0]])), q, atol=1e-6)
    # negative slope 0: output is orthogonal to k when <q, k> < 0.
    k = jnp.array([[-2.0, 1.0, 3.0]])
    out = vn_leaky_relu(jnp.array([[1.0, 0.5, -1.0]]), k, negative_slope=0.0)
    assert abs(float(jnp.sum(out * k))) < 1e-5


@pytest.mark.parametrize(
    "layer",
    [VNLinear(5), VNNorm(), VNLinearLeakyReLU(5), VNLinearLeakyReLU(5, shared_direction=True)],
    ids=["linear", "norm", "leaky_relu", "leaky_relu_shared"],
)
def test_vn_layers_are_rotation_equivariant(layer):
    x = jax.random.normal(jax.random.PRNGKey(2), (7, 4, 3))  # (points, channels, xyz)
    kwargs = {"project": True} if isinstance(layer, VNLinearLeakyReLU) else {}
    variables = layer.init(jax.random.PRNGKey(3), x, **kwargs)
    if "norm" in variables["params"] or isinstance(layer, VNNorm):  # non-trivial norm affine
        variables = jax.tree.map(lambda p: p + 0.3, variables)
    rotations = _rotations(3)
    # One compiled call: row 0 is f(x), row r the output on the r-th rotated copy of x.
    inputs = jnp.concatenate([x[None], jax.vmap(lambda r: rotate_points(x, r))(rotations)])
    outputs = jax.jit(jax.vmap(lambda xi: layer.apply(variables, xi, **kwargs)))(inputs)
    for r, rotation in enumerate(rotations):
        np.testing.assert_allclose(outputs[r + 1], rotate_points(outputs[0], rotation), atol=1e-5)


def test_vn_norm_standardizes_signed_norms():
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(4), (50, 2, 3)) + 1.0
    norm = VNNorm()
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    # At init (scale 1, bias 0), y_c = x_c / ‖x_c‖ · n̂_c, so ⟨y, x/‖x‖⟩ = n̂ is standardised per channel.
    signed = jnp.sum(y * x, axis=-1) / jnp.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(signed.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(signed.std(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize("kind", ["axis", "dense", "in_kernel"])
def test_full_vn_block_breaks_equivariance(kind):
    layer = VNLinearLeakyReLU(4, spectral_branch=False, branch_kind=kind)
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 3, 3))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(6), x)
    apply = jax.jit(layer.apply)
    rotation = _rotations(1)[0]
    err = _rel(apply(variables, rotate_points(x, rotation)), rotate_points(apply(variables, x), rotation))
    assert err > 1e-2


def test_vn_linear_perturbation_is_a_per_axis_channel_mixing():
    """VNLinear(x, δ): V'_{c', i} = Σ_c (W + δ_i)_{c c'} V_{c, i}; γ = 0 (δ = 0) is VN-Linear."""
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 3))
    layer = VNLinear(2)
    variables = layer.init(jax.random.PRNGKey(4), x)
    w = np.asarray(variables["params"]["kernel"])
    delta = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, 4, 2)))
    xn = np.asarray(x)
    expected = np.stack([xn[..., i] @ (w + delta[i]) for i in range(3)], axis=-1)
    np.testing.assert_allclose(layer.apply(variables, x, jnp.asarray(delta)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.apply(variables, x, jnp.zeros((3, 4, 2))), layer.apply(variables, x), atol=1e-6)
    with pytest.raises(ValueError, match="perturbation must have shape"):
        layer.apply(variables, x, jnp.zeros((4, 2)))


def test_axis_mix_branch_matches_per_channel_matrices_and_is_bounded():
    """g(q)_c = q_c A_c with kernel[i, 3c + j] = A_c[i, j]; normalised A_c give ‖g(q)‖ ≤ ‖q‖."""
    q = jax.random.normal(jax.random.PRNGKey(1), (5, 4, 3))
    raw = AxisMixBranch(normalize=False)
    variables = raw.init(jax.random.PRNGKey(2), q)
    kernel = np.asarray(variables["params"]["kernel"])
    assert kernel.shape == (3, 12)
    expected = np.stack([np.asarray(q)[:, c] @ kernel[:, 3 * c : 3 * c + 3] for c in range(4)], axis=1)
    np.testing.assert_allclose(raw.apply(variables, q), expected, rtol=1e-5, atol=1e-6)
    bounded = AxisMixBranch(normalize=True).apply({"params": {"kernel": 10.0 * kernel}}, q)
    assert bool(jnp.all(jnp.linalg.norm(bounded, axis=-1) <= jnp.linalg.norm(q, axis=-1) * (1 + 1e-5)))
    with pytest.raises(ValueError, match="branch_kind"):
        VNLinearLeakyReLU(4, branch_kind="conv").init(jax.random.PRNGKey(0), q)


# --------------------------------------------------------------------------- graph


def _numpy_knn(features, k):
    distance = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    return np.argsort(distance, axis=1, kind="stable")[:, :k]


def test_knn_and_edge_features_match_brute_force():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(15, 3)).astype(np.float32)
    expected = _numpy_knn(points.astype(np.float64), 4)
    np.testing.assert_array_equal(np.asarray(knn_indices(jnp.asarray(points), 4)), expected)
    assert np.all(expected[:, 0] == np.arange(15))  # the point itself is its nearest neighbour

    edges = np.asarray(point_edge_features(jnp.asarray(points), 4))
    assert edges.shape == (15, 4, 3, 3)
    for i in range(15):
        for slot, j in enumerate(expected[i]):
            np.testing.assert_allclose(edges[i, slot, 0], points[j] - points[i], atol=1e-6)
            np.testing.assert_allclose(edges[i, slot, 1], points[i], atol=1e-6)
            np.testing.assert_allclose(edges[i, slot, 2], np.cross(points[j], points[i]), atol=1e-5)
    assert point_edge_features(jnp.asarray(points), 4, cross_product=False).shape == (15, 4, 2, 3)

    vectors = rng.normal(size=(15, 2, 3)).astype(np.float32)
    neighbours = _numpy_knn(vectors.reshape(15, 6).astype(np.float64), 4)
    feats = np.asarray(edge_features(jnp.asarray(vectors), 4))
    assert feats.shape == (15, 4, 4, 3)
    for i in range(15):
        for slot, j in enumerate(neighbours[i]):
            np.testing.assert_allclose(feats[i, slot, :2], vectors[j] - vectors[i], atol=1e-6)
            np.testing.assert_allclose(feats[i, slot, 2:], vectors[i], atol=1e-6)


def _edge_case(seed=0, points=12, channels=3, k=4):
    x = jax.random.normal(jax.random.PRNGKey(seed), (points, channels, 3))
    return x, feature_knn(x, k)


def test_vn_linear_on_neighbours_equals_vn_linear_on_the_edge_tensor():
    """Wᵀ[V_j − V_i; V_i] computed per point (``neighbours=``) equals the product on the formed
    edges, with the same (2C, F) kernel, with and without a per-axis perturbation."""
    x, neighbours = _edge_case()
    edges = gather_edges(x, neighbours)
    assert edges.shape == (12, 4, 6, 3)
    layer = VNLinear(5)
    variables = layer.init(jax.random.PRNGKey(1), edges)
    assert layer.init(jax.random.PRNGKey(1), x, None, neighbours)["params"]["kernel"].shape == (6, 5)
    fast = layer.apply(variables, x, None, neighbours)
    assert fast.shape == (12, 4, 5, 3)
    np.testing.assert_allclose(fast, layer.apply(variables, edges), rtol=1e-5, atol=1e-5)
    delta = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 5))
    np.testing.assert_allclose(layer.apply(variables, x, delta, neighbours), layer.apply(variables, edges, delta),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="neighbours"):
        layer.apply(variables, x, None, neighbours[:5])
    with pytest.raises(ValueError, match="integer"):
        layer.apply(variables, x, None, neighbours.astype(jnp.float32))


@pytest.mark.parametrize("kind", ["in_kernel", "axis", "dense"])
def test_vn_block_on_neighbours_equals_the_block_on_edges(kind):
    """The EdgeConv block with ``neighbours`` has the parameter tree of the block on formed edges
    and the same outputs, for the projection and the full model of every branch kind."""
    x, neighbours = _edge_case(seed=3)
    edges = gather_edges(x, neighbours)
    layer = VNLinearLeakyReLU(5, spectral_branch=False, branch_kind=kind)
    variables = layer.init(jax.random.PRNGKey(4), edges)
    fast_tree = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(4), x, False, neighbours))
    assert jax.tree.map(jnp.shape, fast_tree) == jax.tree.map(jnp.shape, variables)
    for project in (True, False):
        reference = layer.apply(variables, edges, project)
        fast = layer.apply(variables, x, project, neighbours)
        assert _rel(fast, reference) < 1e-5, (kind, project)
    # the γ-branch matters here (the check above is not vacuous)
    assert _rel(layer.apply(variables, x, False, neighbours), layer.apply(variables, x, True, neighbours)) > 1e-2


def test_knn_rejects_bad_k():
    with pytest.raises(ValueError, match="k must satisfy"):
        knn_indices(jnp.zeros((3, 3)), 4)


# --------------------------------------------------------------------------- branch layout


def test_vector_branch_layout():
    x = jax.random.normal(jax.random.PRNGKey(7), (6, 3, 3))  # 6 points, C = 3
    branch = VectorBranch(2, spectral=False)
    variables = branch.init(jax.random.PRNGKey(8), x)
    kernel = np.asarray(variables["params"]["mlp"]["Dense_0"]["kernel"])  # (9, 6)
    bias = np.asarray(variables["params"]["mlp"]["Dense_0"]["bias"])
    y = np.asarray(branch.apply(variables, x))
    assert y.shape == (6, 2, 3)

    # (a) the output of point n is the MLP of point n's (channel, xyz)-flattened numbers.
    xn = np.asarray(x)
    for n in range(6):
        np.testing.assert_allclose(y[n], (xn[n].reshape(9) @ kernel + bias).reshape(2, 3), atol=1e-5)

    # (b) perturbing point m changes no other point's output.
    y_perturbed = np.asarray(branch.apply(variables, x.at[2].add(1.0)))
    changed = np.abs(y_perturbed - y).max(axis=(1, 2)) > 1e-6
    np.testing.assert_array_equal(changed, np.arange(6) == 2)

    # (c) with kernel kron(W, I3) (and no bias) the branch IS the VN-Linear with weight W: the
    # reshape back to (C', 3) matches the flattening (a scrambled layout would not).
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (3, 2)))
    lifted = {"params": {"mlp": {"Dense_0": {"kernel": jnp.asarray(np.kron(w, np.eye(3))), "bias": jnp.zeros(6)}}}}
    vn_linear = VNLinear(2).apply({"params": {"kernel": jnp.asarray(w)}}, x)
    np.testing.assert_allclose(branch.apply(lifted, x), vn_linear, atol=1e-5)


# --------------------------------------------------------------------------- classifier


def test_projection_invariant_to_rotations_and_permutations(model_and_variables):
    _, variables, points, apply = model_and_variables
    logits = apply(variables, points, project=True)
    assert logits.shape == (4,)
    for rotation in _rotations(3, seed=11):
        assert _rel(apply(variables, rotate_points(points, rotation), project=True), logits) <= 1e-4
    perm = np.random.default_rng(3).permutation(NUM_POINTS)
    assert _rel(apply(variables, points[perm], project=True), logits) <= 1e-4


def test_max_mean_pooling_is_invariant_and_reflections_need_no_cross_product():
    points = jax.random.normal(jax.random.PRNGKey(5), (NUM_POINTS, 3))
    mirror = jnp.diag(jnp.array([1.0, 1.0, -1.0]))
    for cross in (True, False):
        model = VNDGCNN(num_classes=4, k=K, width=2, head_hidden=(8,), pooling="max_mean", cross_product=cross)
        variables = init_variables(model, jax.random.PRNGKey(2), NUM_POINTS)
        assert variables["params"]["head0"]["kernel"].shape[0] == 2 * 32 * 2 * 3  # max and mean: 2·32w·3
        apply = jax.jit(model.apply, static_argnames="project")
        logits = apply(variables, points, project=True)
        for rotation in _rotations(2, seed=13):
            assert _rel(apply(variables, rotate_points(points, rotation), project=True), logits) <= 1e-4
        perm = np.random.default_rng(5).permutation(NUM_POINTS)
        assert _rel(apply(variables, points[perm], project=True), logits) <= 1e-4
        # x_j × x_i is a pseudovector: with it the classifier is SO(3)- but not O(3)-invariant
        mirrored = _rel(apply(variables, rotate_points(points, mirror), project=True), logits)
        assert mirrored > 1e-2 if cross else mirrored <= 1e-4
    with pytest.raises(ValueError, match="pooling"):
        VNDGCNN(num_classes=4, k=K, width=2, pooling="max").init(jax.random.PRNGKey(0), points)


def test_full_model_breaks_rotation_invariance(model_and_variables):
    _, variables, points, apply = model_and_variables
    assert all(float(g) == 1.0 for g in jax.tree.leaves(variables[GAMMA]))
    assert len(jax.tree.leaves(variables[GAMMA])) == 15
    logits = apply(variables, points, project=False)
    rotated = apply(variables, rotate_points(points, _rotations(1, seed=12)[0]), project=False)
    assert _rel(rotated, logits) > 1e-2
    # Point permutations are still a symmetry of the full model (branches act per point).
    perm = np.random.default_rng(4).permutation(NUM_POINTS)
    assert _rel(apply(variables, points[perm], project=False), logits) <= 1e-4


def test_init_variables_matches_model_init_tree(model_and_variables):
    model, variables, points, _ = model_and_variables
    reference = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), points))
    assert jax.tree.structure(reference) == jax.tree.structure(variables)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(variables)))
    kernel = variables["params"]["conv5"]["feature"]["kernel"]  # (16, 32): std 1/sqrt(16)
    assert 0.15 < float(jnp.std(kernel)) < 0.35
    np.testing.assert_array_equal(variables["params"]["conv5"]["norm"]["scale"], 1.0)
    again = init_variables(model, jax.random.PRNGKey(1), NUM_POINTS)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)))
    other = init_variables(model, jax.random.PRNGKey(2), NUM_POINTS)
    assert not np.array_equal(other["params"]["conv1"]["feature"]["kernel"], kernel)
    vanilla = init_variables(model, jax.random.PRNGKey(1), NUM_POINTS, project=True)
    assert GAMMA not in vanilla


def test_projection_does_not_evaluate_branches(model_and_variables):
    model, variables, points, apply = model_and_variables
    stripped = {"params": _strip_branches(variables["params"])}
    vanilla = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), points, project=True))
    assert GAMMA not in vanilla
    assert jax.tree.structure(vanilla["params"]) == jax.tree.structure(stripped["params"])
    projection = apply(variables, points, project=True)
    # Without branch parameters and γ the projection still runs: the branches are never called.
    np.testing.assert_allclose(apply(stripped, points, project=True), projection, atol=1e-6)
    # γ = 0 on the full model gives the same numbers.
    np.testing.assert_allclose(apply(projected_variables(variables), points, project=False), projection, atol=1e-5)


def test_model_rejects_bad_inputs(model_and_variables):
    model, variables, points, _ = model_and_variables
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        model.apply(variables, points[None], project=True)
    with pytest.raises(ValueError, match="at least k"):
        model.apply(variables, points[: K - 1], project=True)


@pytest.mark.parametrize("kind", ["in_kernel", "axis", "dense"])
def test_each_branch_alone_breaks_rotation_invariance(model_and_variables, kind):
    """One γ at a time (γ_init = 1, the other 14 at 0): each of the 15 branches is wired to the
    logits and breaks rotation invariance by itself; all γ = 0 restores it."""
    model, variables, points, apply = model_and_variables
    if kind != model.branch_kind:
        model = VNDGCNN(num_classes=4, k=K, width=2, head_hidden=(8,), branch_kind=kind)
        variables = init_variables(model, jax.random.PRNGKey(1), NUM_POINTS)
        apply = jax.jit(model.apply, static_argnames="project")
    rotated = rotate_points(points, _rotations(1, seed=21)[0])
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(variables[GAMMA])[0]]
    assert len(paths) == 15

    def error(on):  # γ as initialised at the leaf ``on``, 0 elsewhere
        gamma = jax.tree_util.tree_map_with_path(lambda path, g: g if path == on else jnp.zeros_like(g),
                                                 variables[GAMMA])
        single = {**variables, GAMMA: gamma}
        return _rel(apply(single, rotated, project=False), apply(single, points, project=False))

    for path in paths:
        assert error(path) > 1e-2, jax.tree_util.keystr(path)
    assert error(None) <= 1e-4


def test_vn_norm_statistics_run_over_every_leading_axis():
    # (P, k, C, 3) = (2, 2, 1, 3) edge features along +x with norms [[1, 2], [3, 4]]: mean 2.5,
    # variance 1.25 over all four entries, so the new norms are (n − 2.5)/√1.25 (EPS negligible)
    norms = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    x = jnp.asarray(np.stack([norms, np.zeros_like(norms), np.zeros_like(norms)], -1)[:, :, None, :])
    norm = VNNorm()
    y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(np.asarray(y)[..., 0, 0], (norms - 2.5) / np.sqrt(1.25), rtol=1e-4, atol=1e-4)
