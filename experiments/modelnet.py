"""Point-cloud study: VN-DGCNN with ACE on ModelNet40 (or its procedural stand-in), clean and
with randomly dropped points.

    python -m experiments.modelnet --preset quick|cpu|paper --out DIR [--data synthetic|PATH]
        [--methods vanilla,ace,ace-resilient] [--seeds N] [--epochs N] [--dropout P]
        [--dropout-rule refill|first-point] [--studies clean,dropout] [--classes a,b,...]
        [--dual-proportional K] [--optimizer adam|sgd] [--learning-rate LR]
        [--final-learning-rate LR] [--weight-decay WD] [--branch-kind in_kernel|axis|dense]
        [--pooling mean|max_mean] [--cache-dir DIR] [--seed S] [--no-progress]

Data: ``--data synthetic`` (default) is the 40-class procedural stand-in of
:mod:`data.shapes`; any other value is a local ModelNet40 folder for
:func:`data.modelnet.load_modelnet40` (the first ``num_points`` points of every cloud).
``--classes`` (or the preset's ``classes``) keeps a subset of classes, relabelled 0..n−1
in the given order.

Protocol (ACE paper, ModelNet40 with SO(3) rotations):

- training clouds are rotated by a fresh uniform random rotation at EVERY step, inside the
  loss, from the per-example PRNG key the engine passes (so every method sees the same
  augmentation); validation and test clouds carry one fixed, seeded rotation each;
- loss: cross entropy with label smoothing 0.2; model selection on the validation accuracy
  (``select_metric="accuracy"``, ``select_mode="max"``) of the model the method deploys
  (:attr:`ace_jax.Method.deployed`): the projection for vanilla and ace, the full model for
  ace-resilient, unconstrained and penalty (METHOD.md §4). The ace-resilient rows below were
  measured when every method was selected on the projection;
- study ``dropout``: inside the loss, after the rotation, points of each training cloud are
  dropped (drawn afresh every step from the per-example key) by ``--dropout-rule``:
  ``first-point`` (default, with P = 0.875 in every preset) is the rule of the PointNet++
  training code that VN-DGCNN's public code builds on: a ratio r ~ U(0, P) per cloud, each
  point dropped with probability r and moved onto the cloud's first point
  (:func:`drop_points_to_first_jax`); ``refill`` drops exactly the fraction P and refills the
  slots with copies of kept points (:func:`drop_points_jax`, the same rule as
  :func:`data.pointcloud.drop_points`; the earlier default, with P = 0.5).
  Validation and test clouds are NOT dropped: the study asks whether training on damaged
  clouds still converges to a good classifier;
- reported on the test split, for the projection (γ = 0, branches not evaluated) and the
  full model of the selected variables: class accuracy (mean over classes of the per-class
  accuracy) and instance accuracy (fraction of clouds classified correctly).

Presets: ``quick`` is a smoke-size run of both studies (5 distinct classes, 128 points,
k = 10, width 3, Adam, 120 steps, branches without spectral normalisation — it roughly
halves the compile time on CPU) that takes minutes on 2 CPU cores. Its γ start at 0.1, not
the paper's 1.0: Adam moves γ by at most about the learning rate per step, so from 1.0 the
constraint γ = 0 cannot be reached in 120 steps and the selected projection would be an
untrained function. ``cpu`` is the longest run this project's 2-core CPU allows for the
issue's comparison (vanilla and ACE, clean and dropout): 10 classes that differ mostly in
proportions (``CPU_CLASSES``), 48 / 12 / 20 clouds per class, the quick model (128 points,
k = 10, width 3), the paper's primal optimizer (SGD, learning rate 0.1, momentum 0.9, cosine
decay to 1e-3, weight decay 1e-4; Adam 1e-3 before, ``--optimizer adam --learning-rate 1e-3``),
dual 1e-3 with the PI term κ = 500 (plain ascent oscillates, see below), the paper's γ init 1.0
and spectrally normalised branches, 50 epochs of 60 steps (4–5 min per run and seed on one
core). ``paper`` follows the paper:
40 classes, 300 points, k = 20, width 21 (64/3), batch 32, 250 epochs, SGD with learning
rate 0.1, momentum 0.9, cosine decay to 1e-3 and weight decay 1e-4 on the network
parameters (not on γ) — passed to the engine as ``TrainConfig.optimizer`` —, dual learning
rate 1e-4.

Measured with ``--preset cpu`` (one core; test accuracy of the selected epoch, class = instance
accuracy because the test split is balanced). With the paper's optimizer (the preset now;
``python -m experiments.modelnet --preset cpu --methods vanilla|ace --seeds 2``, 16–19 min per
method for both studies and both seeds; the dropout study again for seeds 2 and 3 with
``--studies dropout --seed 2 --seeds 2``):

| study | seeds | vanilla | ACE projection | ACE full |
|---|---|---|---|---|
| clean | 0 / 1 | 96.0 / 96.0 % | 99.0 / 95.5 % | 99.0 / 95.5 % |
| dropout 0.875, first-point | 0 / 1 / 2 / 3 | 41.5 / 63.0 / 93.0 / 81.0 % (69.6 ± 22.4) | **88.0 / 97.5 / 88.5 / 91.5 % (91.4 ± 4.4)** | 88.0 / 98.0 / 89.5 / 91.0 % |

(± is the sample std over seeds.) Under dropout the strict model's training is erratic: its
training loss stays above 2.1 (chance for 10 classes is ln 10 = 2.30) for 35 / 24 / 13 / 18 of
the 50 epochs, against 13 / 7 / 22 / 14 for ACE. On seed 0 it stays between 1.99 and 2.33 over
epochs 5–40 (best validation accuracy 39 % up to epoch 40); on seed 3 it reaches 55 %
validation at epoch 10 and falls back to chance (14 %, loss 2.31) at epoch 20. ACE's projection
beats it on seeds 0, 1 and 3 (+46.5, +34.5, +10.5 points) and trails it on seed 2 (−4.5), where
vanilla trained cleanly and ACE was the slow one (loss 2.14 at epoch 20). So the strict model
stalls on some seeds, not all; ACE's spread over seeds is a fifth of vanilla's. ACE's largest
|γ| swings up to 0.62–0.86 after epoch 10 and ends at 0.015–0.045. Without dropout both converge
(validation 97–100 % at epoch 50).

All 40 classes of the stand-in (``--preset cpu --classes all --methods vanilla|ace``, 1920 /
480 / 800 clouds, seeds 0 / 1, 16–18 s per epoch, 28–31 min per method and seed for both
studies): clean 93.0 / 92.1 % vanilla against 93.4 / 91.0 % for ACE's projection (93.1 / 90.3 %
full); dropout 78.6 / 79.8 % against **93.5 / 86.9 %** (93.4 / 86.5 % full). Under dropout
vanilla lags: training loss 2.82 / 2.81 at epoch 20 and 2.18 / 2.13 at epoch 50 (chance
ln 40 = 3.69), against 2.29 / 2.80 and 1.63 / 1.78 for ACE; on seed 1 vanilla's loss jumps
from 2.46 at epoch 25 to 3.64 at epoch 27, back to chance. Clean, ACE is not better here (means 92.2
against 92.6 %). Seeds 2 and 3 of the clean study (``--classes all --studies clean --methods
vanilla,ace --seed 2 --seeds 2``, decided before they ran, as a replication; 866–874 s per run):
vanilla 94.0 / 90.75 %, ACE projection 93.4 / 90.5 % (full the same). Over seeds 0–3 the clean
accuracy is 92.5 ± 1.4 % vanilla against 92.1 ± 1.5 % ACE; ACE is ahead on one seed of four
(paired differences +0.4, −1.1, −0.6, −0.3 points; t = −1.3, 3 degrees of freedom). Clean, at
40 classes, ACE does not beat vanilla on this stand-in.

With Adam 1e-3 (the preset before; ``--optimizer adam --learning-rate 1e-3``):

| dual update | study | vanilla | ACE projection | ACE full |
|---|---|---|---|---|
| plain ascent (``--dual-proportional 0``) | clean | 80.5 % | 70.5 % | 82.0 % |
| plain ascent | dropout 0.5, ``--dropout-rule refill`` | 94.0 % | 58.5 % | 82.0 % |
| + PI term, ``--dual-proportional 500`` | clean | 80.5 / 87.0 % | 84.5 / 86.0 % | 84.0 / 95.5 % |
| + PI term, ``--dual-proportional 500`` | dropout 0.5, refill | 94.0 / 93.0 % | 74.0 / 91.0 % | 76.0 / 93.5 % |
| ace-resilient, PI term κ = 500 | clean | – | 79.0 / 83.5 % | 84.5 / 93.0 % |
| ace-resilient, PI term κ = 500 | dropout 0.5, refill | – | 64.0 / 73.5 % | 78.5 / 81.0 % |
| + PI term, κ = 500 (the preset) | dropout 0.875, first-point (the preset) | 67.0 / 79.0 % | **76.5 / 87.5 %** | 73.5 / 85.5 % |
| ace-resilient, PI term κ = 500 | dropout 0.875, first-point | – | 69.5 / 52.5 % | 83.0 / 76.5 % |

With plain ascent γ and λ oscillate undamped (period about 50 epochs; γ swings from 1 to −0.7
and back to +0.6), and the projections of the selected epochs trail the full models. The PI term
(κ = 500, about the oscillation period in steps divided by 2π) roughly halves the swing (γ
undershoots to −0.45 and is back at −0.05…−0.35 at epoch 50); the selected epochs (44 clean,
42 dropout) still had mean |γ| ≈ 0.25, so, as in the N-body study, the projection is good
while the branches are far from off. On these shapes the strict model does not stall under
the refill rule: the dropped-and-refilled points act as augmentation, and vanilla gains from them.
ace-resilient (``--methods ace-resilient --dual-proportional 500``): mean |γ| falls from 0.95 to
0.03 by epoch 30 while the slack u peaks at 0.28 and ends at 0.10 (seed 0); its projection is
still improving at epoch 50 (validation 0.78 against 0.92 for the full model, clean) and ends
below both vanilla and ACE.

The dropout rule decides the outcome. With the rule of the PointNet++ code
(``--dropout 0.875 --dropout-rule first-point``, now the presets' setting; the last two rows,
4.5–5.6 min per run on one core) the dropped points pile up on the cloud's first point, and
the strict model loses about 10 points against its clean accuracy (67.0 / 79.0 % against
80.5 / 87.0 %). Its training loss falls more slowly: 1.59 / 1.51 at epoch 49, against
1.44 / 1.38 for ACE's full model. It does not stall outright within 50 epochs. ACE's
projection loses less (76.5 / 87.5 % against its clean 84.5 / 86.0 %: −3.3 points on
average, against −10.8 for vanilla) and beats vanilla by 9.5 and 8.5 points on the two seeds.
Its projection trails its full model until epoch ~40 (γ ≈ 1 early) and then draws level or
ahead (final γ −0.44…−0.02).
ace-resilient's full model (83.0 / 76.5 %) also beats vanilla. Its projection does not
(69.5 / 52.5 %): its γ end at −0.02…0.30 with slacks u of 0.07–0.39 (the relaxation keeps
the branches on), so its deployed model is the full one.

Outputs in DIR:

- ``results.json``: ``{"config": {...}, "runs": {"clean" | "dropout": {method:
  {"class_acc_projection", "instance_acc_projection", "class_acc_full",
  "instance_acc_full"}: {"mean", "std"} over seeds, "diverged": [{"seed", "error"}]}}}``
  (a diverged seed is recorded there and voids its method's means, written as null);
- ``per_seed.json`` (each run's numbers, best epoch, final γ, seconds, median epoch time);
- ``curves_<study>.png`` (validation accuracy per epoch, projection solid, full dashed),
  ``train_loss_<study>.png``, ``gamma_<study>_<method>.png`` (γ / λ / u of the first seed),
  ``table.md``, and the engine's logs under ``runs/<study>/<method>/seed<N>/``.

:func:`benchmark_case` gives the paper-size Task and one training batch for the step benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

from ace_jax import METHOD_NAMES, Task, TrainConfig, fit, gammas, get_method, named_leaves, random_rotation, rotate_points
from data.pointcloud import random_rotations, refill_drop_count, rotate
from experiments.common import (Diverged, add_study_args, array_digest, fit_seed, markdown_table, mean_std_cell,
                                parse_list, preset_run_settings, report_diverged, summarize, write_json)
from models.vn_dgcnn import VNDGCNN, init_variables

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STUDIES = ("clean", "dropout")
# The paper's SGD (initial rate 0.1): cosine decay to 1 % of the initial rate (1e-3), weight decay
# on the network.
PAPER_SGD = {"final_fraction": 1e-2, "weight_decay": 1e-4}
# How the dropout study damages a training cloud (see drop_points_jax, drop_points_to_first_jax).
DROPOUT_RULES = ("refill", "first-point")
METRICS = ("class_acc_projection", "instance_acc_projection", "class_acc_full", "instance_acc_full")
# "scheduled" needs a Lie-derivative regulariser this task does not define.
SUPPORTED_METHODS = tuple(m for m in METHOD_NAMES if m != "scheduled")
QUICK_CLASSES = ("sphere", "cube", "cylinder", "thin_torus", "table")
# Ten classes that differ mostly in proportions (the hard kind for a rotation-invariant model).
CPU_CLASSES = (
    "oblate_ellipsoid", "prolate_ellipsoid", "triaxial_ellipsoid", "slab", "beam", "plank", "cylinder", "rod",
    "cone", "flat_cone",
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Every setting of one study run (data, model, optimisation)."""

    epochs: int
    seeds: int
    batch_size: int
    num_points: int
    k: int
    width: int
    head_hidden: tuple[int, ...]
    optimizer: str  # "adam" or "sgd"
    learning_rate: float
    dual_learning_rate: float
    classes: tuple[str, ...] | None = None  # None: every class of the data
    num_per_class_train: int = 100  # synthetic data only
    num_per_class_val: int = 20
    num_per_class_test: int = 40
    val_fraction: float = 0.1  # real data: class-stratified hold-out of the training files
    data_seed: int = 0
    dropout: float = 0.875  # the maximum fraction with "first-point", the exact one with "refill"
    dropout_rule: str = "first-point"  # "first-point" (drop_points_to_first_jax) or "refill" (drop_points_jax)
    label_smoothing: float = 0.2
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # on network parameters, never on γ
    final_learning_rate: float | None = None  # sgd: cosine decay to this value
    gamma_init: float = 1.0
    dual_proportional: float = 0.0  # gain κ of the dual's PI term (ace_jax.proportional_term); 0 = plain ascent
    spectral_branch: bool = True  # spectrally normalised branches (METHOD.md §5)
    branch_kind: str = "in_kernel"  # "in_kernel" (per-axis weights folded into VN-Linear, default), "axis" or "dense"
    pooling: str = "mean"  # over points: "mean" (every number measured here) or "max_mean" (public VN-DGCNN)
    eval_batch_size: int = 64
    methods: tuple[str, ...] = ("vanilla", "ace", "ace-resilient")

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must satisfy 0 <= dropout < 1, got {self.dropout}")
        if self.dropout_rule not in DROPOUT_RULES:
            raise ValueError(f"dropout_rule must be one of {DROPOUT_RULES}, got {self.dropout_rule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must satisfy 0 <= s < 1, got {self.label_smoothing}")
        if not self.dual_proportional >= 0:
            raise ValueError(f"dual_proportional must be >= 0, got {self.dual_proportional}")
        if self.dropout_rule == "refill":
            refill_drop_count(self.dropout, self.num_points)  # before any training, not when the loss compiles
        if self.num_points < self.k:
            raise ValueError(f"num_points ({self.num_points}) must be >= k ({self.k})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.final_learning_rate is not None and not 0 < self.final_learning_rate <= self.learning_rate:
            raise ValueError(f"final_learning_rate must satisfy 0 < final <= learning_rate ({self.learning_rate}), "
                             f"got {self.final_learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer == "adam" and (self.weight_decay > 0 or self.final_learning_rate is not None):
            raise ValueError("weight_decay and final_learning_rate apply to optimizer 'sgd' only (Adam uses a constant "
                             "learning rate and no weight decay here)")


PRESETS = {
    "quick": Preset(
        epochs=12, seeds=1, batch_size=8, num_points=128, k=10, width=3, head_hidden=(32,),
        optimizer="adam", learning_rate=3e-3, dual_learning_rate=3e-2, classes=QUICK_CLASSES,
        num_per_class_train=16, num_per_class_val=6, num_per_class_test=10, eval_batch_size=32,
        spectral_branch=False, gamma_init=0.1,
    ),
    "cpu": Preset(
        epochs=50, seeds=1, batch_size=8, num_points=128, k=10, width=3, head_hidden=(32,),
        optimizer="sgd", learning_rate=0.1, final_learning_rate=1e-3, weight_decay=1e-4,  # the paper's
        dual_learning_rate=1e-3, classes=CPU_CLASSES,
        num_per_class_train=48, num_per_class_val=12, num_per_class_test=20, eval_batch_size=40,
        methods=("vanilla", "ace"), dual_proportional=500.0,
    ),
    "paper": Preset(
        epochs=250, seeds=3, batch_size=32, num_points=300, k=20, width=21, head_hidden=(512, 256),
        optimizer="sgd", learning_rate=0.1, dual_learning_rate=1e-4, final_learning_rate=1e-3,
        weight_decay=1e-4, num_per_class_train=100, num_per_class_val=20, num_per_class_test=40,
        eval_batch_size=128,
    ),
}


# --------------------------------------------------------------------------- data


def subset_classes(data: dict, classes: tuple[str, ...] | None) -> dict:
    """Keep only ``classes`` (names) and relabel them 0..n−1 in the given order."""
    if classes is None:
        return data
    names = list(data["class_names"])
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"unknown classes {missing}; the data has: {', '.join(names)} (the quick and cpu presets "
                         "name classes of the synthetic set: with real data pass --classes all or real names)")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}")
    new_label = np.full(len(names), -1, np.int64)
    for i, c in enumerate(classes):
        new_label[names.index(c)] = i
    out = {"class_names": list(classes)}
    for split in ("train", "val", "test"):
        points, labels = data[split]
        keep = new_label[labels] >= 0
        out[split] = (points[keep], new_label[labels[keep]].astype(np.int32))
    return out


def load_data(source: str, preset: Preset, cache_dir=None) -> dict:
    """Splits as engine datasets ``{"points": (N, P, 3) float32, "label": (N,) int32}``.

    Validation and test clouds are rotated by one fixed uniform rotation each (seeded by
    ``preset.data_seed``); training clouds stay canonical (the loss rotates them).
    Returns ``{"train", "val", "test", "class_names"}``.
    """
    if source == "synthetic":
        from data.shapes import make_shapes

        raw = make_shapes(preset.num_per_class_train, preset.num_per_class_val, preset.num_per_class_test,
                          num_points=preset.num_points, seed=preset.data_seed, cache_dir=cache_dir)
    else:
        from data.modelnet import load_modelnet40

        raw = load_modelnet40(source, num_points=preset.num_points, val_fraction=preset.val_fraction,
                              seed=preset.data_seed, cache_dir=cache_dir)
    raw = subset_classes(raw, preset.classes)
    out = {"class_names": raw["class_names"]}
    for index, split in enumerate(("train", "val", "test")):
        points, labels = raw[split]
        if len(labels) == 0:
            raise ValueError(f"the {split} split is empty; raise its size or use more classes")
        counts = np.bincount(np.asarray(labels), minlength=len(raw["class_names"]))
        if np.any(counts == 0):  # class accuracy would silently average over fewer classes than the model has
            empty = [raw["class_names"][i] for i in np.flatnonzero(counts == 0)]
            raise ValueError(f"the {split} split has no cloud of class(es) {', '.join(empty)}; drop them with "
                             "--classes or supply more data")
        points = np.asarray(points, np.float32)
        if not np.all(np.isfinite(points)):
            bad = np.flatnonzero(~np.isfinite(points).all(axis=(1, 2)))
            raise ValueError(f"the {split} split has non-finite coordinates in cloud(s) {bad[:10].tolist()}")
        if split != "train":
            rotations = random_rotations(np.random.default_rng([preset.data_seed, index]), len(points))
            points = rotate(points, rotations).astype(np.float32)
        out[split] = {"points": points, "label": np.asarray(labels, np.int32)}
    return out


def drop_points_jax(key: jax.Array, points: jax.Array, fraction: float) -> jax.Array:
    """Drop round(fraction·P) random points of ONE cloud ``(P, 3)``; refill their slots with
    copies of kept points chosen uniformly with replacement (shape unchanged).

    The rule of :func:`data.pointcloud.drop_points`, in jax so it runs inside the jitted loss
    with the per-example key (new points dropped every step). ``fraction`` is static.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"drop_points_jax expects one cloud of shape (P, 3), got {points.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"drop fraction must satisfy 0 <= fraction < 1, got {fraction}")
    num_points = points.shape[0]
    num_drop = refill_drop_count(fraction, num_points)
    num_keep = num_points - num_drop
    if num_drop == 0:
        return points
    k_order, k_donor = jax.random.split(key)
    order = jax.random.permutation(k_order, num_points)
    kept, dropped = order[:num_keep], order[num_keep:]
    donors = kept[jax.random.randint(k_donor, (num_drop,), 0, num_keep)]
    return points.at[dropped].set(points[donors])


def drop_points_to_first_jax(key: jax.Array, points: jax.Array, max_fraction: float) -> jax.Array:
    """Random point dropout as in the PointNet++ training code that VN-DGCNN inherits, for ONE
    cloud ``(P, 3)``: draw a ratio r ~ U(0, max_fraction), drop every point independently with
    probability r, and move each dropped point onto the cloud's first point (shape unchanged).

    Unlike :func:`drop_points_jax`, the expected fraction dropped is max_fraction / 2 and the
    copies all sit at ONE location, so a cloud can carry dozens of coincident points: the
    nearest neighbours of each copy are other copies, whose edge vectors x_j − x_i are exactly
    zero. (The public code uses max_fraction = 0.875.) Commutes with rotations of the cloud.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"drop_points_to_first_jax expects one cloud of shape (P, 3), got {points.shape}")
    if not 0.0 <= max_fraction < 1.0:
        raise ValueError(f"max drop fraction must satisfy 0 <= max_fraction < 1, got {max_fraction}")
    k_ratio, k_drop = jax.random.split(key)
    ratio = jax.random.uniform(k_ratio, (), maxval=max_fraction)
    dropped = jax.random.uniform(k_drop, (points.shape[0],)) < ratio
    return jnp.where(dropped[:, None], points[0], points)


# --------------------------------------------------------------------------- task


def build_model(preset: Preset, num_classes: int) -> VNDGCNN:
    return VNDGCNN(num_classes=num_classes, k=preset.k, width=preset.width, gamma_init=preset.gamma_init,
                   head_hidden=tuple(preset.head_hidden), spectral_branch=preset.spectral_branch,
                   branch_kind=preset.branch_kind, pooling=preset.pooling)


def smoothed_cross_entropy(logits: jax.Array, label: jax.Array, smoothing: float) -> jax.Array:
    """−Σ_c t_c log softmax(logits)_c with t = (1 − s)·onehot(label) + s/num_classes."""
    targets = optax.smooth_labels(jax.nn.one_hot(label, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_task(
    model: VNDGCNN, num_points: int, dropout: float = 0.0, label_smoothing: float = 0.2,
    dropout_rule: str = "first-point",
) -> Task:
    """The engine's view: one example is ``{"points": (P, 3), "label": ()}``.

    loss: random SO(3) rotation (and point dropout by ``dropout_rule`` if ``dropout > 0``:
    ``"first-point"``, the default as in every Preset, drops up to the fraction ``dropout``
    (:func:`drop_points_to_first_jax`), ``"refill"`` exactly it (:func:`drop_points_jax`))
    from the example's key, then smoothed cross entropy. metric: ``{"accuracy", "loss"}`` (plain cross
    entropy) on the example as given. transform: a random rotation of the points.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must satisfy 0 <= dropout < 1, got {dropout}")
    if dropout_rule not in DROPOUT_RULES:
        raise ValueError(f"dropout_rule must be one of {DROPOUT_RULES}, got {dropout_rule!r}")
    drop = drop_points_jax if dropout_rule == "refill" else drop_points_to_first_jax

    def loss(variables, example, rng, project):
        k_rotation, k_drop = jax.random.split(rng)
        points = rotate_points(example["points"], random_rotation(k_rotation))
        if dropout > 0:
            points = drop(k_drop, points, dropout)
        logits = model.apply(variables, points, project=project)
        return smoothed_cross_entropy(logits, example["label"], label_smoothing)

    def metric(variables, example, project):
        logits = model.apply(variables, example["points"], project=project)
        return {
            "accuracy": (jnp.argmax(logits) == example["label"]).astype(jnp.float32),
            "loss": smoothed_cross_entropy(logits, example["label"], 0.0),
        }

    def transform(rng, example):
        return {**example, "points": rotate_points(example["points"], random_rotation(rng))}

    return Task(
        init=lambda rng, has_branches: init_variables(model, rng, num_points, project=not has_branches),
        loss=loss,
        metric=metric,
        transform=transform,
    )


def benchmark_case(batch: int, seed: int = 0, branch_kind: str | None = None) -> tuple[Task, dict]:
    """The paper-size Task (40 classes, 300 points, k = 20, width 21; ``branch_kind`` overrides
    the preset's) and one training batch ``{"points": (batch, 300, 3), "label": (batch,)}`` of
    procedural shapes (seeded)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    from data.shapes import make_shapes

    preset = PRESETS["paper"]
    if branch_kind is not None:
        preset = dataclasses.replace(preset, branch_kind=branch_kind)
    points, labels = make_shapes(math.ceil(batch / 40), 0, 0, num_points=preset.num_points, seed=seed)["train"]
    pick = np.random.default_rng(seed).permutation(len(labels))[:batch]
    data = {"points": np.asarray(points[pick], np.float32), "label": np.asarray(labels[pick], np.int32)}
    return make_task(build_model(preset, 40), preset.num_points, 0.0, preset.label_smoothing), data


# --------------------------------------------------------------------------- evaluation


def make_predictor(model: VNDGCNN, project: bool, batch_size: int):
    """``predict(variables, points (N, P, 3)) -> labels (N,)`` in padded batches (one compile)."""
    batched = jax.jit(jax.vmap(lambda v, p: jnp.argmax(model.apply(v, p, project=project)), in_axes=(None, 0)))

    def predict(variables, points: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(points), batch_size):
            chunk = points[start : start + batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
            out.append(np.asarray(batched(variables, padded))[: len(chunk)])
        return np.concatenate(out)

    return predict


def accuracies(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(class accuracy = mean over the classes present of per-class accuracy, instance accuracy)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} must be equal non-empty 1-D")
    correct = predicted == labels
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return float(np.mean(per_class)), float(correct.mean())


# --------------------------------------------------------------------------- study


def primal_optimizer(preset: Preset, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation | None:
    """None (the engine's Adam(learning_rate)) or SGD with momentum, cosine decay and weight
    decay on ``params`` only (γ is not decayed: its pull to 0 is the constraint's job)."""
    if preset.optimizer == "adam":
        return None
    final = preset.final_learning_rate if preset.final_learning_rate is not None else preset.learning_rate
    schedule = optax.cosine_decay_schedule(preset.learning_rate, max(1, steps_per_epoch * epochs),
                                           alpha=final / preset.learning_rate)
    parts = []
    if preset.weight_decay > 0:
        only_params = lambda tree: {k: jax.tree.map(lambda _: k == "params", v) for k, v in tree.items()}  # noqa: E731
        parts.append(optax.add_decayed_weights(preset.weight_decay, mask=only_params))
    parts.append(optax.sgd(schedule, momentum=preset.momentum))
    return optax.chain(*parts)


def run_one(task, data, method: str, preset: Preset, seed: int, run_dir: Path, predictors, progress: bool,
            run_settings: dict | None = None) -> dict:
    """Train one method with one seed; test accuracies of the selected variables. ``run_settings``
    (what else the run depends on) lets a rerun into ``run_dir`` resume a finished or interrupted run."""
    steps_per_epoch = len(data["train"]["label"]) // preset.batch_size
    config = TrainConfig(
        epochs=preset.epochs, batch_size=preset.batch_size, learning_rate=preset.learning_rate,
        dual_learning_rate=preset.dual_learning_rate, dual_proportional=preset.dual_proportional,
        eval_batch_size=preset.eval_batch_size, optimizer=primal_optimizer(preset, steps_per_epoch, preset.epochs),
        select_on=get_method(method).deployed, select_metric="accuracy", select_mode="max",
        seed=seed, out_dir=str(run_dir), run_settings=run_settings, progress=progress,
    )
    result = fit_seed(lambda: fit(task, data["train"], data["val"], data["test"], get_method(method), config), seed)
    if isinstance(result, Diverged):  # recorded; its NaN accuracies void the method's mean (summarize)
        return {"seed": seed, **{m: float("nan") for m in METRICS}, "best_epoch": None, "final_gammas": None,
                "selected_gammas": None, "diverged": result.error, "_history": []}
    has_branches = get_method(method).has_branches
    points, labels = data["test"]["points"], data["test"]["label"]
    proj = accuracies(predictors[True](result.best_variables, points), labels)
    full = accuracies(predictors[False](result.best_variables, points), labels) if has_branches else proj
    epoch_seconds = [r["seconds"] for r in result.history[1:]] or [result.history[0]["seconds"]]
    return {
        "seed": seed,
        "class_acc_projection": proj[0], "instance_acc_projection": proj[1],
        "class_acc_full": full[0], "instance_acc_full": full[1],
        "best_epoch": int(result.best_epoch),
        "final_gammas": dict(result.history[-1]["gamma"]),  # γ at the last epoch, as the other studies
        "selected_gammas": {k: float(v) for k, v in named_leaves(gammas(result.best_variables)).items()},
        "seconds": result.seconds,
        "train_seconds": result.train_seconds,  # every epoch, also those of earlier calls of a resumed run
        # Median over the epochs after the first (which includes compilation), validation included.
        "epoch_seconds": float(np.median(epoch_seconds)),
        "_history": result.history,
    }


def plot_train_loss(histories: dict, path: Path, title: str) -> None:
    from experiments.plotting import single_point_marker

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, history) in enumerate(histories.items()):
        ax.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], color=f"C{i}", label=name,
                marker=single_point_marker(history))
    ax.set_xlabel("epoch")
    # the logged objective: the smoothed cross-entropy, plus β·ℓ(Q·x) for the penalty method
    ax.set_ylabel("training objective (smoothed CE" + (" + penalty" if "penalty" in histories else "") + ")")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every run diverged
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(preset: Preset, out_dir: Path, source: str = "synthetic", studies=STUDIES, first_seed: int = 0,
              progress: bool = True, cache_dir=None) -> dict:
    """Run every study × method × seed; write results.json, per_seed.json, plots, table.md."""
    from experiments.plotting import plot_curves, plot_trajectories

    for name in preset.methods:
        if name not in SUPPORTED_METHODS:
            raise ValueError(f"unsupported method {name!r}; choose from {', '.join(SUPPORTED_METHODS)}")
    for study in studies:
        if study not in STUDIES:
            raise ValueError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")
    if "dropout" in studies and preset.dropout <= 0:
        raise ValueError("the dropout study needs dropout > 0 (or run only the clean study)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(source, preset, cache_dir)
    num_classes = len(data["class_names"])
    data_digest = array_digest([data[s] for s in ("train", "val", "test")])  # the numbers, not just the path
    model = build_model(preset, num_classes)
    # Shared by all runs: jax.jit reuses the compiled program for equal variable trees.
    predictors = {p: make_predictor(model, p, preset.eval_batch_size) for p in (True, False)}
    seeds = list(range(first_seed, first_seed + preset.seeds))

    runs, per_seed, timing = {}, {}, {}
    for study in studies:
        fraction = preset.dropout if study == "dropout" else 0.0
        task = make_task(model, preset.num_points, fraction, preset.label_smoothing, preset.dropout_rule)
        runs[study], per_seed[study], timing[study] = {}, {}, {}
        histories = {}
        for method in preset.methods:
            settings = preset_run_settings(preset, data=source, data_arrays=data_digest, study=study,
                                           dropout_fraction=fraction,
                                           class_names=list(data["class_names"]),
                                           split_sizes={s: int(len(data[s]["label"])) for s in ("train", "val", "test")})
            records = [run_one(task, data, method, preset, seed, out_dir / "runs" / study / method / f"seed{seed}",
                               predictors, progress, settings) for seed in seeds]
            runs[study][method] = {m: summarize([r[m] for r in records]) for m in METRICS}
            runs[study][method]["diverged"] = [{"seed": r["seed"], "error": r["diverged"]} for r in records
                                               if "diverged" in r]
            per_seed[study][method] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
            trained = [r for r in records if "diverged" not in r]
            timing[study][method] = {"fit_seconds": float(np.mean([r["seconds"] for r in trained])) if trained else None,
                                     "epoch_seconds": float(np.median([r["epoch_seconds"] for r in trained])) if trained
                                     else None}
            histories[method] = trained[0]["_history"] if trained else []
            if get_method(method).has_branches and trained:
                plot_trajectories(histories[method], out_dir / f"gamma_{study}_{method}.png",
                                  f"{study}: {method} γ / λ / u (seed {trained[0]['seed']})")
        title = f"{study} (dropout {fraction:g}{', ' + preset.dropout_rule if fraction else ''})"
        plot_curves(histories, out_dir / f"curves_{study}.png", metric="accuracy", title=title, logy=False)
        plot_train_loss(histories, out_dir / f"train_loss_{study}.png", title)

    config = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(preset).items()},
        "data": source,
        "class_names": data["class_names"],
        "split_sizes": {s: int(len(data[s]["label"])) for s in ("train", "val", "test")},
        "studies": {s: (preset.dropout if s == "dropout" else 0.0) for s in studies},
        "seeds_used": seeds,
        "selection": "best validation accuracy of the model each method deploys (select_on)",
        "select_on": {m: get_method(m).deployed for m in preset.methods},
        "augmentation": "fresh uniform SO(3) rotation per training example and step (inside the loss); "
                        "fixed seeded rotation per validation/test cloud; dropout on training clouds only",
        "normalisation_note": "VNNorm: per-cloud statistics over points (stateless VN-BatchNorm); head: LayerNorm",
        "timing": timing,
        "wall_seconds": time.perf_counter() - t_start,
        "device": str(jax.devices()[0].device_kind),
    }
    results = {"config": config, "runs": runs}
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "per_seed.json", per_seed)
    (out_dir / "table.md").write_text(results_table(results))
    return results


def results_table(results: dict) -> str:
    """Markdown table: study, method, the four test accuracies (mean ± sample std over seeds, %), epoch time."""
    rows = []
    for study, methods in results["runs"].items():
        for method, r in methods.items():
            cells = [mean_std_cell(r[m], 100, ".1f", ".1f") for m in METRICS]
            epoch = results["config"]["timing"][study][method]["epoch_seconds"]
            if r["diverged"]:  # no mean: name the seeds instead
                cells[0] = f"no mean (seed(s) {', '.join(str(d['seed']) for d in r['diverged'])} diverged)"
            rows.append([study, method, *cells, "-" if epoch is None else f"{epoch:.1f}"])
    header = ["study", "method", "class acc proj %", "inst acc proj %", "class acc full %", "inst acc full %",
              "s / epoch"]
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = add_study_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), PRESETS)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a local ModelNet40 folder")
    parser.add_argument("--dropout", type=float, default=None,
                        help="fraction of points dropped in the dropout study "
                             "(the maximum, with --dropout-rule first-point)")
    parser.add_argument("--dropout-rule", choices=DROPOUT_RULES, default=None,
                        help="'first-point' (default): drop U(0, P) of the points onto the first point (PointNet++ "
                             "code); 'refill': drop exactly that fraction, refill with copies of kept points")
    parser.add_argument("--studies", default=None, help="comma-separated subset of " + ", ".join(STUDIES))
    parser.add_argument("--classes", default=None, help="comma-separated class names, or 'all'")
    parser.add_argument("--branch-kind", choices=("axis", "dense", "in_kernel"), default=None,
                        help="ACE branch: 'axis' (per-channel xyz mixing), 'dense' (the paper's Dense) or "
                             "'in_kernel' (per-axis channel mixing folded into each VN-Linear; default)")
    parser.add_argument("--pooling", choices=("mean", "max_mean"), default=None,
                        help="pooling of the invariant features over points: 'mean' (default) or 'max_mean' "
                             "(max and mean concatenated, as the public VN-DGCNN)")
    parser.add_argument("--dual-proportional", type=float, default=None,
                        help="gain of the proportional (damping) term of the dual update; 0 = plain ascent")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                        help="primal optimizer: 'adam' or 'sgd' (momentum 0.9, cosine decay, as the paper; switching an "
                             "Adam preset to sgd takes the paper's decay to a hundredth of the rate and weight decay 1e-4 "
                             "unless --final-learning-rate / --weight-decay are given)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="primal learning rate (the initial one with sgd; default: the preset's)")
    parser.add_argument("--final-learning-rate", type=float, default=None,
                        help="sgd: end of the cosine decay (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="sgd: weight decay on network parameters (default: the preset's)")
    parser.add_argument("--cache-dir", default=None, help="data cache folder")
    return parser


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The Preset named by ``--preset`` with the command line's overrides (SystemExit on a bad one)."""
    preset = PRESETS[args.preset]
    changes = {}
    if args.methods:  # "" keeps the preset's methods, as in the other studies
        changes["methods"] = tuple(parse_list(args.methods, SUPPORTED_METHODS, "methods"))
    for name in ("seeds", "epochs"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name} must be >= 1, got {value}")
            changes[name] = value
    if args.dropout is not None:
        if not 0.0 < args.dropout < 1.0:
            raise SystemExit(f"--dropout must satisfy 0 < P < 1, got {args.dropout}")
        changes["dropout"] = args.dropout
    if args.dropout_rule is not None:
        changes["dropout_rule"] = args.dropout_rule
    if args.branch_kind is not None:
        changes["branch_kind"] = args.branch_kind
    if args.pooling is not None:
        changes["pooling"] = args.pooling
    if args.dual_proportional is not None:
        changes["dual_proportional"] = args.dual_proportional
    for name in ("optimizer", "learning_rate", "final_learning_rate", "weight_decay"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.optimizer is not None and args.optimizer != preset.optimizer:
        if args.learning_rate is None:
            raise SystemExit(f"--optimizer {args.optimizer} replaces the preset's {preset.optimizer}: "
                             "give its --learning-rate too")
        if args.optimizer == "adam":  # the preset's SGD-only settings do not carry over (given explicitly, they fail)
            changes.setdefault("weight_decay", 0.0)
            changes.setdefault("final_learning_rate", None)
        else:  # from an Adam preset: the paper's SGD (cosine decay to 1 %, weight decay 1e-4) unless given
            changes.setdefault("weight_decay", PAPER_SGD["weight_decay"])
            changes.setdefault("final_learning_rate", PAPER_SGD["final_fraction"] * args.learning_rate)
    if args.classes is not None:
        changes["classes"] = None if args.classes == "all" else tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        return dataclasses.replace(preset, **changes)  # Preset validates every setting
    except ValueError as error:
        raise SystemExit(f"invalid setting: {error}") from None


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    preset = preset_from_args(args)
    studies = parse_list(args.studies, STUDIES, "studies")
    if args.data != "synthetic" and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such folder (use 'synthetic' or a local ModelNet40 copy)")
    results = run_study(preset, Path(args.out), args.data, studies, args.seed, not args.no_progress, args.cache_dir)
    print(results_table(results))
    print(f"wall time {results['config']['wall_seconds']:.0f} s; results in {Path(args.out) / 'results.json'}")
    return results


if __name__ == "__main__":
    raise SystemExit(report_diverged(main()))
