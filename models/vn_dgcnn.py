"""Vector Neurons (Deng et al. 2021) and the VN-DGCNN point-cloud classifier, with ACE branches.

A *vector feature* is an array ``(..., C, 3)``: C channels, each a 3-vector. A rotation R
acts on every channel, V ↦ V Rᵀ (row vectors, as :func:`ace_jax.rotate_points`). Leading
axes index points (and neighbours); the model handles ONE cloud, the engine vmaps it.

Layers (each SO(3)-equivariant, in fact O(3)-equivariant, and shared over points; the classifier
below is SO(3)-invariant, not O(3)-invariant, because its first edge features include the
pseudovector x_j × x_i, which a reflection flips — ``cross_product=False`` drops it):

- VN-Linear: V' = Wᵀ V, i.e. V'_{c'} = Σ_c W_{c c'} V_c. It mixes channels only (never the
  xyz axis), has no bias (a bias vector would not rotate), so (V Rᵀ)' = V' Rᵀ.
- VN-LeakyReLU with learned directions: from the same input V, a feature q = W_q V and a
  direction k = W_k V (per channel, or one shared channel). With slope α,

      out = α q + (1 − α) · ( q                               if ⟨q, k⟩ ≥ 0
                              q − ⟨q, k⟩ / (‖k‖² + ε) · k     otherwise )

  i.e. the component of q along k is projected out when q points against k. ⟨·,·⟩ and ‖·‖
  are rotation invariant and q, k rotate, so the output rotates.
- VN-Norm (stateless replacement for VN-BatchNorm, see below): per channel c the vector
  norms n = ‖V_c‖ are standardised over all leading axes of ONE cloud (its points, and
  neighbours in an edge convolution): n̂ = (n − mean n) / sqrt(var n + ε) · a_c + b_c, then
  V_c ↦ V_c / n · n̂. The statistics are invariant to rotations and to the order of the points.
- VN invariant layer ("std-feature"): two VN-LeakyReLU layers and a VN-Linear map V to an
  equivariant frame Z (3 vectors per point); the invariant features are the inner products
  ⟨V_c, Z_j⟩ (C × 3 numbers per point): both factors rotate, so the products do not.

Deviation from the paper: VN-BatchNorm uses batch statistics in training and running
averages in evaluation (a mutable ``batch_stats`` collection). The ACE engine does not
thread mutable collections and vmaps the model over single clouds, so :class:`VNNorm` uses
per-cloud statistics over points instead (an instance norm of the vector norms). It is
deterministic, identical in training and evaluation, and keeps the model invariant per
cloud. The classifier head uses LayerNorm instead of BatchNorm1d and no dropout, and by
default pools the invariant features by their mean alone (the public model: max and mean).

VN-DGCNN (the classifier, for one cloud ``points (P, 3)``; w = ``width``, 21 ≈ 64/3 in the paper):

1. kNN graph (k neighbours, the point itself included, as DGCNN) on the coordinates; edge
   features [x_j − x_i, x_i, x_j × x_i] → (P, k, 3, 3) (the cross product as in the public
   VN-DGCNN; ``cross_product=False`` gives [x_j − x_i, x_i]);
2. four EdgeConv blocks: VN-LeakyReLU on edge features, mean over the k neighbours,
   widths (w, w, 2w, 4w). Blocks 2–4 rebuild the graph in feature space (dynamic graph,
   kNN on the flattened C·3 numbers, a rotation-invariant distance) with edge features
   [V_j − V_i, V_i] per channel → (P, k, 2C, 3). These blocks never form that tensor: both
   VN-Linear maps are linear in the edge, Wᵀ[V_j − V_i; V_i] = W_aᵀ V_j + (W_b − W_a)ᵀ V_i,
   so they run on the P points and only their outputs are gathered per edge
   (``VNLinearLeakyReLU(...)(x, project, neighbours)``, see :class:`VNLinear`) — k times fewer
   multiply-adds, same parameters, same outputs up to float rounding;
3. concatenation of the four outputs (8w channels), VN-LeakyReLU to 16w channels (one
   shared direction, as the paper's conv5), concatenation with its mean over points (32w);
4. invariant layer → (P, 32w·3) invariant numbers, mean over points (``pooling="mean"``, the
   default, with which every number in experiments/modelnet.py was measured) or max and mean
   concatenated (``pooling="max_mean"``, 2·32w·3 numbers, as the public VN-DGCNN);
5. MLP head (Dense → LayerNorm → LeakyReLU(0.2) per hidden layer) → logits.

ACE (METHOD.md §1, "VN layers 2"): every VN-LeakyReLU block carries two symmetry-breaking
branches, one on the feature path and one on the direction path, and the frame VN-Linear of
the invariant layer carries one (15 γ in all). Three kinds of branch (``branch_kind``):

- ``"in_kernel"`` (default): the branch is a perturbation of the VN-Linear weight, one
  channel-mixing matrix per xyz axis, q_i = Σ_c (W_q + γ_q δ_{q,i})_{c·} V_{c,i}
  (:class:`ace_jax.WeightBranch`, δ spectral-normalised), i.e. q = W_q V + γ_q g_q(V) with g a
  Linear map of the flattened layer INPUT that is block-diagonal over the xyz axes — a
  rotation does not commute with axis-dependent weights. It costs the VN-Linear product
  alone: measured 1.00× the vanilla step (1842 / 1849 ms) against 1.31× for ``"axis"``
  (``python -m experiments.benchmark --models vn_dgcnn,vn_dgcnn_axis --methods vanilla,ace
  --batch 8 --steps 20``, one core, the other busy; 1.03× and 1.56× before the per-point
  EdgeConv products of step 2 above). At the paper's size on both cores (``--models
  vn_dgcnn --methods vanilla,ace --steps 20``, batch 32) the step takes 3.58 s vanilla and
  4.08 s ACE (1.14×; with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), against 9.03 s and
  12.27 s (1.36×) before the EdgeConv products ran per point. The per-axis products run as
  one batched product with xyz moved to the front (:func:`_vn_product`), and the branches'
  spectral norms by power iteration on the Gram matrix (:func:`ace_jax.spectral_norm`);
  timed interleaved in one process, the ACE step took 4.33 s with three products on strided
  slices, 4.36 s with the einsum "...ci,icd->...di" and 4.10 s with the batched product
  (vanilla 3.59 s); in a second, 4.08 s batched,
  4.02 s adding the Gram iteration and 3.94 s with no spectral normalisation at all (vanilla
  3.54 s): the per-axis products, not the normalisation, are most of what remains. (The
  one-core 1.00× above is for the strided products; repeated with the batched ones and the
  other core busy it read 1.17×, but with a p90 of 2.75 s on a 1.63 s vanilla median — too
  noisy to compare.) The per-axis δ triples
  each VN-Linear's weight count (3.7 M parameters against the vanilla 1.8 M, most of it the
  MLP head). Quick study (one seed, ``python -m experiments.modelnet --preset quick
  --branch-kind K``): ACE projection class
  accuracy 74 % clean / 66 % dropout with in_kernel vs 58 % / 56 % with axis (vanilla 82 % / 80 %).
- ``"axis"``: q = W_q V + γ_q · g_q(W_q V), g_q(f)_c = f_c A_c with a learned 3×3
  A_c per channel (:class:`ace_jax.AxisMixBranch`), likewise for k, on the layer's own
  output. XLA cost analysis (batch 32 × 300 points, w = 21): 1.02× the vanilla FLOPs but
  1.38× the bytes — the extra passes over the (P, k, C, 3) edge tensors and the reduction for
  ∂L/∂A_c are memory-bound.
- ``"dense"``: q = W_q V + γ_q · g_q(V) with g an :class:`ace_jax.MLPBranch` acting on the
  C·3 numbers of ONE point (or edge) flattened in (channel, xyz) order, its C'·3 outputs
  reshaped back to (C', 3) in the same order (:class:`VectorBranch`) — the paper's branch.
  It does 3× the work of the VN-Linear it accompanies, on every edge of every kNN graph:
  3.8× the vanilla step's FLOPs at the same setting.

With ``project=True`` no branch is evaluated (and initialising with ``project=True`` creates
neither branch parameters nor γ: the vanilla VN-DGCNN).
(Flattening (C, 3) to C·3 and reshaping back must use the same axis order for every point;
reshaping a channels-first (C, 3, P) layout without the matching transpose would mix
numbers of different points — ``tests/test_vn_dgcnn.py`` checks the layout.)

:func:`init_variables` builds the same variables as ``VNDGCNN.init`` from one random draw,
without compiling ~75 per-parameter initialisers (slow on CPU).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ace_jax import GAMMA, AxisMixBranch, MLPBranch, SymmetryBreaking, named_leaves, weight_breaking

EPS = 1e-6
"""ε of the VN nonlinearity and norms (as in the public Vector Neurons code)."""


def _check_vectors(x: jax.Array, name: str) -> None:
    if x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"{name} expects vector features of shape (..., C, 3), got {x.shape}")


def safe_norm(v: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """‖v‖ = sqrt(Σ v² + ε²): a smooth norm whose gradient is finite at v = 0 (zero edges)."""
    return jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=keepdims) + EPS**2)


# --------------------------------------------------------------------------- graph


def knn_indices(features: jax.Array, k: int) -> jax.Array:
    """Indices of the k nearest rows of ``features (P, D)`` to each row, nearest first.

    Squared Euclidean distance d_ij = ‖f_i‖² + ‖f_j‖² − 2⟨f_i, f_j⟩; the row itself
    (distance 0) is included, as in DGCNN. Returns int32 ``(P, k)``.
    """
    if features.ndim != 2:
        raise ValueError(f"knn_indices expects features of shape (P, D), got {features.shape}")
    num_points = features.shape[0]
    if not 1 <= k <= num_points:
        raise ValueError(f"k must satisfy 1 <= k <= number of points ({num_points}), got {k}")
    squared = jnp.sum(features * features, axis=-1)
    distance = squared[:, None] + squared[None, :] - 2.0 * features @ features.T
    _, indices = jax.lax.top_k(-jax.lax.stop_gradient(distance), k)
    return indices


def edge_features(vectors: jax.Array, k: int) -> jax.Array:
    """EdgeConv input on vector features: kNN in feature space, edges [V_j − V_i, V_i].

    Args:
      vectors: (P, C, 3) vector features of one cloud.
      k: neighbours per point.
    Returns:
      (P, k, 2C, 3): channels 0..C−1 are V_j − V_i, channels C..2C−1 are V_i, for the j-th
      nearest neighbour of point i in the flattened (C·3) feature space.
    """
    return gather_edges(vectors, feature_knn(vectors, k))  # feature_knn checks the (P, C, 3) shape


def feature_knn(vectors: jax.Array, k: int) -> jax.Array:
    """kNN graph of ``vectors (P, C, 3)`` in the flattened (C·3) feature space → int32 ``(P, k)``."""
    _check_vectors(vectors, "feature_knn")
    if vectors.ndim != 3:
        raise ValueError(f"feature_knn expects (P, C, 3) for one cloud, got {vectors.shape}")
    return knn_indices(vectors.reshape(vectors.shape[0], -1), k)


def _check_neighbours(vectors: jax.Array, neighbours: jax.Array, name: str) -> None:
    if vectors.ndim != 3 or neighbours.ndim != 2 or neighbours.shape[0] != vectors.shape[0]:
        raise ValueError(f"{name} with neighbours expects point features (P, C, 3) and indices (P, k), "
                         f"got {vectors.shape} and {neighbours.shape}")
    if not jnp.issubdtype(neighbours.dtype, jnp.integer):
        raise ValueError(f"{name}: neighbours must be integer indices, got dtype {neighbours.dtype}")


def gather_edges(vectors: jax.Array, neighbours: jax.Array) -> jax.Array:
    """EdgeConv edges [V_j − V_i, V_i] of ``vectors (P, C, 3)`` for the graph ``neighbours (P, k)``
    (row i lists the j of point i) → ``(P, k, 2C, 3)``."""
    _check_neighbours(vectors, neighbours, "gather_edges")
    gathered = vectors[neighbours]  # (P, k, C, 3)
    centre = jnp.broadcast_to(vectors[:, None], gathered.shape)
    return jnp.concatenate([gathered - centre, centre], axis=-2)


def point_edge_features(points: jax.Array, k: int, cross_product: bool = True) -> jax.Array:
    """First-layer edges on coordinates: [x_j − x_i, x_i(, x_j × x_i)] → (P, k, 2 or 3, 3)."""
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"point_edge_features expects points of shape (P, 3), got {points.shape}")
    indices = knn_indices(points, k)
    neighbours = points[indices]  # (P, k, 3)
    centre = jnp.broadcast_to(points[:, None], neighbours.shape)
    channels = [neighbours - centre, centre]
    if cross_product:
        channels.append(jnp.cross(neighbours, centre))
    return jnp.stack(channels, axis=-2)


# --------------------------------------------------------------------------- VN layers


class VNLinear(nn.Module):
    """VN-Linear ``(..., C, 3) → (..., features, 3)``: V'_{c'} = Σ_c W_{c c'} V_c (no bias).

    Call ``layer(x, perturbation=None, neighbours=None)``.

    - A ``perturbation`` δW ``(3, C, features)`` gives each xyz axis its own matrix,
      V'_{c', i} = Σ_c (W + δW_i)_{c c'} V_{c, i} — the VN-Linear map plus the
      (rotation-breaking) branch Σ_c δW_{i, c c'} V_{c, i}, in one product.
    - ``neighbours (P, k)`` (int): ``x (P, C, 3)`` are point features and the layer maps the
      EdgeConv edges E_ij = [V_j − V_i, V_i] (2C channels, :func:`gather_edges`) of that graph
      without forming them. With W = [W_a; W_b] split at row C (and likewise each W + δW_i),

          Wᵀ E_ij = W_aᵀ V_j + (W_b − W_a)ᵀ V_i,

      so both products run over the P points, not the P·k edges, and only their results are
      gathered: k times fewer multiply-adds and no (P, k, 2C, 3) input. The kernel has the
      edge shape (2C, features), so the parameters are those of ``layer(gather_edges(x, nbrs))``
      and the outputs ``(P, k, features, 3)`` agree with it up to float rounding.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, perturbation: jax.Array | None = None,
                 neighbours: jax.Array | None = None) -> jax.Array:
        _check_vectors(x, "VNLinear")
        channels = x.shape[-2]
        if neighbours is not None:
            _check_neighbours(x, neighbours, "VNLinear")
        fan_in = channels if neighbours is None else 2 * channels
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (fan_in, self.features))
        if perturbation is not None and perturbation.shape != (3,) + kernel.shape:
            raise ValueError(f"VNLinear perturbation must have shape {(3,) + kernel.shape}, got {perturbation.shape}")
        weight = (kernel if perturbation is None else kernel + perturbation).astype(x.dtype)
        if neighbours is None:
            return _vn_product(x, weight)
        neighbour_weight = weight[..., :channels, :]
        centre_weight = weight[..., channels:, :] - neighbour_weight
        per_point = _vn_product(x, jnp.concatenate([neighbour_weight, centre_weight], axis=-1))  # (P, 2F, 3)
        return per_point[:, : self.features][neighbours] + per_point[:, None, self.features :]


def _vn_product(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Σ_c x_{c,i} W_{c d} for ``weight (C, D)``, or Σ_c x_{c,i} W_{i,c d} for ``weight (3, C, D)``."""
    if weight.ndim == 2:
        return jnp.einsum("...ci,cd->...di", x, weight)
    # per-axis weights: move xyz to the front, one batched product (batch = axis, leading, so
    # no further operand copies), move it back; faster at the paper's size than three products
    # on strided slices or the einsum "...ci,icd->...di" (timings in the module docstring)
    moved = jnp.moveaxis(x, -1, 0)  # (3, ..., C)
    product = jax.lax.dot_general(moved, weight, (((moved.ndim - 1,), (1,)), ((0,), (0,))))  # (3, ..., D)
    return jnp.moveaxis(product, 0, -1)


def vn_leaky_relu(q: jax.Array, k: jax.Array, negative_slope: float = 0.2) -> jax.Array:
    """VN-LeakyReLU of features q (..., C, 3) along directions k (..., C or 1, 3); see the module doc."""
    dot = jnp.sum(q * k, axis=-1, keepdims=True)
    k_norm_sq = jnp.sum(k * k, axis=-1, keepdims=True)
    projected = q - dot / (k_norm_sq + EPS) * k
    rectified = jnp.where(dot >= 0, q, projected)
    return negative_slope * q + (1.0 - negative_slope) * rectified


class VNNorm(nn.Module):
    """Stateless VN norm: standardise each channel's vector norms over the leading axes.

    For x (..., C, 3): n = ‖x_c‖ (..., C); n̂ = (n − mean n)/sqrt(var n + ε)·scale_c + bias_c
    with mean/var over ALL leading axes (the points of one cloud); returns x / n · n̂.
    Replaces VN-BatchNorm (module doc). With a single leading element the variance is 0
    and n̂ = bias.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_vectors(x, "VNNorm")
        channels = x.shape[-2]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        norms = safe_norm(x)  # (..., C)
        axes = tuple(range(norms.ndim - 1))
        mean = jnp.mean(norms, axis=axes)
        var = jnp.var(norms, axis=axes)
        standardized = (norms - mean) / jnp.sqrt(var + EPS) * scale + bias
        return x * (standardized / norms)[..., None]


class VectorBranch(nn.Module):
    """Symmetry-breaking branch on vector features: ``(..., C, 3) → (..., features, 3)``.

    The (C, 3) numbers of each leading index (one point or one edge) are flattened in
    (channel, xyz) order — flat[c·3 + i] = x[c, i] — passed through an
    :class:`ace_jax.MLPBranch` with ``features·3`` outputs, and reshaped back with the same
    order, out[c', i] = y[c'·3 + i]. Different points never mix.
    """

    features: int
    hidden: Sequence[int] = ()
    spectral: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_vectors(x, "VectorBranch")
        flat = x.reshape(x.shape[:-2] + (x.shape[-2] * 3,))
        y = MLPBranch(self.features * 3, hidden=tuple(self.hidden), spectral=self.spectral, name="mlp")(flat)
        return y.reshape(x.shape[:-2] + (self.features, 3))


BRANCH_KINDS = ("axis", "dense", "in_kernel")


def breaking_map(kind: str, channels: int, hidden: Sequence[int], spectral: bool) -> nn.Module:
    """The branch g of one VN layer (unbound, ``parent=None``, so SymmetryBreaking adopts it).

    ``"axis"``: :class:`ace_jax.AxisMixBranch` applied to the layer's equivariant OUTPUT (f + γ g(f));
    ``"dense"``: :class:`VectorBranch`, the paper's Dense on the flattened layer INPUT.
    """
    if kind == "axis":
        return AxisMixBranch(component_axis=-1, normalize=spectral, parent=None)
    if kind == "dense":
        return VectorBranch(channels, hidden=tuple(hidden), spectral=spectral, parent=None)
    if kind == "in_kernel":
        raise ValueError("in_kernel branches are folded into VNLinear (see axis_weight_breaking), not applied as a map")
    raise ValueError(f"branch_kind must be one of {BRANCH_KINDS}, got {kind!r}")


def axis_weight_breaking(name: str, fan_in: int, fan_out: int, spectral: bool, gamma_init: float) -> jax.Array:
    """γ·δW ``(3, fan_in, fan_out)`` for :class:`VNLinear`'s ``perturbation`` (``branch_kind="in_kernel"``):
    one spectral-normalised channel-mixing matrix per xyz axis (:func:`ace_jax.weight_breaking`)."""
    return weight_breaking(name, (3, fan_in, fan_out), spectral=spectral, gamma_init=gamma_init)


class VNLinearLeakyReLU(nn.Module):
    """VN block: feature path q = W_q V (+ γ_q g_q(V)), VNNorm, direction path k = W_k V
    (+ γ_k g_k(V)), then :func:`vn_leaky_relu`. ``(..., C, 3) → (..., features, 3)``.

    Attributes:
      features: output channels.
      negative_slope: α of the leaky nonlinearity (0.2 in the paper).
      shared_direction: one direction channel for all features (the paper's conv5).
      use_norm: apply :class:`VNNorm` to q.
      branch_kind: ``"in_kernel"`` (default, :func:`axis_weight_breaking` folded into each VNLinear),
        ``"axis"`` (:class:`ace_jax.AxisMixBranch` on the path's output) or ``"dense"``
        (:class:`VectorBranch` on the block input); see :func:`breaking_map`.
      branch_hidden / spectral_branch: hidden sizes of dense branches / normalised branches.
      gamma_init: initial γ of both branches.
    """

    features: int
    negative_slope: float = 0.2
    shared_direction: bool = False
    use_norm: bool = True
    branch_hidden: Sequence[int] = ()
    spectral_branch: bool = True
    gamma_init: float = 1.0
    branch_kind: str = "in_kernel"

    def _corrected(self, out: jax.Array, x: jax.Array, name: str) -> jax.Array:
        """``out + γ·g(·)``; g reads ``out`` (axis branch) or the block input ``x`` (dense)."""
        # parent=None in breaking_map: the branch is adopted by SymmetryBreaking, so its
        # parameters live under ``<name>/branch`` next to ``<name>/gamma``.
        branch = breaking_map(self.branch_kind, out.shape[-2], self.branch_hidden, self.spectral_branch)
        source = out if self.branch_kind == "axis" else x
        return out + SymmetryBreaking(branch, gamma_init=self.gamma_init, name=name)(source)

    @nn.compact
    def __call__(self, x: jax.Array, project: bool = False, neighbours: jax.Array | None = None) -> jax.Array:
        """``x (..., C, 3) → (..., features, 3)``; with ``neighbours (P, k)``, ``x (P, C, 3)`` are point
        features and the block acts on the EdgeConv edges ``gather_edges(x, neighbours)`` →
        ``(P, k, features, 3)``. Both VN-Linear products then run per point (see :class:`VNLinear`);
        only a ``"dense"`` branch, which reads the block input, forms the edge tensor."""
        _check_vectors(x, "VNLinearLeakyReLU")
        if self.branch_kind not in BRANCH_KINDS:
            raise ValueError(f"branch_kind must be one of {BRANCH_KINDS}, got {self.branch_kind!r}")
        direction_channels = 1 if self.shared_direction else self.features
        folded = self.branch_kind == "in_kernel" and not project
        fan_in = x.shape[-2] if neighbours is None else 2 * x.shape[-2]
        if neighbours is not None and self.branch_kind == "dense" and not project:
            block_input = gather_edges(x, neighbours)
        else:
            block_input = x

        def path(name: str, channels: int, breaking: str) -> jax.Array:
            if folded:
                delta = axis_weight_breaking(breaking, fan_in, channels, self.spectral_branch, self.gamma_init)
                return VNLinear(channels, name=name)(x, delta, neighbours)
            out = VNLinear(channels, name=name)(x, neighbours=neighbours)
            return out if project else self._corrected(out, block_input, breaking)

        q = path("feature", self.features, "feature_breaking")
        if self.use_norm:
            q = VNNorm(name="norm")(q)
        k = path("direction", direction_channels, "direction_breaking")
        return vn_leaky_relu(q, k, self.negative_slope)


class VNInvariant(nn.Module):
    """Invariant features of ``x (P, C, 3)``: ⟨x_c, z_j⟩ for a learned equivariant frame z.

    z = VN-Linear_3(VNLinearLeakyReLU_{C/4}(VNLinearLeakyReLU_{C/2}(x))) (+ γ g(·) on the
    frame layer), shape (P, 3, 3). Returns (P, C·3), ordered (channel, frame vector).
    """

    negative_slope: float = 0.2
    branch_hidden: Sequence[int] = ()
    spectral_branch: bool = True
    gamma_init: float = 1.0
    branch_kind: str = "in_kernel"

    @nn.compact
    def __call__(self, x: jax.Array, project: bool = False) -> jax.Array:
        _check_vectors(x, "VNInvariant")
        channels = x.shape[-2]
        block = dict(negative_slope=self.negative_slope, branch_hidden=self.branch_hidden,
                     spectral_branch=self.spectral_branch, gamma_init=self.gamma_init, branch_kind=self.branch_kind)
        z = VNLinearLeakyReLU(max(channels // 2, 1), name="frame1", **block)(x, project)
        z = VNLinearLeakyReLU(max(channels // 4, 1), name="frame2", **block)(z, project)
        folded = self.branch_kind == "in_kernel" and not project
        delta = axis_weight_breaking("frame_breaking", z.shape[-2], 3, self.spectral_branch, self.gamma_init) if folded else None
        frame = VNLinear(3, name="frame")(z, delta)
        if not project and not folded:
            branch = breaking_map(self.branch_kind, 3, self.branch_hidden, self.spectral_branch)
            source = frame if self.branch_kind == "axis" else z
            frame = frame + SymmetryBreaking(branch, gamma_init=self.gamma_init, name="frame_breaking")(source)
        invariant = jnp.einsum("...ci,...ji->...cj", x, frame)
        return invariant.reshape(x.shape[:-2] + (channels * 3,))


# --------------------------------------------------------------------------- classifier


class VNDGCNN(nn.Module):
    """VN-DGCNN classifier of one point cloud (module doc), with ACE branches.

    Attributes:
      num_classes: number of logits.
      k: neighbours of the kNN graphs (20 in the paper).
      width: base channel count w; EdgeConv widths (w, w, 2w, 4w), global layer 16w.
      gamma_init: initial γ of every branch.
      head_hidden: hidden sizes of the MLP head.
      negative_slope: slope of every VN-LeakyReLU and of the head.
      cross_product: add x_j × x_i to the first layer's edge features (the model is then
        SO(3)- but not O(3)-invariant).
      pooling: ``"mean"`` (default) or ``"max_mean"`` (public VN-DGCNN) over points (step 4).
      branch_kind: ``"in_kernel"`` (default), ``"axis"`` or ``"dense"`` branches (module doc).
      branch_hidden / spectral_branch: hidden sizes of dense branches / normalised branches.

    Call: ``(points (P, 3), project=False) -> logits (num_classes,)``.
    """

    num_classes: int = 40
    k: int = 20
    width: int = 21
    gamma_init: float = 1.0
    head_hidden: Sequence[int] = (512, 256)
    negative_slope: float = 0.2
    cross_product: bool = True
    branch_hidden: Sequence[int] = ()
    spectral_branch: bool = True
    branch_kind: str = "in_kernel"
    pooling: str = "mean"

    @nn.compact
    def __call__(self, points: jax.Array, project: bool = False) -> jax.Array:
        points = jnp.asarray(points)
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"VNDGCNN expects one cloud of shape (P, 3), got {points.shape}")
        if points.shape[0] < self.k:
            raise ValueError(f"VNDGCNN needs at least k={self.k} points, got {points.shape[0]}")
        if self.width < 1 or self.num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {self.width}, {self.num_classes}")
        if self.pooling not in ("mean", "max_mean"):
            raise ValueError(f"pooling must be 'mean' or 'max_mean', got {self.pooling!r}")
        block = dict(negative_slope=self.negative_slope, branch_hidden=self.branch_hidden,
                     spectral_branch=self.spectral_branch, gamma_init=self.gamma_init, branch_kind=self.branch_kind)
        w = self.width

        edges = point_edge_features(points, self.k, self.cross_product)
        x1 = VNLinearLeakyReLU(w, name="conv1", **block)(edges, project).mean(axis=1)
        # Blocks 2–4 take the point features and their kNN graph; VNLinear maps the edges per point.
        x2 = VNLinearLeakyReLU(w, name="conv2", **block)(x1, project, feature_knn(x1, self.k)).mean(axis=1)
        x3 = VNLinearLeakyReLU(2 * w, name="conv3", **block)(x2, project, feature_knn(x2, self.k)).mean(axis=1)
        x4 = VNLinearLeakyReLU(4 * w, name="conv4", **block)(x3, project, feature_knn(x3, self.k)).mean(axis=1)
        x = jnp.concatenate([x1, x2, x3, x4], axis=-2)  # (P, 8w, 3)
        x = VNLinearLeakyReLU(16 * w, shared_direction=True, name="conv5", **block)(x, project)
        x = jnp.concatenate([x, jnp.broadcast_to(x.mean(axis=0, keepdims=True), x.shape)], axis=-2)
        invariant = VNInvariant(name="invariant", **block)(x, project)
        h = invariant.mean(axis=0)  # (32w·3,)
        if self.pooling == "max_mean":
            h = jnp.concatenate([invariant.max(axis=0), h])  # (2·32w·3,)
        for i, size in enumerate(self.head_hidden):
            h = nn.Dense(size, name=f"head{i}")(h)
            h = nn.LayerNorm(name=f"head{i}_norm")(h)
            h = nn.leaky_relu(h, self.negative_slope)
        return nn.Dense(self.num_classes, name="logits")(h)


def init_variables(model: VNDGCNN, rng: jax.Array, num_points: int, project: bool = False) -> dict:
    """Variables of ``model`` for clouds of ``num_points`` points, from ONE random draw.

    Same tree as ``model.init(rng, points, project=project)`` (read off with
    ``jax.eval_shape``, nothing is compiled), filled as: every ``kernel`` (..., fan_in,
    fan_out) ~ N(0, 1/fan_in) (LeCun normal, untruncated); every ``bias`` 0; every ``scale``
    1 (VNNorm, LayerNorm); every γ = ``model.gamma_init``. All kernels come from a single
    ``jax.random.normal`` of the total size, split in tree order: compiling flax's per-parameter
    initialisers (about 75 threefry draws) takes tens of seconds on a CPU, this takes none.
    Same ``rng`` → same numbers.
    """
    if num_points < model.k:
        raise ValueError(f"num_points must be >= k={model.k}, got {num_points}")
    points = jax.ShapeDtypeStruct((num_points, 3), jnp.float32)
    shapes = jax.eval_shape(lambda p: model.init(jax.random.PRNGKey(0), p, project=project), points)
    named = named_leaves(shapes["params"])
    kernels = [name for name, leaf in named.items() if name.endswith("kernel")]
    for name in kernels:
        if len(named[name].shape) < 2:
            raise ValueError(f"init_variables expects kernels (..., fan_in, fan_out), {name} has shape {named[name].shape}")
    total = sum(int(np.prod(named[name].shape)) for name in kernels)
    draws = np.asarray(jax.random.normal(rng, (total,), jnp.float32))
    offsets, start = {}, 0
    for name in kernels:
        size = int(np.prod(named[name].shape))
        offsets[name], start = (start, size), start + size

    def fill(path, leaf):  # on the host: no per-parameter device programs
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        if name in offsets:
            start, size = offsets[name]
            value = draws[start : start + size].reshape(leaf.shape) / np.sqrt(leaf.shape[-2])
        elif name.endswith("scale"):
            value = np.ones(leaf.shape)
        elif name.endswith("bias"):
            value = np.zeros(leaf.shape)
        else:
            raise ValueError(f"init_variables: no rule for parameter {name} of shape {leaf.shape}")
        return jnp.asarray(value, leaf.dtype)

    variables = {"params": jax.tree_util.tree_map_with_path(fill, shapes["params"])}
    if GAMMA in shapes:
        variables[GAMMA] = jax.tree.map(lambda g: jnp.asarray(np.full(g.shape, model.gamma_init), g.dtype), shapes[GAMMA])
    return variables
