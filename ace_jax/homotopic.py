"""Homotopic layers: an equivariant map plus a γ-scaled symmetry-breaking branch.

A homotopic layer computes

    f(x; θ, γ) = f_eq(x; θ) + γ · g(x; θ)

where ``f_eq`` is G-equivariant, ``g`` is an unconstrained branch and γ is a scalar stored
in its own Flax variable collection, :data:`GAMMA` (``"gamma"``), never in ``"params"``.
γ = 0 is the *equivariant projection*. Every module here takes a static ``project`` flag;
with ``project=True`` the branch is not evaluated at all (not merely multiplied by zero),
so the projection costs exactly what the equivariant model costs, and initialising with
``project=True`` creates neither branch parameters nor γ (the "vanilla" model).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

GAMMA = "gamma"
"""Name of the variable collection that holds every γ_i."""


class SymmetryBreaking(nn.Module):
    """The breaking term ``γ · g(*args)`` with γ a learnable scalar in collection ``gamma``.

    Use it inside a model where the equivariant and breaking paths are combined by hand::

        y = equivariant_update(h)
        if not project:
            y = y + SymmetryBreaking(MLPBranch(d), name="feature_breaking")(h)

    Attributes:
      branch: the unconstrained map g; any Flax module. Its output may be any pytree;
        every leaf is scaled by γ.
      gamma_init: initial γ (1.0 is the paper's default; 0.0 is an ablation).

    A branch whose class sets ``folds_output_scale = True`` (:class:`MLPBranch`,
    :class:`LowRankBranch`) is called as ``branch(*args, output_scale=γ)`` and applies γ to
    its last layer's weights: γ·(h W + b) = h (γW) + γb. Same function, but γ then touches a
    (d_in, d_out) matrix instead of every output row, so neither the forward product by γ nor
    the backward reduction ∂L/∂γ = Σ_rows ⟨g, ∂L/∂y⟩ runs over the activations
    (∂L/∂γ = ⟨W, hᵀ ∂L/∂y⟩ + ⟨b, Σ ∂L/∂y⟩ reuses the weight gradient's product). Measured on
    the N-body SEGNN ACE step (2-core CPU): scratch memory 31.6 → 30.2 MiB with Linear
    branches, 32.9 → 31.2 MiB with rank-16 ones; the step time moved by less than the
    machine's run-to-run noise (a few %).
    """

    branch: nn.Module
    gamma_init: float = 1.0

    @nn.compact
    def __call__(self, *args, **kwargs):
        gamma = self.variable(GAMMA, "gamma", lambda: jnp.asarray(self.gamma_init, jnp.float32))
        if getattr(self.branch, "folds_output_scale", False):
            return self.branch(*args, output_scale=gamma.value, **kwargs)
        out = self.branch(*args, **kwargs)
        return jax.tree.map(lambda y: gamma.value.astype(y.dtype) * y, out)


class Homotopic(nn.Module):
    """``f(x) = equivariant(x) + γ · branch(x)``, the homotopic wrapper of one layer.

    Attributes:
      equivariant: the G-equivariant module f_eq; its output may be an array or any pytree
        (e.g. a tuple of scalar and vector features).
      branch: the breaking module g; it must map x to a pytree of the same structure and leaf
        shapes as ``equivariant(x)``; the two are added leaf by leaf.
      gamma_init: initial γ.

    Call with ``project=True`` for the equivariant projection (branch not evaluated).
    """

    equivariant: nn.Module
    branch: nn.Module
    gamma_init: float = 1.0

    @nn.compact
    def __call__(self, x, *, project: bool = False):
        y = self.equivariant(x)
        if project:
            return y
        correction = SymmetryBreaking(self.branch, self.gamma_init, name="breaking")(x)
        shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
        if jax.tree.structure(correction) != jax.tree.structure(y) or shapes(correction) != shapes(y):
            raise ValueError(
                f"Homotopic: branch output {shapes(correction)} does not match the equivariant "
                f"output {shapes(y)} (same pytree structure and leaf shapes needed)"
            )
        return jax.tree.map(jnp.add, y, correction)


def spectral_norm(kernel: jax.Array, num_iterations: int = 10) -> jax.Array:
    """Largest singular value σ_max of a 2-D ``kernel`` W (in, out), by power iteration.

    From v₀ = 1/√out, ``num_iterations`` steps of u = W v / ‖W v‖, v = Wᵀ u / ‖Wᵀ u‖, then
    u = W v / ‖W v‖ and σ = uᵀ W v. The iteration runs on ``stop_gradient(W)`` from a fixed
    start, so it is stateless and deterministic; σ is differentiable in W through the last
    product, as in the usual spectral normalisation (Miyato et al., 2018).

    The iterates are computed in the smaller of the two spaces through the Gram matrix:
    v ← WᵀW v / ‖WᵀW v‖ when out ≤ in, u ← W Wᵀ u / ‖W Wᵀ u‖ when in < out — the same
    vectors (up to rounding) with one mat-vec per step instead of two, which matters on CPU,
    where each tiny dependent op costs more to dispatch than its arithmetic. Forming the Gram
    matrix takes min(in, out)²·max(in, out) multiply-adds, more than the 2·n·in·out of the
    mat-vecs it replaces: cheap at branch sizes (VN-DGCNN's 672 × 336 kernels: the ACE step
    went from 4.08 to 4.02 s), not meant for kernels with thousands of rows and columns.

    Accuracy: the estimate approaches σ_max from below (uᵀWv ≤ σ_max for unit u, v), and ten
    steps from a fixed start need not converge when the top singular values are close, as in a
    random kernel. At LeCun initialisation (5 keys) the true σ_max exceeded the estimate by
    0.5–10 % for 64 × 64 kernels and 2–6 % for 336 × 672 and 672 × 336; 100 steps bring it within
    2 %. A kernel divided by the estimate therefore has spectral norm 1 to within that margin, at
    or above 1, not exactly 1. The fixed start can also miss σ_max altogether: when the top
    right singular vector is orthogonal to the all-ones v₀ the iteration never sees it (e.g.
    W = [[2, −2], [0.5, 0.5]], σ_max = 2√2, estimate 1/√2, so W / estimate has norm 4). Random
    kernels meet this with probability 0, but a kernel with that sign structure, learned or
    set by hand, can come close; the bound holds only for kernels without it.
    """
    if kernel.ndim != 2:
        raise ValueError(f"spectral_norm expects a 2-D kernel, got shape {kernel.shape}")
    if num_iterations < 0:
        raise ValueError(f"spectral_norm needs num_iterations >= 0, got {num_iterations}")
    w = jax.lax.stop_gradient(kernel)
    fan_in, fan_out = w.shape

    def normalize(x):
        return x / (jnp.linalg.norm(x) + 1e-12)

    def power(gram, x, steps):
        # unrolled: a handful of tiny mat-vecs that XLA fuses, instead of a while loop whose
        # per-iteration dispatch costs more than the arithmetic on CPU
        return jax.lax.fori_loop(0, steps, lambda _, x: normalize(gram @ x), x, unroll=True)

    v = jnp.ones((fan_out,), w.dtype) / jnp.sqrt(fan_out)
    if fan_out <= fan_in or num_iterations == 0:  # v-space: v_t = WᵀW v_{t-1} (normalised)
        v = power(w.T @ w, v, num_iterations)
    else:  # u-space: u_1 = W v₀, u_{t+1} = W Wᵀ u_t, v = Wᵀ u_n (normalised)
        u = power(w @ w.T, normalize(w @ v), num_iterations - 1)
        v = normalize(w.T @ u)
    u = jax.lax.stop_gradient(normalize(w @ v))
    return u @ kernel @ jax.lax.stop_gradient(v)


def spectral_normalize(kernel: jax.Array, num_iterations: int = 10, *, bound: bool = False) -> jax.Array:
    """``W / σ_max(W)`` for every ``(fan_in, fan_out)`` matrix of a ``(*blocks, fan_in, fan_out)``
    stack (each block by its own :func:`spectral_norm`; σ floored at 1e-12), so ‖x W_b‖ ≤ ‖x‖ up
    to the power-iteration estimate's shortfall (a few per cent, see :func:`spectral_norm`).

    With ``bound=True`` it is ``W / max(1, σ_max(W))`` instead: the same property ‖x W_b‖ ≤ ‖x‖,
    but a block already inside it is left as it is, so a kernel initialised small stays small
    (W / σ_max rescales every kernel to σ_max = 1 whatever its initialiser). The two agree
    exactly, values and gradients, wherever σ_max > 1.
    """
    if kernel.ndim < 2:
        raise ValueError(f"spectral_normalize expects (*blocks, fan_in, fan_out), got shape {kernel.shape}")
    blocks = kernel.reshape((-1,) + kernel.shape[-2:])
    sigma = jax.vmap(lambda w: spectral_norm(w, num_iterations))(blocks)
    floor = 1.0 if bound else 1e-12
    return kernel / jnp.maximum(sigma, floor).reshape(kernel.shape[:-2] + (1, 1))


class SpectralDense(nn.Module):
    """Dense layer ``x W / σ_max(W) + b``: its Lipschitz constant is (close to) 1.

    Needed for the resilient variant (METHOD.md §5), where it keeps ‖g_i‖ and hence the
    equivariance error of the full model bounded in terms of |γ_i|.

    With ``bound=True`` the layer is ``x W / max(1, σ_max(W)) + b``: Lipschitz constant at most
    1 rather than equal to 1, so the scale of ``kernel_init`` survives when it is below 1 (a
    branch started small, :func:`branch_output_init`). Same numbers as the default once σ_max > 1.
    """

    features: int
    use_bias: bool = True
    num_iterations: int = 10
    kernel_init: Callable = nn.initializers.lecun_normal()
    bound: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, scale=None):
        """``x`` (..., d_in) → (..., features); ``scale`` (a scalar) multiplies the output,
        applied to the normalised kernel and the bias rather than to the output rows."""
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        kernel = spectral_normalize(kernel, self.num_iterations, bound=self.bound)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return _affine(x, kernel, bias, scale)


class ScaledDense(nn.Module):
    """``nn.Dense`` (same parameters, names and initialisers) whose call takes an optional
    scalar ``scale`` of the output, folded into the kernel and bias: s·(x W + b) = x (sW) + sb.
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, scale=None):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return _affine(x, kernel, bias, scale)


def _affine(x, kernel, bias, scale):
    """``scale · (x W + b)`` with the scale applied to W and b (any of bias / scale may be None)."""
    if scale is not None:
        scale = jnp.asarray(scale, kernel.dtype)
        kernel = scale * kernel
        bias = None if bias is None else scale * bias
    y = x @ kernel.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


def branch_output_init(scale: float) -> Callable:
    """Initialiser for a branch's last kernel: normal (truncated) with variance ``scale / fan_in``.

    ``scale = 1`` is LeCun normal (the default of every branch layer); ``scale = 0`` gives a zero
    kernel, so with a zero bias the branch starts at g = 0. A branch fed raw coordinates at
    γ = 1 otherwise starts as large as the equivariant path it perturbs. For a kernel of more than
    two axes, ``(*blocks, fan_in, fan_out)``, fan_in counts the leading axes too (JAX's
    ``variance_scaling`` reads them as a receptive field): variance ``scale / (blocks·fan_in)``.
    """
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"branch_init_scale must be finite and >= 0, got {scale}")
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class MLPBranch(nn.Module):
    """A plain breaking branch g acting on the last axis: Dense layers with an activation.

    With ``hidden=()`` it is a single Linear layer (the paper's most common branch). All
    irrep components of an equivariant feature are treated as plain numbers, which is
    what makes the branch able to break the symmetry.

    Attributes:
      features: output size of the last axis.
      hidden: sizes of hidden layers.
      spectral: spectrally normalise every layer (1-Lipschitz branch up to activations).
      activation: nonlinearity between layers.
      output_kernel_init: initialiser of the last layer's kernel (None = LeCun normal, as
        every other layer). A small one starts the branch near g = 0, so ``γ·g`` cannot swamp
        the equivariant path at γ = 1 while ∂L/∂W = γ·(…) still lets the branch grow. With
        ``spectral=True`` the last layer is then ``SpectralDense(bound=True)``, W / max(1, σ_max):
        still 1-Lipschitz, but without rescaling the small kernel up to σ_max = 1 (plain W / σ_max
        would undo any initial scale).
    """

    features: int
    hidden: Sequence[int] = ()
    spectral: bool = False
    activation: Callable = nn.silu
    output_kernel_init: Callable | None = None

    folds_output_scale: ClassVar[bool] = True  # see SymmetryBreaking

    @nn.compact
    def __call__(self, x, output_scale=None):
        """``x`` (..., d_in) → (..., features); ``output_scale`` s gives s·g(x), with s applied
        to the last layer's weights. Parameters are named as for ``nn.Dense`` layers in order
        (``Dense_0``, ``Dense_1``, … or ``SpectralDense_k``)."""
        dense = SpectralDense if self.spectral else ScaledDense
        prefix = "SpectralDense" if self.spectral else "Dense"  # the names nn.Dense layers had
        for i, width in enumerate(self.hidden):
            x = self.activation(dense(width, name=f"{prefix}_{i}")(x))
        last = {} if self.output_kernel_init is None else {"kernel_init": self.output_kernel_init}
        if self.spectral and self.output_kernel_init is not None:
            last["bound"] = True  # keep the requested start scale (see output_kernel_init)
        return dense(self.features, name=f"{prefix}_{len(tuple(self.hidden))}", **last)(x, output_scale)


class LowRankBranch(nn.Module):
    """A Linear breaking branch of bounded rank: ``g(x) = (x U) V + b``.

    Shapes: x (..., d_in), U (d_in, r), V (r, features), b (features,); output (..., features).
    It is the Linear branch of :class:`MLPBranch` with its matrix constrained to rank ≤ r, so
    it breaks the symmetry the same way (every component of the input is a plain number) at
    r·(d_in + features) multiply-adds per row instead of d_in·features: for SEGNN's 324-wide
    QM9 features and r = 16 that is a tenth of the work. Affine, so
    :func:`summed_affine_branch` applies.

    With ``spectral=True`` U and V are each divided by their largest singular value, so
    ‖g(x) − b‖ ≤ ‖x‖ (a 1-Lipschitz branch, METHOD.md §5). Initialisation is LeCun normal for
    both factors (fan-in d_in, then r), so the output has the scale of a Dense layer's.
    """

    features: int
    rank: int
    spectral: bool = False
    use_bias: bool = True

    folds_output_scale: ClassVar[bool] = True  # see SymmetryBreaking

    @nn.compact
    def __call__(self, x, output_scale=None):
        """``x`` (..., d_in) → (..., features); ``output_scale`` s gives s·g(x) (s applied to V, b)."""
        if self.rank < 1:
            raise ValueError(f"LowRankBranch rank must be >= 1, got {self.rank}")
        dense = SpectralDense if self.spectral else ScaledDense
        z = dense(self.rank, use_bias=False, name="down")(x)
        return dense(self.features, use_bias=self.use_bias, name="up")(z, output_scale)


class AxisMixBranch(nn.Module):
    """Cheap breaking branch for vector (or any multi-component) features: a learned matrix
    per channel acting on the component axis,

        g(x)_c = x_c A_c,    x_c ∈ ℝ^m (the m components of channel c),  A_c ∈ ℝ^{m×m}.

    It is a Linear map of the flattened features, block-diagonal over channels. It mixes the
    components, which an equivariant layer may not do: for vectors (m = 3) rotating by R
    gives g(x Rᵀ)_c = x_c Rᵀ A_c ≠ x_c A_c Rᵀ unless A_c commutes with every rotation
    (A_c ∝ I). Applied as f + γ·g(f) to the output f of an equivariant linear layer it costs
    m² multiply-adds per channel — a Dense branch on the flattened input costs (C_in m)(C_out m).

    ``component_axis`` is -1 for features laid out ``(..., C, m)`` and -2 for ``(..., m, C)``.
    With ``normalize=True`` every A_c is divided by its Frobenius norm (≥ its largest singular
    value), so ‖g(x)_c‖ ≤ ‖x_c‖ for every channel (a 1-Lipschitz branch, METHOD.md §5).

    Parameter ``kernel`` (m, m·C) holds ``kernel[i, m·c + j] = A_c[i, j]`` (fan-in m, so LeCun
    initialisation gives A_c entries of variance 1/m).
    """

    component_axis: int = -1
    normalize: bool = True
    epsilon: float = 1e-12
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim < 2 or self.component_axis not in (-1, -2):
            raise ValueError(f"AxisMixBranch needs (..., C, m) or (..., m, C) features and component_axis -1 or -2, "
                             f"got shape {x.shape} and component_axis {self.component_axis}")
        m = x.shape[self.component_axis]
        channels = x.shape[-2] if self.component_axis == -1 else x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (m, m * channels), self.param_dtype)
        a = kernel.reshape(m, channels, m)  # a[i, c, j] = A_c[i, j]
        if self.normalize:
            a = a * jax.lax.rsqrt(jnp.sum(a * a, axis=(0, 2), keepdims=True) + self.epsilon)
        a = a.astype(x.dtype)
        # m² fused multiply-adds of (…, C) slices (XLA fuses them into one loop): measured
        # faster on CPU, forward and backward, than a broadcast-and-sum or an einsum (which
        # lowers to C tiny batched matmuls behind transposes).
        component = (lambda i: x[..., :, i]) if self.component_axis == -1 else (lambda i: x[..., i, :])
        outputs = [sum(component(i) * a[i, :, j] for i in range(m)) for j in range(m)]
        return jnp.stack(outputs, axis=self.component_axis)


class WeightBranch(nn.Module):
    """A breaking branch given by its *weights*, for layers that fold it into their own.

    Returns ``δW`` of shape ``(*blocks, fan_in, fan_out)`` (and ``δb (*blocks, fan_out)`` with
    ``use_bias``). Wrapped in :class:`SymmetryBreaking` it yields ``γ·δW``; a linear layer
    ``y = x W`` then computes ``x (W + γ δW) = x W + γ·(x δW)`` — the equivariant map plus the
    affine branch ``g(x) = x δW`` on the layer's input — in ONE product, at the cost of the
    layer alone, when δW has the layout of W. The branch breaks the symmetry when δW is not of
    the constrained form of W: e.g. ``blocks = (3,)`` gives vector features one channel-mixing
    matrix per xyz axis, ``y_i = x_i (W + γ δW_i)``, which a rotation does not commute with
    (VN-Linear and the vector paths of steerable layers share one W over the axes).

    With ``spectral=True`` every ``(fan_in, fan_out)`` block is divided by its largest singular
    value, so ‖x δW_b‖ ≤ ‖x‖ per block: the breaking is bounded *relative to the layer input*
    (Assumption 1 of METHOD.md, with the bound scaling with the input). With an explicit
    ``kernel_init`` (None = LeCun normal) a spectral block is divided by max(1, σ_max) instead
    (:func:`spectral_normalize` with ``bound=True``), as :class:`MLPBranch` does for its
    ``output_kernel_init``: the same bound, but a block initialised small, e.g. with
    :func:`branch_output_init`, keeps its start scale instead of being rescaled to σ_max = 1.

    Initialisation: the LeCun normal default treats the whole stack as one kernel, so with
    blocks, e.g. ``(3, fan_in, fan_out)``, each block's entries have variance 1/(3·fan_in), not
    1/fan_in — √3 smaller than a per-block LeCun kernel. With ``spectral=True`` and no
    ``kernel_init`` this is immaterial (each block is rescaled to σ_max = 1); without spectral
    normalisation (SEGNN's ``branch_kind="in_kernel"`` default) it is the start scale every
    number in this project was measured with.
    """

    shape: Sequence[int]
    spectral: bool = True
    use_bias: bool = False
    kernel_init: Callable | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        shape = tuple(self.shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"WeightBranch shape must be (*blocks, fan_in, fan_out) with positive sizes, got {shape}")
        init = nn.initializers.lecun_normal() if self.kernel_init is None else self.kernel_init
        kernel = self.param("kernel", init, shape, self.param_dtype)
        if self.spectral:
            kernel = spectral_normalize(kernel, bound=self.kernel_init is not None)
        if not self.use_bias:
            return kernel
        return kernel, self.param("bias", nn.initializers.zeros, shape[:-2] + shape[-1:], self.param_dtype)


def weight_breaking(
    name: str, shape: Sequence[int], *, spectral: bool = True, gamma_init: float = 1.0, use_bias: bool = False,
    kernel_init: Callable | None = None,
):
    """``γ·δW`` (and ``γ·δb`` with ``use_bias``) from a :class:`WeightBranch` of ``shape`` wrapped in
    :class:`SymmetryBreaking` named ``name``; call it inside a compact module, which then holds
    ``<name>/branch/kernel`` (params) and ``<name>/gamma`` (collection ``gamma``). The caller adds
    the result to the weight of the layer it perturbs. ``kernel_init`` as in :class:`WeightBranch`."""
    branch = WeightBranch(shape, spectral, use_bias, kernel_init, parent=None)
    return SymmetryBreaking(branch, gamma_init, name=name)()


def summed_affine_branch(branch: Callable, total: jax.Array, count) -> jax.Array:
    """``Σ_j g(m_j)`` over ``count`` inputs whose sum is ``total``, for an AFFINE branch g.

    With g(m) = m A + b, Σ_{j=1..n} g(m_j) = n·g(Σ_j m_j / n): the branch runs once on the
    aggregated message (per node) instead of once per edge — same numbers, the work divided by
    the degree. ``count`` broadcasts against ``total`` (e.g. degrees of shape (N, 1)); nodes with
    count 0 get 0. Wrong for a branch with a nonlinearity (use it per edge then).
    """
    return count * branch(total / jnp.maximum(count, 1))


def gammas(variables: Mapping[str, Any]) -> dict:
    """The ``gamma`` collection of ``variables`` ({} for a model without branches)."""
    return dict(variables.get(GAMMA, {}))


def projected_variables(variables: Mapping[str, Any]) -> dict:
    """A copy of ``variables`` with every γ set to 0: the deployed equivariant model.

    ``model.apply(projected_variables(v), x)`` equals ``model.apply(v, x, project=True)``
    (up to floating point), but still evaluates the branches; prefer ``project=True``.
    """
    out = dict(variables)
    if GAMMA in out:
        out[GAMMA] = jax.tree.map(jnp.zeros_like, out[GAMMA])
    return out


def named_leaves(tree: Any) -> dict[str, jax.Array]:
    """Flatten a pytree into ``{"a/b/gamma": leaf}`` with slash-joined key paths (two paths
    that join to the same name, e.g. ``{"a/b": x, "a": {"b": y}}``, are an error)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = {}
    for path, leaf in flat:
        parts = []
        for key in path:
            if isinstance(key, jax.tree_util.DictKey):
                parts.append(str(key.key))
            elif isinstance(key, jax.tree_util.GetAttrKey):
                parts.append(key.name)
            elif isinstance(key, jax.tree_util.SequenceKey):
                parts.append(str(key.idx))
            else:
                parts.append(str(key))
        name = "/".join(parts)
        if name in names:
            raise ValueError(f"named_leaves: two leaves are both named {name!r} (a key containing '/'?)")
        names[name] = leaf
    return names
