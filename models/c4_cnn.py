"""A strictly C4-equivariant CNN (group convolutions on Z² ⋊ C4) with ACE breaking branches.

Feature maps on the group are arrays ``(B, H, W, 4, C)``: the axis of size 4 is the
orientation r ∈ Z4 and C4 acts on them by the regular representation
(:func:`ace_jax.c4_regular_act`: rotate every map spatially by k·90° and shift r ↦ r + k).
Images ``(B, H, W, C)`` transform by plain rotation (:func:`ace_jax.c4_act`).
``R^r ψ`` below is ``jnp.rot90(ψ, r)`` over the two spatial kernel axes; ``⋆`` is
cross-correlation with 'SAME' zero padding and an odd kernel, which commutes exactly with
90° rotations of a square image when the kernel is rotated too.

- Lifting convolution (Z² → Z² ⋊ C4), kernel ψ ``(k, k, C_in, C_out)``:

      out[x, r, c'] = Σ_c ((R^r ψ_{·,·,c,c'}) ⋆ f_c)(x) + b_{c'}

- Group convolution (Z² ⋊ C4 → Z² ⋊ C4), kernel ψ ``(k, k, 4, C_in, C_out)``:

      out[x, r, c'] = Σ_{s,c} ((R^r ψ_{·,·,s−r,c,c'}) ⋆ f_{s,c})(x) + b_{c'}

  i.e. the filter of output orientation r is rotated spatially by r and cyclically shifted by
  r over the input orientation axis. Bias is shared over orientations.

Both are computed with ONE ``lax.conv_general_dilated`` call each: the 4 transformed copies
of the filter are stacked as output channels ``(r, c')`` and the input orientation axis is
flattened into the input channels ``(s, c)``.

The network (``C4CNN``): lifting conv → ReLU, then ``num_layers − 1`` group convs → ReLU,
then orientation pooling (mean over the 4 axis) and a 1×1 conv to one output channel, an
image that rotates with the input. Every layer i and the output carry an ACE branch
``γ_i · g_i(h_{i−1})`` added to the layer output (after the nonlinearity), where g_i is a plain
(non-equivariant) convolution on the flattened input features ``(H, W, 4·C)`` (the input
image for the lifting layer); a 1×1 branch is the paper's "Linear layer on the flattened
features". By default the branch kernels are spectral-normalised and read unit-norm pixel
vectors, so that |g_i| is bounded and γ_i bounds the breaking (see :class:`ConvBranch`).

A cheaper variant exists but is not the default: ``branch_bound="tanh", branch_shared=True``
(tanh on the branch output instead of the normalisation pass over its input, and each
group-conv branch emitting C channels shared by the four orientations; the lifting branch is
never shared, since a shared map of the 1-channel image would be equivariant). Its ACE step
measured about 1.0× the vanilla step (batch 32, 2-core CPU; the default costs ~1.4×), but on the
quick C4 study (3 seeds) its square → square projection ended at MSE ~0.15–0.20 against the
baseline's 1.5e-3, γ ≈ 0.2–0.3 (the network leaned on a small-γ correction), while the
default reached γ ≈ 0 and projection MSE 1.2e-5.
With ``project=True`` no branch is evaluated and, at init, no branch parameters and no γ
are created.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ace_jax import SymmetryBreaking, spectral_norm

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _check_odd(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number ('SAME' padding stays centred), got {kernel_size}")


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'SAME' cross-correlation of ``x (B,H,W,I)`` with ``kernel (k,k,I,O)``."""
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME", dimension_numbers=_DIMENSIONS)


def lifting_filter_bank(kernel: jax.Array) -> jax.Array:
    """``(k, k, C_in, C_out)`` → ``(k, k, C_in, 4·C_out)``: the 4 rotated copies, channels (r, c')."""
    bank = jnp.stack([jnp.rot90(kernel, r, axes=(0, 1)) for r in range(4)], axis=3)
    k, _, c_in, _, c_out = bank.shape
    return bank.reshape(k, k, c_in, 4 * c_out)


def group_filter_bank(kernel: jax.Array) -> jax.Array:
    """``(k, k, 4, C_in, C_out)`` → ``(k, k, 4·C_in, 4·C_out)``.

    Copy r is ``R^r`` applied spatially to the kernel rolled by r over the orientation axis
    (``rolled[:, :, s] = ψ[:, :, s − r]``); input channels (s, c), output channels (r, c').
    """
    bank = jnp.stack(
        [jnp.rot90(jnp.roll(kernel, r, axis=2), r, axes=(0, 1)) for r in range(4)], axis=4
    )  # (k, k, 4, C_in, 4, C_out)
    k, _, _, c_in, _, c_out = bank.shape
    return bank.reshape(k, k, 4 * c_in, 4 * c_out)


class LiftingConv(nn.Module):
    """Images ``(B, H, W, C_in)`` → group feature maps ``(B, H, W, 4, features)``."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_odd(self.kernel_size)
        if x.ndim != 4:
            raise ValueError(f"LiftingConv expects (B, H, W, C), got shape {x.shape}")
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = _conv(x, lifting_filter_bank(kernel))
        return y.reshape(*x.shape[:3], 4, self.features) + bias.astype(y.dtype)


class GroupConv(nn.Module):
    """Group feature maps ``(B, H, W, 4, C_in)`` → ``(B, H, W, 4, features)``."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        _check_odd(self.kernel_size)
        if f.ndim != 5 or f.shape[-2] != 4:
            raise ValueError(f"GroupConv expects (B, H, W, 4, C), got shape {f.shape}")
        k, c_in = self.kernel_size, f.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 4, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = _conv(f.reshape(*f.shape[:3], 4 * c_in), group_filter_bank(kernel))
        return y.reshape(*f.shape[:3], 4, self.features) + bias.astype(y.dtype)


BRANCH_BOUNDS = ("tanh", "normalize", "none")


class ConvBranch(nn.Module):
    """Plain (non-equivariant) 'SAME' convolution ``(B, H, W, C_in)`` → ``(B, H, W, features)``.

    With ``spectral=True`` the kernel, reshaped to a ``(k·k·C_in, features)`` matrix, is divided
    by its largest singular value (Miyato et al.'s convolutional spectral normalisation).

    ``bound`` makes the branch bounded whatever the scale of the equivariant features it reads
    (Assumption 1 of METHOD.md §4, ‖g‖ ≤ B), so the network cannot keep a large correction at
    small γ by inflating those features, and |γ| bounds how much the layer breaks the symmetry:

    - ``"tanh"``: ``g = tanh(conv(h) + b)``, |g| ≤ 1 per output (the cheapest: one elementwise
      op on the branch output, which is small);
    - ``"normalize"``: every input pixel vector is scaled to (at most) unit norm,
      ``h_p / sqrt(‖h_p‖² + ε)``, and the conv has no bias; with a spectral-normalised kernel the
      output is bounded per pixel by ``kernel_size`` (by 1 for 1×1 convs). It costs a
      normalisation pass over the (large) branch input, forward and backward;
    - ``"none"``: an unbounded affine conv (the class default; :class:`C4CNN` passes its own).
    """

    features: int
    kernel_size: int = 3
    spectral: bool = True
    bound: str = "none"
    epsilon: float = 1e-4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_odd(self.kernel_size)
        if self.bound not in BRANCH_BOUNDS:
            raise ValueError(f"ConvBranch bound must be one of {BRANCH_BOUNDS}, got {self.bound!r}")
        if x.ndim != 4:
            raise ValueError(f"ConvBranch expects (B, H, W, C), got shape {x.shape}")
        k = self.kernel_size
        if self.bound == "normalize":
            x = x * lax.rsqrt(jnp.sum(x**2, axis=-1, keepdims=True) + self.epsilon)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        if self.spectral:
            sigma = spectral_norm(kernel.reshape(-1, self.features))
            kernel = kernel / jnp.maximum(sigma, 1e-12)
        # A 1×1 convolution is a matrix product over channels; XLA's CPU conv path is far
        # slower for it than a plain dot.
        y = x @ kernel[0, 0].astype(x.dtype) if k == 1 else _conv(x, kernel)
        if self.bound != "normalize":
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return jnp.tanh(y) if self.bound == "tanh" else y


class C4CNN(nn.Module):
    """C4-equivariant CNN image → image with one ACE branch per layer and one at the output.

    Attributes:
      channels: channels per orientation of every hidden group feature map.
      num_layers: number of equivariant conv layers (1 lifting + ``num_layers − 1`` group).
      kernel_size: odd spatial size of the equivariant filters.
      branch_kernel_size: odd spatial size of the breaking branches' plain convs.
      spectral: spectral-normalise the branches (METHOD.md §5).
      branch_bound: how each branch is kept bounded, ``"normalize"`` (default), ``"tanh"``
        or ``"none"`` (see :class:`ConvBranch`).
      branch_shared: each group-conv layer's branch outputs C channels added to all 4
        orientations instead of 4·C channels, one per (orientation, channel) (default). The
        lifting layer's branch is never shared (shared, it would not break C4).
      gamma_init: initial γ of every branch.
      activation: pointwise nonlinearity (any pointwise map keeps equivariance).

    Call: ``model.apply(variables, x, project=False)`` with ``x (H, W, 1)`` or
    ``(B, H, W, 1)``, ``H == W``; returns an array of the same shape.
    Branch/γ names: ``layer{i}_breaking`` (i = 0 … num_layers − 1) and ``output_breaking``.
    """

    channels: int = 8
    num_layers: int = 4
    kernel_size: int = 3
    branch_kernel_size: int = 1
    spectral: bool = True
    branch_bound: str = "normalize"
    branch_shared: bool = False
    gamma_init: float = 1.0
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, project: bool = False) -> jax.Array:
        if x.ndim not in (3, 4) or x.shape[-1] != 1 or x.shape[-3] != x.shape[-2]:
            raise ValueError(f"C4CNN expects a square single-channel image (H, H, 1) or (B, H, H, 1), got {x.shape}")
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(f"num_layers and channels must be >= 1, got {self.num_layers}, {self.channels}")
        single = x.ndim == 3
        if single:
            x = x[None]
        batch, height, width, _ = x.shape
        c = self.channels

        def breaking(name, features, inputs):
            # parent=None: the branch becomes a child of SymmetryBreaking (params at <name>/branch).
            branch = ConvBranch(features, self.branch_kernel_size, self.spectral, self.branch_bound, parent=None)
            return SymmetryBreaking(branch, self.gamma_init, name=name)(inputs)

        def correction(name, inputs, like, shared):
            """γ·g(inputs) shaped like the group feature map ``like (B, H, W, 4, C)``."""
            if shared:
                return breaking(name, c, inputs)[..., None, :]
            return breaking(name, 4 * c, inputs).reshape(like.shape)

        h = self.activation(LiftingConv(c, self.kernel_size, name="layer0")(x))
        if not project:
            # Never shared here: a 1×1 map of the 1-channel image, equal for all orientations,
            # would be C4-equivariant (it breaks nothing); per-orientation weights do break.
            h = h + correction("layer0_breaking", x, h, shared=False)
        for i in range(1, self.num_layers):
            flat = h.reshape(batch, height, width, 4 * c)
            h_next = self.activation(GroupConv(c, self.kernel_size, name=f"layer{i}")(h))
            if not project:
                h_next = h_next + correction(f"layer{i}_breaking", flat, h_next, self.branch_shared)
            h = h_next
        y = nn.Dense(1, name="readout")(jnp.mean(h, axis=-2))
        if not project:
            y = y + breaking("output_breaking", 1, h.reshape(batch, height, width, 4 * c))
        return y[0] if single else y
