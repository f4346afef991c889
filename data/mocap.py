"""CMU motion-capture loader (EGNO protocol) for skeleton-trajectory prediction.

File layout
-----------
An ``.npz`` archive with

* ``edges``: ``(B, 2)`` integer array, the skeleton bones as joint-index pairs (one
  direction is enough; both are accepted).
* ``trial_NN``: one float array ``(F, J, 3)`` per trial, ``F`` frames of ``J`` joints in
  3-D. All trials share ``J``. The ``y`` axis (coordinate index 1) is vertical.
* ``split_{train,val,test}_trial_NN``: 1-D integer array of start frames for trial
  ``trial_NN`` in that split (the order in the file is used, only its head is taken). Each
  trial belongs to one split: a trial listed in two is refused (its frames would leak from
  training into evaluation).

The shipped file ``../shared/data/cmu_mocap_run.npz`` (relative to the repository root)
is subject 09 "Run" (11 trials, 31 joints, 30 bones). Any other file of this layout,
e.g. the "Walk" set (subject 35) with any number of trials, loads through ``path``.

Protocol (EGNO, Xu et al. 2024)
-------------------------------
For a start frame ``s`` of trial ``X`` (``X[f]`` is ``(J, 3)``):

* input positions  ``loc    = X[s]``,
* input velocities ``vel    = X[s + 1] - X[s]`` (forward difference ``V_t = X_{t+1} - X_t``),
* targets          ``target[k] = X[s + o_k]`` with offsets
  ``o_k = delta_frame - (num_timesteps - 1) + k`` for ``k = 0 .. num_timesteps - 1``,
  i.e. the ``num_timesteps`` consecutive frames ending at ``s + delta_frame``
  (``s+26 .. s+30`` for ``delta_frame = 30``, ``num_timesteps = 5``; the reported metric
  is the MSE at the last one, ``s + delta_frame``).

Per trial the first ``num_train_per_trial`` (train) or ``num_eval_per_trial`` (val, test)
start frames of its split array are used; samples are ordered by trial number, then by
position in the split array. With the shipped file this gives 200 / 240 / 240 samples.

Graph (shared by all samples): directed edges in both directions for the 1-hop bones
(edge attribute 1) and for the 2-hop neighbours, i.e. joint pairs at graph distance
exactly 2 along the skeleton (edge attribute 2). ``edges[e] = (sender, receiver)``.

Node features ``(N, J, 2)``: ``[‖v_i‖, (y_i - height_mean) / height_std]`` where ``y_i`` is
the height (coordinate 1) of joint ``i`` at the input frame and ``height_mean`` /
``height_std`` are the mean / standard deviation of the input-frame heights over all
joints of all TRAIN samples (so val/test use the train statistics; stored in
:class:`MocapData`).

Symmetry
--------
Positions and velocities are 3-D vectors, but the height feature is the raw ``y``
coordinate, which is neither rotation- nor ``y``-translation-invariant (gravity picks out
the vertical axis). A model fed these inputs can therefore be equivariant at most to

* rotations about the vertical ``y`` axis (SO(2) about ``y``), together with the
  reflections through planes that contain the ``y`` axis (O(2) about ``y``), and
* translations in the horizontal ``x``-``z`` plane,

i.e. to the maps ``x -> R x + t`` with ``R e_y = e_y`` (so ``R`` is block-diagonal: a 2x2
orthogonal matrix on ``(z, x)``, ``1`` on ``y``) and ``t_y = 0``; velocities transform as
``v -> R v``. Under this group ``loc``, ``vel`` and ``target`` transform equivariantly and
``node_features``, ``edges``, ``edge_attr`` are invariant. A general rotation (e.g. about
``x``) or a ``y``-translation changes the height feature, so it is not a symmetry of
the inputs. :func:`random_vertical_rotation` samples ``R`` and :func:`apply_rigid` applies
``(R, t)`` to a split dict, for equivariance tests of models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import jax
import numpy as np

SPLIT_NAMES = ("train", "val", "test")

DEFAULT_MOCAP_PATH = Path(__file__).resolve().parents[1].parent / "shared/data/cmu_mocap_run.npz"

_EXPECTED_LAYOUT = (
    "an .npz archive with 'edges' (B, 2) int bones, 'trial_NN' float (frames, joints, 3) "
    "arrays and 'split_{train,val,test}_trial_NN' 1-D int start-frame arrays "
    "(see the module docstring of data/mocap.py)"
)
_TRIAL_KEY = re.compile(r"^trial_(\d+)$")
_SPLIT_KEY = re.compile(r"^split_(train|val|test)_trial_(\d+)$")

_SAMPLE_KEYS_TRANSFORMED_AS_POSITIONS = ("loc", "target")
_SAMPLE_KEYS_TRANSFORMED_AS_VECTORS = ("vel",)


class MocapData(NamedTuple):
    """A loaded MoCap data set.

    Attributes:
      splits: ``{"train" | "val" | "test": split dict}``; a split dict holds, for ``N``
        samples, ``J`` joints and ``T = num_timesteps``:
        ``loc`` (N, J, 3) float32, ``vel`` (N, J, 3) float32, ``target`` (N, T, J, 3)
        float32, ``node_features`` (N, J, 2) float32 ``[‖v‖, normalised height]``, and for
        provenance ``trial`` (N,) int32 (trial number) and ``start_frame`` (N,) int32.
      edges: (E, 2) int32 directed ``(sender, receiver)`` pairs, both directions, 1-hop
        bones first then 2-hop neighbours, each block sorted lexicographically.
      edge_attr: (E, 1) float32, 1 for a 1-hop edge, 2 for a 2-hop edge.
      height_mean, height_std: train-split statistics used to normalise the height.
      target_offsets: (T,) int32 frame offsets ``o_k`` of the targets from the start frame.
    """

    splits: dict[str, dict[str, np.ndarray]]
    edges: np.ndarray
    edge_attr: np.ndarray
    height_mean: float
    height_std: float
    target_offsets: np.ndarray

    @property
    def train(self) -> dict[str, np.ndarray]:
        return self.splits["train"]

    @property
    def val(self) -> dict[str, np.ndarray]:
        return self.splits["val"]

    @property
    def test(self) -> dict[str, np.ndarray]:
        return self.splits["test"]


def target_frame_offsets(delta_frame: int, num_timesteps: int) -> np.ndarray:
    """Offsets ``o_k = delta_frame - (num_timesteps - 1) + k``, k = 0..T-1, as (T,) int32.

    The last offset is always ``delta_frame``; (30, 5) gives [26, 27, 28, 29, 30].
    """
    _check_positive_int("delta_frame", delta_frame)
    _check_positive_int("num_timesteps", num_timesteps)
    if num_timesteps > delta_frame:
        raise ValueError(
            f"num_timesteps ({num_timesteps}) must not exceed delta_frame ({delta_frame}): "
            "the predicted frames s+delta-(T-1) .. s+delta must lie after the start frame"
        )
    return (delta_frame - (num_timesteps - 1) + np.arange(num_timesteps)).astype(np.int32)


def skeleton_graph(bones: np.ndarray, num_joints: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed 1-hop + 2-hop edges of a skeleton.

    With ``A`` the symmetric (J, J) bone adjacency (no self loops), the 1-hop edges are the
    pairs with ``A_ij = 1`` and the 2-hop edges the pairs ``i != j`` with ``A_ij = 0`` and
    ``(A @ A)_ij > 0`` (graph distance exactly 2).

    Args:
      bones: (B, 2) integer joint-index pairs, each in [0, num_joints), no self loops.
      num_joints: J.

    Returns:
      ``edges`` (E, 2) int32 ``(sender, receiver)`` and ``edge_attr`` (E, 1) float32 in {1, 2}.
    """
    bones = np.asarray(bones)
    if bones.ndim != 2 or bones.shape[1] != 2 or not np.issubdtype(bones.dtype, np.integer):
        raise ValueError(
            f"bones must be an integer array of shape (B, 2), got {bones.dtype} {bones.shape}"
        )
    if bones.size and (bones.min() < 0 or bones.max() >= num_joints):
        raise ValueError(
            f"bone joint indices must lie in [0, {num_joints}), got range "
            f"[{bones.min()}, {bones.max()}]"
        )
    if np.any(bones[:, 0] == bones[:, 1]):
        raise ValueError(f"bones contain self loops: {bones[bones[:, 0] == bones[:, 1]].tolist()}")
    one_hop = np.zeros((num_joints, num_joints), dtype=bool)
    one_hop[bones[:, 0], bones[:, 1]] = True
    one_hop[bones[:, 1], bones[:, 0]] = True
    paths_of_two = one_hop.astype(np.int64) @ one_hop.astype(np.int64)
    two_hop = (paths_of_two > 0) & ~one_hop & ~np.eye(num_joints, dtype=bool)
    one_hop_edges = np.argwhere(one_hop)  # row-major order: sorted lexicographically
    two_hop_edges = np.argwhere(two_hop)
    edges = np.concatenate([one_hop_edges, two_hop_edges]).astype(np.int32).reshape(-1, 2)
    edge_attr = np.concatenate(
        [np.full(len(one_hop_edges), 1.0), np.full(len(two_hop_edges), 2.0)]
    ).astype(np.float32)[:, None]
    return edges, edge_attr


def mocap_node_features(
    loc: np.ndarray, vel: np.ndarray, height_mean: float, height_std: float
) -> np.ndarray:
    """Node features ``[‖v‖, (y - height_mean) / height_std]``, shape (..., J, 2) float32.

    Args:
      loc: (..., J, 3) positions; the height is ``loc[..., 1]``.
      vel: (..., J, 3) velocities, same shape as ``loc``.
      height_mean, height_std: normalisation statistics (``height_std > 0``).
    """
    loc = np.asarray(loc, dtype=np.float32)
    vel = np.asarray(vel, dtype=np.float32)
    if loc.shape != vel.shape or loc.ndim < 2 or loc.shape[-1] != 3:
        raise ValueError(
            f"loc and vel must have the same shape (..., J, 3), got {loc.shape} and {vel.shape}"
        )
    if not height_std > 0:
        raise ValueError(f"height_std must be positive, got {height_std}")
    speed = np.linalg.norm(vel, axis=-1)
    height = (loc[..., 1] - height_mean) / height_std
    return np.stack([speed, height], axis=-1).astype(np.float32)


def load_mocap(
    path: str | Path | None = None,
    *,
    delta_frame: int = 30,
    num_timesteps: int = 5,
    num_train_per_trial: int = 40,
    num_eval_per_trial: int = 80,
) -> MocapData:
    """Load a MoCap ``.npz`` file and build the EGNO train/val/test samples.

    Args:
      path: the ``.npz`` file; ``None`` loads the shipped "Run" set at
        :data:`DEFAULT_MOCAP_PATH`.
      delta_frame: frames between the input and the last predicted frame.
      num_timesteps: number T of predicted frames (the T frames ending at ``s + delta_frame``).
      num_train_per_trial: start frames used per train trial (head of its split array).
      num_eval_per_trial: start frames used per val and per test trial.

    Returns:
      :class:`MocapData` (see the module docstring for the exact definitions).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: bad arguments, or a malformed file (missing or unknown keys, wrong
        shapes or dtypes, too few start frames, start frames that overflow a trial).
    """
    offsets = target_frame_offsets(delta_frame, num_timesteps)
    _check_positive_int("num_train_per_trial", num_train_per_trial)
    _check_positive_int("num_eval_per_trial", num_eval_per_trial)
    path = DEFAULT_MOCAP_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MoCap file not found: {path}. Expected {_EXPECTED_LAYOUT}. The CMU 'Run' set "
            "(subject 09, EGNO preprocessing) is shipped as ../shared/data/cmu_mocap_run.npz; "
            "other sets (e.g. 'Walk') must be supplied as a local file of the same layout."
        )
    with np.load(path, allow_pickle=False) as archive:
        raw = {key: archive[key] for key in archive.files}

    trials, split_starts, bones = _parse_archive(raw, path)
    num_joints = next(iter(trials.values())).shape[1]
    try:
        edges, edge_attr = skeleton_graph(bones, num_joints)
    except ValueError as error:
        raise ValueError(f"{path}: malformed 'edges': {error}") from error

    counts = {"train": num_train_per_trial, "val": num_eval_per_trial, "test": num_eval_per_trial}
    samples = {
        split: _build_samples(trials, split_starts[split], counts[split], offsets, split, path)
        for split in SPLIT_NAMES
    }
    train_heights = samples["train"]["loc"][..., 1]
    height_mean = float(train_heights.mean())
    height_std = float(train_heights.std())
    if not height_std > 0:
        raise ValueError(f"{path}: train heights have zero spread; cannot normalise the height")
    for split_dict in samples.values():
        split_dict["node_features"] = mocap_node_features(
            split_dict["loc"], split_dict["vel"], height_mean, height_std
        )
    return MocapData(
        splits=samples,
        edges=edges,
        edge_attr=edge_attr,
        height_mean=height_mean,
        height_std=height_std,
        target_offsets=offsets,
    )


def random_vertical_rotation(
    key_or_rng, n: int, *, include_reflections: bool = False
) -> np.ndarray:
    """Random rotations about the vertical ``y`` axis, (n, 3, 3) float32.

    ``R(θ) = [[cos θ, 0, sin θ], [0, 1, 0], [-sin θ, 0, cos θ]]`` with θ uniform in [0, 2π).
    With ``include_reflections`` each matrix is, with probability 1/2, followed by the
    reflection ``x -> -x`` (a plane containing ``y``), so the samples cover O(2) about ``y``.

    Args:
      key_or_rng: a JAX PRNG key, a ``np.random.Generator`` or an int seed (for
        ``np.random.default_rng``). Same key/seed -> same matrices.
      n: number of matrices.
    """
    _check_positive_int("n", n)
    if isinstance(key_or_rng, jax.Array):
        angle_key, flip_key = jax.random.split(key_or_rng)
        angles = np.asarray(jax.random.uniform(angle_key, (n,), maxval=2 * np.pi), np.float64)
        flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (n,)))
    elif isinstance(key_or_rng, (np.random.Generator, int, np.integer)):
        rng = np.random.default_rng(key_or_rng)
        angles = rng.uniform(0.0, 2 * np.pi, size=n)
        flips = rng.random(n) < 0.5
    else:
        raise ValueError(
            "key_or_rng must be a JAX PRNG key, a numpy Generator or an int seed, "
            f"got {type(key_or_rng).__name__}"
        )
    cos, sin = np.cos(angles), np.sin(angles)
    rotations = np.zeros((n, 3, 3))
    rotations[:, 0, 0] = cos
    rotations[:, 0, 2] = sin
    rotations[:, 1, 1] = 1.0
    rotations[:, 2, 0] = -sin
    rotations[:, 2, 2] = cos
    if include_reflections:
        rotations[flips, :, 0] *= -1.0  # R @ diag(-1, 1, 1): reflect x first, then rotate
    return rotations.astype(np.float32)


def apply_rigid(
    arrays: Mapping[str, np.ndarray], R: np.ndarray, t: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Apply ``x -> R x + t`` to ``loc`` / ``target`` and ``v -> R v`` to ``vel``.

    Args:
      arrays: a split dict (or any subset of it) with ``loc`` (N, J, 3), ``vel`` (N, J, 3),
        ``target`` (N, T, J, 3).
      R: (3, 3) orthogonal matrix shared by all samples, or (N, 3, 3), one per sample.
      t: optional translation, (3,) or (N, 3). Default zero.

    Returns:
      A new dict: ``loc``, ``vel``, ``target`` transformed (float32), all other keys copied
      unchanged. ``node_features`` are copied only when ``(R, t)`` is in the symmetry group
      (``R`` fixes ``e_y`` and ``t_y = 0``), where they are provably invariant.

    Raises:
      ValueError: bad shapes, or ``node_features`` present and ``(R, t)`` outside the group
        (recompute them with :func:`mocap_node_features` instead).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3) or R.ndim not in (2, 3):
        raise ValueError(f"R must have shape (3, 3) or (N, 3, 3), got {R.shape}")
    t = np.zeros(3) if t is None else np.asarray(t, dtype=np.float64)
    if t.shape[-1:] != (3,) or t.ndim not in (1, 2):
        raise ValueError(f"t must have shape (3,) or (N, 3), got {t.shape}")
    n = _num_samples(arrays)
    for name, value, per_sample_ndim in (("R", R, 3), ("t", t, 2)):
        if value.ndim == per_sample_ndim and value.shape[0] != n:
            raise ValueError(f"{name} has {value.shape[0]} per-sample entries but arrays have {n}")
    if "node_features" in arrays and not _is_vertical_symmetry(R, t):
        raise ValueError(
            "node_features (speed, height) are not invariant under this (R, t): R must fix "
            "the y axis and t must have t_y = 0. Drop 'node_features' or recompute them with "
            "mocap_node_features on the transformed loc/vel."
        )
    R_per_sample = np.broadcast_to(R, (n, 3, 3))
    t_per_sample = np.broadcast_to(t, (n, 3))
    out = dict(arrays)
    for key in _SAMPLE_KEYS_TRANSFORMED_AS_POSITIONS + _SAMPLE_KEYS_TRANSFORMED_AS_VECTORS:
        if key not in arrays:
            continue
        value = np.asarray(arrays[key], dtype=np.float64)
        if value.shape[-1] != 3 or value.ndim < 2:
            raise ValueError(f"{key} must have shape (N, ..., 3), got {value.shape}")
        extra_axes = (1,) * (value.ndim - 2)
        R_b = R_per_sample.reshape((n,) + extra_axes + (3, 3))
        moved = np.einsum("n...ij,n...j->n...i", R_b, value)
        if key in _SAMPLE_KEYS_TRANSFORMED_AS_POSITIONS:
            moved = moved + t_per_sample.reshape((n,) + extra_axes + (3,))
        out[key] = moved.astype(np.float32)
    return out


def mocap_batches(
    split_dict: Mapping[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator | int | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over a split dict in mini-batches (one pass).

    Args:
      split_dict: arrays sharing the leading sample axis N.
      batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
      rng: ``None`` keeps the stored order; a ``np.random.Generator`` or int seed shuffles
        (same seed -> same order).
      drop_last: skip a final incomplete batch.

    Yields:
      Dicts with the same keys, each array holding the batch's samples.
    """
    _check_positive_int("batch_size", batch_size)
    n = _num_samples(split_dict)
    order = np.arange(n) if rng is None else np.random.default_rng(rng).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for begin in range(0, stop, batch_size):
        index = order[begin : begin + batch_size]
        yield {key: np.asarray(value)[index] for key, value in split_dict.items()}


# ----------------------------------------------------------------------------- helpers


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _num_samples(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("arrays is empty")
    sizes = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"all arrays must share the leading sample axis, got sizes {sizes}")
    return next(iter(sizes.values()))


def _is_vertical_symmetry(R: np.ndarray, t: np.ndarray, atol: float = 1e-5) -> bool:
    e_y = np.array([0.0, 1.0, 0.0])
    column_y, row_y = R[..., :, 1], R[..., 1, :]
    fixes_y = np.allclose(column_y, e_y, atol=atol) and np.allclose(row_y, e_y, atol=atol)
    orthogonal = np.allclose(np.swapaxes(R, -1, -2) @ R, np.eye(3), atol=atol)
    return bool(fixes_y and orthogonal and np.allclose(t[..., 1], 0.0, atol=atol))


def _parse_archive(raw: dict[str, np.ndarray], path: Path):
    """Validate the archive.

    Returns ``({trial_number: (F, J, 3) float32}, {split: {trial_number: starts}}, bones)``.
    """
    if "edges" not in raw:
        raise ValueError(f"{path}: missing key 'edges'. Expected {_EXPECTED_LAYOUT}")
    trials: dict[int, np.ndarray] = {}
    trial_keys: dict[str, int] = {}
    split_starts: dict[str, dict[int, np.ndarray]] = {split: {} for split in SPLIT_NAMES}
    split_trial_keys: list[tuple[str, str, str]] = []
    unknown = []
    for key, value in raw.items():
        if key == "edges":
            continue
        if match := _TRIAL_KEY.match(key):
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"{path}: '{key}' must be a float array, got dtype {value.dtype}")
            if value.ndim != 3 or value.shape[2] != 3:
                raise ValueError(
                    f"{path}: '{key}' must have shape (frames, joints, 3), got {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{path}: '{key}' contains non-finite values")
            number = int(match.group(1))
            if number in trials:
                raise ValueError(f"{path}: trial number {number} appears under two keys")
            trials[number] = value.astype(np.float32)
            trial_keys[f"trial_{match.group(1)}"] = number
        elif match := _SPLIT_KEY.match(key):
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise ValueError(
                    f"{path}: '{key}' must be a 1-D integer array of start frames, "
                    f"got {value.dtype} {value.shape}"
                )
            split_trial_keys.append((key, match.group(1), f"trial_{match.group(2)}"))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}. Expected {_EXPECTED_LAYOUT}")
    if not trials:
        raise ValueError(f"{path}: no 'trial_NN' arrays. Expected {_EXPECTED_LAYOUT}")
    joint_counts = {trials[n].shape[1] for n in trials}
    if len(joint_counts) != 1:
        raise ValueError(f"{path}: trials disagree on the number of joints: {sorted(joint_counts)}")
    for key, split, trial_key in split_trial_keys:
        if trial_key not in trial_keys:
            raise ValueError(f"{path}: '{key}' refers to missing trial array '{trial_key}'")
        split_starts[split][trial_keys[trial_key]] = raw[key]
    for first, second in ((a, b) for i, a in enumerate(SPLIT_NAMES) for b in SPLIT_NAMES[i + 1:]):
        shared = sorted(set(split_starts[first]) & set(split_starts[second]))
        if shared:  # a trial in two splits would leak its frames from training into evaluation
            raise ValueError(f"{path}: trial(s) {shared} listed in both the {first!r} and the {second!r} split")
    for split in SPLIT_NAMES:
        if not split_starts[split]:
            raise ValueError(
                f"{path}: no 'split_{split}_trial_NN' arrays; every split in {SPLIT_NAMES} "
                "needs at least one trial"
            )
    return trials, split_starts, np.asarray(raw["edges"])


def _build_samples(trials, starts_by_trial, count, offsets, split, path) -> dict[str, np.ndarray]:
    """Gather loc / vel / target for the first ``count`` start frames of each trial of a split."""
    locs, vels, targets, trial_ids, start_ids = [], [], [], [], []
    last_offset = int(offsets[-1])
    for number in sorted(starts_by_trial):
        all_starts = starts_by_trial[number]
        if len(all_starts) < count:
            raise ValueError(
                f"{path}: split '{split}' trial {number} has {len(all_starts)} start frames, "
                f"fewer than the {count} requested"
            )
        starts = all_starts[:count].astype(np.int64)
        frames = trials[number]
        num_frames = frames.shape[0]
        # The velocity needs frame s+1 and the last target frame s+delta; offsets[-1] >= 1.
        bad = (starts < 0) | (starts + last_offset >= num_frames)
        if np.any(bad):
            raise ValueError(
                f"{path}: split '{split}' trial {number}: start frames {starts[bad].tolist()} "
                f"overflow the trial: need 0 <= s and s + {last_offset} < {num_frames} frames"
            )
        locs.append(frames[starts])
        vels.append(frames[starts + 1] - frames[starts])
        targets.append(frames[starts[:, None] + offsets[None, :]])
        trial_ids.append(np.full(count, number, dtype=np.int32))
        start_ids.append(starts.astype(np.int32))
    return {
        "loc": np.concatenate(locs).astype(np.float32),
        "vel": np.concatenate(vels).astype(np.float32),
        "target": np.concatenate(targets).astype(np.float32),
        "trial": np.concatenate(trial_ids),
        "start_frame": np.concatenate(start_ids),
    }
