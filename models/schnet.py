"""SchNet (Schütt et al., 2017/2018) on padded graph batches, with ACE branches.

Input: a padded ``data.graphs.GraphBatch`` (or any mapping / object with the same fields):
N_pad nodes, E_pad edges, G_pad graphs, padding nodes owned by the last graph.

    h_i^0   = E[Z_i]                                    atom embedding, (N_pad, F)
    d_ij    = ‖x_i − x_j‖ for every edge j → i          (E_pad,)
    e_k(d)  = exp(−(d − μ_k)² / (2Δ²)),  μ_k = k·Δ, Δ = r_c / (K − 1), k = 0 … K − 1
    C(d)    = ½ (cos(π d / r_c) + 1) for d < r_c, else 0         (cosine cutoff)
    ssp(x)  = softplus(x) − log 2                                 (shifted softplus)

Interaction block t (continuous-filter convolution, residual):

    W_ij    = Dense(ssp(Dense(e(d_ij)))) · C(d_ij)                 (E_pad, F_filter)
    m_i     = Σ_{j → i} (h_j A_t) ⊙ W_ij                           A_t: Dense, no bias
    h_i    ← h_i + Dense(ssp(Dense(m_i)))

Output: per-atom o_i = Dense_1(ssp(Dense_{F/2}(h_i))), pooled per graph,

    y_g = Σ_{i ∈ g} o_i   (``pooling="sum"``, default: the original SchNet / PyG readout;
                          right for extensive targets and used for all QM9 targets here)
    y_g = mean_{i ∈ g} o_i (``pooling="mean"``).

Everything above depends on the geometry only through distances, so the model is invariant
to rotations, reflections and translations of each molecule and to atom permutations.

Masks: node features, messages and per-atom outputs are multiplied by the node / edge masks,
pooling uses ``segment_sum`` over ``node_graph`` and the pooled result is multiplied by
``graph_mask``: padding nodes, padding edges and the padding graph never reach a real graph
and the output is exactly 0 on padding graph slots.

ACE (METHOD.md §1, "SchNet 1 per interaction block, fed by a chain of Linear layers on raw
coordinates"): block t becomes

    h_i ← h_i + Dense(ssp(Dense(m_i))) + γ_t · g_t(x_i − x̄_{g(i)})

with x̄_g the centroid (plain mean over the real atoms) of molecule g and g_t a chain of
Linear layers (by default two, ``branch_hidden=(F,)`` with the identity between them) on
the three Cartesian components taken as plain numbers. Centring keeps the full model
translation invariant (and permutation invariant); the raw components break rotation and
reflection invariance, which is what the constraint γ_t = 0 then has to remove. With
``project=True`` no branch is evaluated and initialising with ``project=True`` creates
neither branch parameters nor γ (the vanilla SchNet).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ace_jax import MLPBranch, SymmetryBreaking, branch_output_init

POOLINGS = ("sum", "mean")
GRAPH_FIELDS = (
    "positions", "atomic_numbers", "senders", "receivers", "node_graph", "node_mask", "edge_mask", "graph_mask",
)
"""Fields of a padded graph batch that the graph models read."""


def identity(x: jax.Array) -> jax.Array:
    """The identity map (activation of a plain chain of Linear layers)."""
    return x


def shifted_softplus(x: jax.Array) -> jax.Array:
    """ssp(x) = softplus(x) − log 2 (so ssp(0) = 0)."""
    return jax.nn.softplus(x) - math.log(2.0)


def gaussian_expansion(distances: jax.Array, cutoff: float, num_gaussians: int) -> jax.Array:
    """(E,) -> (E, K): exp(−(d − μ_k)² / (2Δ²)), μ_k = k Δ on [0, cutoff], Δ = cutoff / (K − 1)."""
    if num_gaussians < 2:
        raise ValueError(f"num_gaussians must be >= 2, got {num_gaussians}")
    centers = jnp.linspace(0.0, cutoff, num_gaussians, dtype=distances.dtype)
    spacing = cutoff / (num_gaussians - 1)
    return jnp.exp(-0.5 * ((distances[:, None] - centers) / spacing) ** 2)


def cosine_cutoff(distances: jax.Array, cutoff: float) -> jax.Array:
    """C(d) = ½ (cos(π d / r_c) + 1) for d < r_c, else 0."""
    value = 0.5 * (jnp.cos(math.pi * distances / cutoff) + 1.0)
    return jnp.where(distances < cutoff, value, 0.0)


def graph_fields(batch: Any) -> dict:
    """The ``GRAPH_FIELDS`` of a GraphBatch, a mapping or any object with those attributes.

    Raises ValueError naming the missing field or a shape that does not fit.
    """
    fields = {}
    for name in GRAPH_FIELDS:
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            if name not in batch:
                raise ValueError(f"graph batch lacks the field {name!r}")
            value = batch[name]
        elif hasattr(batch, name):
            value = getattr(batch, name)
        else:
            raise ValueError(f"graph batch lacks the field {name!r}")
        fields[name] = jnp.asarray(value)
    num_nodes = fields["positions"].shape[0]
    if fields["positions"].shape != (num_nodes, 3):
        raise ValueError(f"positions must be (N_pad, 3), got {fields['positions'].shape}")
    for name in ("atomic_numbers", "node_graph", "node_mask"):
        if fields[name].shape != (num_nodes,):
            raise ValueError(f"{name} must be ({num_nodes},), got {fields[name].shape}")
    num_edges = fields["senders"].shape
    for name in ("receivers", "edge_mask"):
        if fields[name].shape != num_edges or len(num_edges) != 1:
            raise ValueError(f"senders, receivers and edge_mask must be (E_pad,), got {num_edges}, "
                             f"{fields[name].shape} for {name}")
    if fields["graph_mask"].ndim != 1 or fields["graph_mask"].shape[0] < 2:
        raise ValueError(f"graph_mask must be (G_pad,) with G_pad >= 2, got {fields['graph_mask'].shape}")
    return fields


def centred_positions(positions, node_graph, node_mask, num_graphs: int) -> jax.Array:
    """x_i − x̄_{g(i)}, x̄_g the mean position of the real atoms of graph g; 0 on padding nodes."""
    weight = node_mask.astype(positions.dtype)[:, None]
    totals = jax.ops.segment_sum(positions * weight, node_graph, num_graphs)
    counts = jax.ops.segment_sum(weight, node_graph, num_graphs)
    centroids = totals / jnp.maximum(counts, 1.0)
    return (positions - centroids[node_graph]) * weight


def pool_graphs(values, node_graph, node_mask, graph_mask, pooling: str) -> jax.Array:
    """Per-graph sum or mean of node ``values`` (N_pad,) over real nodes -> (G_pad,), 0 on padding graphs."""
    num_graphs = graph_mask.shape[0]
    weight = node_mask.astype(values.dtype)
    total = jax.ops.segment_sum(values * weight, node_graph, num_graphs)
    if pooling == "mean":
        count = jax.ops.segment_sum(weight, node_graph, num_graphs)
        total = total / jnp.maximum(count, 1.0)
    elif pooling != "sum":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return total * graph_mask.astype(values.dtype)


class Interaction(nn.Module):
    """One SchNet interaction block (continuous-filter convolution + residual), ACE branch optional.

    Call: ``(h (N, F), expansion (E, K), envelope (E,), senders, receivers, edge_mask,
    node_mask, centred (N, 3), project) -> h' (N, F)``.
    """

    features: int
    filters: int
    branch_hidden: Sequence[int] = (64,)
    branch_activation: Callable = identity
    spectral_branch: bool = False
    gamma_init: float = 1.0
    branch_init_scale: float = 1.0

    @nn.compact
    def __call__(self, h, expansion, envelope, senders, receivers, edge_mask, node_mask, centred, project: bool):
        filters = nn.Dense(self.filters, name="filter_1")(expansion)
        filters = nn.Dense(self.filters, name="filter_2")(shifted_softplus(filters))
        filters = filters * (envelope * edge_mask.astype(h.dtype))[:, None]  # (E, F_filter)
        x = nn.Dense(self.filters, use_bias=False, name="atom_to_filter")(h)
        messages = x[senders] * filters
        aggregated = jax.ops.segment_sum(messages, receivers, h.shape[0])
        update = nn.Dense(self.features, name="filter_to_atom")(aggregated)
        update = nn.Dense(self.features, name="update")(shifted_softplus(update))
        h = h + update
        if not project:
            branch = MLPBranch(
                self.features, tuple(self.branch_hidden), self.spectral_branch, self.branch_activation,
                name="coordinate_branch", output_kernel_init=branch_output_init(self.branch_init_scale),
            )
            h = h + SymmetryBreaking(branch, self.gamma_init, name="coordinate_breaking")(centred)
        return h * node_mask.astype(h.dtype)[:, None]


class SchNet(nn.Module):
    """SchNet for padded molecule batches: ``model.apply(variables, batch, project=False) -> (G_pad,)``.

    Attributes:
      features: atom feature width F (64 in the ACE paper).
      filters: filter width (64).
      num_interactions: interaction blocks (6), each with one ACE branch.
      num_gaussians: radial basis size K (50), centres on [0, cutoff].
      cutoff: r_c of the cosine cutoff in Å (10; the radius graph should use the same).
      num_elements: embedding table size; atomic numbers must lie in [0, num_elements)
        (QM9: H, C, N, O, F, so 10; 0 is the padding "element").
      pooling: "sum" (default) or "mean" over the atoms of each molecule.
      branch_hidden: hidden widths of each coordinate branch (default (F,): two Linear layers).
      branch_activation: activation between branch layers (default identity: a linear chain).
      spectral_branch: spectrally normalised branch layers (for resilient ACE).
      gamma_init: initial γ of every branch.
      branch_init_scale: variance of each branch's last kernel relative to LeCun normal (1.0;
        ``ace_jax.branch_output_init``). With 1.0 the branches, fed coordinates of several Å,
        start larger than the embeddings they are added to; 0.01 was no better on QM9
        (experiments/qm9.py), so 1.0 stays the default.

    The output is one number per graph slot (the normalised target), 0 on padding slots.
    """

    features: int = 64
    filters: int = 64
    num_interactions: int = 6
    num_gaussians: int = 50
    cutoff: float = 10.0
    num_elements: int = 10
    pooling: str = "sum"
    branch_hidden: Sequence[int] = (64,)
    branch_activation: Callable = identity
    spectral_branch: bool = False
    gamma_init: float = 1.0
    branch_init_scale: float = 1.0

    @nn.compact
    def __call__(self, batch: Any, project: bool = False) -> jax.Array:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {self.cutoff}")
        if self.num_interactions < 1:
            raise ValueError(f"num_interactions must be >= 1, got {self.num_interactions}")
        g = graph_fields(batch)
        positions = g["positions"].astype(jnp.float32)
        node_mask, edge_mask, graph_mask = g["node_mask"], g["edge_mask"], g["graph_mask"]
        senders, receivers, node_graph = g["senders"], g["receivers"], g["node_graph"]
        num_graphs = graph_mask.shape[0]

        vectors = positions[receivers] - positions[senders]
        distances = jnp.sqrt(jnp.sum(vectors**2, axis=-1))  # padding edges have length > 0 (graphs.py)
        expansion = gaussian_expansion(distances, self.cutoff, self.num_gaussians)
        envelope = cosine_cutoff(distances, self.cutoff)
        centred = None if project else centred_positions(positions, node_graph, node_mask, num_graphs)

        h = nn.Embed(self.num_elements, self.features, name="embedding")(g["atomic_numbers"])
        h = h * node_mask.astype(h.dtype)[:, None]
        for t in range(self.num_interactions):
            h = Interaction(
                self.features, self.filters, tuple(self.branch_hidden), self.branch_activation,
                self.spectral_branch, self.gamma_init, self.branch_init_scale, name=f"interaction_{t}",
            )(h, expansion, envelope, senders, receivers, edge_mask, node_mask, centred, project)

        atom_out = nn.Dense(self.features // 2, name="output_1")(h)
        atom_out = nn.Dense(1, name="output_2")(shifted_softplus(atom_out))[:, 0]  # (N_pad,)
        return pool_graphs(atom_out, node_graph, node_mask, graph_mask, self.pooling)
