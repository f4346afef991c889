"""One primal–dual step of ACE as a single XLA program.

All gradients are taken at the current point (simultaneous updates, Alg. 1/2):

    (θ, γ) ← primal_tx(∇_{θ,γ} L)                 any optax optimizer
    λ      ← dual_tx(∇_λ L = c(γ, u))              ascent, projected to λ ≥ 0 for inequalities
    u      ← slack_tx(∇_u L = α u − λ)             projected descent, u ≥ 0 (resilient only)

A non-finite Lagrangian, gradient or updated state (parameters, γ, λ, u, optimizer states)
leaves the state unchanged and records the step in ``first_bad_step`` so the host can stop
the run with a clear message; a state that has stopped stays frozen.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ace_jax.formulations import Formulation


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointable).

    ``gamma`` is a tree of scalars (the ``gamma`` collection), ``multipliers`` λ and
    ``slacks`` u have the same structure (empty dicts when unused). ``extra`` holds other
    model collections that are not trained (kept as-is).
    """

    step: jax.Array
    params: Any
    gamma: Any
    multipliers: Any
    slacks: Any
    opt_state: Any
    dual_state: Any
    slack_state: Any
    extra: Any
    first_bad_step: jax.Array

    def variables(self) -> dict:
        """Model variables for ``apply``: params, γ (if any) and extra collections."""
        out = {"params": self.params, **self.extra}
        if jax.tree.leaves(self.gamma):
            out["gamma"] = self.gamma
        return out


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_train_state(
    variables: dict,
    primal_tx: optax.GradientTransformation,
    dual_tx: optax.GradientTransformation | None,
    slack_tx: optax.GradientTransformation | None,
    formulation: Formulation | None,
    learn_gamma: bool,
    slack_init: float = 0.0,
) -> TrainState:
    """Initial state: λ = 0, u = ``slack_init`` (one per γ; finite, ≥ 0), optimizer states."""
    if not (math.isfinite(slack_init) and slack_init >= 0):
        raise ValueError(f"slack_init must be finite and >= 0 (u is projected onto u >= 0), got {slack_init}")
    variables = dict(variables)
    params = variables.pop("params")
    gamma = variables.pop("gamma", {})
    zeros = jax.tree.map(jnp.zeros_like, gamma)
    constrained = formulation is not None and bool(jax.tree.leaves(gamma))
    multipliers = zeros if constrained else {}
    slacks = jax.tree.map(lambda g: jnp.full_like(g, slack_init), gamma) if constrained and formulation.uses_slacks else {}
    primal = {"params": params, "gamma": gamma} if learn_gamma else {"params": params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        gamma=gamma,
        multipliers=multipliers,
        slacks=slacks,
        opt_state=primal_tx.init(primal),
        dual_state=dual_tx.init(multipliers) if (constrained and dual_tx is not None) else (),
        slack_state=slack_tx.init(slacks) if (constrained and slack_tx is not None and slacks) else (),
        extra=variables,
        first_bad_step=jnp.asarray(-1, jnp.int32),
    )


def make_train_step(
    lagrangian: Callable,
    primal_tx: optax.GradientTransformation,
    dual_tx: optax.GradientTransformation | None,
    slack_tx: optax.GradientTransformation | None,
    formulation: Formulation | None,
    learn_gamma: bool,
):
    """``step(state, batch, rng) -> (state, metrics)`` — jit it (the engine does).

    ``lagrangian`` comes from :func:`ace_jax.lagrangian.make_lagrangian`. ``metrics`` holds
    the task loss, the Lagrangian value, ``finite`` (this step's loss, gradient and update
    were finite) and ``applied`` (its update was applied). The first non-finite step sets
    ``state.first_bad_step`` and freezes the state: every later step is a no-op
    (``applied`` False) until the caller stops or restarts from a good state — a loop of
    one's own should check ``first_bad_step`` (or ``applied``), as :func:`ace_jax.fit` does.
    """

    def step(state: TrainState, batch, rng):
        primal = {"params": state.params, "gamma": state.gamma} if learn_gamma else {"params": state.params}

        def objective(primal):
            gamma = primal["gamma"] if learn_gamma else state.gamma
            return lagrangian(primal["params"], gamma, state.multipliers, state.slacks, batch, rng, state.extra)

        (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(primal)
        updates, opt_state = primal_tx.update(grads, state.opt_state, primal)
        primal = optax.apply_updates(primal, updates)

        multipliers, dual_state = state.multipliers, state.dual_state
        slacks, slack_state = state.slacks, state.slack_state
        constrained = formulation is not None and bool(jax.tree.leaves(state.multipliers))
        if constrained:
            dual_updates, dual_state = dual_tx.update(aux.constraints, state.dual_state, state.multipliers)
            multipliers = optax.apply_updates(state.multipliers, dual_updates)
            if formulation.uses_slacks:
                slack_grad = formulation.slack_gradient(state.slacks, state.multipliers)
                slack_updates, slack_state = slack_tx.update(slack_grad, state.slack_state, state.slacks)
                slacks = optax.apply_updates(state.slacks, slack_updates)

        new = state.replace(
            step=state.step + 1,
            params=primal["params"],
            gamma=primal["gamma"] if learn_gamma else state.gamma,
            multipliers=multipliers,
            slacks=slacks,
            opt_state=opt_state,
            dual_state=dual_state,
            slack_state=slack_state,
        )
        # the updated state too: a finite gradient can still overflow a weight, an optimizer
        # moment (Adam's ν = inf freezes a weight silently) or a multiplier
        finite = _all_finite((value, grads, new.params, new.gamma, new.multipliers, new.slacks,
                              new.opt_state, new.dual_state, new.slack_state))
        healthy = finite & (state.first_bad_step < 0)
        kept = jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, state)
        kept = kept.replace(
            step=state.step + 1,
            first_bad_step=jnp.where(healthy | (state.first_bad_step >= 0), state.first_bad_step, state.step),
        )
        metrics = {"loss": aux.loss, "lagrangian": aux.lagrangian, "finite": finite, "applied": healthy}
        return kept, metrics

    return step
