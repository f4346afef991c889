"""ModelNet40 loader for local copies of the real data (nothing is downloaded).

Two common distributions are supported; ``path`` may be the layout folder itself or a
folder containing it:

(a) ``modelnet40_normal_resampled/`` (text files)::

        modelnet40_shape_names.txt         40 class names, one per line (label = line index)
        modelnet40_train.txt               sample names, one per line, e.g. "airplane_0001"
        modelnet40_test.txt
        <class>/<class>_<id>.txt           rows "x,y,z,nx,ny,nz" (10,000 points)

(b) ``modelnet40_ply_hdf5_2048/`` (HDF5, needs ``h5py``)::

        ply_data_train0.h5, ply_data_train1.h5, ...   datasets "data" (B, 2048, 3), "label" (B, 1)
        ply_data_test0.h5, ...
        shape_names.txt                               optional class names (label = line index)

As in the ACE paper, only the first ``num_points`` points of each cloud are used (normals
are ignored), and each truncated cloud is normalised to the unit sphere (centroid 0, largest
norm 1). The validation split is a seeded, class-stratified hold-out of the *training*
files; the test split is never used for selection.

Parsing the text layout is slow (12,311 files), so its result is cached as ``.npz`` under
``cache_dir`` (keyed by the folder, ``num_points``, and the sizes and modification times of
its list files and of every sample file). The HDF5 layout loads quickly and is not cached.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from data.cache import read_cache
from data.pointcloud import normalize_to_unit_sphere, stratified_holdout

TEXT_LAYOUT_DIR = "modelnet40_normal_resampled"
HDF5_LAYOUT_DIR = "modelnet40_ply_hdf5_2048"
_TEXT_FILES = ("modelnet40_shape_names.txt", "modelnet40_train.txt", "modelnet40_test.txt")

_EXPECTED_LAYOUTS = (
    f"  (a) {TEXT_LAYOUT_DIR}/ with {', '.join(_TEXT_FILES)} and <class>/<class>_NNNN.txt files "
    "(rows 'x,y,z,nx,ny,nz'), or\n"
    f"  (b) {HDF5_LAYOUT_DIR}/ with ply_data_train*.h5 and ply_data_test*.h5 (datasets 'data' (B,2048,3) "
    "and 'label' (B,1)), optionally shape_names.txt.\n"
    "The path may be that folder or its parent. Get the data from the ModelNet40 distribution "
    "(e.g. the PointNet++ or PointNet release) and unpack it locally."
)


def load_modelnet40(
    path: str | os.PathLike,
    num_points: int = 300,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Load ModelNet40 from a local folder in either supported layout.

    Args:
      path: the layout folder, or a folder containing ``modelnet40_normal_resampled`` or
        ``modelnet40_ply_hdf5_2048``.
      num_points: number of leading points kept per cloud (300 in the paper).
      val_fraction: fraction of each class's training files held out for validation
        (0 <= val_fraction < 1; 0 gives an empty validation split).
      seed: seed of the hold-out split.
      cache_dir: cache folder for the parsed text layout; default ``~/.cache/ace_jax/modelnet40``.
    Returns:
      dict with ``train``, ``val``, ``test``: (points (N, num_points, 3) float32, unit-sphere
      normalised, labels (N,) int32); and ``class_names``: list of str (label = index).
    Raises:
      FileNotFoundError: missing path, unrecognised layout, or missing sample files.
      ValueError: invalid arguments, too few points in a file, labels out of range.
      ImportError: HDF5 layout without ``h5py`` installed.
    """
    if isinstance(num_points, bool) or int(num_points) != num_points or num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must satisfy 0 <= val_fraction < 1, got {val_fraction}")
    layout, root = _detect_layout(Path(path))
    if layout == "text":
        cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "ace_jax" / "modelnet40"
        raw = _load_text_layout_cached(root, int(num_points), cache_dir)
    else:
        raw = _load_hdf5_layout(root, int(num_points))
    train_points, train_labels, test_points, test_labels, class_names = raw

    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"{split} labels must lie in [0, {len(class_names)}), found range "
                f"[{labels.min()}, {labels.max()}] in {root}"
            )
    keep, held_out = stratified_holdout(train_labels, val_fraction, seed)
    train_points = normalize_to_unit_sphere(train_points).astype(np.float32)
    test_points = normalize_to_unit_sphere(test_points).astype(np.float32)
    return {
        "train": (train_points[keep], train_labels[keep]),
        "val": (train_points[held_out], train_labels[held_out]),
        "test": (test_points, test_labels),
        "class_names": list(class_names),
    }


def _detect_layout(path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise FileNotFoundError(f"ModelNet40 path {path} does not exist. Expected either\n{_EXPECTED_LAYOUTS}")
    if not path.is_dir():
        raise FileNotFoundError(f"ModelNet40 path {path} is not a folder. Expected either\n{_EXPECTED_LAYOUTS}")
    for candidate in (path, path / TEXT_LAYOUT_DIR, path / HDF5_LAYOUT_DIR):
        if all((candidate / name).is_file() for name in _TEXT_FILES):
            return "text", candidate
        if _hdf5_files(candidate, "train") and _hdf5_files(candidate, "test"):
            return "hdf5", candidate
    raise FileNotFoundError(
        f"no recognised ModelNet40 layout in {path} (found: "
        f"{', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'}). Expected either\n"
        f"{_EXPECTED_LAYOUTS}"
    )


def _hdf5_files(folder: Path, split: str) -> list[Path]:
    """``ply_data_<split>N.h5`` files in numeric order of N."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"ply_data_{split}(\d+)\.h5$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def _read_lines(file: Path) -> list[str]:
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- text layout


def _load_text_layout_cached(root: Path, num_points: int, cache_dir: Path):
    fingerprint = ["text-layout-cache-v2", str(root.resolve()), str(num_points)]
    for name in _TEXT_FILES:
        stat = (root / name).stat()
        fingerprint += [name, str(stat.st_size), str(stat.st_mtime_ns)]
    # every sample file too (one stat each, milliseconds for the 12,311 files): a sample
    # replaced in place must not be answered from the cache
    for split in ("train", "test"):
        for sample in _read_lines(root / f"modelnet40_{split}.txt"):
            file = root / sample.rsplit("_", 1)[0] / f"{sample}.txt"
            stat = file.stat() if file.is_file() else None  # a missing file is reported by the parser
            fingerprint += [sample, "missing" if stat is None else f"{stat.st_size}:{stat.st_mtime_ns}"]
    key = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()[:16]
    cache_file = cache_dir / f"modelnet40_text_{num_points}pts_{key}.npz"
    if cache_file.exists():
        return read_cache(cache_file, lambda stored: (
            stored["train_points"], stored["train_labels"],
            stored["test_points"], stored["test_labels"], [str(n) for n in stored["class_names"]],
        ))
    raw = _load_text_layout(root, num_points)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        np.savez(
            handle, train_points=raw[0], train_labels=raw[1], test_points=raw[2], test_labels=raw[3],
            class_names=np.array(raw[4]),
        )
    os.replace(temporary, cache_file)
    return raw


def _load_text_layout(root: Path, num_points: int):
    class_names = _read_lines(root / "modelnet40_shape_names.txt")
    label_of = {name: index for index, name in enumerate(class_names)}
    splits = []
    for split in ("train", "test"):
        points, labels = [], []
        for sample in _read_lines(root / f"modelnet40_{split}.txt"):
            class_name = sample.rsplit("_", 1)[0]  # class names may contain "_" (e.g. night_stand)
            if class_name not in label_of:
                raise ValueError(
                    f"sample {sample!r} in modelnet40_{split}.txt has class {class_name!r}, which is not in "
                    f"modelnet40_shape_names.txt"
                )
            file = root / class_name / f"{sample}.txt"
            if not file.is_file():
                raise FileNotFoundError(f"sample file {file} listed in modelnet40_{split}.txt is missing")
            try:
                rows = np.loadtxt(file, delimiter=",", max_rows=num_points, usecols=(0, 1, 2), ndmin=2)
            except ValueError as error:  # name the one bad file of the ~12 000
                raise ValueError(f"{file}: {error}") from error
            if rows.shape[0] < num_points:
                raise ValueError(f"{file} has only {rows.shape[0]} points, fewer than num_points={num_points}")
            points.append(rows)
            labels.append(label_of[class_name])
        splits.append(
            (np.asarray(points, np.float32).reshape(-1, num_points, 3), np.asarray(labels, np.int32))
        )
    (train_points, train_labels), (test_points, test_labels) = splits
    return train_points, train_labels, test_points, test_labels, class_names


# --------------------------------------------------------------------------- HDF5 layout


def _load_hdf5_layout(root: Path, num_points: int):
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            f"reading the ModelNet40 HDF5 layout in {root} needs the 'h5py' package: "
            "pip install h5py (or pip install 'ace-jax[modelnet]'), or use the "
            f"{TEXT_LAYOUT_DIR} text layout instead"
        ) from error

    splits = []
    for split in ("train", "test"):
        points, labels = [], []
        for file in _hdf5_files(root, split):
            with h5py.File(file, "r") as handle:
                for key in ("data", "label"):
                    if key not in handle:
                        raise ValueError(f"{file} has no dataset {key!r} (found: {', '.join(handle.keys())})")
                data, label = np.asarray(handle["data"]), np.asarray(handle["label"])
            if data.ndim != 3 or data.shape[-1] != 3:
                raise ValueError(f"{file}: 'data' must have shape (B, P, 3), got {data.shape}")
            if data.shape[1] < num_points:
                raise ValueError(
                    f"{file} has only {data.shape[1]} points per cloud, fewer than num_points={num_points}"
                )
            label = label.reshape(-1)
            if label.shape[0] != data.shape[0]:
                raise ValueError(f"{file}: {data.shape[0]} clouds but {label.shape[0]} labels")
            points.append(data[:, :num_points].astype(np.float32))
            labels.append(label.astype(np.int32))
        splits.append((np.concatenate(points), np.concatenate(labels)))
    (train_points, train_labels), (test_points, test_labels) = splits

    names_file = root / "shape_names.txt"
    if names_file.is_file():
        class_names = _read_lines(names_file)
    else:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        class_names = [f"class_{index:02d}" for index in range(max(num_classes, 40))]
    return train_points, train_labels, test_points, test_labels, class_names
