"""QM9 parsing, caching, splits, target statistics, radius graphs and padded batching."""

import csv
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from data import graphs, qm9
from data.graphs import (
    PADDING_NODES,
    batch_iterator,
    bucket_size,
    compute_neighbor_lists,
    make_batch,
    pad_budget,
    radius_graph,
    worst_case_budget,
)
from data.qm9 import (
    CSV_HEADER,
    HARTREE_TO_EV,
    TARGET_NAMES,
    cormorant_split,
    load_qm9,
    parse_csv,
    random_split,
    subtract_atom_references,
    target_column,
    target_stats,
)

FIXTURE = Path(__file__).parent / "fixtures" / "qm9_tiny.csv"


@pytest.fixture(scope="module")
def tiny():
    return parse_csv(FIXTURE)


def _read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _write_rows(path, rows):
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def test_fixture_has_the_qm9pack_header():
    assert tuple(_read_rows(FIXTURE)[0]) == CSV_HEADER


def test_parse_shapes_and_atoms(tiny):
    assert tiny["positions"].shape == (8, 29, 3) and tiny["positions"].dtype == np.float32
    assert tiny["atomic_numbers"].shape == (8, 29)
    assert tiny["targets"].shape == (8, 12) and tiny["targets"].dtype == np.float64
    np.testing.assert_array_equal(tiny["index"], [1, 2, 3, 4, 184, 20003, 44747, 123246])
    np.testing.assert_array_equal(tiny["num_atoms"], [5, 4, 3, 4, 5, 17, 15, 29])
    # methane: C H H H H, then padding
    np.testing.assert_array_equal(tiny["atomic_numbers"][0, :6], [6, 1, 1, 1, 1, 0])
    # CF4 is listed F C F F F
    np.testing.assert_array_equal(tiny["atomic_numbers"][4, :5], [9, 6, 9, 9, 9])
    # padding: Z = 0 and zero coordinates exactly beyond num_atoms
    for m, n in enumerate(tiny["num_atoms"]):
        assert np.all(tiny["atomic_numbers"][m, :n] > 0)
        assert np.all(tiny["atomic_numbers"][m, n:] == 0)
        assert np.all(tiny["positions"][m, n:] == 0)
    assert list(tiny["target_names"]) == list(TARGET_NAMES)


def test_parse_coordinates_including_python_float_literals(tiny):
    np.testing.assert_allclose(
        tiny["positions"][0, 0], [-0.0126981359, 1.0858041578, 0.0080009958], rtol=1e-6
    )
    # acetylene's row is written "[[0.5995394918,0.,1.],...]" (not valid JSON)
    np.testing.assert_allclose(tiny["positions"][3, 0], [0.5995394918, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(tiny["positions"][3, 2], [-1.6616385861, 0.0, 1.0], rtol=1e-6)


def test_targets_units_checked_by_hand(tiny):
    methane = dict(zip(TARGET_NAMES, tiny["targets"][0]))
    # CSV row 1: HOMO -0.3877 Ha, U0 -40.47893 Ha; 0.3877 * 27.211386246 = 10.549854...
    assert methane["homo"] == pytest.approx(-10.549854447, abs=1e-8)
    assert methane["U0"] == pytest.approx(-1101.487799055, abs=1e-8)
    assert methane["lumo"] == pytest.approx(0.1171 * 27.211386246)
    assert methane["zpve"] == pytest.approx(0.044749 * 27.211386246)
    # columns that keep their units: D, bohr^3, bohr^2, cal/mol K
    assert methane["mu"] == 0.0
    assert methane["alpha"] == pytest.approx(13.21)
    assert methane["r2"] == pytest.approx(35.3641)
    assert methane["Cv"] == pytest.approx(6.469)
    assert tiny["targets"][1, target_column("mu")] == pytest.approx(1.6256)
    assert qm9.TARGETS["homo"].unit == "eV" and qm9.TARGETS["alpha"].unit == "bohr^3"
    # the file's gap is LUMO - HOMO rounded to 1e-4 Hartree
    y = tiny["targets"]
    gap = y[:, target_column("lumo")] - y[:, target_column("homo")]
    np.testing.assert_allclose(y[:, target_column("gap")], gap, atol=1.01e-4 * HARTREE_TO_EV)


def test_target_column_rejects_unknown_name():
    assert target_column("mu") == 0 and target_column("Cv") == 11
    with pytest.raises(ValueError, match="unknown QM9 target 'energy'"):
        target_column("energy")


def _corrupt(tmp_path, column, value):
    """Copy the fixture with `column` of the 2nd data row replaced by `value`."""
    rows = _read_rows(FIXTURE)
    rows[2][rows[0].index(column)] = value
    return _write_rows(tmp_path / "bad.csv", rows)


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("XYZ_Ang", "[[0.1,0.2,0.3],[1.0,2.0,3.0]]", "expected shape"),
        ("XYZ_Ang", "[[0.1,0.2,0.3", "not a list literal"),
        ("Elements", "['N','H','H','Cl']", "unknown element"),
        ("Elements", "['N','H','H']", "3 symbols but N_atoms = 4"),
        ("HOMO_au", "abc", "expected a number"),
        ("InternalEnergy_0K_au", "nan", "finite"),
        ("Index", "2.5", "expected an integer"),
    ],
)
def test_malformed_row_names_row_and_column(tmp_path, column, value, problem):
    path = _corrupt(tmp_path, column, value)
    with pytest.raises(ValueError) as error:
        parse_csv(path)
    message = str(error.value)
    assert "data row 2" in message and f"'{column}'" in message and problem in message
    assert "bad.csv" in message


def test_short_row_and_missing_column_are_rejected(tmp_path):
    rows = _read_rows(FIXTURE)
    short = [r[:] for r in rows]
    short[3] = short[3][:10]
    with pytest.raises(ValueError, match=r"data row 3 .*too few fields"):
        parse_csv(_write_rows(tmp_path / "short.csv", short))
    column = rows[0].index("Enthalphy_298K_au")
    dropped = [r[:column] + r[column + 1 :] for r in rows]
    with pytest.raises(ValueError, match="missing column.*Enthalphy_298K_au"):
        parse_csv(_write_rows(tmp_path / "dropped.csv", dropped))
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        parse_csv(tmp_path / "nowhere.csv")


def test_several_files_concatenate_and_duplicates_fail(tmp_path, tiny):
    rows = _read_rows(FIXTURE)
    first = _write_rows(tmp_path / "a.csv", rows[:4])
    second = _write_rows(tmp_path / "b.csv", [rows[0]] + rows[4:])
    joined = parse_csv([first, second])
    swapped = parse_csv([second, first])  # files in another order: still ordered by Index
    for key in ("positions", "atomic_numbers", "num_atoms", "targets", "index"):
        np.testing.assert_array_equal(joined[key], tiny[key])
        np.testing.assert_array_equal(swapped[key], tiny[key])
    assert np.all(np.diff(tiny["index"]) > 0)
    with pytest.raises(ValueError, match="duplicated QM9 Index"):
        parse_csv([FIXTURE, FIXTURE])


# ------------------------------------------------------------------------------------------
# Loading and caching
# ------------------------------------------------------------------------------------------


def test_load_qm9_parses_once_then_reads_the_cache(tmp_path, monkeypatch, tiny):
    csv_path = tmp_path / "part.csv"
    shutil.copy(FIXTURE, csv_path)
    cache_dir = tmp_path / "cache"
    first = load_qm9(cache_dir=cache_dir, csv_paths=[csv_path])
    assert len(list(cache_dir.glob("*.npz"))) == 1

    def no_parsing(paths):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(qm9, "parse_csv", no_parsing)
    second = load_qm9(cache_dir=cache_dir, csv_paths=[csv_path])
    assert set(second) == set(tiny)
    for key in tiny:
        np.testing.assert_array_equal(second[key], first[key])
        np.testing.assert_array_equal(second[key], tiny[key])
    # a changed CSV never returns the stale cache
    rows = _read_rows(csv_path)
    _write_rows(csv_path, rows[:3])
    with pytest.raises(AssertionError, match="cache should have been used"):
        load_qm9(cache_dir=cache_dir, csv_paths=[csv_path])


def test_missing_qm9pack_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "qm9pack", None)  # import machinery: "not installed"
    with pytest.raises(ImportError) as error:
        load_qm9(cache_dir=tmp_path)
    assert "pip install -e .[qm9]" in str(error.value) and "qm9pack" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_missing_csv_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_qm9(cache_dir=tmp_path, csv_paths=[tmp_path / "absent.csv"])


# ------------------------------------------------------------------------------------------
# Splits and target statistics
# ------------------------------------------------------------------------------------------


def _assert_partition(split, num):
    joined = np.concatenate([split.train, split.valid, split.test])
    assert len(joined) == num
    np.testing.assert_array_equal(np.sort(joined), np.arange(num))


def test_cormorant_split_sizes_and_reference_permutation():
    split = cormorant_split(130_831)
    assert (len(split.train), len(split.valid), len(split.test)) == (100_000, 17_748, 13_083)
    _assert_partition(split, 130_831)
    # Cormorant: np.random.seed(0); np.random.permutation(N); train | valid | test
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        reference = np.random.permutation(130_831)
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(split.train, reference[:100_000])
    np.testing.assert_array_equal(split.test, reference[117_748:])


def test_cormorant_split_scales_for_fewer_molecules():
    small = cormorant_split(8)
    assert (len(small.train), len(small.valid), len(small.test)) == (6, 1, 1)
    for num in (1, 2, 3, 10, 57, 1000):
        split = cormorant_split(num)
        _assert_partition(split, num)
        assert abs(len(split.train) - num * 100_000 / 130_831) <= 0.5
    with pytest.raises(ValueError, match="num_molecules"):
        cormorant_split(0)


def test_random_split_sizes_disjoint_and_seeded():
    split = random_split(1000, (0.8, 0.1, 0.1), seed=3)
    assert (len(split.train), len(split.valid), len(split.test)) == (800, 100, 100)
    _assert_partition(split, 1000)
    again = random_split(1000, (0.8, 0.1, 0.1), seed=3)
    other = random_split(1000, (0.8, 0.1, 0.1), seed=4)
    np.testing.assert_array_equal(split.train, again.train)
    assert not np.array_equal(split.train, other.train)
    _assert_partition(random_split(7, (0.5, 0.25, 0.25), seed=0), 7)
    with pytest.raises(ValueError, match="sum to 1"):
        random_split(10, (0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="non-negative"):
        random_split(10, (1.2, -0.1, -0.1))


def test_target_stats_by_hand():
    mean, mad = target_stats(np.array([1.0, 2.0, 3.0, 6.0]))
    assert mean == pytest.approx(3.0) and mad == pytest.approx((2 + 1 + 0 + 3) / 4)
    y = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]])
    mean, mad = target_stats(y)
    np.testing.assert_allclose(mean, [3.0, 20.0])
    np.testing.assert_allclose(mad, [4 / 3, 40 / 3])
    z = qm9.normalize_targets(y, mean, mad)
    np.testing.assert_allclose(np.abs(z).mean(axis=0), [1.0, 1.0])
    np.testing.assert_allclose(qm9.denormalize_targets(z, mean, mad), y)
    with pytest.raises(ValueError, match="MAD = 0"):
        target_stats(np.ones((4, 2)))
    with pytest.raises(ValueError, match="shape"):
        target_stats(np.zeros((0, 3)))


def test_atomization_energy_of_methane(tiny):
    atomized = subtract_atom_references(tiny["targets"], tiny["atomic_numbers"])
    # U0(CH4) - U0(C) - 4 U0(H) in Hartree, from the QM9 atomref table
    expected = (-40.47893 - (-37.846772) - 4 * (-0.500273)) * 27.211386246
    assert atomized[0, target_column("U0")] == pytest.approx(expected, abs=1e-9)
    assert atomized[0, target_column("U0")] == pytest.approx(-17.1722, abs=1e-3)
    untouched = [target_column(n) for n in ("mu", "homo", "zpve", "Cv")]
    np.testing.assert_array_equal(atomized[:, untouched], tiny["targets"][:, untouched])
    assert np.all(np.abs(atomized[:, 7:11]) < 150)  # eV: atomization, not total, energies


# ------------------------------------------------------------------------------------------
# Radius graphs
# ------------------------------------------------------------------------------------------


def _brute_force_edges(points, cutoff, max_neighbors=None):
    edges = set()
    for i in range(len(points)):
        near = []
        for j in range(len(points)):
            distance = float(np.sqrt(np.sum((points[i] - points[j]) ** 2)))
            if j != i and distance < cutoff:
                near.append((distance, j))
        near.sort()
        if max_neighbors is not None:
            near = near[:max_neighbors]
        edges.update((j, i) for _, j in near)
    return edges


@pytest.mark.parametrize("max_neighbors", [None, 1, 3])
def test_radius_graph_matches_brute_force(max_neighbors):
    points = np.random.default_rng(0).uniform(0, 2, size=(15, 3))
    senders, receivers = radius_graph(points, 1.0, max_neighbors)
    edges = list(zip(senders.tolist(), receivers.tolist()))
    assert len(edges) == len(set(edges)) and all(s != r for s, r in edges)
    assert set(edges) == _brute_force_edges(points, 1.0, max_neighbors)
    assert edges == sorted(edges, key=lambda e: (e[1], e[0]))
    if max_neighbors is not None:
        assert np.bincount(receivers, minlength=15).max() <= max_neighbors


def test_radius_graph_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        radius_graph(np.zeros((4, 2)), 1.0)
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph(np.zeros((4, 3)), 0.0)
    with pytest.raises(ValueError, match="max_neighbors"):
        radius_graph(np.zeros((4, 3)), 1.0, 0)


def test_non_finite_atom_positions_are_refused_but_padding_is_not_read(tiny):
    broken = {**tiny, "positions": tiny["positions"].copy()}
    n = int(broken["num_atoms"][5])
    broken["positions"][5, n:] = np.nan  # padding slots: never read
    compute_neighbor_lists(broken, 10.0)
    lists = compute_neighbor_lists(broken, 10.0)
    broken["positions"][5, 0, 0] = np.nan  # a real atom: its edges would silently vanish
    with pytest.raises(ValueError, match=r"non-finite atom positions in molecule\(s\) \[5\]"):
        compute_neighbor_lists(broken, 10.0)
    # a batch checks its own molecules only
    make_batch(broken, lists, [0, 1], 2)
    with pytest.raises(ValueError, match=r"non-finite atom positions in molecule\(s\) \[5\]"):
        make_batch(broken, lists, [1, 5], 2)


@pytest.mark.parametrize("cutoff, max_neighbors", [(2.0, None), (10.0, None), (2.0, 2)])
def test_neighbor_lists_match_radius_graph(tiny, cutoff, max_neighbors):
    lists = compute_neighbor_lists(tiny, cutoff, max_neighbors)
    assert lists.offsets.shape == (9,) and lists.senders.dtype == np.uint8
    for m, n in enumerate(tiny["num_atoms"]):
        part = slice(lists.offsets[m], lists.offsets[m + 1])
        senders, receivers = radius_graph(tiny["positions"][m, :n], cutoff, max_neighbors)
        np.testing.assert_array_equal(lists.senders[part], senders)
        np.testing.assert_array_equal(lists.receivers[part], receivers)
    if cutoff == 10.0:  # complete graphs, except nonane (about 11 Å long)
        n = tiny["num_atoms"]
        np.testing.assert_array_equal(lists.num_edges()[:7], n[:7] * (n[:7] - 1))
        assert lists.num_edges()[7] < 29 * 28


# ------------------------------------------------------------------------------------------
# Padding and batching
# ------------------------------------------------------------------------------------------


def test_bucket_sizes_by_hand():
    assert [bucket_size(c) for c in (1, 16, 17, 64, 65, 81, 129, 1000)] == [
        16, 16, 20, 64, 80, 96, 160, 1024,
    ]
    assert bucket_size(100, steps_per_octave=1) == 128
    assert pad_budget(62, 300) == (64, 320)
    assert pad_budget(63, 0) == (80, 16)


def _segment_sum(values, segment_ids, num_segments):
    return np.asarray(jax.ops.segment_sum(values, segment_ids, num_segments=num_segments))


def test_padded_batch_segment_sums_equal_per_molecule_sums(tiny):
    cutoff = 2.0
    lists = compute_neighbor_lists(tiny, cutoff)
    ids = np.array([5, 0, 7])
    batch = make_batch(tiny, lists, ids, batch_size=4)
    num_slots = 5
    assert batch.graph_mask.tolist() == [True, True, True, False, False]
    assert batch.targets.shape == (num_slots, 12)
    real_nodes = int(tiny["num_atoms"][ids].sum())
    assert batch.node_mask.sum() == real_nodes
    assert batch.edge_mask.sum() == lists.num_edges()[ids].sum()
    # masks exclude padding: padding nodes have Z = 0 and belong to the last graph
    assert np.all(batch.atomic_numbers[~batch.node_mask] == 0)
    assert np.all(batch.node_graph[~batch.node_mask] == num_slots - 1)
    assert np.all(batch.node_graph[batch.node_mask] < len(ids))
    # padding edges join two distinct padding nodes only (non-zero length)
    pad_s, pad_r = batch.senders[~batch.edge_mask], batch.receivers[~batch.edge_mask]
    assert np.all(~batch.node_mask[pad_s]) and np.all(~batch.node_mask[pad_r])
    assert np.all(pad_s != pad_r)
    real_s, real_r = batch.senders[batch.edge_mask], batch.receivers[batch.edge_mask]
    assert np.all(batch.node_graph[real_s] == batch.node_graph[real_r])

    node_sums = _segment_sum(batch.positions, batch.node_graph, num_slots)
    z_sums = _segment_sum(batch.atomic_numbers, batch.node_graph, num_slots)
    edge_graph = batch.node_graph[batch.receivers]
    edge_counts = _segment_sum(np.ones(len(batch.senders)), edge_graph, num_slots)
    vectors = batch.positions[batch.receivers] - batch.positions[batch.senders]
    edge_length_sums = _segment_sum(np.linalg.norm(vectors, axis=1), edge_graph, num_slots)
    for slot, m in enumerate(ids):
        n = tiny["num_atoms"][m]
        expected_sum = tiny["positions"][m, :n].sum(0)
        np.testing.assert_allclose(node_sums[slot], expected_sum, rtol=1e-5, atol=1e-5)
        assert z_sums[slot] == tiny["atomic_numbers"][m].sum()
        senders, receivers = radius_graph(tiny["positions"][m, :n], cutoff)
        assert edge_counts[slot] == len(senders)
        x = tiny["positions"][m, :n].astype(np.float64)
        expected_length = np.linalg.norm(x[receivers] - x[senders], axis=1).sum()
        assert edge_length_sums[slot] == pytest.approx(expected_length, rel=1e-5)
        np.testing.assert_allclose(batch.targets[slot], tiny["targets"][m].astype(np.float32))
    # empty graph slots stay empty
    assert np.all(node_sums[3] == 0) and z_sums[3] == 0 and edge_counts[3] == 0
    assert np.all(batch.targets[~batch.graph_mask] == 0)


def _random_molecule_set(num_molecules, seed):
    rng = np.random.default_rng(seed)
    num_atoms = rng.integers(12, 25, size=num_molecules)  # QM9-like sizes
    positions = np.zeros((num_molecules, 29, 3), np.float32)
    numbers = np.zeros((num_molecules, 29), np.int32)
    for m, n in enumerate(num_atoms):
        positions[m, :n] = rng.normal(scale=1.5, size=(n, 3))
        numbers[m, :n] = rng.choice([1, 6, 7, 8, 9], size=n)
    targets = rng.normal(size=(num_molecules, 2))
    return {"positions": positions, "num_atoms": num_atoms.astype(np.int32),
            "atomic_numbers": numbers, "targets": targets}


def test_epoch_uses_few_padded_shapes_and_is_seeded():
    dataset = _random_molecule_set(800, seed=1)
    lists = compute_neighbor_lists(dataset, 2.0)
    indices = np.arange(800)
    def epoch(seed):
        return batch_iterator(
            dataset, indices, 32, 2.0, neighbor_lists=lists, shuffle=True, seed=seed
        )

    batches = list(epoch(5))
    assert len(batches) == 25
    shapes = {(len(b.positions), len(b.senders)) for b in batches}
    raw = {(int(b.node_mask.sum()), int(b.edge_mask.sum())) for b in batches}
    assert len(raw) >= 20 and len(shapes) <= 6
    for nodes, edges in shapes:
        assert nodes == bucket_size(nodes) and edges == bucket_size(edges)
    # every molecule appears exactly once per epoch
    assert sum(int(b.node_mask.sum()) for b in batches) == dataset["num_atoms"].sum()
    seen = np.concatenate([b.targets[b.graph_mask] for b in batches])
    np.testing.assert_array_equal(
        np.sort(seen[:, 0]), np.sort(dataset["targets"][:, 0].astype(np.float32))
    )

    again = list(epoch(5))
    for a, b in zip(batches, again):
        for field_a, field_b in zip(a, b):
            np.testing.assert_array_equal(field_a, field_b)
    other = next(epoch(6))
    assert not np.array_equal(other.targets, batches[0].targets)


def test_fixed_budget_gives_one_shape_and_overflow_fails(tiny):
    lists = compute_neighbor_lists(tiny, 10.0)
    budget = worst_case_budget(tiny["num_atoms"], lists, np.arange(8), 3)
    shapes = {
        (len(b.positions), len(b.senders))
        for b in batch_iterator(tiny, np.arange(8), 3, 10.0, neighbor_lists=lists, budget=budget)
    }
    assert shapes == {budget}
    with pytest.raises(ValueError, match="budget"):
        list(batch_iterator(tiny, np.arange(8), 3, 10.0, neighbor_lists=lists, budget=(16, 16)))


def test_batch_iterator_remainder_and_argument_checks(tiny):
    sizes = [int(b.graph_mask.sum()) for b in batch_iterator(tiny, np.arange(8), 3, 2.0)]
    assert sizes == [3, 3, 2]
    dropped = list(batch_iterator(tiny, np.arange(8), 3, 2.0, drop_remainder=True))
    assert [int(b.graph_mask.sum()) for b in dropped] == [3, 3]
    lists = compute_neighbor_lists(tiny, 2.0)
    with pytest.raises(ValueError, match="cutoff=2.0"):
        list(batch_iterator(tiny, np.arange(8), 3, 5.0, neighbor_lists=lists))
    with pytest.raises(ValueError, match="indices"):
        list(batch_iterator(tiny, np.array([0, 8]), 3, 2.0))
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_iterator(tiny, np.arange(8), 0, 2.0))
    one_target = next(batch_iterator(tiny, [0], 2, 2.0, targets=tiny["targets"][:, 2]))
    assert one_target.targets.shape == (3, 1)
    assert one_target.targets[0, 0] == pytest.approx(-0.3877 * HARTREE_TO_EV, rel=1e-6)
    assert PADDING_NODES >= 2 and graphs.GraphBatch._fields[-1] == "targets"


def test_atomization_energies_of_u_h_and_g_by_hand(tiny):
    # methane (fixture row 0, CH4): molecule energy minus 1 C and 4 H reference energies, in eV
    atomized = subtract_atom_references(tiny["targets"], tiny["atomic_numbers"])
    by_hand = {
        "U": (-40.476062 - (-37.845355) - 4 * (-0.498857)) * HARTREE_TO_EV,
        "H": (-40.475117 - (-37.844411) - 4 * (-0.497912)) * HARTREE_TO_EV,
        "G": (-40.498597 - (-37.861317) - 4 * (-0.510927)) * HARTREE_TO_EV,
    }
    for name, value in by_hand.items():
        assert atomized[0, target_column(name)] == pytest.approx(value, abs=1e-6), name
    assert by_hand["U"] == pytest.approx(-17.28682224, abs=1e-6)


def test_random_split_sizes_round_and_follow_default_rng():
    split = random_split(7, (0.5, 0.25, 0.25), seed=0)
    assert tuple(len(part) for part in split) == (4, 2, 1)  # round(3.5) = 4, round(1.75) = 2, the rest 1
    split = random_split(1000, (0.8, 0.1, 0.1), 3)
    np.testing.assert_array_equal(np.sort(split.train), np.sort(np.random.default_rng(3).permutation(1000)[:800]))


def test_radius_graph_cutoff_is_strict():
    senders, receivers = radius_graph(np.array([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0.5, 0]]), 1.0)
    assert sorted(zip(senders.tolist(), receivers.tolist())) == [(0, 2), (2, 0)]  # the pair at exactly 1 Å: no edge


def test_padding_needs_two_spare_nodes_and_its_edges_have_nonzero_length(tiny):
    lists = compute_neighbor_lists(tiny, 2.0)
    with pytest.raises(ValueError, match="budget"):
        make_batch(tiny, lists, [0], 2, budget=(6, 32))  # methane's 5 atoms + 1: padding edges would be self loops
    make_batch(tiny, lists, [0], 2, budget=(7, 32))
    batch = make_batch(tiny, lists, [0], 2, budget=(16, 32))
    senders, receivers = np.asarray(batch.senders), np.asarray(batch.receivers)
    edge_mask = np.asarray(batch.edge_mask)
    pad_s, pad_r = senders[~edge_mask], receivers[~edge_mask]
    positions = np.asarray(batch.positions, np.float64)
    lengths = np.linalg.norm(positions[pad_s] - positions[pad_r], axis=-1)
    assert np.all(lengths > 0.5)  # no zero-length padding edge: a norm's gradient there would be NaN
