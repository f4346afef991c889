"""Reading the ``.npz`` cache files the data loaders write (one clear error for a bad one)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def read_cache(path: str | Path, read: Callable[[Any], Any]) -> Any:
    """``read(archive)`` on the opened ``.npz`` cache file ``path``.

    A truncated, overwritten or foreign file (or one missing a key ``read`` asks for) raises a
    ValueError that names the file and says to delete it, instead of numpy's bare
    ``EOFError`` / ``BadZipFile`` / pickle message.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return read(archive)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"cache file {path} is unreadable ({type(error).__name__}: {error}); "
                         "delete it and the loader rebuilds it") from error
