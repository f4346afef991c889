"""Group samplers/actions and the equivariance metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax import (
    c4_act,
    c4_regular_act,
    d4_act,
    equivariance_bound,
    equivariance_error,
    random_orthogonal,
    random_rotation,
    rotate_points,
    rotation_about_axis,
)


def test_random_rotations_are_uniform_rotations():
    r = np.asarray(random_rotation(jax.random.PRNGKey(0), (4000,)))
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    # Haar measure: E[R] = 0 and E[R_ij²] = 1/3.
    np.testing.assert_allclose(r.mean(0), 0.0, atol=0.04)
    np.testing.assert_allclose((r**2).mean(0), 1 / 3, atol=0.03)


def test_random_orthogonal_has_both_determinants():
    det = np.linalg.det(np.asarray(random_orthogonal(jax.random.PRNGKey(1), (200,))))
    np.testing.assert_allclose(np.abs(det), 1.0, atol=1e-5)
    assert 60 < np.sum(det < 0) < 140


def test_rotation_about_axis_fixes_the_axis():
    r = rotation_about_axis(jnp.array(0.7), axis=1)
    np.testing.assert_allclose(r @ jnp.array([0.0, 1.0, 0.0]), [0.0, 1.0, 0.0], atol=1e-6)
    # right-handed about every axis: a quarter turn takes e_{a+1} to e_{a+2} (x→y, y→z, z→x)
    eye = np.eye(3)
    for axis in range(3):
        turned = rotation_about_axis(jnp.array(np.pi / 2), axis) @ eye[(axis + 1) % 3]
        np.testing.assert_allclose(turned, eye[(axis + 2) % 3], atol=1e-6)
    with pytest.raises(ValueError):
        rotation_about_axis(jnp.array(0.1), axis=3)


def test_c4_actions_are_group_actions():
    img = jax.random.normal(jax.random.PRNGKey(0), (6, 6, 2))
    feat = jax.random.normal(jax.random.PRNGKey(1), (6, 6, 4, 3))
    for a in range(4):
        for b in range(4):
            np.testing.assert_array_equal(c4_act(c4_act(img, a), b), c4_act(img, a + b))
            np.testing.assert_array_equal(c4_regular_act(c4_regular_act(feat, a), b), c4_regular_act(feat, a + b))
    np.testing.assert_array_equal(c4_act(img, 4), img)
    # a flip composed with itself is the identity
    np.testing.assert_array_equal(d4_act(d4_act(img, 0, True), 0, True), img)
    # by hand, as displayed (rows top to bottom, columns left to right):
    square = jnp.array([[1.0, 2.0], [3.0, 4.0]])[..., None]
    np.testing.assert_array_equal(c4_act(square, 1)[..., 0], [[2.0, 4.0], [1.0, 3.0]])  # 90° counter-clockwise
    np.testing.assert_array_equal(d4_act(square, 0, True)[..., 0], [[2.0, 1.0], [4.0, 3.0]])  # mirror left-right
    np.testing.assert_array_equal(d4_act(square, 1, True)[..., 0], [[1.0, 3.0], [2.0, 4.0]])  # mirror, then rotate
    with pytest.raises(ValueError):
        c4_regular_act(jnp.ones((6, 6, 3, 2)), 1)


def test_equivariance_error_zero_for_equivariant_and_positive_otherwise():
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 3))
    rots = list(random_rotation(jax.random.PRNGKey(1), (4,)))
    act = lambda g, y: rotate_points(y, g)  # noqa: E731
    equivariant = lambda y: y * jnp.linalg.norm(y, axis=-1, keepdims=True)  # noqa: E731
    broken = lambda y: y + jnp.array([0.0, 0.0, 1.0])  # noqa: E731
    assert float(equivariance_error(equivariant, x, rots, act, act)) < 1e-5
    assert float(equivariance_error(broken, x, rots, act, act)) > 0.1
    with pytest.raises(ValueError):
        equivariance_error(equivariant, x, [], act, act)


def test_equivariance_bound_recursion_by_hand():
    # e1 = 0 + 0.5·(0 + 2·2) = 2; e2 = 1.5·2 + 0.1·(1.5·2 + 2·2) = 3.7
    assert equivariance_bound([0.5, 0.1], lipschitz=1.5, branch_bound=2.0) == pytest.approx(3.7)
    assert equivariance_bound([0.0, 0.0, 0.0], 2.0, 5.0) == 0.0


def test_equivariance_bound_is_attained_by_a_constant_branch():
    # f(y) = 0 + 1·b with ‖b‖ = 1: under ρ = −I the error is ‖b − ρ b‖ = 2 = the bound (M·0 + 2B)
    b = jnp.array([0.6, 0.0, 0.8])
    f = lambda y: jnp.broadcast_to(b, y.shape)  # noqa: E731
    act = lambda g, y: rotate_points(y, g)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 3))
    measured = float(equivariance_error(f, x, [-jnp.eye(3)], act, act))
    assert measured == pytest.approx(2.0, rel=1e-6)
    assert measured <= equivariance_bound([1.0], lipschitz=1.0, branch_bound=1.0) + 1e-6


def test_equivariance_bound_holds_for_a_random_two_layer_model():
    # layer i: y ↦ s_i y + γ_i B tanh(y A_i)/√3 (equivariant scaling plus a bounded branch)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    scales, gammas, branch_bound = [0.9, -0.8], [0.3, -0.2], 0.5
    mats = [0.5 * jax.random.normal(k, (3, 3)) for k in keys[:2]]
    lipschitz = max(max(abs(s) for s in scales),
                    max(branch_bound / np.sqrt(3) * float(jnp.linalg.norm(a, 2)) for a in mats))

    def f(y):
        for s, g, a in zip(scales, gammas, mats):
            y = s * y + g * branch_bound * jnp.tanh(y @ a) / np.sqrt(3)
        return y

    act = lambda g, y: rotate_points(y, g)  # noqa: E731
    x = 2.0 * jax.random.normal(keys[2], (64, 3))
    rots = list(random_orthogonal(keys[3], (16,)))
    worst = max(float(equivariance_error(f, x, [r], act, act)) for r in rots)
    assert 0.0 < worst <= equivariance_bound(gammas, lipschitz, branch_bound)


def test_equivariance_error_averages_over_nodes_and_group_elements_as_method_md_states():
    # f = |x| on two points on the x axis. Under g = −I: f(g·x) − g·f(x) = 2|x|, norms 2 and 4 (node
    # mean 3); under g = I the error is 0; mean over g: 1.5 (a max over nodes or elements gives 4).
    from ace_jax import relative_equivariance_error

    x = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    elements = [-jnp.eye(3), jnp.eye(3)]
    act = lambda g, y: rotate_points(y, g)  # noqa: E731
    assert float(equivariance_error(jnp.abs, x, elements, act, act)) == pytest.approx(1.5)
    assert float(equivariance_error(jnp.abs, x, elements[:1], act, act)) == pytest.approx(3.0)
    # relative: divided by the mean norm of f(x), (1 + 2) / 2
    assert float(relative_equivariance_error(jnp.abs, x, elements, act, act)) == pytest.approx(1.0)
