"""Reading the ``.npz`` cache files the data loaders write (one clear error for a bad one)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def read_cache(path: str | Path, read: Callable[[Any], Any]) -> Any:
    """``read(archive)`` on the opened ``.npz`` cache file ``path``.

    A truncated, overwritten or foreign file (not an ``.npz`` archive, or one missing a key
    ``read`` asks for) raises a ValueError that names the file and says to delete it, instead
    of numpy's bare ``EOFError`` / ``BadZipFile`` / pickle message. A file that cannot be
    opened at all (permissions) raises its own OSError: deleting it is not the remedy.
    """
    path = Path(path)

    def unreadable(reason: str) -> ValueError:
        return ValueError(f"cache file {path} is unreadable ({reason}); delete it and the loader rebuilds it")

    with open(path, "rb"):  # PermissionError and the like surface as they are
        pass
    try:
        archive = np.load(path, allow_pickle=False)
    except (EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise unreadable(f"{type(error).__name__}: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise unreadable("not an .npz archive")
    with archive:
        try:
            return read(archive)
        except (EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
            raise unreadable(f"{type(error).__name__}: {error}") from error
