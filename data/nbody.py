"""Charged-particle N-body data set ("nbody_small"), generated exactly as the community set.

The community set (Kipf et al. 2018, as extended to 3-D and used by EGNN / SEGNN / ACE;
file suffix ``charged5_initvel1small``) is produced by a seeded numpy simulation. This module
re-implements that simulation from its specification (``shared/DATA.md``, "N-body") and
vectorises it over trajectories, keeping the reference's floating-point operations in the same
order so that the trajectories agree with a per-trajectory simulation to float64 round-off.

Physics (5 unit-mass particles in 3-D, charges q_i in {-1, +1}):

    F_i = sum_{j != i} q_i q_j (x_i - x_j) / |x_i - x_j|^3  +  q_i E z_hat       (E = ``field``)
    each Cartesian component of F_i clipped to [-100, 100]   (clipping after the field term)

Integration (dt = 0.001, 5000 steps, leapfrog with staggered velocities):

    v <- v + dt F(x_0)
    for i = 1 ... 4999:   x <- x + dt v;   if i % 100 == 0: record (x, v);   v <- v + dt F(x)

which records 49 frames; frame k is the state after (k + 1) * 100 steps, i.e. at time
0.1 (k + 1). The initial state is reflected once into the box [-5, 5]^3 (no walls later).

Array layout follows the community files: positions/velocities of one frame are (3, 5)
(coordinate, particle); trajectories are (N, 49, 3, 5); charges (N, 5, 1); edges (N, 5, 5)
with edges[i, j] = q_i q_j.

Random-number stream (numpy legacy Mersenne-Twister ``RandomState(seed)``, identical to the
global ``np.random.seed(seed)``), consumed per trajectory in this order:
``choice([-1, 0, 1], size=(5, 1), p=[1/2, 0, 1/2])`` (charges), ``randn(3, 5)`` (positions),
``randn(3, 5)`` (velocity directions), then two ``randn(49, 3, 5)`` observation-noise draws
(multiplied by a noise variance of 0 in the reference, so only the stream advances).
Trajectories are laid out in the stream as: train block, valid block, test block.

Round-off agreement: the squared distances are formed as in the reference,
``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>``, with the Gram matrix from numpy's BLAS matrix product
(the same BLAS routine as the reference's ``A.dot(A.T)``; with FMA kernels its rounding
differs from a plain multiply-add); ``|x|^3`` is ``np.power(d2, 1.5)``; sums run in the order
numpy's reductions use. The trajectories are therefore reproduced bit-for-bit relative to a
literal per-trajectory numpy implementation *on the same machine*; the community files were
made on an unknown machine/BLAS, so agreement with them is to float64 round-off, amplified
by the chaotic dynamics in trajectories with close encounters.

CLI (writes the community file layout)::

    python -m data.nbody --out DIR [--field E] [--num-train N] [--num-valid N]
                         [--num-test N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from data.cache import read_cache

NUM_PARTICLES = 5
NUM_DIMS = 3
CHARGE_VALUES = np.array([-1.0, 0.0, 1.0])
CHARGE_PROBABILITIES = [0.5, 0.0, 0.5]
LOC_STD = 1.0
VEL_NORM = 0.5
INTERACTION_STRENGTH = 1.0
BOX_SIZE = 5.0
TIME_STEP = 0.001
MAX_FORCE = 0.1 / TIME_STEP  # = 100.0, written as in the reference
NUM_STEPS = 5000
SAMPLE_EVERY = 100
NUM_FRAMES = NUM_STEPS // SAMPLE_EVERY - 1  # 49

DEFAULT_SEED = 43
SPLITS = ("train", "valid", "test")
STANDARD_SPLIT_SIZES = {"train": 10000, "valid": 2000, "test": 2000}
INPUT_FRAME = 30
TARGET_FRAME = 40
BASE_SUFFIX = f"charged{NUM_PARTICLES}_initvel1small"
DEFAULT_CACHE_DIR = Path("~/.cache/ace_jax/nbody")
_CACHE_FORMAT_VERSION = 1
_DEFAULT_CHUNK_SIZE = 2000


# --------------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_field(field) -> float:
    try:
        value = float(field)
    except (TypeError, ValueError):
        raise ValueError(f"field must be a real number, got {field!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"field must be finite, got {field!r}")
    return value


def _draw_one_trajectory(rng: np.random.RandomState):
    """Consume the random numbers of one trajectory, in the reference order.

    Returns (charges (5, 1), positions (3, 5), raw velocity directions (3, 5)).
    """
    charges = rng.choice(CHARGE_VALUES, size=(NUM_PARTICLES, 1), p=CHARGE_PROBABILITIES)
    loc = rng.randn(NUM_DIMS, NUM_PARTICLES) * LOC_STD
    vel = rng.randn(NUM_DIMS, NUM_PARTICLES)
    rng.randn(NUM_FRAMES, NUM_DIMS, NUM_PARTICLES)  # position observation noise (x 0)
    rng.randn(NUM_FRAMES, NUM_DIMS, NUM_PARTICLES)  # velocity observation noise (x 0)
    return charges, loc, vel


def draw_initial_conditions(rng: np.random.RandomState, num: int):
    """Draw ``num`` consecutive trajectories' initial conditions from ``rng`` (advancing it).

    Velocities are rescaled to speed ``VEL_NORM`` = 0.5 per particle,
    v <- (v * 0.5) / sqrt(v_x^2 + v_y^2 + v_z^2), as in the reference; the box reflection is
    NOT applied here (``simulate`` applies it).

    Returns (charges (num, 5, 1), loc0 (num, 3, 5), vel0 (num, 3, 5)), float64.
    """
    num = _check_count("num", num)
    charges = np.empty((num, NUM_PARTICLES, 1))
    loc0 = np.empty((num, NUM_DIMS, NUM_PARTICLES))
    raw_vel = np.empty((num, NUM_DIMS, NUM_PARTICLES))
    for n in range(num):
        charges[n], loc0[n], raw_vel[n] = _draw_one_trajectory(rng)
    squared = raw_vel**2
    speed = np.sqrt((squared[:, 0] + squared[:, 1]) + squared[:, 2])  # (num, 5)
    vel0 = raw_vel * VEL_NORM / speed[:, None, :]
    return charges, loc0, vel0


def skip_trajectories(rng: np.random.RandomState, num: int) -> None:
    """Advance ``rng`` past ``num`` trajectories without simulating them (cheap: ~80 us each)."""
    for _ in range(_check_count("num", num)):
        _draw_one_trajectory(rng)


# --------------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------------


def reflect_into_box(loc: np.ndarray, vel: np.ndarray):
    """Reflect an initial state once into the box [-5, 5]^3 (returns new arrays).

    x > 5 -> 10 - x with the velocity component made negative; then x < -5 -> -10 - x with
    the velocity component made positive. Coordinates must lie in (-15, 15).
    """
    if not (np.all(loc < 3 * BOX_SIZE) and np.all(loc > -3 * BOX_SIZE)):
        raise ValueError(
            f"initial positions must lie strictly inside (-{3 * BOX_SIZE}, {3 * BOX_SIZE}) "
            "to be reflected once into the box"
        )
    over = loc > BOX_SIZE
    loc = np.where(over, 2 * BOX_SIZE - loc, loc)
    vel = np.where(over, -np.abs(vel), vel)
    under = loc < -BOX_SIZE
    loc = np.where(under, -2 * BOX_SIZE - loc, loc)
    vel = np.where(under, np.abs(vel), vel)
    return loc, vel


def _forces(loc: np.ndarray, edges: np.ndarray, field_force: np.ndarray) -> np.ndarray:
    """Clipped forces for a batch of states.

    loc (b, 3, 5) C-contiguous; edges (b, 5, 5) = q_i q_j; field_force (b, 5) = q_i E.
    Returns F (b, 3, 5) with F[:, d, i] = clip(sum_j s_ij (x_di - x_dj) + [d = z] q_i E),
    s_ij = edges_ij / d2_ij^1.5 (s_ii = 0), d2_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>.
    """
    squared = loc * loc
    sq_norm = (squared[:, 0] + squared[:, 1]) + squared[:, 2]  # (b, 5)
    points = loc.transpose(0, 2, 1)  # (b, 5, 3) view sharing loc's memory
    gram = np.matmul(points, loc)  # BLAS product of a matrix with its transpose, (b, 5, 5)
    dist2 = sq_norm[:, :, None] + sq_norm[:, None, :] - 2 * gram
    # The diagonal (d2_ii ~ 0, possibly slightly negative) is overwritten; coincident
    # particles give non-finite values, which ``simulate`` reports.
    with np.errstate(divide="ignore", invalid="ignore"):
        strength = INTERACTION_STRENGTH * edges / np.power(dist2, 1.5)
        diag = np.arange(NUM_PARTICLES)
        strength[:, diag, diag] = 0.0
        # terms[b, d, i, j] = s_ij (x_di - x_dj); sum over j in sequence j = 0, 1, ..., 4.
        terms = strength[:, None, :, :] * (loc[:, :, :, None] - loc[:, :, None, :])
    force = terms[..., 0]
    for j in range(1, NUM_PARTICLES):
        force = force + terms[..., j]
    force[:, 2, :] += field_force
    return np.clip(force, -MAX_FORCE, MAX_FORCE)


def _check_batch(charges, loc0, vel0):
    charges = np.asarray(charges, dtype=np.float64)
    loc0 = np.asarray(loc0, dtype=np.float64)
    vel0 = np.asarray(vel0, dtype=np.float64)
    if charges.ndim != 3 or charges.shape[1:] != (NUM_PARTICLES, 1):
        raise ValueError(f"charges must have shape (B, {NUM_PARTICLES}, 1), got {charges.shape}")
    batch = charges.shape[0]
    for name, array in (("loc0", loc0), ("vel0", vel0)):
        if array.shape != (batch, NUM_DIMS, NUM_PARTICLES):
            raise ValueError(
                f"{name} must have shape (B, {NUM_DIMS}, {NUM_PARTICLES}) with B = {batch} "
                f"(from charges), got {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains non-finite values")
    if not np.all(np.isfinite(charges)):
        raise ValueError("charges contain non-finite values")
    return charges, loc0, vel0


def simulate(
    charges,
    loc0,
    vel0,
    field: float = 0.0,
    *,
    num_steps: int = NUM_STEPS,
    sample_every: int = SAMPLE_EVERY,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
):
    """Integrate a batch of trajectories (vectorised over the batch, numpy float64).

    Args:
      charges: (B, 5, 1) particle charges q.
      loc0, vel0: (B, 3, 5) initial positions / velocities, after the velocity rescale and
        BEFORE the box reflection (which this function applies once).
      field: uniform external field E along z; adds q_i E to the z force before clipping.
        E = 0 runs the same code (adding +-0 leaves every non-zero force bit-identical).
      num_steps, sample_every: integration length and recording interval (defaults 5000 and
        100 give the 49 frames of the data set); frames are recorded at steps
        sample_every, 2 sample_every, ..., < num_steps.
      chunk_size: trajectories integrated at once (bounds memory; results do not depend on it).

    Returns:
      (loc, vel), each (B, num_steps // sample_every - 1, 3, 5) float64.

    Raises ValueError on bad shapes/settings, on initial coordinates outside (-15, 15), and
    when a trajectory becomes non-finite (two particles at exactly the same point).
    """
    charges, loc0, vel0 = _check_batch(charges, loc0, vel0)
    field = _check_field(field)
    num_steps = _check_count("num_steps", num_steps)
    sample_every = _check_count("sample_every", sample_every)
    chunk_size = _check_count("chunk_size", chunk_size)
    if sample_every == 0 or num_steps % sample_every != 0 or num_steps < 2 * sample_every:
        raise ValueError(
            "num_steps must be a multiple of sample_every (> 0) with at least one recorded "
            f"frame, got num_steps={num_steps}, sample_every={sample_every}"
        )
    if chunk_size == 0:
        raise ValueError("chunk_size must be positive")
    num_frames = num_steps // sample_every - 1
    batch = charges.shape[0]
    loc_out = np.empty((batch, num_frames, NUM_DIMS, NUM_PARTICLES))
    vel_out = np.empty((batch, num_frames, NUM_DIMS, NUM_PARTICLES))
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        loc_out[start:stop], vel_out[start:stop] = _simulate_chunk(
            charges[start:stop], loc0[start:stop], vel0[start:stop], field, num_frames,
            sample_every,
        )
    bad = ~(np.isfinite(loc_out).all(axis=(1, 2, 3)) & np.isfinite(vel_out).all(axis=(1, 2, 3)))
    if np.any(bad):
        raise ValueError(
            "non-finite trajectory (coincident particles?) for batch indices "
            f"{np.flatnonzero(bad)[:10]}"
        )
    return loc_out, vel_out


def _simulate_chunk(charges, loc0, vel0, field, num_frames, sample_every):
    loc, vel = reflect_into_box(loc0, vel0)
    loc = np.ascontiguousarray(loc)
    vel = np.ascontiguousarray(vel)
    edges = charges * charges.transpose(0, 2, 1)  # (b, 5, 5), q_i q_j
    field_force = charges[:, :, 0] * field  # (b, 5)
    loc_out = np.empty((charges.shape[0], num_frames) + loc.shape[1:])
    vel_out = np.empty_like(loc_out)
    vel += TIME_STEP * _forces(loc, edges, field_force)
    last_recorded_step = num_frames * sample_every
    # The reference also updates v after the last recorded step; that update is never
    # observed, so it is skipped here.
    for step in range(1, last_recorded_step + 1):
        loc += TIME_STEP * vel
        if step % sample_every == 0:
            frame = step // sample_every - 1
            loc_out[:, frame] = loc
            vel_out[:, frame] = vel
            if step == last_recorded_step:
                break
        vel += TIME_STEP * _forces(loc, edges, field_force)
    return loc_out, vel_out


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


def generate(
    num_train: int = 10000,
    num_valid: int = 2000,
    num_test: int = 2000,
    seed: int = DEFAULT_SEED,
    field: float = 0.0,
):
    """Generate the data set from one ``RandomState(seed)`` stream.

    Stream layout: the train block holds max(num_train, 10000) trajectories, then the valid
    block max(num_valid, 2000), then the test block. A split asks for a prefix of its block;
    the random numbers of the rest of the block are drawn without simulating, so that with
    seed 43 the valid/test trajectories are the community ones whatever num_train is (and the
    first num_train train trajectories are the community ones). With the defaults this is
    exactly the community generator (10000 / 2000 / 2000).

    Returns {split: {"loc": (N, 49, 3, 5), "vel": (N, 49, 3, 5), "edges": (N, 5, 5),
    "charges": (N, 5, 1)}} for split in ("train", "valid", "test"), float64.
    """
    counts = {
        "train": _check_count("num_train", num_train),
        "valid": _check_count("num_valid", num_valid),
        "test": _check_count("num_test", num_test),
    }
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    field = _check_field(field)
    rng = np.random.RandomState(int(seed))
    result = {}
    for split in SPLITS:
        num = counts[split]
        charges, loc0, vel0 = draw_initial_conditions(rng, num)
        if split != SPLITS[-1]:
            skip_trajectories(rng, max(num, STANDARD_SPLIT_SIZES[split]) - num)
        loc, vel = simulate(charges, loc0, vel0, field)
        result[split] = {
            "loc": loc,
            "vel": vel,
            "edges": charges * charges.transpose(0, 2, 1),
            "charges": charges,
        }
    return result


def dataset_suffix(field: float = 0.0) -> str:
    """Community file suffix, ``charged5_initvel1small`` (+ ``_field<E>`` when E != 0)."""
    field = _check_field(field)
    return BASE_SUFFIX if field == 0.0 else f"{BASE_SUFFIX}_field{field!r}"


def cache_path(cache_dir=None, seed: int = DEFAULT_SEED, field: float = 0.0) -> Path:
    """Cache file of the task frames for (seed, field)."""
    directory = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    return directory.expanduser() / f"nbody_{dataset_suffix(field)}_seed{int(seed)}_frames.npz"


def _build_task_cache(path: Path, seed: int, field: float) -> None:
    data = generate(seed=seed, field=field)
    arrays = {"format_version": np.array(_CACHE_FORMAT_VERSION)}
    for split in SPLITS:
        for frame in (INPUT_FRAME, TARGET_FRAME):
            arrays[f"{split}_loc{frame}"] = data[split]["loc"][:, frame]
            arrays[f"{split}_vel{frame}"] = data[split]["vel"][:, frame]
        arrays[f"{split}_charges"] = data[split]["charges"]
    path.parent.mkdir(parents=True, exist_ok=True)
    # a per-process name opened normally (the umask's permissions, as the other caches; mkstemp's
    # 0600 would lock other users out of a shared cache folder)
    tmp_name = str(path.with_name(f"{path.name}.{os.getpid()}.tmp"))
    try:
        with open(tmp_name, "wb") as tmp_file:
            np.savez(tmp_file, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise


def load_task(split: str, num=None, field: float = 0.0, cache_dir=None, seed: int = DEFAULT_SEED):
    """The learning task: state at frame 30 -> positions at frame 40 (1000 steps = time 1.0).

    The frames 30 and 40 (+ charges) of the whole set (10000 / 2000 / 2000 trajectories) are
    cached in one ``.npz`` under ``cache_dir`` (default ``~/.cache/ace_jax/nbody``) keyed by
    (seed, field); the first call generates them (a few minutes), later calls just load.

    Args:
      split: "train", "valid" or "test".
      num: number of leading trajectories of the split (None: all).

    Returns dict of float32 arrays: "loc" (N, 5, 3) and "vel" (N, 5, 3) at frame 30,
    "charges" (N, 5, 1), "target" (N, 5, 3) positions at frame 40.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    field = _check_field(field)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    available = STANDARD_SPLIT_SIZES[split]
    if num is None:
        num = available
    num = _check_count("num", num)
    if num > available:
        raise ValueError(f"num={num} exceeds the {available} trajectories of split {split!r}")
    path = cache_path(cache_dir, seed, field)
    if not path.exists():
        _build_task_cache(path, int(seed), field)
    def read(cached):
        if int(cached.get("format_version", -1)) != _CACHE_FORMAT_VERSION:
            return None
        return (cached[f"{split}_loc{INPUT_FRAME}"][:num], cached[f"{split}_vel{INPUT_FRAME}"][:num],
                cached[f"{split}_loc{TARGET_FRAME}"][:num], cached[f"{split}_charges"][:num])

    arrays = read_cache(path, read)
    if arrays is None:
        raise ValueError(f"cache file {path} has an unknown format; delete it to regenerate")
    loc, vel, target, charges = arrays
    return {
        "loc": loc.transpose(0, 2, 1).astype(np.float32),
        "vel": vel.transpose(0, 2, 1).astype(np.float32),
        "charges": charges.astype(np.float32),
        "target": target.transpose(0, 2, 1).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def write_community_files(data, out_dir, field: float = 0.0) -> list[Path]:
    """Save ``generate``'s output as ``{loc,vel,edges,charges}_{split}_{suffix}.npy``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = dataset_suffix(field)
    written = []
    for split in SPLITS:
        for key in ("loc", "vel", "edges", "charges"):
            path = out_dir / f"{key}_{split}_{suffix}.npy"
            np.save(path, data[split][key])
            written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.nbody",
        description="Generate the charged 5-particle N-body set in the community file layout.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--field", type=float, default=0.0, help="external field E along z")
    parser.add_argument("--num-train", type=int, default=STANDARD_SPLIT_SIZES["train"])
    parser.add_argument("--num-valid", type=int, default=STANDARD_SPLIT_SIZES["valid"])
    parser.add_argument("--num-test", type=int, default=STANDARD_SPLIT_SIZES["test"])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    data = generate(args.num_train, args.num_valid, args.num_test, args.seed, args.field)
    for path in write_community_files(data, args.out, args.field):
        print(path)


if __name__ == "__main__":
    main()
