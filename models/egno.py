"""EGNO: an equivariant graph neural operator (Xu et al., 2024) with ACE symmetry-breaking branches.

EGNO predicts a whole trajectory of ``T`` future frames of a graph at once. The input state
(positions ``x``, velocities ``v``, invariant node features) is replicated over the ``T``
output frames, the scalar features get a sinusoidal embedding of the frame index
``t = 0 .. T-1``, and ``L`` blocks then alternate

1. a temporal Fourier convolution along the frame axis (FFT over ``T``, keep the lowest
   ``modes`` frequencies, mix channels with learned complex weights, inverse FFT), and
2. an EGNN layer (Satorras et al., 2021) with velocity, run on every frame's graph.

Shapes for one sample (the training engine vmaps over the batch): ``J`` joints, ``E``
directed edges, ``H`` hidden features, ``T`` frames.

Temporal convolution (:class:`TemporalFourierConv`), for a signal ``s`` of shape
``(T, ..., C)`` with ``ŝ_k = rfft(s)_k`` the DFT along the frame axis::

    out = irfft_T( [ Σ_c ŝ_k[..., c] W_k[c, o]  for k < K ,  0 for k ≥ K ] ),
    K = min(modes, T // 2 + 1),  W_k ∈ ℂ^{C × C'}.

Scalar features ``h (T, J, H)`` use ``h ← h + silu(conv(h))``. The vector channels are
stacked as ``X = [x − c, v]`` of shape ``(T, J, 3, 2)`` with ``c`` the input centroid and use
``X ← X + conv(X)``: the weights mix only the frame and channel axes, never the ``xyz`` axis,
so the conv commutes with every linear map of ``xyz`` (in particular rotations and
reflections), and ``x − c`` is translation invariant.

EGNN layer (:class:`EGNOLayer`), on every frame independently; edge ``(j → i)`` with sender
``j`` and receiver ``i``, edge attributes ``a_ij`` (hop type and the squared input-frame
distance ``‖x⁰_i − x⁰_j‖² / s_x²``)::

    m_ij  = φ_e(h_i, h_j, ‖x_i − x_j‖² / s_x², a_ij)
    v_i  ← φ_v(h_i) v_i + (1/deg_i) Σ_j (x_i − x_j) φ_x(m_ij)   [+ γ_x g_x(z_i)]
    x_i  ← x_i + v_i
    h_i  ← h_i + φ_h(h_i, Σ_j m_ij)                              [+ γ_h g_h(z_i)]

(the h update, and with it the feature branch, is left out of the last layer: the output is x
alone, so a last-layer γ_h could not act on it).

``s_x`` (``length_scale``) and ``s_v`` (``velocity_scale``) are fixed positive constants, e.g.
the training set's spreads, that put lengths and velocities on an O(1) scale (scaling an
invariant or a vector by a constant changes no symmetry).

ACE branches (bracketed; absent with ``project=True``): ``z_i = [h_i, (x_i − c)/s_x, v_i/s_v]``
is the concatenation of the node's scalars and the RAW components of its centred position and
its velocity, read as plain numbers. ``g_h = MLPBranch(H, spectral=True)`` and
``g_x = MLPBranch(3, spectral=True)`` therefore see the orientation of the skeleton and can
break rotation/reflection equivariance — the feature branch makes ``h`` orientation
dependent, the coordinate branch adds a non-equivariant displacement. Every branch sees
positions only relative to the centroid, so translation equivariance is kept by the full
model too; the branches relax the rotational part of the group.

Symmetry of the projection (γ = 0, ``project=True``). Positions enter only through
differences ``x_i − x_j``, the centroid-relative ``x − c`` and the final ``c + (x − c)``;
velocities only through norms and as vectors scaled by invariants. With the node features
held as given invariants the projection is therefore E(3)-equivariant in ``(loc, vel)``. On
MoCap the node features contain the height ``y``, which is invariant exactly under the
group documented in :mod:`data.mocap`: O(2) about the vertical ``y`` axis plus horizontal
``x``-``z`` translations. Hence on the data the projection is equivariant to that group and
(by construction of the inputs) not to, e.g., rotations about ``x``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ace_jax import MLPBranch, SymmetryBreaking


def sinusoidal_time_embedding(num_timesteps: int, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of the frame indices ``t = 0 .. T-1``, shape ``(T, dim)``.

    With ``half = dim // 2`` and ``ω_k = max_period^(−k / max(half − 1, 1))``:
    ``emb[t] = [sin(t ω_0) .. sin(t ω_{half−1}), cos(t ω_0) .. cos(t ω_{half−1})]``
    (a zero column is appended when ``dim`` is odd).
    """
    if num_timesteps < 1 or dim < 1:
        raise ValueError(f"num_timesteps and dim must be >= 1, got {num_timesteps}, {dim}")
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half) / max(half - 1, 1))
    angles = jnp.arange(num_timesteps, dtype=jnp.float32)[:, None] * frequencies[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _complex_uniform_init(scale: float):
    """Initialiser of the real or imaginary part of the Fourier weights: U[0, scale)."""

    def init(key, shape, dtype=jnp.float32):
        return scale * jax.random.uniform(key, shape, dtype)

    return init


class TemporalFourierConv(nn.Module):
    """Spectral convolution along the leading (frame) axis, mixing only the last (channel) axis.

    ``s (T, ..., C) -> (T, ..., features)``: ``irfft_T`` of the lowest ``K = min(modes,
    T // 2 + 1)`` Fourier modes of ``s`` multiplied by learned complex ``(C, features)``
    matrices (one per mode); higher modes are set to zero. The middle axes (nodes, ``xyz``)
    are never mixed, so the map commutes with any linear map acting on them.

    Attributes:
      features: output channels C'.
      modes: number of Fourier modes kept (the learned weights exist for ``modes``; only
        the first ``K`` are used for short trajectories).
    """

    features: int
    modes: int = 2

    @nn.compact
    def __call__(self, signal: jax.Array) -> jax.Array:
        if signal.ndim < 2:
            raise ValueError(f"TemporalFourierConv expects (T, ..., C), got shape {signal.shape}")
        if self.modes < 1:
            raise ValueError(f"modes must be >= 1, got {self.modes}")
        num_frames, channels = signal.shape[0], signal.shape[-1]
        scale = 1.0 / (channels * self.features)
        shape = (self.modes, channels, self.features)
        w_real = self.param("weight_real", _complex_uniform_init(scale), shape)
        w_imag = self.param("weight_imag", _complex_uniform_init(scale), shape)
        kept = min(self.modes, num_frames // 2 + 1)
        spectrum = jnp.fft.rfft(signal, axis=0)[:kept]  # (K, ..., C) complex
        weights = (w_real[:kept] + 1j * w_imag[:kept]).astype(spectrum.dtype)
        mixed = jnp.einsum("k...c,kco->k...o", spectrum, weights)
        padded = jnp.zeros((num_frames // 2 + 1,) + mixed.shape[1:], mixed.dtype).at[:kept].set(mixed)
        return jnp.fft.irfft(padded, n=num_frames, axis=0).astype(signal.dtype)


_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""Kernel init U(±1/√fan_in) (variance 1/(3·fan_in)), the common default for EGNN-type models:
it keeps the residual feature updates of a deep stack from growing at initialisation."""


class _MLP(nn.Module):
    """Dense layers with SiLU between them (and after the last one if ``final_activation``)."""

    sizes: tuple[int, ...]
    final_activation: bool = False
    last_kernel_init: nn.initializers.Initializer = _DENSE_INIT

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.sizes):
            last = i == len(self.sizes) - 1
            x = nn.Dense(width, kernel_init=self.last_kernel_init if last else _DENSE_INIT)(x)
            if not last or self.final_activation:
                x = nn.silu(x)
        return x


class EGNOLayer(nn.Module):
    """One EGNN layer with velocity on every frame's graph, plus the two ACE branches.

    Args of ``__call__`` (``c`` the input centroid):
      h: (T, J, H) scalar features; x: (T, J, 3) positions; v: (T, J, 3) velocities;
      centroid: (3,); edges: (E, 2) int ``(sender, receiver)``; edge_features: (E, F_e)
      invariant edge attributes; project: skip (do not build or evaluate) the branches.

    Returns ``(h, x, v)`` with the same shapes. See the module docstring for the update.
    ``update_features=False`` (the last layer, whose h is never read) returns h unchanged and
    builds neither φ_h nor the feature branch.
    ``length_scale`` (s_x) divides the current distances (squared: s_x²) and the raw ``x − c``
    fed to the branches, ``velocity_scale`` the raw ``v`` fed to the branches.
    """

    hidden: int
    gamma_init: float = 1.0
    length_scale: float = 1.0
    velocity_scale: float = 1.0
    update_features: bool = True

    @nn.compact
    def __call__(self, h, x, v, centroid, edges, edge_features, *, project: bool = False):
        num_frames, num_nodes, _ = h.shape
        senders, receivers = edges[:, 0], edges[:, 1]
        rel = x[:, receivers] - x[:, senders]  # (T, E, 3): x_i − x_j
        radial = jnp.sum(rel**2, axis=-1, keepdims=True) / self.length_scale**2  # (T, E, 1)
        edge_feat = jnp.broadcast_to(edge_features, (num_frames,) + edge_features.shape)
        edge_in = jnp.concatenate([h[:, receivers], h[:, senders], radial, edge_feat], axis=-1)
        messages = _MLP((self.hidden, self.hidden), final_activation=True, name="edge_mlp")(edge_in)

        coord_weights = _MLP(
            (self.hidden, 1), last_kernel_init=nn.initializers.variance_scaling(1e-3, "fan_avg", "uniform"),
            name="coord_mlp",
        )(messages)  # (T, E, 1)
        degree = jnp.zeros((num_nodes,), h.dtype).at[receivers].add(1.0)
        trans_sum = jnp.zeros_like(x).at[:, receivers].add(rel * coord_weights)
        trans_mean = trans_sum / jnp.maximum(degree, 1.0)[None, :, None]
        vel_scale = _MLP((self.hidden, 1), name="vel_mlp")(h)  # (T, J, 1)
        v_new = vel_scale * v + trans_mean
        h_new = h
        if self.update_features:
            message_sum = jnp.zeros((num_frames, num_nodes, self.hidden), h.dtype).at[:, receivers].add(messages)
            h_new = h + _MLP((self.hidden, self.hidden), name="node_mlp")(jnp.concatenate([h, message_sum], axis=-1))
        if not project:
            # Raw centred coordinates and velocities as plain numbers: orientation-aware inputs.
            breaking_input = jnp.concatenate(
                [h, (x - centroid) / self.length_scale, v / self.velocity_scale], axis=-1
            )  # (T, J, H + 6)
            v_new = v_new + SymmetryBreaking(
                MLPBranch(3, spectral=True), self.gamma_init, name="coordinate_breaking"
            )(breaking_input)
            if self.update_features:
                h_new = h_new + SymmetryBreaking(
                    MLPBranch(self.hidden, spectral=True), self.gamma_init, name="feature_breaking"
                )(breaking_input)
        return h_new, x + v_new, v_new


class EGNO(nn.Module):
    """Equivariant graph neural operator for trajectories, with ACE branches per layer.

    Attributes:
      hidden: H, scalar feature width.
      num_layers: L, number of (temporal conv, EGNN layer) blocks.
      modes: Fourier modes kept by the temporal convolutions.
      time_embed: size of the sinusoidal frame-index embedding.
      num_timesteps: T, number of predicted frames.
      gamma_init: initial γ of every branch.
      length_scale, velocity_scale: fixed positive constants ``s_x``, ``s_v``: squared
        distances fed to the edge network are divided by ``s_x²``, the raw centred positions /
        velocities fed to the branches by ``s_x`` / ``s_v`` (any positive values keep every
        symmetry; they only set the scale of those inputs).

    ``__call__(loc (J,3), vel (J,3), node_features (J,F), edges (E,2), edge_attr (E,A),
    project=False) -> (T, J, 3)`` predicted positions of ONE sample. ``edges`` are
    ``(sender, receiver)`` index pairs; ``edge_attr`` invariant edge attributes (on MoCap the
    hop type). With ``project=True`` the branches are neither built nor evaluated.
    Per layer ``i`` the γ's are ``layer_{i}/coordinate_breaking/gamma`` and, except in the last
    layer (whose scalar features are never read, so it has no feature update),
    ``layer_{i}/feature_breaking/gamma``: 2L − 1 γ in all.
    """

    hidden: int = 128
    num_layers: int = 6
    modes: int = 2
    time_embed: int = 32
    num_timesteps: int = 5
    gamma_init: float = 1.0
    length_scale: float = 1.0
    velocity_scale: float = 1.0

    @nn.compact
    def __call__(self, loc, vel, node_features, edges, edge_attr, project: bool = False):
        loc, vel, node_features, edges, edge_attr = map(jnp.asarray, (loc, vel, node_features, edges, edge_attr))
        _check_inputs(loc, vel, node_features, edges, edge_attr)
        if self.num_layers < 1 or self.hidden < 1 or self.num_timesteps < 1:
            raise ValueError(
                f"EGNO: hidden, num_layers and num_timesteps must be >= 1, got "
                f"{self.hidden}, {self.num_layers}, {self.num_timesteps}"
            )
        num_frames, num_nodes = self.num_timesteps, loc.shape[0]
        centroid = jnp.mean(loc, axis=0)  # (3,)
        senders, receivers = edges[:, 0], edges[:, 1]
        input_radial = jnp.sum((loc[receivers] - loc[senders]) ** 2, axis=-1, keepdims=True)
        input_radial = input_radial / self.length_scale**2
        edge_features = jnp.concatenate([edge_attr.astype(loc.dtype), input_radial], axis=-1)

        time_emb = sinusoidal_time_embedding(num_frames, self.time_embed).astype(loc.dtype)
        h = jnp.concatenate(
            [
                jnp.broadcast_to(node_features, (num_frames,) + node_features.shape),
                jnp.broadcast_to(time_emb[:, None, :], (num_frames, num_nodes, self.time_embed)),
            ],
            axis=-1,
        )
        h = nn.Dense(self.hidden, kernel_init=_DENSE_INIT, name="embedding")(h)  # (T, J, H)
        x = jnp.broadcast_to(loc, (num_frames,) + loc.shape)
        v = jnp.broadcast_to(vel, (num_frames,) + vel.shape)

        for i in range(self.num_layers):
            h = h + nn.silu(TemporalFourierConv(self.hidden, self.modes, name=f"time_conv_h_{i}")(h))
            vectors = jnp.stack([x - centroid, v], axis=-1)  # (T, J, 3, 2)
            vectors = vectors + TemporalFourierConv(2, self.modes, name=f"time_conv_x_{i}")(vectors)
            x, v = vectors[..., 0] + centroid, vectors[..., 1]
            # the last layer's h would never be read: no feature update and no feature branch
            # there (its γ would be constrained but could not act on the output)
            layer = EGNOLayer(self.hidden, self.gamma_init, self.length_scale, self.velocity_scale,
                              update_features=i < self.num_layers - 1, name=f"layer_{i}")
            h, x, v = layer(h, x, v, centroid, edges, edge_features, project=project)
        return x


def _check_inputs(loc, vel, node_features, edges, edge_attr) -> None:
    if loc.ndim != 2 or loc.shape[-1] != 3:
        raise ValueError(f"EGNO: loc must have shape (J, 3) for one sample, got {loc.shape}")
    if vel.shape != loc.shape:
        raise ValueError(f"EGNO: vel must have the shape of loc {loc.shape}, got {vel.shape}")
    if node_features.ndim != 2 or node_features.shape[0] != loc.shape[0]:
        raise ValueError(f"EGNO: node_features must have shape (J={loc.shape[0]}, F), got {node_features.shape}")
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise ValueError(f"EGNO: edges must have shape (E, 2), got {edges.shape}")
    if not jnp.issubdtype(edges.dtype, jnp.integer):
        raise ValueError(f"EGNO: edges must be integer indices, got dtype {edges.dtype}")
    if edge_attr.ndim != 2 or edge_attr.shape[0] != edges.shape[0]:
        raise ValueError(f"EGNO: edge_attr must have shape (E={edges.shape[0]}, A), got {edge_attr.shape}")
