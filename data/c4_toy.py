"""The 2-D C4 toy data set of the ACE paper (App. A.4): centred squares mapped to shapes.

Every input is a single-channel ``size × size`` image (``size`` even) holding an exactly
centred square of even side ``s`` and intensity ``a``::

    x[i, j] = a   if  c − s/2 ≤ i, j < c + s/2,   c = size/2,   else 0.

Because ``size`` and ``s`` are even the square is symmetric about the pixel-grid centre, so
``rot90(x) == x`` exactly: every input is C4-invariant. The three targets are

- ``square_to_square``: ``y = x`` (C4-invariant: no symmetry breaking needed);
- ``square_to_rectangle``: the axis-aligned rectangle of the same width ``s`` and height
  ``h = 2·⌊s/4 + 1/2⌋`` (s/4 rounded half up; rows ``c − h/2 … c + h/2 − 1``), intensity ``a``. It is invariant
  under the 180° rotation (C2) but not under 90°: the map needs C4 → C2 breaking;
- ``square_to_nonsymmetric``: the square with a marked top-left corner, i.e. the block of
  side ``m = s/2`` at rows/columns ``c − s/2 … c − s/2 + m − 1`` gets intensity ``2a``.
  No non-trivial rotation fixes it (C4 → trivial breaking).

Curie's principle: a C4-equivariant f maps a C4-invariant x to a C4-invariant f(x), and the
closest C4-invariant image to y is its group average ``ȳ = ¼ Σ_k rot90(y, k)``. Hence
:func:`c4_floor_mse` ``= ‖y − ȳ‖² / num_pixels`` is a lower bound on the per-pixel MSE of
any strictly C4-equivariant model on that example.

Side lengths are drawn uniformly from the even numbers in ``[4, size − 4]`` and intensities
uniformly from ``[0.5, 1.5)``. Each split uses its own random stream
``np.random.default_rng([seed, split_index])`` so that, e.g., the test set does not change
when ``num_train`` does.
"""

from __future__ import annotations

import numpy as np

TASKS = ("square_to_square", "square_to_rectangle", "square_to_nonsymmetric")
SPLITS = ("train", "val", "test")
INTENSITY_RANGE = (0.5, 1.5)
MIN_SIDE = 4


def square_sides(size: int) -> np.ndarray:
    """The allowed square sides for an image of side ``size``: even numbers in [4, size − 4]."""
    return np.arange(MIN_SIDE, size - MIN_SIDE + 1, 2)


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size % 2 or size < 2 * MIN_SIDE:
        raise ValueError(
            f"size must be an even integer >= {2 * MIN_SIDE} (so that a centred square is exactly "
            f"C4-invariant), got {size!r}"
        )


def draw_square(size: int, side: int, intensity: float) -> np.ndarray:
    """The input image ``(size, size, 1)`` float32: a centred square of even ``side``."""
    _check_size(size)
    if side % 2 or not MIN_SIDE <= side <= size - MIN_SIDE:
        raise ValueError(f"side must be even and in [{MIN_SIDE}, {size - MIN_SIDE}], got {side}")
    image = np.zeros((size, size, 1), np.float32)
    c, r = size // 2, side // 2
    image[c - r : c + r, c - r : c + r] = intensity
    return image


def rectangle_height(side: int) -> int:
    """Height of the target rectangle for a square of ``side``: ``2·⌊s/4 + 1/2⌋`` (s/4 rounded half
    up, unlike Python's ``round``: s = 10 gives 6; even, ≥ 2)."""
    return 2 * ((side + 2) // 4)


def draw_target(task: str, size: int, side: int, intensity: float) -> np.ndarray:
    """The target image ``(size, size, 1)`` of ``task`` for the square (side, intensity)."""
    if task not in TASKS:
        raise ValueError(f"unknown C4 toy task {task!r}; known tasks: {', '.join(TASKS)}")
    image = draw_square(size, side, intensity)
    c, r = size // 2, side // 2
    if task == "square_to_square":
        return image
    if task == "square_to_rectangle":
        image[:] = 0.0
        half_height = rectangle_height(side) // 2
        image[c - half_height : c + half_height, c - r : c + r] = intensity
        return image
    mark = side // 2
    image[c - r : c - r + mark, c - r : c - r + mark] = 2.0 * intensity
    return image


def make_c4_toy(
    task: str, num_train: int, num_val: int, num_test: int, size: int = 16, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Generate the three splits of ``task``.

    Returns ``{"train" | "val" | "test": {"x": (N, size, size, 1), "y": (N, size, size, 1)}}``
    (float32). Deterministic in ``seed``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown C4 toy task {task!r}; known tasks: {', '.join(TASKS)}")
    _check_size(size)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"num_{name} must be a non-negative integer, got {n!r}")
    sides = square_sides(size)
    out = {}
    for index, name in enumerate(SPLITS):
        rng = np.random.default_rng([seed, index])
        n = counts[name]
        chosen_sides = rng.choice(sides, size=n)
        intensities = rng.uniform(*INTENSITY_RANGE, size=n)
        x = np.zeros((n, size, size, 1), np.float32)
        y = np.zeros((n, size, size, 1), np.float32)
        for i, (s, a) in enumerate(zip(chosen_sides, intensities)):
            x[i] = draw_square(size, int(s), float(a))
            y[i] = draw_target(task, size, int(s), float(a))
        out[name] = {"x": x, "y": y}
    return out


def c4_average(images: np.ndarray) -> np.ndarray:
    """Group average ``¼ Σ_k rot90(y, k)`` over the spatial axes (-3, -2) of ``(..., H, W, C)``."""
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-3] != images.shape[-2]:
        raise ValueError(f"c4_average expects square images (..., H, H, C), got shape {images.shape}")
    return sum(np.rot90(images, k, axes=(-3, -2)) for k in range(4)) / 4.0


def c4_floor_mse(y: np.ndarray) -> np.ndarray:
    """Per-example error floor of a strictly C4-equivariant model on C4-invariant inputs.

    ``‖y − ¼ Σ_k rot90(y, k)‖² / (H·W·C)`` for targets ``y (..., H, W, C)``; returns shape
    ``(...)`` (a per-pixel MSE, the normalisation of the models' metric).
    """
    y = np.asarray(y, np.float64)
    residual = y - c4_average(y)
    return np.mean(residual**2, axis=(-3, -2, -1))
