"""The loaders' cache files: a damaged one is named in a clear error; a new one is readable by others."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

import data.nbody as nbody
from data.modelnet import load_modelnet40
from data.qm9 import load_qm9
from data.shapes import make_shapes
from modelnet_layouts import write_text_layout

QM9_FIXTURE = Path(__file__).parent / "fixtures" / "qm9_tiny.csv"


def _damage(cache_dir: Path) -> Path:
    (path,) = list(Path(cache_dir).glob("*.npz"))
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    return path


@pytest.mark.parametrize("loader", ["shapes", "qm9", "modelnet_text"])
def test_a_damaged_cache_file_is_named_in_the_error(tmp_path, loader):
    cache = tmp_path / "cache"
    if loader == "shapes":
        load = lambda: make_shapes(1, 1, 1, num_points=16, seed=0, cache_dir=cache)  # noqa: E731
    elif loader == "qm9":
        load = lambda: load_qm9(cache_dir=cache, csv_paths=[QM9_FIXTURE])  # noqa: E731
    else:
        folder, _, _ = write_text_layout(tmp_path, np.random.default_rng(0))
        load = lambda: load_modelnet40(folder, num_points=6, val_fraction=0.2, seed=0, cache_dir=cache)  # noqa: E731
    load()
    path = _damage(cache)
    with pytest.raises(ValueError, match=f"cache file {path} is unreadable.*delete it"):
        load()
    path.unlink()
    load()  # rebuilt


def test_a_bad_text_sample_file_is_named(tmp_path):
    folder, _, _ = write_text_layout(tmp_path, np.random.default_rng(0))
    bad = folder / "chair" / "chair_0003.txt"
    bad.write_text(bad.read_text().replace(",", " ", 3))
    with pytest.raises(ValueError, match="chair_0003.txt: "):
        load_modelnet40(folder, num_points=6, val_fraction=0.2, seed=0, cache_dir=tmp_path / "cache")


def _tiny_generate(seed, field):
    rng = np.random.default_rng(seed)
    return {split: {"loc": rng.normal(size=(3, 49, 3, 5)), "vel": rng.normal(size=(3, 49, 3, 5)),
                    "charges": rng.choice([-1.0, 1.0], size=(3, 5, 1))} for split in nbody.SPLITS}


def test_nbody_cache_gets_the_umasks_permissions_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(nbody, "generate", lambda seed, field: _tiny_generate(seed, field))
    task = nbody.load_task("valid", num=2, cache_dir=tmp_path)
    assert task["loc"].shape == (2, 5, 3)
    path = nbody.cache_path(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cache file {path} is unreadable"):
        nbody.load_task("valid", num=2, cache_dir=tmp_path)


def test_a_cache_that_is_no_npz_archive_is_named_and_one_that_cannot_be_opened_keeps_its_error(tmp_path):
    from data.cache import read_cache

    path = tmp_path / "x.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.arange(3))  # an .npy written under the cache's name
    with pytest.raises(ValueError, match="not an .npz archive"):
        read_cache(path, lambda archive: archive["x"])
    np.savez(path, x=np.arange(3))
    np.testing.assert_array_equal(read_cache(path, lambda archive: archive["x"]), np.arange(3))
    with pytest.raises(ValueError, match="KeyError"):
        read_cache(path, lambda archive: archive["y"])
    with pytest.raises(FileNotFoundError):  # not "delete it": there is nothing to delete
        read_cache(tmp_path / "missing.npz", lambda archive: archive["x"])
