"""The empirical Lagrangian of ACE over a vmapped per-example loss.

    L(θ, γ, λ, u) = (1/B) Σ_n w_n ℓ(f(x_n; θ, γ), y_n) / mean(w) + (α/2)‖u‖² + Σ_i λ_i c_i(γ, u)

c is given by the formulation (γ for equality, |γ| − ε, |γ| − u). With no formulation
(vanilla / unconstrained baselines) L is the task loss alone.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ace_jax.formulations import Formulation
from ace_jax.homotopic import GAMMA

PerExampleLoss = Callable[[Any, Any, jax.Array], jax.Array]
"""``loss(variables, example, rng) -> scalar`` for ONE example (no batch axis)."""


class LagrangianAux(NamedTuple):
    """What the Lagrangian reports besides its value."""

    loss: jax.Array  # mean task loss over the batch
    constraints: Any  # tree like γ: c_i (∇_λ L)
    lagrangian: jax.Array


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Σ_n w_n v_n / Σ_n w_n for ``values (B,)`` and ``weights (B,)`` (w_n ≥ 0, not all 0).

    Entries of zero weight (padding) are ignored in the value, even where it is NaN or inf;
    a negative weight (not checkable under jit; ``fit`` refuses one) counts as 0 in both sums.
    Their gradient is not: reverse mode still multiplies 0 by the entry's own gradient, and
    0 · NaN is NaN, so a zero-weight example must still have a finite loss and gradient (pad
    with copies of real examples, as the engine's ``padded_batches`` does). ``weights`` of any
    other shape is refused (a (B, 1) or scalar weight would broadcast and turn the mean into a
    sum)."""
    if weights is None:
        return jnp.mean(values)
    if jnp.shape(weights) != jnp.shape(values):
        raise ValueError(f"example weights must have shape {jnp.shape(values)} (one per example), "
                         f"got {jnp.shape(weights)}")
    used = weights > 0
    kept = jnp.where(used, values * weights, jnp.zeros_like(values))
    return jnp.sum(kept) / jnp.maximum(jnp.sum(jnp.where(used, weights, 0.0)), 1e-12)


def make_lagrangian(
    per_example_loss: PerExampleLoss,
    formulation: Formulation | None,
    *,
    regularizer: Callable[[Any, Any, jax.Array], jax.Array] | None = None,
):
    """Build ``lagrangian(params, gamma, multipliers, slacks, batch, rng, extra=None)``.

    Args:
      per_example_loss: ℓ for a single example; vmapped here over the leading batch axis
        of every leaf of ``batch`` (any pytree; in a dict batch a key ``"weight"`` (B,), if
        present, weights examples and is not passed to the loss).
      formulation: :class:`Equality`, :class:`Inequality`, :class:`Resilient` or None.
      regularizer: optional ``r(variables, batch, rng) -> scalar`` added to L (used by
        the scheduled-relaxation baseline's penalty).

    Returns a function giving ``(L, LagrangianAux)``; differentiate it w.r.t. params and γ.
    ``extra`` holds further variable collections (e.g. fixed buffers) passed to the model.
    """

    def lagrangian(params, gamma, multipliers, slacks, batch, rng, extra=None):
        variables = {"params": params, **(extra or {})}
        if gamma is not None and jax.tree.leaves(gamma):
            variables[GAMMA] = gamma
        weights = None
        if isinstance(batch, Mapping):
            batch = dict(batch)
            weights = batch.pop("weight", None)
        size = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(rng, size + 1)
        losses = jax.vmap(per_example_loss, in_axes=(None, 0, 0))(variables, batch, keys[1:])
        if losses.shape != (size,):
            raise ValueError(f"per_example_loss must return a scalar per example, got batch shape {losses.shape}")
        loss = weighted_mean(losses, weights)
        value = loss
        if regularizer is not None:
            value = value + regularizer(variables, batch, keys[0])
        constraints = {}
        if formulation is not None:
            constraints = formulation.constraints(gamma, slacks)
            value = value + formulation.slack_cost(slacks) if formulation.uses_slacks else value
            value = value + constraint_term(multipliers, constraints)
        return value, LagrangianAux(loss=loss, constraints=constraints, lagrangian=value)

    return lagrangian


def constraint_term(multipliers, constraints) -> jax.Array:
    """Σ_i λ_i · c_i, pairing each multiplier with the constraint at the same place in the tree.

    The two trees must have the same structure (that of γ, or of its branches); a missing,
    extra or misnamed multiplier is an error, never a silently dropped or mispaired term."""
    if jax.tree.structure(multipliers) != jax.tree.structure(constraints):
        raise ValueError(
            "multipliers must have the same tree structure as the constraints (one λ per γ): got "
            f"{jax.tree.structure(multipliers)} for constraints {jax.tree.structure(constraints)}"
        )
    terms = jax.tree.leaves(jax.tree.map(lambda lam, c: jnp.sum(lam * c), multipliers, constraints))
    return sum(terms, jnp.zeros((), jnp.result_type(*terms) if terms else jnp.float32))
