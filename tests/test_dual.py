"""The dual transform: projected ascent that behaves like an optax GradientTransformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ace_jax as aj
from ace_jax import dual_ascent, project_nonnegative, slack_descent


def test_plain_ascent_matches_hand_written_step():
    lam = {"a": jnp.array(0.3), "b": jnp.array(-0.2)}
    grad = {"a": jnp.array(0.5), "b": jnp.array(-1.0)}
    tx = dual_ascent(0.1)
    upd, _ = tx.update(grad, tx.init(lam), lam)
    new = optax.apply_updates(lam, upd)
    # Equality multipliers: λ + η g, sign free (b goes more negative).
    np.testing.assert_allclose(new["a"], 0.3 + 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["b"], -0.2 - 0.1 * 1.0, rtol=1e-6)


def test_projection_keeps_inequality_multipliers_nonnegative():
    lam = {"a": jnp.array(0.05), "b": jnp.array(1.0)}
    grad = {"a": jnp.array(-1.0), "b": jnp.array(-1.0)}
    tx = dual_ascent(0.1, nonnegative=True)
    upd, _ = tx.update(grad, tx.init(lam), lam)
    new = optax.apply_updates(lam, upd)
    np.testing.assert_allclose(new["a"], 0.0)  # max(0.05 - 0.1, 0)
    np.testing.assert_allclose(new["b"], 0.9, rtol=1e-6)


def test_mixed_mask_projects_only_inequalities():
    lam = {"eq": jnp.array(0.0), "ineq": jnp.array(0.0)}
    grad = {"eq": jnp.array(-2.0), "ineq": jnp.array(-2.0)}
    tx = dual_ascent(0.5, nonnegative={"eq": False, "ineq": True})
    upd, _ = tx.update(grad, tx.init(lam), lam)
    new = optax.apply_updates(lam, upd)
    assert float(new["eq"]) == pytest.approx(-1.0)
    assert float(new["ineq"]) == 0.0


def test_optimizer_underneath_ascends():
    # Adam on the dual ascends the Lagrangian: with a positive constraint value λ grows.
    lam = jnp.zeros(3)
    tx = dual_ascent(optimizer=optax.adam(0.01))
    state = tx.init(lam)
    for _ in range(5):
        upd, state = tx.update(jnp.array([1.0, -1.0, 1e-3]), state, lam)
        lam = optax.apply_updates(lam, upd)
    np.testing.assert_allclose(lam, [0.05, -0.05, 0.05], rtol=1e-3)  # Adam moves ~lr per step


def test_composes_in_optax_chain_and_under_jit():
    tx = optax.chain(optax.clip(0.1), dual_ascent(1.0, nonnegative=True))
    lam = jnp.array([0.0, 1.0])

    @jax.jit
    def step(lam, state, g):
        upd, state = tx.update(g, state, lam)
        return optax.apply_updates(lam, upd), state

    lam, _ = step(lam, tx.init(lam), jnp.array([5.0, -5.0]))
    np.testing.assert_allclose(lam, [0.1, 0.9], rtol=1e-6)


def test_slack_descent_is_projected():
    u = jnp.array([0.05, 1.0])
    tx = slack_descent(0.1)
    upd, _ = tx.update(jnp.array([1.0, 1.0]), tx.init(u), u)
    np.testing.assert_allclose(optax.apply_updates(u, upd), [0.0, 0.9], rtol=1e-6)


def test_projection_needs_params_and_rates_must_be_positive():
    tx = project_nonnegative()
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    with pytest.raises(ValueError, match="learning_rate"):
        dual_ascent(-0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        slack_descent(0.0)
    with pytest.raises(ValueError):
        dual_ascent()


def test_proportional_term_closed_form():
    # λ_{t+1} = η Σ_{s≤t} c_s + η κ c_t for plain ascent with a proportional term.
    eta, kappa = 0.1, 3.0
    tx = dual_ascent(eta, proportional=kappa)
    lam = jnp.zeros(())
    state = tx.init(lam)
    cs = [0.5, -0.2, 0.7, 0.1]
    for t, c in enumerate(cs):
        upd, state = tx.update(jnp.asarray(c), state, lam)
        lam = optax.apply_updates(lam, upd)
        np.testing.assert_allclose(lam, eta * sum(cs[: t + 1]) + eta * kappa * c, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="gain"):
        dual_ascent(0.1, proportional=-1.0)


def test_proportional_term_damps_the_bang_bang_oscillation():
    # Adam on γ with a loss flat in γ: plain ascent oscillates forever; the PI update settles.
    def run(kappa):
        gamma, lam = jnp.array(1.0), jnp.array(0.0)
        ptx, dtx = optax.adam(0.01), dual_ascent(0.01, proportional=kappa)
        ps, ds = ptx.init(gamma), dtx.init(lam)
        late = []
        for t in range(3000):
            upd, ps = ptx.update(lam, ps, gamma)  # ∂L/∂γ = λ (ℓ flat in γ)
            dupd, ds = dtx.update(gamma, ds, lam)  # ∇_λ L = γ
            gamma, lam = optax.apply_updates(gamma, upd), optax.apply_updates(lam, dupd)
            if t >= 2500:
                late.append(abs(float(gamma)))
        return max(late)

    assert run(0.0) > 0.3
    assert run(50.0) < 0.05


def test_dual_and_formulation_settings_refuse_nan():
    nan = float("nan")
    with pytest.raises(ValueError, match="proportional gain must be finite"):
        aj.proportional_term(nan)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        aj.dual_ascent(float("inf"))
    with pytest.raises(ValueError, match="epsilon must be finite"):
        aj.Inequality(epsilon=nan)
    with pytest.raises(ValueError, match="alpha must be finite"):
        aj.Resilient(alpha=nan)
    variables = {"params": {"w": jnp.ones(2)}, "gamma": {"g": jnp.zeros(())}}
    with pytest.raises(ValueError, match="slack_init must be finite and >= 0"):
        aj.init_train_state(variables, optax.sgd(0.1), aj.dual_ascent(0.1), optax.sgd(0.1), aj.Resilient(), True, slack_init=-3.0)


@pytest.mark.parametrize("proportional", [0.0, 0.5])
def test_dual_ascent_and_slack_descent_work_under_inject_hyperparams(proportional):
    # a learning rate set during training (optax.inject_hyperparams) reaches the transforms traced
    # under jit; the result equals the transform built with the same numbers, and changing the
    # injected rate changes the step
    lam = {"a": jnp.array(0.1), "b": jnp.array(0.2)}
    c = {"a": jnp.array(-1.0), "b": jnp.array(1.0)}
    ref = dual_ascent(0.1, nonnegative=True, proportional=proportional)
    tx = optax.inject_hyperparams(dual_ascent, static_args=("nonnegative",))(
        learning_rate=0.1, nonnegative=True, proportional=proportional)
    update = jax.jit(tx.update)
    lam_ref, lam_inj, s_ref, s_inj = lam, lam, ref.init(lam), tx.init(lam)
    for _ in range(3):
        u, s_ref = ref.update(c, s_ref, lam_ref)
        lam_ref = optax.apply_updates(lam_ref, u)
        u, s_inj = update(c, s_inj, lam_inj)
        lam_inj = optax.apply_updates(lam_inj, u)
    for k in lam:
        np.testing.assert_allclose(lam_inj[k], lam_ref[k], rtol=1e-6)
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u, _ = update(c, s_inj, lam_inj)
    assert float(u["b"]) == pytest.approx(0.2, rel=1e-6)  # η c_b; c is unchanged, so the P part is 0
    slack = optax.inject_hyperparams(slack_descent)(learning_rate=0.1)
    u, _ = jax.jit(slack.update)(c, slack.init(lam), lam)
    np.testing.assert_allclose([u["a"], u["b"]], [0.1, -0.1], rtol=1e-6)  # [u − η c]_+ − u


def test_scalar_bool_like_masks_are_accepted():
    lam = {"a": jnp.array(0.1), "b": jnp.array(0.2)}
    c = {"a": jnp.array(-1.0), "b": jnp.array(1.0)}
    for mask, a in ((np.bool_(True), 0.0), (jnp.asarray(True), 0.0), (np.bool_(False), -0.4)):
        tx = dual_ascent(0.5, nonnegative=mask)
        u, _ = tx.update(c, tx.init(lam), lam)
        assert float(optax.apply_updates(lam, u)["a"]) == pytest.approx(a, abs=1e-7)
