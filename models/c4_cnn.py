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
image that rotates with the input. Every layer i and the output carry an ACE branch g_i, a
plain (non-equivariant) affine convolution of the layer's INPUT flattened to ``(H, W, 4·C)``
(the input image for the lifting layer); 1×1 by default, the paper's "Linear layer on the
flattened features" (METHOD.md §1: f_i(x) = f_eq,i(x) + γ_i g_i(x)).

Default (``branch_in_kernel=True``): the branch is folded into the layer's own convolution,
``h_i = act(h_{i−1} ⋆ (ψ_i + γ_i δψ_i) + b_i + γ_i δb_i)``, so the ACE model does the vanilla
model's convolutions plus a few kernel additions (:class:`ace_jax.WeightBranch`, δψ
spectral-normalised: per output pixel ‖(γ δψ ⋆ h)_p‖ ≤ |γ| ‖patch_p(h)‖, the norm of the
k_b × k_b input patch it reads — for the default 1×1 branch, of the input pixel itself).
Step time (batch 32, quiet 2-core CPU, ``python -m experiments.benchmark --models c4_cnn
--steps 300``): vanilla 32.3 ms, ACE 33.2 ms (1.03×), ACE-resilient 32.9 ms (1.02×).
Measured on the quick C4 study (3 seeds, ``python -m experiments.c4_toy --seeds 3``, 185 s on
the 2-core CPU): square → square γ → 0 (|γ| at the last epoch ≤ 0.019 in every branch and
seed, mean over seeds ≤ 0.007) with projection MSE 1.37e-4 against the baseline's 1.33e-3; rectangle and
non-symmetric full-model MSE 1.46e-2 / 1.30e-2 below the C4 floors 3.53e-2 / 5.40e-2, with the
output branch's |γ| at 0.10 / 0.16. (An earlier record of the same command read projection
2.0e-4 against 1.5e-3 and γ ≤ 0.015, then from the selected epoch's γ.)

Other branch forms (``branch_in_kernel=False``): γ_i·g_i(h_{i−1}) added AFTER the
nonlinearity, by a separate :class:`ConvBranch`. ``branch_bound="normalize"`` (unit-norm input
pixels, |g| bounded absolutely) gave the same qualitative results (square → square projection
1.2e-5) at ~1.3× the vanilla step; ``branch_bound="tanh", branch_shared=True`` (C channels
shared by the four orientations; the lifting branch is never shared, since a shared map of
the 1-channel image would be equivariant) costs ~1.0× but failed square → square (γ stayed
0.2–0.3, projection MSE 0.15–0.20).
With ``project=True`` no branch is evaluated and, at init, no branch parameters and no γ
are created.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ace_jax import SymmetryBreaking, spectral_normalize, weight_breaking

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


def _perturbed_conv(x, bank, bias, perturbation):
    """``x ⋆ bank + bias`` (bias shared over the 4 orientations), plus the optional
    non-equivariant ``perturbation = (δψ (k_b, k_b, I, O), δb (O,))`` folded into the same conv:
    δψ is zero-padded to the bank's centred k×k window, so ``x ⋆ (bank + δψ) = x ⋆ bank + x ⋆ δψ``
    costs one convolution."""
    k = bank.shape[0]
    bias = jnp.tile(bias, 4)
    if perturbation is not None:
        delta, delta_bias = perturbation
        if delta.shape[2:] != bank.shape[2:] or delta.shape[0] > k:
            raise ValueError(f"perturbation kernel {delta.shape} does not fit the filter bank {bank.shape}")
        pad = (k - delta.shape[0]) // 2
        bank = bank + jnp.pad(delta, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
        bias = bias + delta_bias
    return _conv(x, bank) + bias.astype(x.dtype)


class LiftingConv(nn.Module):
    """Images ``(B, H, W, C_in)`` → group feature maps ``(B, H, W, 4, features)``.

    Call ``layer(x, perturbation=None)``; ``perturbation = (δψ (k_b, k_b, C_in, 4·features),
    δb (4·features,))`` adds the plain conv ``x ⋆ δψ + δb`` (channels (r, c')) in the same conv.
    """

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, perturbation=None) -> jax.Array:
        _check_odd(self.kernel_size)
        if x.ndim != 4:
            raise ValueError(f"LiftingConv expects (B, H, W, C), got shape {x.shape}")
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = _perturbed_conv(x, lifting_filter_bank(kernel), bias, perturbation)
        return y.reshape(*x.shape[:3], 4, self.features)


class GroupConv(nn.Module):
    """Group feature maps ``(B, H, W, 4, C_in)`` → ``(B, H, W, 4, features)``.

    Call ``layer(f, perturbation=None)``; ``perturbation = (δψ (k_b, k_b, 4·C_in, 4·features),
    δb (4·features,))`` adds the plain conv of the flattened maps in the same conv.
    """

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, f: jax.Array, perturbation=None) -> jax.Array:
        _check_odd(self.kernel_size)
        if f.ndim != 5 or f.shape[-2] != 4:
            raise ValueError(f"GroupConv expects (B, H, W, 4, C), got shape {f.shape}")
        k, c_in = self.kernel_size, f.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 4, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = _perturbed_conv(f.reshape(*f.shape[:3], 4 * c_in), group_filter_bank(kernel), bias, perturbation)
        return y.reshape(*f.shape[:3], 4, self.features)


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
            kernel = spectral_normalize(kernel.reshape(-1, self.features)).reshape(kernel.shape)
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
      branch_in_kernel: fold each branch, an affine conv of the layer's INPUT, into that
        layer's convolution, ``act(x ⋆ (ψ + γ·δψ) + b + γ·δb)`` (default): no extra pass over
        the features; ``branch_kernel_size`` may be up to ``kernel_size``; needs
        ``branch_bound="none"`` (the bound is the spectral norm's, relative to the input;
        :class:`ace_jax.WeightBranch` holds δψ as a ``(k_b·k_b·C_in, C_out)`` matrix and δb).
        The output branch is ``γ·(flat(h) δW + δb)`` next to the readout.
      branch_bound: with ``branch_in_kernel=False``, how each post-activation branch is
        bounded: ``"normalize"``, ``"tanh"`` or ``"none"`` (see :class:`ConvBranch`).
      branch_shared: with ``branch_in_kernel=False``, each group-conv layer's branch outputs C
        channels added to all 4 orientations instead of 4·C channels. The lifting layer's
        branch is never shared (shared, it would not break C4).
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
    branch_bound: str = "none"
    branch_shared: bool = False
    branch_in_kernel: bool = True
    gamma_init: float = 1.0
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, project: bool = False) -> jax.Array:
        if x.ndim not in (3, 4) or x.shape[-1] != 1 or x.shape[-3] != x.shape[-2]:
            raise ValueError(f"C4CNN expects a square single-channel image (H, H, 1) or (B, H, H, 1), got {x.shape}")
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(f"num_layers and channels must be >= 1, got {self.num_layers}, {self.channels}")
        if self.branch_bound not in BRANCH_BOUNDS:
            raise ValueError(f"C4CNN branch_bound must be one of {BRANCH_BOUNDS}, got {self.branch_bound!r}")
        if self.branch_in_kernel:
            if self.branch_bound != "none" or self.branch_shared:
                raise ValueError(
                    "branch_in_kernel folds an affine branch into the conv kernel: it needs "
                    f"branch_bound='none' and branch_shared=False, got {self.branch_bound!r}, {self.branch_shared}"
                )
            if self.branch_kernel_size > self.kernel_size:
                raise ValueError(
                    f"branch_in_kernel needs branch_kernel_size <= kernel_size, got {self.branch_kernel_size} > {self.kernel_size}"
                )
        single = x.ndim == 3
        if single:
            x = x[None]
        if self.branch_in_kernel:
            y = self._in_kernel(x, project)
            return y[0] if single else y
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

    def _in_kernel(self, x: jax.Array, project: bool) -> jax.Array:
        """The network with every branch folded into its layer's convolution."""
        batch, height, width, _ = x.shape
        c, kb = self.channels, self.branch_kernel_size

        def perturbation(name, in_features, features, size=kb):
            """(γ·δψ (size, size, in, out), γ·δb): the layer's folded branch (ace_jax.WeightBranch)."""
            delta, delta_bias = weight_breaking(
                name, (size * size * in_features, features), spectral=self.spectral, gamma_init=self.gamma_init, use_bias=True
            )
            return delta.reshape(size, size, in_features, features), delta_bias

        if project:
            perturbation = lambda *args: None  # noqa: E731

        h = LiftingConv(c, self.kernel_size, name="layer0")(x, perturbation("layer0_breaking", x.shape[-1], 4 * c))
        h = self.activation(h)
        for i in range(1, self.num_layers):
            layer = GroupConv(c, self.kernel_size, name=f"layer{i}")
            h = self.activation(layer(h, perturbation(f"layer{i}_breaking", 4 * c, 4 * c)))
        y = nn.Dense(1, name="readout")(jnp.mean(h, axis=-2))
        if not project:
            delta, delta_bias = perturbation("output_breaking", 4 * c, 1, size=1)
            flat = h.reshape(batch, height, width, 4 * c)
            y = y + flat @ delta[0, 0].astype(flat.dtype) + delta_bias.astype(flat.dtype)
        return y
