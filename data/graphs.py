"""Radius graphs and fixed-shape padded graph batches for jit (SchNet, SEGNN, ...).

A *molecule set* is a dict of numpy arrays, as returned by ``data.qm9.load_qm9``:
  ``positions`` (M, A, 3), ``num_atoms`` (M,), ``atomic_numbers`` (M, A) (0 = padding) and
  ``targets`` (M, k). Molecule m has atoms 0 … num_atoms[m] − 1.

Edge convention: an edge (sender j → receiver i) carries a message from atom j to atom i;
a radius graph has every ordered pair i ≠ j with ‖x_i − x_j‖ < cutoff (strict), listed
sorted by (receiver, sender).

Padding convention (that of ``jraph.pad_with_graphs``): a batch of B ≤ batch_size molecules
has G_pad = batch_size + 1 graph slots. Real graphs are 0 … B − 1, slots B … G_pad − 2 are
empty, and graph G_pad − 1 owns every padding node. Padding edges join padding nodes only, so
``segment_sum(values, node_graph, G_pad)`` over nodes (or over ``node_graph[receivers]`` for
edges) never mixes padding into a real graph. At least two padding nodes are always present
and they sit 1 Å apart on the x axis, so every padding edge has non-zero length: normalising
an edge vector never divides by zero (which would put NaN into gradients even under a mask).

Node and edge totals are rounded up to a ladder of bucket sizes (``steps_per_octave`` values
per doubling, e.g. 64, 80, 96, 112, 128, 160, …), so jit compiles only a handful of shapes.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

_MOLECULE_CHUNK = 512  # molecules per vectorised distance computation


class GraphBatch(NamedTuple):
    """Fixed-shape padded batch. N_pad nodes, E_pad edges, G_pad = batch_size + 1 graphs.

    positions (N_pad, 3) float32; atomic_numbers (N_pad,) int32 (0 on padding);
    senders, receivers (E_pad,) int32 node indices into the batch; node_graph (N_pad,) int32
    graph id of each node; node_mask (N_pad,), edge_mask (E_pad,), graph_mask (G_pad,) bool,
    True on real entries; targets (G_pad, k) float32 (0 on padding graphs).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    node_graph: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    graph_mask: np.ndarray
    targets: np.ndarray


class NeighborLists(NamedTuple):
    """Radius-graph edges of every molecule of a set, in CSR form.

    Edges of molecule m are ``senders[offsets[m]:offsets[m+1]]`` → ``receivers[...]`` with
    atom indices local to the molecule; ``offsets`` is (M + 1,) int64.
    """

    cutoff: float
    max_neighbors: int | None
    senders: np.ndarray
    receivers: np.ndarray
    offsets: np.ndarray

    def num_edges(self) -> np.ndarray:
        """(M,) edge count of each molecule."""
        return np.diff(self.offsets)


# --------------------------------------------------------------------------------------------
# Radius graphs
# --------------------------------------------------------------------------------------------


def _check_cutoff(cutoff, max_neighbors) -> tuple[float, int | None]:
    cutoff = float(cutoff)
    if not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be a positive finite distance, got {cutoff}")
    if max_neighbors is not None:
        is_integer = isinstance(max_neighbors, (int, np.integer))
        if isinstance(max_neighbors, bool) or not is_integer or max_neighbors < 1:
            raise ValueError(
                f"max_neighbors must be a positive integer or None, got {max_neighbors!r}"
            )
        max_neighbors = int(max_neighbors)
    return cutoff, max_neighbors


def _padded_radius_edges(
    positions: np.ndarray, num_atoms: np.ndarray, cutoff: float, max_neighbors: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of C padded molecules at once: (molecule, receiver, sender), each (E,) int64.

    positions (C, A, 3), num_atoms (C,). Edge j → i iff i ≠ j, both < num_atoms and
    ‖x_i − x_j‖ < cutoff; with max_neighbors only the nearest ones of each receiver are kept
    (ties go to the lower sender index). Sorted by (molecule, receiver, sender).
    """
    positions = positions.astype(np.float64)
    num_slots = positions.shape[1]
    slot = np.arange(num_slots)
    is_atom = slot[None, :] < num_atoms[:, None]  # (C, A)
    difference = positions[:, :, None, :] - positions[:, None, :, :]  # [c, i, j] = x_i - x_j
    distance = np.sqrt(np.sum(difference * difference, axis=-1))  # (C, A, A)
    keep = is_atom[:, :, None] & is_atom[:, None, :] & (slot[:, None] != slot[None, :])
    keep &= distance < cutoff
    if max_neighbors is not None and max_neighbors < num_slots - 1:
        ranked = np.where(keep, distance, np.inf)
        order = np.argsort(ranked, axis=-1, kind="stable")
        rank = np.argsort(order, axis=-1, kind="stable")  # rank of sender j among i's senders
        keep &= rank < max_neighbors
    molecule, receiver, sender = np.nonzero(keep)
    return molecule, receiver, sender


def radius_graph(positions, cutoff: float, max_neighbors: int | None = None):
    """(senders, receivers), each (E,) int32, of the radius graph of one point cloud.

    positions (n, 3). Every ordered pair i ≠ j with ‖x_i − x_j‖ < cutoff gives the edge
    j → i (no self loops). With ``max_neighbors`` each receiver keeps only its nearest
    ``max_neighbors`` senders (ties go to the lower index). Sorted by (receiver, sender).
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n, 3), got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions contain non-finite values")
    cutoff, max_neighbors = _check_cutoff(cutoff, max_neighbors)
    _, receivers, senders = _padded_radius_edges(
        positions[None], np.array([len(positions)]), cutoff, max_neighbors
    )
    return senders.astype(np.int32), receivers.astype(np.int32)


def _check_molecule_set(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for key in ("positions", "num_atoms", "atomic_numbers"):
        if key not in dataset:
            raise ValueError(f"molecule set lacks the array {key!r} (has {sorted(dataset)})")
    positions = np.asarray(dataset["positions"])
    num_atoms = np.asarray(dataset["num_atoms"])
    atomic_numbers = np.asarray(dataset["atomic_numbers"])
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"positions must be (M, A, 3), got {positions.shape}")
    num_molecules, num_slots = positions.shape[:2]
    if num_atoms.shape != (num_molecules,):
        raise ValueError(f"num_atoms must be ({num_molecules},), got {num_atoms.shape}")
    if atomic_numbers.shape != (num_molecules, num_slots):
        raise ValueError(
            f"atomic_numbers must be {(num_molecules, num_slots)}, got {atomic_numbers.shape}"
        )
    if np.any(num_atoms < 1) or np.any(num_atoms > num_slots):
        raise ValueError(f"num_atoms must lie in [1, {num_slots}]")
    return positions, num_atoms, atomic_numbers


def _check_finite_atoms(positions: np.ndarray, num_atoms: np.ndarray, molecule_ids=None) -> None:
    """Refuse non-finite coordinates of real atoms (padding slots are not read): a NaN distance
    compares False with the cutoff, so such an atom would silently lose its edges."""
    ids = np.arange(len(num_atoms)) if molecule_ids is None else np.asarray(molecule_ids)
    real = np.arange(positions.shape[1])[None, :] < num_atoms[ids][:, None]  # (B, A)
    bad = ids[~np.all(np.isfinite(positions[ids]) | ~real[:, :, None], axis=(1, 2))]
    if bad.size:
        raise ValueError(f"non-finite atom positions in molecule(s) {bad[:10].tolist()}")


def compute_neighbor_lists(
    dataset, cutoff: float, max_neighbors: int | None = None
) -> NeighborLists:
    """Radius-graph edges of every molecule of ``dataset`` (see ``radius_graph``), computed once.

    Keep the result and pass it to ``batch_iterator`` for every epoch: one set per cutoff.
    Local atom indices are stored as uint8 (QM9: ≤ 29 atoms) or wider when needed.
    """
    positions, num_atoms, _ = _check_molecule_set(dataset)
    _check_finite_atoms(positions, num_atoms)
    cutoff, max_neighbors = _check_cutoff(cutoff, max_neighbors)
    num_molecules, num_slots = positions.shape[:2]
    index_dtype = np.min_scalar_type(max(num_slots - 1, 0))
    senders, receivers = [], []
    counts = np.zeros(num_molecules, dtype=np.int64)
    for start in range(0, num_molecules, _MOLECULE_CHUNK):
        stop = min(start + _MOLECULE_CHUNK, num_molecules)
        molecule, receiver, sender = _padded_radius_edges(
            positions[start:stop], num_atoms[start:stop], cutoff, max_neighbors
        )
        counts[start:stop] = np.bincount(molecule, minlength=stop - start)
        senders.append(sender.astype(index_dtype))
        receivers.append(receiver.astype(index_dtype))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return NeighborLists(
        cutoff=cutoff,
        max_neighbors=max_neighbors,
        senders=np.concatenate(senders),
        receivers=np.concatenate(receivers),
        offsets=offsets,
    )


# --------------------------------------------------------------------------------------------
# Padding budgets
# --------------------------------------------------------------------------------------------

PADDING_NODES = 2
"""Padding nodes reserved in every batch (so that padding edges join two distinct nodes)."""


def bucket_size(count: int, steps_per_octave: int = 4, minimum: int = 16) -> int:
    """Smallest size ≥ max(count, minimum) of the form ⌈2^k · (1 + j / steps_per_octave)⌉.

    steps_per_octave = 1 gives powers of two; 4 gives …, 64, 80, 96, 112, 128, 160, … (at most
    25 % waste, at most 4 sizes per doubling of the count).
    """
    if steps_per_octave < 1 or minimum < 1:
        raise ValueError(
            f"steps_per_octave and minimum must be >= 1, got {steps_per_octave}, {minimum}"
        )
    count = max(int(count), int(minimum))
    base = 1 << (count.bit_length() - 1)  # largest power of two <= count
    for step in range(steps_per_octave + 1):
        candidate = -(-base * (steps_per_octave + step) // steps_per_octave)
        if candidate >= count:
            return candidate
    raise AssertionError("unreachable: 2 * base >= count")


def pad_budget(
    num_nodes: int,
    num_edges: int,
    *,
    steps_per_octave: int = 4,
    min_nodes: int = 16,
    min_edges: int = 16,
) -> tuple[int, int]:
    """(N_pad, E_pad) for a batch with ``num_nodes`` real nodes and ``num_edges`` real edges.

    N_pad ≥ num_nodes + PADDING_NODES and E_pad ≥ num_edges, both on the bucket ladder.
    """
    if num_nodes < 0 or num_edges < 0:
        raise ValueError(f"counts must be non-negative, got {num_nodes} nodes, {num_edges} edges")
    return (
        bucket_size(num_nodes + PADDING_NODES, steps_per_octave, min_nodes),
        bucket_size(num_edges, steps_per_octave, min_edges),
    )


def worst_case_budget(
    num_atoms, neighbor_lists: NeighborLists, indices, batch_size: int, *, steps_per_octave: int = 4
) -> tuple[int, int]:
    """One (N_pad, E_pad) that fits every batch of ``batch_size`` molecules drawn from ``indices``.

    Sums the ``batch_size`` largest node counts and, separately, the largest edge counts, then
    rounds up with ``pad_budget``. Pass it as ``budget=`` for a single compiled shape.
    """
    indices = np.asarray(indices, dtype=np.int64)
    nodes = np.sort(np.asarray(num_atoms)[indices])[::-1][:batch_size].sum()
    edges = np.sort(neighbor_lists.num_edges()[indices])[::-1][:batch_size].sum()
    return pad_budget(int(nodes), int(edges), steps_per_octave=steps_per_octave)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def make_batch(
    dataset,
    neighbor_lists: NeighborLists,
    molecule_ids,
    batch_size: int,
    *,
    targets=None,
    budget: tuple[int, int] | None = None,
    steps_per_octave: int = 4,
) -> GraphBatch:
    """Pad the molecules ``molecule_ids`` (B ≤ batch_size of them) into one ``GraphBatch``.

    ``targets`` (M, k) replaces ``dataset["targets"]`` (e.g. normalised or selected columns).
    ``budget`` = (N_pad, E_pad) fixes the shape (ValueError if the batch does not fit);
    otherwise the shape comes from ``pad_budget``.
    """
    positions, num_atoms, atomic_numbers = _check_molecule_set(dataset)
    targets = np.asarray(dataset["targets"] if targets is None else targets)
    if targets.ndim == 1:
        targets = targets[:, None]
    if targets.ndim != 2 or targets.shape[0] != positions.shape[0]:
        raise ValueError(
            f"targets must be (M, k) with M = {positions.shape[0]}, got {targets.shape}"
        )
    ids = np.asarray(molecule_ids, dtype=np.int64)
    if ids.ndim != 1 or not 1 <= len(ids) <= batch_size:
        raise ValueError(f"need 1 … {batch_size} molecule ids, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= positions.shape[0]:
        raise ValueError(f"molecule ids must lie in [0, {positions.shape[0]})")
    if len(neighbor_lists.offsets) != positions.shape[0] + 1:
        raise ValueError("neighbor_lists were computed for another molecule set")
    _check_finite_atoms(positions, num_atoms, ids)  # only this batch's molecules: O(B), not O(M)

    num_graphs = len(ids)
    graph_slots = batch_size + 1
    atoms = num_atoms[ids].astype(np.int64)
    node_start = np.concatenate([[0], np.cumsum(atoms)[:-1]])
    edge_begin = neighbor_lists.offsets[ids]
    edge_count = neighbor_lists.offsets[ids + 1] - edge_begin
    real_nodes, real_edges = int(atoms.sum()), int(edge_count.sum())
    if budget is None:
        node_pad, edge_pad = pad_budget(real_nodes, real_edges, steps_per_octave=steps_per_octave)
    else:
        node_pad, edge_pad = (int(b) for b in budget)
        if real_nodes + PADDING_NODES > node_pad or real_edges > edge_pad:
            raise ValueError(
                f"batch needs {real_nodes} + {PADDING_NODES} nodes and {real_edges} edges, "
                f"more than the budget {budget}"
            )

    is_atom = np.arange(positions.shape[1])[None, :] < atoms[:, None]  # (B, A)
    batch_positions = np.zeros((node_pad, 3), dtype=np.float32)
    batch_positions[:real_nodes] = positions[ids][is_atom]
    num_padding_nodes = node_pad - real_nodes
    batch_positions[real_nodes:, 0] = np.arange(1, num_padding_nodes + 1)
    batch_numbers = np.zeros(node_pad, dtype=np.int32)
    batch_numbers[:real_nodes] = atomic_numbers[ids][is_atom]
    node_graph = np.full(node_pad, graph_slots - 1, dtype=np.int32)
    node_graph[:real_nodes] = np.repeat(np.arange(num_graphs), atoms)

    # Gather each molecule's CSR slice and shift its local atom indices by its node offset.
    first_edge_of_graph = np.concatenate([[0], np.cumsum(edge_count)[:-1]])
    edge_source = np.arange(real_edges) + np.repeat(edge_begin - first_edge_of_graph, edge_count)
    edge_shift = np.repeat(node_start, edge_count)
    senders = np.empty(edge_pad, dtype=np.int32)
    receivers = np.empty(edge_pad, dtype=np.int32)
    senders[:real_edges] = neighbor_lists.senders[edge_source].astype(np.int64) + edge_shift
    receivers[:real_edges] = neighbor_lists.receivers[edge_source].astype(np.int64) + edge_shift
    padding_edge = np.arange(edge_pad - real_edges)
    senders[real_edges:] = real_nodes + padding_edge % num_padding_nodes
    receivers[real_edges:] = real_nodes + (padding_edge + 1) % num_padding_nodes

    batch_targets = np.zeros((graph_slots, targets.shape[1]), dtype=np.float32)
    batch_targets[:num_graphs] = targets[ids]
    return GraphBatch(
        positions=batch_positions,
        atomic_numbers=batch_numbers,
        senders=senders,
        receivers=receivers,
        node_graph=node_graph,
        node_mask=np.arange(node_pad) < real_nodes,
        edge_mask=np.arange(edge_pad) < real_edges,
        graph_mask=np.arange(graph_slots) < num_graphs,
        targets=batch_targets,
    )


def batch_iterator(
    dataset,
    indices,
    batch_size: int,
    cutoff: float,
    *,
    max_neighbors: int | None = None,
    neighbor_lists: NeighborLists | None = None,
    targets=None,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
    budget: tuple[int, int] | None = None,
    steps_per_octave: int = 4,
) -> Iterator[GraphBatch]:
    """One epoch of ``GraphBatch``es over the molecules ``indices``.

    With ``shuffle`` the order is ``np.random.default_rng(seed).permutation(indices)`` (same
    seed, same batches); otherwise ``indices`` in order. The last batch may hold fewer than
    ``batch_size`` molecules (its extra graph slots are masked) unless ``drop_remainder``.
    Pass ``neighbor_lists`` from ``compute_neighbor_lists(dataset, cutoff, max_neighbors)`` to
    avoid recomputing them for every epoch; they must match ``cutoff`` and ``max_neighbors``.
    ``targets`` and ``budget``: see ``make_batch``.
    """
    is_integer = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not is_integer or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    cutoff, max_neighbors = _check_cutoff(cutoff, max_neighbors)
    positions, _, _ = _check_molecule_set(dataset)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= positions.shape[0]):
        raise ValueError(f"indices must lie in [0, {positions.shape[0]})")
    if neighbor_lists is None:
        neighbor_lists = compute_neighbor_lists(dataset, cutoff, max_neighbors)
    elif (neighbor_lists.cutoff, neighbor_lists.max_neighbors) != (cutoff, max_neighbors):
        raise ValueError(
            f"neighbor_lists were built for cutoff={neighbor_lists.cutoff}, "
            f"max_neighbors={neighbor_lists.max_neighbors}, not {cutoff}, {max_neighbors}"
        )
    order = np.random.default_rng(seed).permutation(indices) if shuffle else indices
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for start in range(0, stop, batch_size):
        yield make_batch(
            dataset,
            neighbor_lists,
            order[start : start + batch_size],
            batch_size,
            targets=targets,
            budget=budget,
            steps_per_octave=steps_per_octave,
        )
