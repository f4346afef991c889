"""Optax-style transforms for the dual (and slack) variables of the Lagrangian.

optax minimises: ``params ← params + updates``. Multipliers are *maximised*, so
:func:`dual_ascent` turns the gradient ∇_λ L into an ascent step

    λ ← Π(λ + η_λ ∇_λ L)        (plain ascent, the default)

or feeds −∇_λ L to any optax optimizer (e.g. Adam, as the public ACE code does). Π is the
projection onto λ ≥ 0 for inequality multipliers and the identity for equalities.
Both are ordinary :class:`optax.GradientTransformation` objects: pure ``init``/``update``
pairs that compose with ``optax.chain``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _traced(value) -> bool:
    """A hyperparameter traced by jit (e.g. under ``optax.inject_hyperparams``) has no value to check."""
    return isinstance(value, jax.core.Tracer)


def _check_learning_rate(name: str, learning_rate) -> None:
    if callable(learning_rate) or _traced(learning_rate):  # a schedule or a traced value: not checkable here
        return
    if not (math.isfinite(float(learning_rate)) and float(learning_rate) > 0):
        raise ValueError(f"{name}: learning_rate must be finite and > 0, got {learning_rate}")


def _as_mask(mask: Any) -> Any:
    """A scalar bool-like (``True``, ``np.bool_``, a 0-d bool array) as a Python bool; a tree as is."""
    if isinstance(mask, (bool, np.bool_)) or (isinstance(mask, (np.ndarray, jax.Array)) and mask.ndim == 0):
        return bool(mask)
    return mask


class ProjectNonnegativeState(NamedTuple):
    """No state: the projection is memoryless."""


def project_nonnegative(mask: Any = True) -> optax.GradientTransformation:
    """Rewrite updates so that ``params + updates ≥ 0`` where ``mask`` is True.

    ``update = max(params + update, 0) − params``: the Euclidean projection of the
    tentative iterate onto the non-negative orthant. ``mask`` is a bool or a tree of
    bools matching ``params`` (False leaves are left untouched, e.g. equality λ).
    Requires ``params`` in ``update``.
    """

    mask = _as_mask(mask)

    def init_fn(params):
        del params
        return ProjectNonnegativeState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_nonnegative needs the current params (multipliers) in update()")
        masks = jax.tree.map(lambda _: mask, params) if isinstance(mask, bool) else mask
        updates = jax.tree.map(
            lambda u, p, m: jnp.where(m, jnp.maximum(p + u, 0.0) - p, u), updates, params, masks
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def ascent(learning_rate, optimizer: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """Gradient ascent: ``update = η g`` (plain) or ``optimizer`` applied to −g."""
    if optimizer is None:
        _check_learning_rate("ascent", learning_rate)
        return optax.scale_by_learning_rate(learning_rate, flip_sign=False)
    return optax.chain(optax.scale(-1.0), optimizer)


class ProportionalState(NamedTuple):
    """The previous constraint values c_{t−1} (zeros before the first step)."""

    previous: Any


def proportional_term(gain: float) -> optax.GradientTransformation:
    """Add a proportional (PI-controller) term: ``g_t ↦ g_t + κ (g_t − g_{t−1})``.

    Followed by plain ascent with rate η this gives, in closed form,
    ``λ_{t+1} = η Σ_{s≤t} c_s + η κ c_t``: the integral of the constraint violation (the
    classical multiplier) plus a term proportional to the current violation. The
    proportional part damps the γ–λ oscillation that plain gradient ascent shows when the
    loss is nearly flat in γ (a "PI" multiplier update, cf. Sohrabi et al., 2024).
    ``gain = 0`` is plain ascent.
    """
    if not _traced(gain) and not (math.isfinite(gain) and gain >= 0):
        raise ValueError(f"proportional gain must be finite and >= 0, got {gain}")

    def init_fn(params):
        return ProportionalState(previous=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        new = jax.tree.map(lambda g, prev: g + gain * (g - prev), updates, state.previous)
        return new, ProportionalState(previous=updates)

    return optax.GradientTransformation(init_fn, update_fn)


def dual_ascent(
    learning_rate: float | optax.Schedule | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
    nonnegative: Any = False,
    proportional: float = 0.0,
) -> optax.GradientTransformation:
    """Projected dual ascent on Lagrange multipliers.

    Args:
      learning_rate: η_λ for plain ascent ``λ ← λ + η_λ ∇_λ L`` (ignored if ``optimizer``).
      optimizer: any optax optimizer to use instead of plain ascent; it receives −∇_λ L.
      nonnegative: project onto λ ≥ 0 — True for inequality/resilient multipliers,
        False for equalities, or a tree of bools for a mix.
      proportional: gain κ of an added proportional term (see :func:`proportional_term`);
        0 (default) is the paper's plain ascent.

    Example::

        tx = dual_ascent(1e-3, nonnegative=True)
        state = tx.init(lam)
        upd, state = tx.update(constraint_values, state, lam)
        lam = optax.apply_updates(lam, upd)

    A learning rate (and κ) changed during training through optax.inject_hyperparams
    needs the mask static: ``optax.inject_hyperparams(dual_ascent,
    static_args=("nonnegative",))(learning_rate=1e-3, nonnegative=True)``.
    """
    if optimizer is None and learning_rate is None:
        raise ValueError("dual_ascent: give a learning_rate or an optimizer")
    # an array gain (optax.inject_hyperparams passes one, traced under jit) always gets the term,
    # so init and update build the same chain; with gain 0 it passes c through unchanged
    parts = [proportional_term(proportional)] if isinstance(proportional, jax.Array) or proportional else []
    parts.append(ascent(learning_rate, optimizer))
    nonnegative = _as_mask(nonnegative)
    if nonnegative is not False:
        parts.append(project_nonnegative(nonnegative))
    return optax.chain(*parts)


def slack_descent(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Projected gradient descent for resilient slacks: ``u ← [u − η_u ∇_u L]_+``."""
    _check_learning_rate("slack_descent", learning_rate)
    return optax.chain(optax.scale_by_learning_rate(learning_rate), project_nonnegative(True))
