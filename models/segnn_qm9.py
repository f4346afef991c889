"""SEGNN (Brandstetter et al., 2022) for QM9 on padded radius graphs, with ACE branches.

The N-body SEGNN of ``models/segnn.py`` is written by hand for l ≤ 1 on dense graphs; the
QM9 variant needs steerable features up to l = 2 and attributes up to l = 3 on sparse
radius graphs, so its steerable layers are built from ``e3nn_jax`` tensor products (same
math: a steerable linear layer is a linear map of the tensor product of a feature with an
attribute, here ``Linear(x ⊗ a)``, which spans exactly the fully connected tensor product).
The gate (silu on scalars, sigmoid gates on l > 0) follows the N-body model.

Input: a padded ``data.graphs.GraphBatch`` (or mapping) built with the SEGNN cutoff (2 Å).

    a_ij  = Y(x_i − x_j), l = 0 … lmax_attr            edge attribute (component-normalised SH)
    a_i   = mean_{j → i} a_ij, with a_i^(l=0) = 1      node attribute (also for isolated atoms)
    h_i   = TP(TP_gated(onehot(Z_i) ; a_i) ; a_i)      embedding, onehot over H, C, N, O, F
    per layer:
      m_ij = TP_gated(TP_gated([h_i, h_j, ‖x_i − x_j‖²] ; a_ij) ; a_ij)
      m_i  = Σ_{j → i} m_ij
      u_i  = TP(TP_gated([h_i, m_i] ; a_i) ; a_i)
      h_i ← InstanceNorm(h_i + u_i)
    o_i   = TP(TP_gated(h_i ; a_i) ; a_i)  (scalars only: ``hidden_scalars`` x 0e)
    y_g   = Dense_1(silu(Dense(mean_{i ∈ g} o_i)))     mean pooling, then a scalar MLP

TP(x ; a) = Linear(x ⊗ a) (bias on scalars); TP_gated adds the gate. Instance norm, per
molecule and per irrep channel: scalars are centred over the molecule's atoms, every irrep
is divided by sqrt(mean over atoms of its mean squared component + ε), then scaled by a
learned weight (scalars also get a bias). The output is O(3)-invariant.

Weights: ``parameterization="fan_in"`` (default) stores each steerable weight block at the
scale it is used with (N(0, 1/n), like the reference SEGNN's torch-style init), "normal" is
e3nn-jax's default N(0, 1) scaled by 1/√n in the forward pass — the same functions, but under
Adam the latter learns √n times more slowly (the N-body SEGNN had the same issue).

ACE (METHOD.md §1: "the reference SEGNN has 2 per message-passing layer, one after each
tensor-product block"): with y the block output flattened to plain numbers, the message
block gives m_ij + γ g(m_ij) (per edge, before the sum) and the update block u_i + γ g(u_i),
g an :class:`ace_jax.MLPBranch` of the same width. With ``project=True`` no branch exists.
For an affine g (``branch_hidden=()``, the default) the summed correction
Σ_j γ g(m_ij) = γ deg_i g(m_i / deg_i), m_i = Σ_j m_ij, is computed once per node (the
branch's work drops by the mean degree; same numbers); with hidden layers g runs per edge.
``branch_rank=r`` factors each affine g through rank r (:class:`ace_jax.LowRankBranch`). At the
default width (324 numbers per node) the two full 324×324 branches of a layer are a large share
of the ACE step; measured (``python -m experiments.benchmark --models segnn_qm9,segnn_qm9_rank16
--methods vanilla,ace --steps 200``, 32 molecules, quiet 2-core CPU, interleaved medians):
full-rank ACE 408 ms against vanilla 362 ms (1.13×; 1.83 M parameters against 0.78 M), rank 16
315 ms against 297 ms (1.06×; 0.88 M parameters). With γ folded into the branch weights
(``--steps 100``, a slower day for the machine): full rank 416 against 392 ms (1.06×), rank 16
421 against 412 ms (1.02×).

Masks: padding edges never send messages (their messages are multiplied by ``edge_mask``),
padding nodes are excluded from the instance-norm statistics and from pooling, and the
output is 0 on padding graph slots.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from ace_jax import LowRankBranch, MLPBranch, SymmetryBreaking, summed_affine_branch
from models.schnet import graph_fields
from models.segnn import check_parameterization

E3NN_GRADIENT_NORMALIZATION = {"fan_in": "element", "normal": "path"}
"""e3nn-jax's name for each weight parameterisation (see :func:`models.segnn.weight_scale`):
"fan_in" stores W ~ N(0, 1/n) used as is (e3nn ``gradient_normalization="element"``), "normal"
stores W ~ N(0, 1) used as W/√n (e3nn's default, ``"path"``). Same functions; under Adam the
"fan_in" weights change √n times faster relative to their size, as in the reference SEGNN."""

QM9_ELEMENTS = (1, 6, 7, 8, 9)
"""Atomic numbers of the one-hot input (H, C, N, O, F); anything else (0 = padding) maps to zeros."""


def weight_balanced_irreps(scalars: int, lmax_hidden: int, lmax_attr: int) -> e3nn.Irreps:
    """``n x (0e + 1o + … + lmax_hidden)`` with about the weights of a ``scalars x 0e`` layer.

    A steerable layer (n × irreps) ⊗ Y(≤ lmax_attr) → (n × irreps) has n² weights per allowed
    path (l1, l2, l_out) (triangle rule, parity (−1)^(l1+l2) = (−1)^l_out); the scalar layer
    has scalars² weights, so n = round(scalars / √paths) (SEGNN's weight balancing).
    """
    paths = 0
    for l1 in range(lmax_hidden + 1):
        for l2 in range(lmax_attr + 1):
            for l_out in range(abs(l1 - l2), min(l1 + l2, lmax_hidden) + 1):
                paths += (l1 + l2 + l_out) % 2 == 0
    n = max(1, round(scalars / math.sqrt(paths)))
    return e3nn.Irreps([(n, (l, (-1) ** l)) for l in range(lmax_hidden + 1)])


def element_one_hot(atomic_numbers: jax.Array) -> jax.Array:
    """(N,) atomic numbers -> (N, 5) one-hot over H, C, N, O, F (zeros for anything else)."""
    z = jnp.asarray(atomic_numbers)
    return jnp.stack([(z == element) for element in QM9_ELEMENTS], axis=-1).astype(jnp.float32)


class SteerableLayer(nn.Module):
    """TP(x ; a) = Linear(x ⊗ a) with bias on scalars; with ``gated`` the e3nn gate follows.

    A gated layer produces one extra scalar per non-scalar channel (the gates, sigmoid) and
    applies silu to the other scalars, so the output has the irreps ``irreps_out`` either way.
    """

    irreps_out: str
    gated: bool = False
    parameterization: str = "fan_in"

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, attr: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        check_parameterization(self.parameterization)
        out = e3nn.Irreps(self.irreps_out).simplify()
        if self.gated:
            scalars = out.filter(keep=["0e"])
            others = out.filter(drop=["0e"])
            linear_out = scalars + e3nn.Irreps(f"{others.num_irreps}x0e") + others if others.num_irreps else scalars
        else:
            linear_out = out
        product = e3nn.tensor_product(x, attr, filter_ir_out=linear_out)
        y = e3nn.flax.Linear(
            linear_out, biases=True, force_irreps_out=True,
            gradient_normalization=E3NN_GRADIENT_NORMALIZATION[self.parameterization],
        )(product)
        if self.gated:
            y = e3nn.gate(y, even_act=jax.nn.silu, even_gate_act=jax.nn.sigmoid)
        return y


def instance_norm_statistics(x, node_graph, node_mask, num_graphs: int, eps: float = 1e-5):
    """Per-graph instance norm of an IrrepsArray (N, dim) without learned parameters.

    Scalars are centred over each graph's real nodes; each channel of each irrep is divided by
    sqrt(mean over the graph's real nodes of its mean squared component + eps).
    """
    weight = node_mask.astype(x.dtype)
    count = jnp.maximum(jax.ops.segment_sum(weight, node_graph, num_graphs), 1.0)[:, None]  # (G, 1)
    chunks = []
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        if chunk is None:
            chunks.append(None)
            continue
        if ir.l == 0 and ir.p == 1:
            mean = jax.ops.segment_sum(chunk[:, :, 0] * weight[:, None], node_graph, num_graphs) / count
            chunk = chunk - mean[node_graph][:, :, None]
        power = jnp.mean(chunk**2, axis=-1)  # (N, mul)
        variance = jax.ops.segment_sum(power * weight[:, None], node_graph, num_graphs) / count
        chunks.append(chunk * jax.lax.rsqrt(variance[node_graph] + eps)[:, :, None])
    return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


class InstanceNorm(nn.Module):
    """Instance norm (see ``instance_norm_statistics``) with a weight per channel and a scalar bias."""

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, node_graph, node_mask, num_graphs: int) -> e3nn.IrrepsArray:
        x = instance_norm_statistics(x, node_graph, node_mask, num_graphs)
        chunks = []
        for index, ((mul, ir), chunk) in enumerate(zip(x.irreps, x.chunks)):
            scale = self.param(f"weight_{index}", nn.initializers.ones, (mul,))
            chunk = chunk * scale[None, :, None]
            if ir.l == 0 and ir.p == 1:
                chunk = chunk + self.param(f"bias_{index}", nn.initializers.zeros, (mul,))[None, :, None]
            chunks.append(chunk)
        return e3nn.from_chunks(x.irreps, chunks, x.shape[:-1], x.dtype)


class SEGNNQM9Layer(nn.Module):
    """One message-passing layer (message, sum, update, residual, instance norm) + 2 ACE branches."""

    hidden_irreps: str
    norm: str = "instance"
    branch_hidden: Sequence[int] = ()
    spectral_branch: bool = False
    gamma_init: float = 1.0
    message_branch_per_edge: bool = False
    parameterization: str = "fan_in"
    branch_rank: int | None = None

    def _product(self, gated: bool, name: str) -> SteerableLayer:
        return SteerableLayer(self.hidden_irreps, gated=gated, parameterization=self.parameterization, name=name)

    def _breaking(self, name: str, width: int) -> SymmetryBreaking:
        if self.branch_rank is not None:
            if tuple(self.branch_hidden):
                raise ValueError("branch_rank applies to affine branches only (branch_hidden=())")
            branch = LowRankBranch(width, self.branch_rank, self.spectral_branch, name=f"{name}_branch")
        else:
            branch = MLPBranch(width, tuple(self.branch_hidden), self.spectral_branch, name=f"{name}_branch")
        return SymmetryBreaking(branch, self.gamma_init, name=f"{name}_breaking")

    @nn.compact
    def __call__(self, h, edge_attr, node_attr, edge_scalars, g: dict, project: bool):
        senders, receivers = g["senders"], g["receivers"]
        num_nodes, num_graphs = h.shape[0], g["graph_mask"].shape[0]
        pair = e3nn.concatenate([h[receivers], h[senders], edge_scalars])  # [h_i, h_j, ‖x_i − x_j‖²]
        m = self._product(True, "message_1")(pair, edge_attr)
        m = self._product(True, "message_2")(m, edge_attr)
        per_edge_branch = not project and (len(tuple(self.branch_hidden)) > 0 or self.message_branch_per_edge)
        if per_edge_branch:
            m = m + e3nn.IrrepsArray(m.irreps, self._breaking("message", m.irreps.dim)(m.array))
        edge_mask = g["edge_mask"].astype(m.dtype)
        m = m * edge_mask[:, None]
        aggregated = e3nn.IrrepsArray(m.irreps, jax.ops.segment_sum(m.array, receivers, num_nodes))
        if not project and not per_edge_branch:
            # affine g: Σ_j g(m_ij) = deg_i · g(m_i / deg_i) with m_i = Σ_j m_ij (real edges only),
            # so the branch runs once per node instead of once per edge (same numbers).
            degree = jax.ops.segment_sum(edge_mask, receivers, num_nodes)[:, None]
            correction = summed_affine_branch(self._breaking("message", m.irreps.dim), aggregated.array, degree)
            aggregated = aggregated + e3nn.IrrepsArray(m.irreps, correction)

        u = e3nn.concatenate([h, aggregated])
        u = self._product(True, "update_1")(u, node_attr)
        u = self._product(False, "update_2")(u, node_attr)
        if not project:
            u = u + e3nn.IrrepsArray(u.irreps, self._breaking("update", u.irreps.dim)(u.array))
        h = h + u
        if self.norm == "instance":
            h = InstanceNorm(name="norm")(h, g["node_graph"], g["node_mask"], num_graphs)
        return h * g["node_mask"].astype(h.dtype)[:, None]


class SEGNNQM9(nn.Module):
    """SEGNN for padded QM9 batches: ``model.apply(variables, batch, project=False) -> (G_pad,)``.

    Attributes:
      hidden_irreps: hidden feature irreps; None = ``weight_balanced_irreps(hidden_scalars,
        lmax_hidden, lmax_attr)`` (36x0e+36x1o+36x2e for 128, 2, 3).
      hidden_scalars: width of the scalar output before pooling and of the post-pool MLP (128).
      lmax_hidden, lmax_attr: highest l of the hidden features (2) and of the attributes (3).
      num_layers: message-passing layers (5), 2 ACE branches each.
      norm: "instance" or "none".
      branch_hidden, spectral_branch, gamma_init: ACE branch settings (one affine layer by default).
      message_branch_per_edge: evaluate an affine message branch on every edge, the literal
        form of the node-level computation (same numbers, slower; for tests).
      parameterization: "fan_in" (default; stored weights ~ N(0, 1/n), as the reference SEGNN's
        torch-style init) or "normal" (e3nn-jax's default: N(0, 1) scaled by 1/√n in the
        forward pass); see :data:`E3NN_GRADIENT_NORMALIZATION`.
      branch_rank: factor each affine branch through rank r (:class:`ace_jax.LowRankBranch`:
        2·324·r multiply-adds per node instead of 324² at the default width); None = full rank.
    """

    hidden_irreps: str | None = None
    hidden_scalars: int = 128
    lmax_hidden: int = 2
    lmax_attr: int = 3
    num_layers: int = 5
    norm: str = "instance"
    branch_hidden: Sequence[int] = ()
    spectral_branch: bool = False
    gamma_init: float = 1.0
    message_branch_per_edge: bool = False
    parameterization: str = "fan_in"
    branch_rank: int | None = None

    def irreps(self) -> e3nn.Irreps:
        if self.hidden_irreps is not None:
            return e3nn.Irreps(self.hidden_irreps)
        return weight_balanced_irreps(self.hidden_scalars, self.lmax_hidden, self.lmax_attr)

    @nn.compact
    def __call__(self, batch: Any, project: bool = False) -> jax.Array:
        if self.norm not in ("instance", "none"):
            raise ValueError(f"norm must be 'instance' or 'none', got {self.norm!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        hidden = str(self.irreps())
        g = graph_fields(batch)
        positions = g["positions"].astype(jnp.float32)
        senders, receivers, node_graph = g["senders"], g["receivers"], g["node_graph"]
        node_mask, edge_mask, graph_mask = g["node_mask"], g["edge_mask"], g["graph_mask"]
        num_nodes, num_graphs = positions.shape[0], graph_mask.shape[0]

        vectors = positions[receivers] - positions[senders]  # x_i − x_j; padding edges have length 1
        edge_attr = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.lmax_attr), vectors, normalize=True, normalization="component"
        )
        edge_weight = edge_mask.astype(jnp.float32)[:, None]
        degree = jax.ops.segment_sum(edge_weight, receivers, num_nodes)
        node_attr = jax.ops.segment_sum(edge_attr.array * edge_weight, receivers, num_nodes) / jnp.maximum(degree, 1.0)
        node_attr = node_attr.at[:, 0].set(1.0)  # Y0 of every atom, also without neighbours
        node_attr = e3nn.IrrepsArray(edge_attr.irreps, node_attr)
        edge_scalars = e3nn.IrrepsArray("0e", jnp.sum(vectors**2, axis=-1, keepdims=True))

        def product(irreps_out: str, gated: bool, name: str) -> SteerableLayer:
            return SteerableLayer(irreps_out, gated=gated, parameterization=self.parameterization, name=name)

        x = e3nn.IrrepsArray(f"{len(QM9_ELEMENTS)}x0e", element_one_hot(g["atomic_numbers"]))
        h = product(hidden, True, "embedding_1")(x, node_attr)
        h = product(hidden, False, "embedding_2")(h, node_attr)
        for layer in range(self.num_layers):
            h = SEGNNQM9Layer(
                hidden, self.norm, tuple(self.branch_hidden), self.spectral_branch, self.gamma_init,
                self.message_branch_per_edge, self.parameterization, self.branch_rank, name=f"layer_{layer}",
            )(h, edge_attr, node_attr, edge_scalars, g, project)

        h = product(hidden, True, "pre_pool_1")(h, node_attr)
        out = product(f"{self.hidden_scalars}x0e", False, "pre_pool_2")(h, node_attr).array
        weight = node_mask.astype(out.dtype)[:, None]
        pooled = jax.ops.segment_sum(out * weight, node_graph, num_graphs)
        pooled = pooled / jnp.maximum(jax.ops.segment_sum(weight, node_graph, num_graphs), 1.0)
        y = nn.Dense(self.hidden_scalars, name="post_pool_1")(pooled)
        y = nn.Dense(1, name="post_pool_2")(jax.nn.silu(y))[:, 0]
        return y * graph_mask.astype(y.dtype)
