"""Primal–dual iterations converge to hand-derived KKT points on small problems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ace_jax import Equality, Inequality, Resilient, dual_ascent, init_train_state, make_lagrangian, make_train_step, slack_descent


def _run(loss, formulation, steps=3000, lr=0.05, gamma0=1.0):
    variables = {"params": {"theta": jnp.array(0.0)}, "gamma": {"g": jnp.array(gamma0)}}
    lagr = make_lagrangian(lambda v, ex, rng: loss(v["params"]["theta"], v["gamma"]["g"]), formulation)
    primal, dual, slack = optax.sgd(lr), dual_ascent(lr, nonnegative=formulation.nonnegative_multipliers), slack_descent(lr)
    state = init_train_state(variables, primal, dual, slack, formulation, learn_gamma=True)
    step = jax.jit(make_train_step(lagr, primal, dual, slack, formulation, learn_gamma=True))
    batch = {"dummy": jnp.zeros((1,))}
    for _ in range(steps):
        state, _ = step(state, batch, jax.random.PRNGKey(0))
    return state


def test_equality_converges_to_kkt_point():
    # ℓ = ½(θ + γ − 2)² + ½(γ − 1)², γ = 0  ⇒  θ* = 2, and ∂ℓ/∂γ + λ = 0 ⇒ λ* = 1.
    state = _run(lambda t, g: 0.5 * (t + g - 2) ** 2 + 0.5 * (g - 1) ** 2, Equality())
    assert float(state.params["theta"]) == pytest.approx(2.0, abs=1e-3)
    assert float(state.gamma["g"]) == pytest.approx(0.0, abs=1e-3)
    assert float(state.multipliers["g"]) == pytest.approx(1.0, abs=1e-3)


def test_equality_multiplier_is_signed():
    # ℓ = ½(γ + 1)²: pushing γ up to 0 needs λ* = −1 (negative: no projection for equalities).
    state = _run(lambda t, g: 0.5 * t**2 + 0.5 * (g + 1) ** 2, Equality())
    assert float(state.multipliers["g"]) == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_resilient_converges_to_relaxed_kkt_point(alpha):
    # min ½(θ−3)² + ½(γ−1)² + α/2 u²  s.t. |γ| ≤ u:  γ* = u* = 1/(1+α), λ* = α u* = α/(1+α).
    state = _run(lambda t, g: 0.5 * (t - 3) ** 2 + 0.5 * (g - 1) ** 2, Resilient(alpha=alpha), steps=4000)
    u_star = 1.0 / (1.0 + alpha)
    assert float(state.params["theta"]) == pytest.approx(3.0, abs=1e-3)
    assert float(state.gamma["g"]) == pytest.approx(u_star, abs=2e-3)
    assert float(state.slacks["g"]) == pytest.approx(u_star, abs=2e-3)
    assert float(state.multipliers["g"]) == pytest.approx(alpha * u_star, abs=2e-3)
    assert float(state.multipliers["g"]) == pytest.approx(alpha * float(state.slacks["g"]), abs=1e-3)


def test_inequality_is_active_when_the_optimum_lies_outside_the_bound():
    # ℓ = ½θ² + ½(γ − 1)², |γ| ≤ 0.3: γ* = 0.3 on the bound, ∂ℓ/∂γ + λ sign(γ) = 0 ⇒ λ* = 0.7.
    state = _run(lambda t, g: 0.5 * t**2 + 0.5 * (g - 1) ** 2, Inequality(epsilon=0.3), steps=4000)
    assert float(state.gamma["g"]) == pytest.approx(0.3, abs=2e-3)
    assert float(state.multipliers["g"]) == pytest.approx(0.7, abs=2e-3)
    c = Inequality(epsilon=0.3).constraints({"g": jnp.array(-0.5)}, {})
    np.testing.assert_allclose(c["g"], 0.2)  # |γ| − ε


def test_inequality_is_inactive_when_unconstrained_optimum_is_feasible():
    # ℓ = ½(γ − 0.1)², |γ| ≤ 0.5: optimum γ* = 0.1 strictly inside, so λ* = 0.
    state = _run(lambda t, g: 0.5 * t**2 + 0.5 * (g - 0.1) ** 2, Inequality(epsilon=0.5), gamma0=0.0)
    assert float(state.gamma["g"]) == pytest.approx(0.1, abs=1e-3)
    assert float(state.multipliers["g"]) == pytest.approx(0.0, abs=1e-6)


def test_lagrangian_value_and_constraints():
    lagr = make_lagrangian(lambda v, ex, rng: ex["y"] * v["params"]["w"], Resilient(alpha=2.0))
    value, aux = lagr(
        {"w": jnp.array(2.0)}, {"g": jnp.array(-0.5)}, {"g": jnp.array(3.0)}, {"g": jnp.array(0.25)},
        {"y": jnp.array([1.0, 3.0])}, jax.random.PRNGKey(0),
    )
    # mean loss 4 + α/2 u² = 0.0625 + λ(|γ| − u) = 3·0.25
    np.testing.assert_allclose(aux.loss, 4.0)
    np.testing.assert_allclose(aux.constraints["g"], 0.25)
    np.testing.assert_allclose(value, 4.0 + 0.0625 + 0.75, rtol=1e-6)


def test_lagrangian_pairs_each_multiplier_with_its_own_constraint():
    lagr = make_lagrangian(lambda v, ex, rng: 0.0 * ex["y"], Equality())
    gamma = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
    args = ({}, gamma)
    rest = (None, {"y": jnp.zeros(2)}, jax.random.PRNGKey(0))
    value, _ = lagr(*args, {"b": jnp.array(5.0), "a": jnp.array(7.0)}, *rest)
    np.testing.assert_allclose(value, 7.0 * 1.0 + 5.0 * 2.0)  # λ_a γ_a + λ_b γ_b, by name
    for wrong in ({"b": jnp.array(5.0)}, [jnp.array(5.0), jnp.array(7.0)], None, {}):
        with pytest.raises(ValueError, match="same tree structure"):
            lagr(*args, wrong, *rest)


def test_example_weights_give_a_weighted_mean_and_ignore_padding():
    lagr = make_lagrangian(lambda v, ex, rng: ex["y"], None)
    key = jax.random.PRNGKey(0)
    y = jnp.array([1.0, 2.0, 3.0, jnp.nan])
    _, aux = lagr({}, None, None, None, {"y": y, "weight": jnp.array([1.0, 1.0, 2.0, 0.0])}, key)
    np.testing.assert_allclose(aux.loss, (1.0 + 2.0 + 6.0) / 4.0)  # the NaN has weight 0
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
        lagr({}, None, None, None, {"y": y, "weight": jnp.ones((4, 1))}, key)
    # a negative weight (fit refuses one; a jitted call cannot) counts as 0 in both sums
    _, aux = lagr({}, None, None, None, {"y": y, "weight": jnp.array([1.0, -1.0, 2.0, 0.0])}, key)
    np.testing.assert_allclose(aux.loss, (1.0 + 6.0) / 3.0)


def test_batch_may_be_any_pytree():
    # a tuple batch (x, y): every leaf is vmapped over its leading axis; no "weight" key to read
    lagr = make_lagrangian(lambda v, ex, rng: (v["params"]["w"] * ex[0] - ex[1]) ** 2, None)
    x = jnp.arange(5.0)
    value, aux = lagr({"w": jnp.asarray(1.0)}, None, None, None, (x, 2.0 * x), jax.random.PRNGKey(0))
    np.testing.assert_allclose(value, np.mean(np.arange(5.0) ** 2))


def _one_step(formulation, state_values, dual_lr, loss=lambda t, g: 0.0 * t):
    """One jitted step from γ₀, λ₀, u₀ set by hand (primal SGD 0.1, slack step 0.1)."""
    variables = {"params": {"theta": jnp.array(0.0)}, "gamma": {"g": jnp.array(1.0)}}
    lagr = make_lagrangian(lambda v, ex, rng: loss(v["params"]["theta"], v["gamma"]["g"]), formulation)
    primal = optax.sgd(0.1)
    dual, slack = dual_ascent(dual_lr, nonnegative=formulation.nonnegative_multipliers), slack_descent(0.1)
    state = init_train_state(variables, primal, dual, slack, formulation, learn_gamma=True)
    state = state.replace(**{k: {"g": jnp.asarray(v, jnp.float32)} for k, v in state_values.items()})
    step = jax.jit(make_train_step(lagr, primal, dual, slack, formulation, learn_gamma=True))
    return step(state, {"dummy": jnp.zeros((1,))}, jax.random.PRNGKey(0))


def test_one_resilient_step_updates_gamma_lambda_and_u_simultaneously_from_the_old_point():
    # ℓ = 0, α = 1, γ₀ = 1, λ₀ = 0.5, u₀ = 0.2; every update reads (γ₀, λ₀, u₀):
    #   γ₁ = γ₀ − 0.1·λ₀ sign(γ₀) = 0.95
    #   λ₁ = [λ₀ + 0.1 (|γ₀| − u₀)]₊ = 0.58   (0.575 if it read γ₁)
    #   u₁ = [u₀ − 0.1 (α u₀ − λ₀)]₊ = 0.23   (0.238 if it read λ₁)
    state, metrics = _one_step(Resilient(alpha=1.0), {"gamma": 1.0, "multipliers": 0.5, "slacks": 0.2}, 0.1)
    assert bool(metrics["applied"])
    assert float(state.gamma["g"]) == pytest.approx(0.95, abs=1e-6)
    assert float(state.multipliers["g"]) == pytest.approx(0.58, abs=1e-6)
    assert float(state.slacks["g"]) == pytest.approx(0.23, abs=1e-6)


def test_one_equality_step_from_the_old_point():
    # ℓ = 0: γ₁ = γ₀ − 0.1 λ₀ = 1 − 0.03 = 0.97, λ₁ = λ₀ + 0.2 γ₀ = 0.5 (signed, no projection)
    state, _ = _one_step(Equality(), {"gamma": 1.0, "multipliers": 0.3}, 0.2)
    assert float(state.gamma["g"]) == pytest.approx(0.97, abs=1e-6)
    assert float(state.multipliers["g"]) == pytest.approx(0.5, abs=1e-6)
    state, _ = _one_step(Equality(), {"gamma": -1.0, "multipliers": 0.0}, 0.2)
    assert float(state.multipliers["g"]) == pytest.approx(-0.2, abs=1e-6)


def test_a_multiplier_that_overflows_stops_the_step_although_loss_and_gradient_are_finite():
    # λ₀ = 0, so the Lagrangian λ·γ and its gradient are finite; λ₁ = 1e10 · 1e30 overflows float32
    state, metrics = _one_step(Equality(), {"gamma": 1e30, "multipliers": 0.0}, 1e10)
    assert not bool(metrics["finite"]) and not bool(metrics["applied"])
    assert int(state.first_bad_step) == 0
    assert float(state.multipliers["g"]) == 0.0 and float(state.gamma["g"]) == pytest.approx(1e30)
