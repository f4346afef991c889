"""Homotopic layers: γ in its own collection, projection skips the branch, spectral norm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax import (
    GAMMA,
    Homotopic,
    LowRankBranch,
    MLPBranch,
    ScaledDense,
    SpectralDense,
    SymmetryBreaking,
    WeightBranch,
    branch_output_init,
    named_leaves,
    projected_variables,
    spectral_norm,
    spectral_normalize,
    summed_affine_branch,
)


class Odd(nn.Module):
    """Equivariant to the sign flip x → −x: a linear map without bias."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, use_bias=False)(x)


def _layer(gamma_init=1.0):
    return Homotopic(Odd(), MLPBranch(3, hidden=(8,)), gamma_init=gamma_init)


def test_gamma_lives_in_its_own_collection():
    v = _layer(0.7).init(jax.random.PRNGKey(0), jnp.ones(4))
    assert set(v) == {"params", GAMMA}
    assert named_leaves(v[GAMMA]) == {"breaking/gamma": pytest.approx(0.7)}
    assert "gamma" not in str(jax.tree_util.tree_structure(v["params"]))


def test_projection_builds_and_evaluates_no_branch():
    layer = _layer()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    v_proj = layer.init(jax.random.PRNGKey(0), x, project=True)
    assert GAMMA not in v_proj and set(v_proj["params"]) == {"equivariant"}
    v = layer.init(jax.random.PRNGKey(0), x)
    assert set(v["params"]) == {"equivariant", "branch"}
    # γ (gamma/breaking/gamma) and the branch weights (params/branch/...) all NaN
    poisoned = jax.tree_util.tree_map_with_path(
        lambda p, a: a if "equivariant" in jax.tree_util.keystr(p) else jnp.full_like(a, jnp.nan), v
    )
    out = layer.apply(poisoned, x, project=True)
    assert np.all(np.isfinite(out))
    assert not np.any(np.isfinite(layer.apply(poisoned, x)))  # the full model reads them
    np.testing.assert_allclose(out, layer.apply(v, x, project=True))
    # projected_variables (γ = 0) gives the same function as project=True
    np.testing.assert_allclose(layer.apply(projected_variables(v), x), out, atol=1e-6)


def test_projection_is_equivariant_and_gamma_breaks_it():
    layer = _layer()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    v = layer.init(jax.random.PRNGKey(0), x)
    proj = lambda z: layer.apply(v, z, project=True)  # noqa: E731
    full = lambda z: layer.apply(v, z)  # noqa: E731
    np.testing.assert_allclose(proj(-x), -proj(x), atol=1e-6)
    assert float(jnp.max(jnp.abs(full(-x) + full(x)))) > 1e-2


def test_shape_mismatch_is_a_clear_error():
    layer = Homotopic(Odd(), MLPBranch(2))
    with pytest.raises(ValueError, match="branch output .* does not match"):
        layer.init(jax.random.PRNGKey(0), jnp.ones(4))


def test_homotopic_adds_pytree_outputs_leaf_by_leaf():
    # scalar and vector features as a tuple: f = f_eq + γ g per leaf (a tuple "+" would concatenate)
    class Pair(nn.Module):
        scale: float

        @nn.compact
        def __call__(self, x):
            return (self.scale * x, jnp.stack([x, -x], axis=-1) * self.scale)

    layer = Homotopic(Pair(1.0), Pair(3.0), gamma_init=0.5)
    x = jnp.array([1.0, 2.0])
    out = layer.apply(layer.init(jax.random.PRNGKey(0), x), x)
    assert isinstance(out, tuple) and len(out) == 2
    np.testing.assert_allclose(out[0], 2.5 * x)  # 1·x + 0.5·3·x
    np.testing.assert_allclose(out[1], 2.5 * np.stack([x, -x], axis=-1))
    with pytest.raises(ValueError, match="same pytree structure"):
        Homotopic(Pair(1.0), MLPBranch(2)).init(jax.random.PRNGKey(0), x)


def test_symmetry_breaking_scales_pytree_outputs():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return {"a": x * 2.0, "b": x + 1.0}

    sb = SymmetryBreaking(Two(), gamma_init=0.5)
    v = sb.init(jax.random.PRNGKey(0), jnp.ones(2))
    out = sb.apply(v, jnp.ones(2))
    np.testing.assert_allclose(out["a"], [1.0, 1.0])
    np.testing.assert_allclose(out["b"], [1.0, 1.0])


def test_spectral_norm_matches_svd():
    w = jax.random.normal(jax.random.PRNGKey(3), (16, 9))
    sigma = np.linalg.svd(np.asarray(w), compute_uv=False)[0]
    np.testing.assert_allclose(spectral_norm(w, 50), sigma, rtol=1e-4)
    with pytest.raises(ValueError, match="2-D"):
        spectral_norm(jnp.ones((2, 2, 2)))


def _two_sided_power_iteration(kernel, steps):
    """The textbook iteration, u = W v/‖W v‖, v = Wᵀ u/‖Wᵀ u‖ from v₀ = 1/√out, σ = uᵀ W v."""
    w = np.asarray(kernel, np.float64)
    v = np.ones(w.shape[1]) / np.sqrt(w.shape[1])
    for _ in range(steps):
        u = w @ v
        u /= np.linalg.norm(u) + 1e-12
        v = w.T @ u
        v /= np.linalg.norm(v) + 1e-12
    u = w @ v
    u /= np.linalg.norm(u) + 1e-12
    return u @ w @ v, np.outer(u, v)  # σ and ∂σ/∂W (u, v held fixed)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (1, 4)])
def test_spectral_norm_gram_iterates_equal_two_sided_ones(shape):
    """The Gram-matrix form (one mat-vec per step, in the smaller space) reproduces the
    two-sided iteration after the same number of steps — not just its limit σ_max — and its
    gradient uvᵀ; few steps keep the estimate away from σ_max, so a wrong count would show."""
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.PRNGKey(shape[0]), shape, jnp.float64)
        for steps in (0, 1, 3):
            sigma, grad = _two_sided_power_iteration(w, steps)
            np.testing.assert_allclose(float(spectral_norm(w, steps)), sigma, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(jax.grad(spectral_norm)(w, steps)), grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="num_iterations"):
        spectral_norm(jnp.ones((3, 2)), -1)


def test_spectral_normalize_scales_every_block_to_unit_norm():
    stack = np.random.default_rng(4).standard_normal((2, 3, 6, 5)).astype(np.float32)
    out = np.asarray(spectral_normalize(jnp.asarray(stack), 50))
    for block, normalised in zip(stack.reshape(-1, 6, 5), out.reshape(-1, 6, 5)):
        sigma = np.linalg.svd(block, compute_uv=False)[0]
        np.testing.assert_allclose(normalised, block / sigma, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="fan_in, fan_out"):
        spectral_normalize(jnp.ones(3))


def test_spectral_normalize_bound_keeps_blocks_inside_the_bound():
    """W / max(1, σ): a block with σ < 1 is unchanged, one with σ > 1 is W / σ, with the
    same gradient as the plain normalisation there."""
    rng = np.random.default_rng(5)
    blocks = rng.standard_normal((2, 6, 5)).astype(np.float32)
    sigmas = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    blocks[0] *= 0.3 / sigmas[0]
    blocks[1] *= 4.0 / sigmas[1]
    out = np.asarray(spectral_normalize(jnp.asarray(blocks), 50, bound=True))
    np.testing.assert_allclose(out[0], blocks[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], blocks[1] / 4.0, rtol=1e-4, atol=1e-6)
    probe = jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))
    grads = [jax.grad(lambda w, b=b: jnp.sum(spectral_normalize(w, 50, bound=b) * probe))(jnp.asarray(blocks[1]))
             for b in (False, True)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_spectral_mlp_branch_keeps_a_small_output_init_and_stays_1_lipschitz():
    """A spectral branch with a small output init starts small (plain W / σ_max would rescale
    it to the same output as a LeCun init), and blowing its kernel up cannot push it past 1."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    key = jax.random.PRNGKey(1)

    def output_norm(scale):
        branch = MLPBranch(3, hidden=(8,), spectral=True, output_kernel_init=branch_output_init(scale))
        return float(jnp.linalg.norm(branch.apply(branch.init(key, x), x)))

    assert 0.0 < output_norm(0.01) < 0.2 * output_norm(1.0)  # kernels 0.1x apart; σ_max(LeCun 8x3) > 1
    linear = MLPBranch(3, spectral=True, output_kernel_init=branch_output_init(0.01))
    params = linear.init(key, x)["params"]
    blown_up = jax.tree.map(lambda w: 1e3 * w, params)
    sigma = np.linalg.svd(np.asarray(blown_up["SpectralDense_0"]["kernel"]), compute_uv=False)[0]
    assert sigma > 10.0
    gaps = jnp.linalg.norm(linear.apply({"params": blown_up}, x) - linear.apply({"params": blown_up}, x[::-1]), axis=-1)
    assert bool(jnp.all(gaps <= jnp.linalg.norm(x - x[::-1], axis=-1) * (1 + 1e-3) + 1e-6))


def test_spectral_dense_is_1_lipschitz():
    layer = SpectralDense(12, num_iterations=30)
    v = layer.init(jax.random.PRNGKey(0), jnp.ones(7))
    kernel = v["params"]["kernel"]
    normalised = kernel / spectral_norm(kernel, 30)
    assert np.linalg.svd(np.asarray(normalised), compute_uv=False)[0] == pytest.approx(1.0, rel=1e-3)
    x, y = jax.random.normal(jax.random.PRNGKey(1), (2, 7))
    gap = jnp.linalg.norm(layer.apply(v, x) - layer.apply(v, y))
    assert float(gap) <= float(jnp.linalg.norm(x - y)) * (1 + 1e-3)
    # the layer's output is x W / σ_max(W) + b, σ_max from the SVD (not e.g. a Frobenius norm)
    bias = jax.random.normal(jax.random.PRNGKey(2), (12,))
    v = {"params": {"kernel": kernel, "bias": bias}}
    sigma = np.linalg.svd(np.asarray(kernel), compute_uv=False)[0]
    np.testing.assert_allclose(layer.apply(v, x), x @ (kernel / sigma) + bias, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(layer.apply(v, x, 0.5), 0.5 * (x @ (kernel / sigma) + bias), rtol=1e-3, atol=1e-5)
    # bound=True leaves a kernel with σ_max < 1 as it is: x W + b
    small = {"params": {"kernel": 0.5 * kernel / sigma, "bias": bias}}
    bounded = SpectralDense(12, num_iterations=30, bound=True)
    np.testing.assert_allclose(bounded.apply(small, x), x @ (0.5 * kernel / sigma) + bias, rtol=1e-5, atol=1e-6)


def test_axis_mix_branch_layouts_agree_and_break_rotations():
    """(…, C, m) and (…, m, C) layouts give the same map; g(x Rᵀ) ≠ g(x) Rᵀ for a rotation R."""
    from ace_jax import AxisMixBranch, random_rotation, rotate_points

    x = jax.random.normal(jax.random.PRNGKey(0), (7, 5, 3))  # (points, C, 3)
    last = AxisMixBranch(component_axis=-1)
    variables = last.init(jax.random.PRNGKey(1), x)
    y = last.apply(variables, x)
    y_t = AxisMixBranch(component_axis=-2).apply(variables, jnp.swapaxes(x, -1, -2))
    np.testing.assert_allclose(jnp.swapaxes(y_t, -1, -2), y, rtol=1e-5, atol=1e-6)
    r = random_rotation(jax.random.PRNGKey(2))
    gap = jnp.linalg.norm(last.apply(variables, rotate_points(x, r)) - rotate_points(y, r))
    assert float(gap) > 1e-2 * float(jnp.linalg.norm(y))
    with pytest.raises(ValueError, match="component_axis"):
        AxisMixBranch(component_axis=0).init(jax.random.PRNGKey(0), x)


def test_weight_branch_blocks_are_spectrally_normalised_and_scaled_by_gamma():
    """SymmetryBreaking(WeightBranch) gives (γ·δW, γ·δb); every (fan_in, fan_out) block of δW
    has largest singular value 1, so x (W + γ δW) − x W = γ x δW is bounded by |γ|·‖x‖."""
    breaking = SymmetryBreaking(WeightBranch((3, 5, 4), use_bias=True), gamma_init=0.5)
    variables = breaking.init(jax.random.PRNGKey(0))
    assert variables[GAMMA]["gamma"] == 0.5
    assert variables["params"]["branch"]["kernel"].shape == (3, 5, 4)
    assert variables["params"]["branch"]["bias"].shape == (3, 4)
    delta, delta_bias = breaking.apply(variables)
    singular = [np.linalg.svd(np.asarray(delta[i]) / 0.5, compute_uv=False)[0] for i in range(3)]
    np.testing.assert_allclose(singular, 1.0, rtol=1e-3)
    np.testing.assert_array_equal(delta_bias, 0.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 5))
    assert bool(jnp.all(jnp.linalg.norm(x @ delta[1], axis=-1) <= 0.5 * jnp.linalg.norm(x, axis=-1) * (1 + 1e-3)))
    raw = WeightBranch((5, 4), spectral=False)
    raw_vars = raw.init(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(raw.apply(raw_vars), raw_vars["params"]["kernel"])
    with pytest.raises(ValueError, match="fan_in, fan_out"):
        WeightBranch((4,)).init(jax.random.PRNGKey(0))


def test_spectral_weight_branch_keeps_a_small_kernel_init_and_its_bound():
    """With an explicit kernel_init a spectral WeightBranch divides each block by max(1, σ_max):
    a block started at scale 0.01 keeps it (plain W / σ_max would rescale it to σ_max = 1), and
    the same parameters blown up ×1000 come out with σ_max = 1, as without an init."""
    small = WeightBranch((3, 6, 4), kernel_init=branch_output_init(0.01))
    params = small.init(jax.random.PRNGKey(0))
    kernel = np.asarray(params["params"]["kernel"])
    raw_sigma = np.linalg.svd(kernel, compute_uv=False)[:, 0]
    assert np.all(raw_sigma < 0.2)
    np.testing.assert_allclose(np.asarray(small.apply(params)), kernel, rtol=1e-6)
    blown_up = jax.tree.map(lambda w: 1e3 * w, params)
    sigma = np.linalg.svd(np.asarray(small.apply(blown_up)), compute_uv=False)[:, 0]
    np.testing.assert_allclose(sigma, 1.0, rtol=1e-3)
    default = WeightBranch((3, 6, 4))  # LeCun init: every block at σ_max = 1, as before
    sigma = np.linalg.svd(np.asarray(default.apply(default.init(jax.random.PRNGKey(0)))), compute_uv=False)[:, 0]
    np.testing.assert_allclose(sigma, 1.0, rtol=1e-3)
    folded = SymmetryBreaking(WeightBranch((6, 4), kernel_init=branch_output_init(0.01)), gamma_init=1.0)
    variables = folded.init(jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(folded.apply(variables)), np.asarray(variables["params"]["branch"]["kernel"]),
                               rtol=1e-6)


def test_summed_affine_branch_equals_the_per_edge_sum():
    """Σ_j g(m_j) = n·g(Σ m_j / n) for affine g, per node with its own count (0 → 0)."""
    dense = nn.Dense(3)
    messages = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 2))  # 4 nodes × up to 5 edges
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([5, 2, 0, 1])[:, None], jnp.float32)[..., None]
    params = dense.init(jax.random.PRNGKey(1), messages)
    g = lambda m: dense.apply(params, m)  # noqa: E731
    per_edge = jnp.sum(g(messages) * mask, axis=1)
    total, count = jnp.sum(messages * mask, axis=1), jnp.sum(mask, axis=1)
    np.testing.assert_allclose(summed_affine_branch(g, total, count), per_edge, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(summed_affine_branch(g, total, count)[2], 0.0)


@pytest.mark.parametrize(
    "branch",
    [MLPBranch(5), MLPBranch(5, hidden=(8,)), MLPBranch(5, hidden=(8,), spectral=True), LowRankBranch(5, 3),
     LowRankBranch(5, 2, spectral=True)],
    ids=["linear", "mlp", "spectral-mlp", "low-rank", "spectral-low-rank"],
)
def test_gamma_folded_into_the_last_layer_is_gamma_times_the_branch(branch):
    """SymmetryBreaking folds γ into the weights of these branches: the value is still γ·g(x)
    and ∂L/∂γ is still ⟨g(x), ∂L/∂y⟩ (hand-derived: L = Σ sin(γ g) gives Σ g cos(γ g))."""
    assert branch.folds_output_scale
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 4))
    sb = SymmetryBreaking(branch, gamma_init=0.7)
    v = sb.init(jax.random.PRNGKey(1), x)
    v = jax.tree_util.tree_map_with_path(  # non-zero biases, so that their scaling is checked too
        lambda path, leaf: jnp.full_like(leaf, 0.3) if "bias" in jax.tree_util.keystr(path) else leaf, v
    )
    g = branch.apply({"params": v["params"]["branch"]}, x)  # the branch alone, unscaled
    np.testing.assert_allclose(sb.apply(v, x), 0.7 * g, rtol=1e-5, atol=1e-6)
    d_gamma = jax.grad(lambda v: jnp.sum(jnp.sin(sb.apply(v, x))))(v)[GAMMA]["gamma"]
    np.testing.assert_allclose(d_gamma, jnp.sum(g * jnp.cos(0.7 * g)), rtol=1e-4)


def test_scaled_dense_is_nn_dense_with_a_scaled_output():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 6))
    ref = nn.Dense(4)
    v = ref.init(jax.random.PRNGKey(1), x)
    v = {"params": {**v["params"], "bias": jnp.arange(4.0)}}
    np.testing.assert_allclose(ScaledDense(4).apply(v, x), ref.apply(v, x), rtol=1e-6)
    np.testing.assert_allclose(ScaledDense(4).apply(v, x, -2.5), -2.5 * ref.apply(v, x), rtol=1e-5, atol=1e-6)
    assert jax.tree.map(jnp.shape, ScaledDense(4).init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, v)


def test_low_rank_branch_is_an_affine_map_of_bounded_rank():
    """g(x) = x U V + b with rank(U V) ≤ r; spectral factors make g − b 1-Lipschitz."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 9))
    branch = LowRankBranch(7, rank=2)
    variables = branch.init(jax.random.PRNGKey(1), x)
    p = variables["params"]
    assert p["down"]["kernel"].shape == (9, 2) and p["up"]["kernel"].shape == (2, 7)
    matrix = np.asarray(p["down"]["kernel"] @ p["up"]["kernel"])
    assert np.linalg.matrix_rank(matrix, tol=1e-6) == 2
    bias = jnp.full((7,), 0.3)
    variables = {"params": {**p, "up": {**p["up"], "bias": bias}}}
    np.testing.assert_allclose(branch.apply(variables, x), np.asarray(x) @ matrix + 0.3, rtol=1e-5, atol=1e-5)
    spectral = LowRankBranch(7, rank=3, spectral=True)
    sv = spectral.init(jax.random.PRNGKey(2), x)
    gaps = jnp.linalg.norm(spectral.apply(sv, x) - spectral.apply(sv, jnp.zeros_like(x)), axis=-1)
    assert bool(jnp.all(gaps <= jnp.linalg.norm(x, axis=-1) * (1 + 1e-3)))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankBranch(7, rank=0).init(jax.random.PRNGKey(0), x)


def test_mlp_branch_output_init_sets_only_the_last_kernel():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    default = MLPBranch(3, hidden=(8,))
    zero_out = MLPBranch(3, hidden=(8,), output_kernel_init=nn.initializers.zeros)
    key = jax.random.PRNGKey(1)
    p_default, p_zero = default.init(key, x)["params"], zero_out.init(key, x)["params"]
    # Same hidden layer (same key, same init); last kernel zero, so g(x) = bias = 0 at init.
    np.testing.assert_array_equal(p_default["Dense_0"]["kernel"], p_zero["Dense_0"]["kernel"])
    assert float(jnp.max(jnp.abs(p_default["Dense_1"]["kernel"]))) > 0.0
    np.testing.assert_array_equal(zero_out.apply({"params": p_zero}, x), jnp.zeros((6, 3)))
    # The branch can still learn: its last kernel gets a non-zero gradient.
    grad = jax.grad(lambda p: jnp.sum(zero_out.apply({"params": p}, x) * x[:, :3]))(p_zero)
    assert float(jnp.max(jnp.abs(grad["Dense_1"]["kernel"]))) > 0.0


def test_named_leaves_refuses_colliding_names():
    assert named_leaves({"a": {"b": 1.0}, "c": [2.0, 3.0]}) == {"a/b": 1.0, "c/0": 2.0, "c/1": 3.0}
    with pytest.raises(ValueError, match="both named 'a/b'"):
        named_leaves({"a/b": 1.0, "a": {"b": 2.0}})


def test_branch_output_init_refuses_non_finite_scales():
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="finite and >= 0"):
            branch_output_init(bad)


def test_parameters_and_gamma_are_float32_like_flax_layers_under_x64():
    # nn.Dense keeps float32 parameters when x64 is on; the branch layers and γ do the same
    # (before, branch kernels followed the x64 default and came out float64 beside float32 ones)
    with jax.enable_x64(True):
        assert jnp.ones(1).dtype == jnp.float64
        x = jnp.ones((2, 3))
        for branch in (MLPBranch(4, hidden=(3,)), MLPBranch(4, hidden=(3,), spectral=True)):
            v = Homotopic(nn.Dense(4), branch).init(jax.random.PRNGKey(0), x)
            assert {str(leaf.dtype) for leaf in named_leaves(v).values()} == {"float32"}
        assert WeightBranch((3, 2, 2), use_bias=True).init(jax.random.PRNGKey(0))["params"]["kernel"].dtype == jnp.float32
        assert SpectralDense(2).init(jax.random.PRNGKey(0), x)["params"]["kernel"].dtype == jnp.float32
        assert ScaledDense(2).init(jax.random.PRNGKey(0), x)["params"]["kernel"].dtype == jnp.float32
