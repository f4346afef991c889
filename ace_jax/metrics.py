"""Equivariance metrics and the layer-wise bound of Theorems 4.1/4.2.

    E_eq = mean_g mean_nodes ‖ f(ρ_in(g) x) − ρ_out(g) f(x) ‖₂
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp


def equivariance_error(
    f: Callable[[Any], jax.Array],
    x: Any,
    elements: Iterable[Any],
    act_in: Callable[[Any, Any], Any],
    act_out: Callable[[Any, jax.Array], jax.Array],
    norm_axes: int | Sequence[int] = -1,
) -> jax.Array:
    """Mean over group elements g of mean ‖f(g·x) − g·f(x)‖₂.

    Args:
      f: the map to test; ``f(x)`` returns an array.
      x: its input (any pytree ``act_in`` understands).
      elements: K group elements (e.g. K random rotations).
      act_in: ``act_in(g, x)`` — the input representation ρ_in(g) x.
      act_out: ``act_out(g, y)`` — the output representation ρ_out(g) y.
      norm_axes: axes the Euclidean norm runs over (default: the last, e.g. xyz of a
        vector per node); the mean runs over all remaining axes (nodes, batch).

    Returns: a scalar. For an exactly equivariant f it is at floating-point round-off.
    """
    return _error_and_output(f, x, elements, act_in, act_out, norm_axes)[0]


def relative_equivariance_error(f, x, elements, act_in, act_out, norm_axes=-1) -> jax.Array:
    """:func:`equivariance_error` divided by mean ‖f(x)‖ (scale-free)."""
    error, fx = _error_and_output(f, x, elements, act_in, act_out, norm_axes)
    scale = jnp.mean(jnp.sqrt(jnp.sum(fx**2, axis=norm_axes)))
    return error / jnp.maximum(scale, 1e-12)


def _error_and_output(f, x, elements, act_in, act_out, norm_axes):
    """(:func:`equivariance_error`, f(x)): f is evaluated once on x and once per element."""
    elements = list(elements)
    if not elements:
        raise ValueError("equivariance_error needs at least one group element")
    fx = f(x)
    errors = []
    for g in elements:
        diff = f(act_in(g, x)) - act_out(g, fx)
        errors.append(jnp.mean(jnp.sqrt(jnp.sum(diff**2, axis=norm_axes))))
    return jnp.mean(jnp.stack(errors)), fx


def equivariance_bound(gammas: Sequence[float], lipschitz: float, branch_bound: float) -> float:
    """Layer-wise bound on the full model's equivariance error (METHOD.md §4, corrected).

    With every f_eq,i and g_i M-Lipschitz, ‖g_i‖ ≤ B and ρ orthogonal,

        e_0 = 0,   e_i = M e_{i−1} + |γ_i| (M e_{i−1} + 2B),

    and e_L bounds ‖f(ρ·x) − ρ·f(x)‖. Derivation, with a = h_{i−1}(ρx), b = ρ h_{i−1}(x),
    ‖a − b‖ ≤ e_{i−1}: f_eq,i(b) = ρ f_eq,i(h_{i−1}(x)) leaves ‖f_eq,i(a) − f_eq,i(b)‖ ≤ M e_{i−1},
    and ‖g_i(a) − ρ g_i(h_{i−1}(x))‖ ≤ ‖g_i(a) − g_i(b)‖ + ‖g_i(ρ h) − ρ g_i(h)‖ ≤ M e_{i−1} + 2B.
    The recursion in METHOD.md has B where 2B belongs and is not a bound: one layer with
    f_eq = 0 and a constant branch g = b, ‖b‖ = 1, γ = 1 has error ‖b − ρb‖ = 2 under ρ = −I
    (or a half-turn about an axis ⟂ b). All γ = 0 gives 0 (exact equivariance).
    """
    if lipschitz < 0 or branch_bound < 0:
        raise ValueError("lipschitz and branch_bound must be non-negative")
    e = 0.0
    for g in gammas:
        e = lipschitz * e + abs(float(g)) * (lipschitz * e + 2.0 * branch_bound)
    return e
