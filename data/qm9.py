"""QM9: parse the qm9pack CSV files, cache them, split them, and normalise targets.

Source: the PyPI package ``qm9pack`` (optional extra, ``pip install -e .[qm9]``) ships the full
QM9 set (Ramakrishnan et al., Sci. Data 2014) as ``qm9pack/data/qm9_part{1,2,3}.csv``:
130,831 molecules (the 3,054 "uncharacterized" ones already removed), ordered by increasing
``Index``. Nothing here downloads anything; the tests use a tiny CSV written in the same layout.

Conventions
-----------
* Molecules are ordered by increasing ``Index`` (:func:`parse_csv` sorts them; qm9pack's
  files are already in that order); the Cormorant split relies on that order.
* ``positions`` are in Ångström (as ``XYZ_Ang``), padded with zeros to the largest molecule.
* ``atomic_numbers`` use 0 for padding; the elements are H, C, N, O, F (Z = 1, 6, 7, 8, 9).
* ``targets`` columns follow ``TARGET_NAMES`` = (mu, alpha, homo, lumo, gap, r2, zpve, U0, U,
  H, G, Cv). Energies given in Hartree (homo, lumo, gap, zpve, U0, U, H, G) are converted to
  eV with ``HARTREE_TO_EV``; the rest keep their CSV units (D, bohr³, bohr², cal/(mol·K)).
* U0, U, H and G are *total* energies. Cormorant's QM9 preprocessing (also used by SEGNN)
  trains on atomization energies instead, i.e. the total energy minus the per-atom reference
  energies of the QM9 ``atomref`` table: ``subtract_atom_references`` does that.
* The ``gap`` column is the one in the file (LUMO − HOMO rounded to 1e-4 Hartree), not
  recomputed.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from data.cache import read_cache

HARTREE_TO_EV = 27.211386246
"""eV per Hartree (CODATA 2018)."""

QM9_NUM_MOLECULES = 130_831
"""Molecules in qm9pack (QM9 without the 3,054 uncharacterized ones)."""

INSTALL_HINT = "pip install -e .[qm9]  (or: pip install qm9pack)"

CSV_HEADER = (
    "XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang",
    "Mulliken_pop", "Harmonic_Freq_cmi", "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye",
    "Polarizability_bohr3", "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K",
)
"""The header of every qm9pack ``qm9_part*.csv`` file (its spelling, "Enthalphy", included)."""

ELEMENT_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
"""Atomic number of each element that occurs in QM9."""


class QM9Target(NamedTuple):
    """One regression target: CSV column, unit after conversion, factor CSV value -> unit."""

    column: str
    unit: str
    scale: float


TARGETS: dict[str, QM9Target] = {
    "mu": QM9Target("Dipole_debye", "D", 1.0),
    "alpha": QM9Target("Polarizability_bohr3", "bohr^3", 1.0),
    "homo": QM9Target("HOMO_au", "eV", HARTREE_TO_EV),
    "lumo": QM9Target("LUMO_au", "eV", HARTREE_TO_EV),
    "gap": QM9Target("HOMO_LUMO_gap_au", "eV", HARTREE_TO_EV),
    "r2": QM9Target("R2_bohr2", "bohr^2", 1.0),
    "zpve": QM9Target("ZPVE_au", "eV", HARTREE_TO_EV),
    "U0": QM9Target("InternalEnergy_0K_au", "eV", HARTREE_TO_EV),
    "U": QM9Target("InternalEnergy_298K_au", "eV", HARTREE_TO_EV),
    "H": QM9Target("Enthalphy_298K_au", "eV", HARTREE_TO_EV),
    "G": QM9Target("GibbsFreeEnergy_298K_au", "eV", HARTREE_TO_EV),
    "Cv": QM9Target("Heatcapacity_Cv_cal_mol_K", "cal/mol K", 1.0),
}
"""The 12 standard QM9 targets, in the column order of ``targets``."""

TARGET_NAMES = tuple(TARGETS)

ATOM_REFERENCE_HARTREE = {
    "U0": {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064579, "F": -99.718730},
    "U": {"H": -0.498857, "C": -37.845355, "N": -54.582445, "O": -75.063163, "F": -99.717314},
    "H": {"H": -0.497912, "C": -37.844411, "N": -54.581501, "O": -75.062219, "F": -99.716370},
    "G": {"H": -0.510927, "C": -37.861317, "N": -54.598897, "O": -75.079532, "F": -99.733544},
}
"""Energies (Hartree) of the isolated atoms, B3LYP/6-31G(2df,p), from the QM9 atomref table."""

_COORDINATE_COLUMN = "XYZ_Ang"
_REQUIRED_COLUMNS = ("Index", "N_atoms", "Elements", _COORDINATE_COLUMN) + tuple(
    target.column for target in TARGETS.values()
)
_CACHE_FORMAT_VERSION = 1


def target_column(name: str) -> int:
    """Column of target ``name`` (e.g. ``"homo"``) in the ``targets`` array."""
    if name not in TARGETS:
        raise ValueError(f"unknown QM9 target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    return TARGET_NAMES.index(name)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class _RowError(ValueError):
    """A problem with one column of one row; the caller adds file and row."""

    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


def _parse_int(row: dict, column: str) -> int:
    text = row[column]
    try:
        return int(text)
    except (TypeError, ValueError):
        raise _RowError(column, f"expected an integer, got {text!r}") from None


def _parse_finite_float(row: dict, column: str) -> float:
    text = row[column]
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _RowError(column, f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _RowError(column, f"expected a finite number, got {text!r}")
    return value


def _parse_elements(row: dict, num_atoms: int) -> np.ndarray:
    text = row["Elements"]
    try:
        symbols = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _RowError("Elements", f"not a list literal: {text!r}") from None
    if not isinstance(symbols, (list, tuple)) or not all(isinstance(s, str) for s in symbols):
        raise _RowError("Elements", f"expected a list of element symbols, got {text!r}")
    unknown = sorted({s for s in symbols if s not in ELEMENT_TO_Z})
    if unknown:
        raise _RowError(
            "Elements", f"unknown element(s) {unknown}; expected {sorted(ELEMENT_TO_Z)}"
        )
    if len(symbols) != num_atoms:
        raise _RowError("Elements", f"{len(symbols)} symbols but N_atoms = {num_atoms}")
    return np.array([ELEMENT_TO_Z[s] for s in symbols], dtype=np.int32)


def _parse_coordinates(row: dict, num_atoms: int) -> np.ndarray:
    text = row[_COORDINATE_COLUMN]
    try:
        nested = ast.literal_eval(text)  # not json: the files contain numbers such as "0."
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _RowError(_COORDINATE_COLUMN, f"not a list literal: {text[:80]!r}") from None
    try:
        coordinates = np.asarray(nested, dtype=np.float64)
    except (ValueError, TypeError):
        raise _RowError(_COORDINATE_COLUMN, "expected a list of [x, y, z] number triples") from None
    if coordinates.shape != (num_atoms, 3):
        raise _RowError(
            _COORDINATE_COLUMN, f"expected shape ({num_atoms}, 3), got {coordinates.shape}"
        )
    if not np.all(np.isfinite(coordinates)):
        raise _RowError(_COORDINATE_COLUMN, "contains a non-finite coordinate")
    return coordinates


def _parse_row(row: dict) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(index, atomic numbers (n,), positions (n, 3), targets (12,)) of one CSV row."""
    index = _parse_int(row, "Index")
    num_atoms = _parse_int(row, "N_atoms")
    if num_atoms < 1:
        raise _RowError("N_atoms", f"expected at least one atom, got {num_atoms}")
    atomic_numbers = _parse_elements(row, num_atoms)
    positions = _parse_coordinates(row, num_atoms)
    targets = np.array(
        [_parse_finite_float(row, t.column) * t.scale for t in TARGETS.values()], dtype=np.float64
    )
    return index, atomic_numbers, positions, targets


def _as_path_list(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("parse_csv needs at least one CSV path")
    return paths


def parse_csv(paths) -> dict[str, np.ndarray]:
    """Parse qm9pack-layout CSV files (one path or a sequence, read in order) into arrays.

    Returns, with M molecules and A = the largest atom count:
      ``positions`` (M, A, 3) float32, Å, zero-padded;
      ``atomic_numbers`` (M, A) int32, 0 = padding;
      ``num_atoms`` (M,) int32;
      ``targets`` (M, 12) float64, columns ``TARGET_NAMES`` in the units of ``TARGETS``;
      ``index`` (M,) int64, the QM9 ``Index`` (1-based id in the original 133,885 set);
      ``target_names`` (12,) str.

    Molecules are ordered by ``Index`` whatever the order of the files and rows, so splits
    that are defined by position (the Cormorant permutation) name the same molecules.

    Raises FileNotFoundError for a missing file and ValueError for a missing column, a
    malformed row (the message names file, row and column), a duplicated Index or no rows.
    """
    indices, elements, coordinates, targets = [], [], [], []
    for path in _as_path_list(paths):
        if not path.is_file():
            raise FileNotFoundError(f"QM9 CSV file not found: {path}")
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing} in header {header}")
            for row_number, row in enumerate(reader, start=1):
                try:
                    if None in row:
                        raise _RowError(
                            "<extra>", f"more fields than the {len(header)} of the header"
                        )
                    absent = [c for c in header if row[c] is None]
                    if absent:
                        raise _RowError(absent[0], "missing (the row has too few fields)")
                    index, z, xyz, y = _parse_row(row)
                except _RowError as error:
                    raise ValueError(
                        f"{path}: data row {row_number} (line {reader.line_num}), "
                        f"column {error.column!r}: {error.problem}"
                    ) from None
                indices.append(index)
                elements.append(z)
                coordinates.append(xyz)
                targets.append(y)
    if not indices:
        raise ValueError(f"no molecules in {[str(p) for p in _as_path_list(paths)]}")
    index = np.array(indices, dtype=np.int64)
    unique, counts = np.unique(index, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"duplicated QM9 Index value(s): {unique[counts > 1][:10].tolist()}")

    order = np.argsort(index, kind="stable")
    index = index[order]
    elements = [elements[m] for m in order]
    coordinates = [coordinates[m] for m in order]
    targets = [targets[m] for m in order]
    num_atoms = np.array([len(z) for z in elements], dtype=np.int32)
    max_atoms = int(num_atoms.max())
    positions = np.zeros((len(indices), max_atoms, 3), dtype=np.float32)
    atomic_numbers = np.zeros((len(indices), max_atoms), dtype=np.int32)
    for m, (z, xyz) in enumerate(zip(elements, coordinates)):
        positions[m, : len(z)] = xyz
        atomic_numbers[m, : len(z)] = z
    return {
        "positions": positions,
        "atomic_numbers": atomic_numbers,
        "num_atoms": num_atoms,
        "targets": np.stack(targets),
        "index": index,
        "target_names": np.array(TARGET_NAMES),
    }


# --------------------------------------------------------------------------------------------
# Loading with a cache
# --------------------------------------------------------------------------------------------


def qm9pack_csv_paths() -> list[Path]:
    """The three CSV files of the installed ``qm9pack`` package.

    The package directory is found with ``importlib.util.find_spec`` without importing
    qm9pack (its ``__init__`` imports pandas and pkg_resources, which are not needed here).
    Raises ImportError (with the install command) when qm9pack is not installed and
    FileNotFoundError when a file is missing from the installed package.
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "QM9 needs the optional package 'qm9pack', which is not installed. "
            f"Install it with: {INSTALL_HINT}; or pass csv_paths= to files in the qm9pack layout."
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = [data_dir / f"qm9_part{part}.csv" for part in (1, 2, 3)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"qm9pack is installed but lacks {missing}; reinstall it with: {INSTALL_HINT}"
        )
    return paths


def default_cache_dir() -> Path:
    """``~/.cache/ace_jax/qm9``."""
    return Path.home() / ".cache" / "ace_jax" / "qm9"


def _cache_key(paths: Sequence[Path]) -> str:
    """Hash of the parser version and each file's resolved path, size and modification time."""
    digest = hashlib.sha256(f"qm9-cache-v{_CACHE_FORMAT_VERSION}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_qm9(cache_dir=None, csv_paths=None) -> dict[str, np.ndarray]:
    """QM9 as the arrays of ``parse_csv``, parsed once and then read from a compressed .npz.

    ``csv_paths`` defaults to the files of the installed qm9pack package (ImportError with the
    install command when it is missing). ``cache_dir`` defaults to ``~/.cache/ace_jax/qm9``.
    The cache file name hashes the CSV paths, sizes and modification times, so editing a CSV
    or passing other files never returns stale arrays. The cache is written atomically.
    """
    paths = qm9pack_csv_paths() if csv_paths is None else _as_path_list(csv_paths)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"QM9 CSV file not found: {path}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cache_file = cache_dir / f"qm9_{_cache_key(paths)}.npz"
    if cache_file.is_file():
        return read_cache(cache_file, lambda archive: {key: archive[key] for key in archive.files})
    dataset = parse_csv(paths)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(temporary, **dataset)
    os.replace(temporary, cache_file)
    return dataset


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


class Split(NamedTuple):
    """Molecule indices (rows of the dataset arrays) of the three subsets, int64."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def _check_num_molecules(num_molecules) -> int:
    if isinstance(num_molecules, bool) or not isinstance(num_molecules, (int, np.integer)):
        raise ValueError(f"num_molecules must be an integer, got {num_molecules!r}")
    if num_molecules < 1:
        raise ValueError(f"num_molecules must be positive, got {num_molecules}")
    return int(num_molecules)


def _split_permutation(permutation: np.ndarray, num_train: int, num_valid: int) -> Split:
    return Split(
        train=permutation[:num_train].astype(np.int64),
        valid=permutation[num_train : num_train + num_valid].astype(np.int64),
        test=permutation[num_train + num_valid :].astype(np.int64),
    )


def cormorant_split(num_molecules: int = QM9_NUM_MOLECULES, seed: int = 0) -> Split:
    """The Cormorant/SEGNN split: 100,000 train / 17,748 valid / 13,083 test for 130,831.

    ``np.random.seed(seed); p = np.random.permutation(num_molecules)`` (numpy's legacy
    MT19937 stream, reproduced with ``RandomState(seed)``); train = p[:n_train], valid = the
    next n_valid, test = the rest. For another number of molecules N the sizes scale in
    proportion: n_train = round(N · 100000/130831), n_test = round(N · 13083/130831),
    n_valid = N − n_train − n_test (exact for N = 130,831).
    """
    n = _check_num_molecules(num_molecules)
    permutation = np.random.RandomState(seed).permutation(n)
    num_train = int(round(n * 100_000 / QM9_NUM_MOLECULES))
    num_test = int(round(n * 13_083 / QM9_NUM_MOLECULES))
    num_train = min(num_train, n)
    num_test = min(num_test, n - num_train)
    return _split_permutation(permutation, num_train, n - num_train - num_test)


def random_split(num_molecules: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Random train/valid/test split with the given fractions (they must sum to 1).

    Permutation from ``np.random.default_rng(seed)``; n_train = round(f_train · N),
    n_valid = round(f_valid · N) (capped so that nothing overflows), n_test = the rest.
    """
    n = _check_num_molecules(num_molecules)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    permutation = np.random.default_rng(seed).permutation(n)
    num_train = min(int(round(fractions[0] * n)), n)
    num_valid = min(int(round(fractions[1] * n)), n - num_train)
    return _split_permutation(permutation, num_train, num_valid)


# --------------------------------------------------------------------------------------------
# Targets: normalisation and atomization energies
# --------------------------------------------------------------------------------------------


def target_stats(y_train) -> tuple[np.ndarray, np.ndarray]:
    """(mean, MAD) over the first axis; MAD = mean |y − mean| (mean absolute deviation).

    ``y_train`` is (M,) or (M, k); the results are () or (k,). The usual QM9 loss is the L1
    of ``(y − mean) / MAD``. Raises ValueError for no rows, non-finite values or a zero MAD.
    """
    y = np.asarray(y_train, dtype=np.float64)
    if y.ndim not in (1, 2) or y.shape[0] == 0:
        raise ValueError(f"y_train must be (M,) or (M, k) with M >= 1, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_train contains non-finite values")
    mean = y.mean(axis=0)
    mad = np.abs(y - mean).mean(axis=0)
    if np.any(mad == 0):
        raise ValueError("a target is constant over y_train (MAD = 0); cannot normalise by it")
    return mean, mad


def normalize_targets(y, mean, mad) -> np.ndarray:
    """(y − mean) / mad."""
    return (np.asarray(y) - mean) / mad


def denormalize_targets(z, mean, mad) -> np.ndarray:
    """z · mad + mean (inverse of ``normalize_targets``)."""
    return np.asarray(z) * mad + mean


def subtract_atom_references(
    targets: np.ndarray, atomic_numbers: np.ndarray, names=("U0", "U", "H", "G")
) -> np.ndarray:
    """A copy of ``targets`` (M, 12) with the energies ``names`` turned into atomization energies.

    For each named target t: t − Σ_atoms E_ref(element, t) · HARTREE_TO_EV, with E_ref from
    ``ATOM_REFERENCE_HARTREE`` and ``atomic_numbers`` (M, A), 0 = padding.
    """
    targets = np.asarray(targets, dtype=np.float64)
    atomic_numbers = np.asarray(atomic_numbers)
    if targets.ndim != 2 or targets.shape[1] != len(TARGETS):
        raise ValueError(f"targets must be (M, {len(TARGETS)}), got {targets.shape}")
    if atomic_numbers.ndim != 2 or atomic_numbers.shape[0] != targets.shape[0]:
        raise ValueError(
            f"atomic_numbers must be (M, A) with M = {targets.shape[0]}, got {atomic_numbers.shape}"
        )
    known = np.isin(atomic_numbers, [0, *ELEMENT_TO_Z.values()])
    if not np.all(known):
        raise ValueError(f"atomic numbers outside H,C,N,O,F: {np.unique(atomic_numbers[~known])}")
    result = targets.copy()
    for name in names:
        if name not in ATOM_REFERENCE_HARTREE:
            raise ValueError(
                f"no atom reference energies for {name!r}; have {list(ATOM_REFERENCE_HARTREE)}"
            )
        table = np.zeros(max(ELEMENT_TO_Z.values()) + 1)
        for symbol, energy in ATOM_REFERENCE_HARTREE[name].items():
            table[ELEMENT_TO_Z[symbol]] = energy * HARTREE_TO_EV
        result[:, target_column(name)] -= table[atomic_numbers].sum(axis=1)
    return result
