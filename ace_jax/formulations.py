"""Constraint formulations: which constraints the γ's obey and how multipliers behave.

Each formulation maps the γ tree (and, for the resilient one, the slack tree u) to a tree of
constraint values c (same structure as γ). The Lagrangian adds Σ_i λ_i c_i.

- :class:`Equality`      c_i = γ_i,            λ_i ∈ ℝ (free sign), no slacks      (P-I)
- :class:`Inequality`    c_i = |γ_i| − ε,      λ_i ≥ 0                              (ε-constrained)
- :class:`Resilient`     c_i = |γ_i| − u_i,    λ_i ≥ 0, u_i ≥ 0, cost (α/2)‖u‖²      (P-II)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _tree_sum(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


@dataclasses.dataclass(frozen=True)
class Equality:
    """γ_i = 0 for every branch; free-sign multipliers."""

    nonnegative_multipliers = False
    uses_slacks = False

    def constraints(self, gamma, slacks=None):
        return gamma

    def slack_cost(self, slacks) -> jax.Array:
        return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Inequality:
    """|γ_i| ≤ ε for every branch; multipliers λ ≥ 0."""

    epsilon: float = 0.0
    nonnegative_multipliers = True
    uses_slacks = False

    def __post_init__(self):
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"Inequality: epsilon must be finite and >= 0, got {self.epsilon}")

    def constraints(self, gamma, slacks=None):
        return jax.tree.map(lambda g: jnp.abs(g) - self.epsilon, gamma)

    def slack_cost(self, slacks) -> jax.Array:
        return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Resilient:
    """|γ_i| ≤ u_i with slack cost (α/2)‖u‖²; λ ≥ 0, u ≥ 0. At a solution α u_i = λ_i."""

    alpha: float = 1.0
    nonnegative_multipliers = True
    uses_slacks = True

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"Resilient: alpha must be finite and > 0, got {self.alpha}")

    def constraints(self, gamma, slacks):
        return jax.tree.map(lambda g, u: jnp.abs(g) - u, gamma, slacks)

    def slack_cost(self, slacks) -> jax.Array:
        return 0.5 * self.alpha * _tree_sum(jax.tree.map(jnp.square, slacks))

    def slack_gradient(self, slacks, multipliers):
        """∇_u L = α u − λ."""
        return jax.tree.map(lambda u, lam: self.alpha * u - lam, slacks, multipliers)


Formulation = Equality | Inequality | Resilient
