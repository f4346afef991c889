"""Motion-capture study: EGNO with ACE on real CMU MoCap "Run" — equality vs resilient.

    python -m experiments.mocap --preset quick|paper --out DIR [--methods a,b] [--seeds N]
                                [--epochs N] [--data PATH] [--seed K] [--no-progress]

Task (EGNO protocol, :mod:`data.mocap`): from the state at frame ``s`` (positions, velocities,
node features ``[‖v‖, normalised height]``) predict the positions at frames
``s+26 .. s+30`` (T = 5). Training loss: MSE over all T frames,

    ℓ = (1 / (T·J·3)) Σ_{t,j,d} (x̂_{t,j,d} − x_{t,j,d})²;

reported metric: the MSE of the LAST frame, ``mse_last = (1/(J·3)) Σ_{j,d} (x̂_{T,j,d} −
x_{T,j,d})²``, in units of 10⁻² (the value printed is ``mse_last / 1e-2``, as in the paper's
Table 1).

Methods (``ace_jax.fit``): ``vanilla`` (the equivariant EGNO alone), ``ace`` (equality
constraints γ_i = 0, model selected on the projection's validation ``mse_last``) and
``ace-resilient`` (|γ_i| ≤ u_i; selected on the FULL model's validation ``mse_last``, the
paper's "partially equivariant" result). Each run writes its log and checkpoint to
``DIR/<method>/seed<k>/`` (resumable), plus ``summary.json`` and ``trajectories.png`` (γ, λ,
u per epoch). The study writes ``DIR/results.json`` (schema below), ``DIR/table.md``,
``DIR/val_curves.png`` and ``DIR/trajectories_<method>.png`` (first seed).

``results.json``::

    {"config": {...}, "unit": "1e-2",
     "methods": {NAME: {"test_mse_projection": {"mean", "std"}, "test_mse_full": {"mean", "std"},
                        "final_gammas": [{γ name: value} per seed], "best_epoch": [per seed],
                        "wall_s": total seconds over seeds (the last call of each run),
                        "train_s": total training seconds over seeds, every epoch (resumed runs too),
                        "diverged": [{"seed", "error"} per diverged seed]}}}

MSE values are in units of 1e-2 and mean/std run over seeds (sample std, n − 1).

Measured (2-core CPU, one core per run, seed 0, ``--preset paper --epochs 500``, ~2.1 h each):
vanilla EGNO 41.9 (best epoch 424), ace-resilient full model 22.7 (best epoch 449; 10 of 12
γ end at |γ| < 3e-4, the last layer's coordinate branch keeps γ = 0.32); paper 35.3 / 23.8 at
3000 epochs; constant velocity 1980. (Measured when the last layer also carried a feature
branch, whose output was never read: 12 γ then, 11 now; the model's outputs and its other
parameters are unchanged, models/egno.py.)
:func:`benchmark_case` gives the lead's step-time benchmark an EGNO :class:`ace_jax.Task`
and one real training batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ace_jax
from data.mocap import DEFAULT_MOCAP_PATH, MocapData, load_mocap
from experiments.common import (Diverged, add_study_args, array_digest, fit_seed, markdown_table, mean_std_cell,
                                parse_list, preset_run_settings, report_diverged, summarize, write_json)
from experiments.plotting import plot_curves, plot_trajectories
from models.egno import EGNO

METHODS = ("vanilla", "ace", "ace-resilient")
UNIT = 1e-2
"""Reported MSEs are divided by this (the paper's ×10⁻² unit)."""
SELECT_METRIC = "mse_last"
MODEL_KEYS = ("loc", "vel", "node_features", "target")
"""The arrays of a split that the task uses (provenance keys are dropped)."""
PAPER_TABLE_RUN = {
    "vanilla": 35.3,
    "ace/projection": 35.3,
    "ace/full": 32.6,
    "ace-resilient/full": 23.8,
}
"""The paper's Table 1, "Run" column (test MSE ×10⁻²), for the table's reference column."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything that sets a MoCap study run (stored in ``results.json['config']``).

    Model: EGNO(hidden, num_layers, modes, time_embed, num_timesteps, gamma_init); its
    branch-input scales are set from the training split (see :func:`branch_scales`).
    Training: Adam(learning_rate), dual ascent with ``dual_learning_rate`` (``dual_optimizer``
    "ascent" as in the paper, or "adam" as in the public code), resilient slack cost α.
    Data: ``max_train`` / ``max_eval`` keep only the first samples of train / val and test
    (``None``: all — 200 / 240 / 240 on the shipped "Run" file).
    """

    hidden: int = 128
    num_layers: int = 6
    modes: int = 2
    time_embed: int = 32
    num_timesteps: int = 5
    gamma_init: float = 1.0
    epochs: int = 3000
    batch_size: int = 12
    learning_rate: float = 5e-4
    dual_learning_rate: float = 2e-4
    dual_optimizer: str = "ascent"
    alpha: float = 1.0
    seeds: int = 3
    eval_every: int = 5
    eval_batch_size: int = 240
    max_train: int | None = None
    max_eval: int | None = None

    def __post_init__(self):
        for name in ("hidden", "num_layers", "modes", "time_embed", "num_timesteps", "epochs", "batch_size",
                     "seeds", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StudyConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"StudyConfig.{name} must be None or a positive integer, got {value!r}")
        for name in ("learning_rate", "dual_learning_rate", "alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StudyConfig.{name} must be > 0, got {getattr(self, name)}")


PRESETS: dict[str, StudyConfig] = {
    # Smoke size: a few minutes on 2 CPU cores for all three methods.
    "quick": StudyConfig(
        hidden=32, num_layers=3, epochs=15, learning_rate=1e-3, dual_learning_rate=1e-3,
        seeds=1, eval_every=1,
    ),
    # The paper's setting (EGNO defaults; ACE: Adam 5e-4, dual 2e-4, 3000 epochs, batch 12).
    "paper": StudyConfig(),
}


# --------------------------------------------------------------------------- task


def _model_arrays(split: Mapping[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    return {key: np.asarray(split[key])[:limit] for key in MODEL_KEYS}


def branch_scales(train: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """``(length_scale, velocity_scale)``: std of the centred input positions and of the velocities.

    Fixed constants (training split only) that put the raw coordinates fed to the ACE
    branches, and the squared distances fed to the edge network, on an O(1) scale.
    """
    loc, vel = np.asarray(train["loc"], np.float64), np.asarray(train["vel"], np.float64)
    length = float((loc - loc.mean(axis=1, keepdims=True)).std())
    velocity = float(vel.std())
    if not (length > 0 and velocity > 0):
        raise ValueError("training positions/velocities have zero spread; cannot set the branch scales")
    return length, velocity


def build_model(config: StudyConfig, train: Mapping[str, np.ndarray]) -> EGNO:
    """The EGNO of ``config`` with branch/edge scales from the training split."""
    length, velocity = branch_scales(train)
    return EGNO(
        hidden=config.hidden, num_layers=config.num_layers, modes=config.modes, time_embed=config.time_embed,
        num_timesteps=config.num_timesteps, gamma_init=config.gamma_init,
        length_scale=length, velocity_scale=velocity,
    )


def vertical_rigid_transform(rng: jax.Array, example: Mapping[str, jax.Array], translation_scale: float = 1.0):
    """A random element of the MoCap symmetry group acting on one example.

    ``R`` = rotation by θ ~ U[0, 2π) about ``y``, composed with probability ½ with the
    reflection ``x → −x``; ``t = (t_x, 0, t_z)`` with ``t_x, t_z ~ N(0, translation_scale²)``.
    ``loc, target → R·+t``, ``vel → R·``; ``node_features`` are invariant.
    """
    k_angle, k_flip, k_shift = jax.random.split(rng, 3)
    theta = jax.random.uniform(k_angle, (), maxval=2 * jnp.pi)
    flip = jnp.where(jax.random.bernoulli(k_flip), -1.0, 1.0)
    c, s = jnp.cos(theta), jnp.sin(theta)
    rotation = jnp.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) * jnp.array([flip, 1.0, 1.0])[None, :]
    shift = translation_scale * jax.random.normal(k_shift, (3,)) * jnp.array([1.0, 0.0, 1.0])
    out = dict(example)
    out["loc"] = ace_jax.rotate_points(example["loc"], rotation) + shift
    out["target"] = ace_jax.rotate_points(example["target"], rotation) + shift
    out["vel"] = ace_jax.rotate_points(example["vel"], rotation)
    return out


def make_task(model: EGNO, data: MocapData, example: Mapping[str, np.ndarray]) -> ace_jax.Task:
    """The :class:`ace_jax.Task` of EGNO on MoCap (edges / edge attributes closed over).

    ``example`` is one sample (no batch axis) used to initialise the model. Loss: MSE over
    all frames; metric: ``{"mse_last": MSE of the last frame, "mse": MSE over all frames}``.
    """
    edges = jnp.asarray(data.edges)
    edge_attr = jnp.asarray(data.edge_attr)
    example = {k: jnp.asarray(example[k]) for k in ("loc", "vel", "node_features")}

    def predict(variables, ex, project):
        return model.apply(variables, ex["loc"], ex["vel"], ex["node_features"], edges, edge_attr, project=project)

    @partial(jax.jit, static_argnums=1)  # one compiled program instead of hundreds of eager ops
    def init(rng, has_branches):
        return model.init(rng, example["loc"], example["vel"], example["node_features"], edges, edge_attr,
                          project=not has_branches)

    def loss(variables, ex, rng, project):
        return jnp.mean((predict(variables, ex, project) - ex["target"]) ** 2)

    def metric(variables, ex, project):
        error = (predict(variables, ex, project) - ex["target"]) ** 2
        return {"mse_last": jnp.mean(error[-1]), "mse": jnp.mean(error)}

    return ace_jax.Task(init=init, loss=loss, metric=metric, transform=vertical_rigid_transform)


def benchmark_case(batch: int, seed: int = 0, data_path: str | Path | None = None):
    """``(task, batch_dict)`` for step-time benchmarks: the paper-size EGNO and ``batch`` real
    training samples (drawn with ``np.random.default_rng(seed)``; with replacement only when
    ``batch`` exceeds the training set). ``batch_dict`` holds loc (B,31,3), vel (B,31,3),
    node_features (B,31,2) and target (B,5,31,3)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    config = PRESETS["paper"]
    data = load_mocap(data_path, num_timesteps=config.num_timesteps)
    train = _model_arrays(data.train, None)
    n = len(train["loc"])
    index = np.random.default_rng(seed).choice(n, size=batch, replace=batch > n)
    model = build_model(config, train)
    task = make_task(model, data, {k: v[0] for k, v in train.items()})
    return task, {k: v[index] for k, v in train.items()}


# --------------------------------------------------------------------------- study


def _train_config(config: StudyConfig, method: str, seed: int, out_dir: Path, progress: bool,
                  data_name: str = "") -> ace_jax.TrainConfig:
    return ace_jax.TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        dual_learning_rate=config.dual_learning_rate, dual_optimizer=config.dual_optimizer,
        eval_every=config.eval_every, eval_batch_size=config.eval_batch_size,
        select_on=select_on(method), select_metric=SELECT_METRIC, select_mode="min",
        # one device: the paper's batch of 12 splits over few device counts, and its steps are small
        seed=seed, out_dir=str(out_dir), progress=progress, data_parallel=False,
        # what else a checkpoint depends on: the model and data settings (preset_run_settings
        # leaves out the seed count, and epochs, which the engine judges: a finished run can be extended)
        run_settings=preset_run_settings(config, data=data_name),
    )


def study_method(name: str, config: StudyConfig) -> ace_jax.Method:
    """The engine's method ``name`` with this study's options (``alpha`` for ``ace-resilient``)."""
    return ace_jax.get_method(name, alpha=config.alpha) if name == "ace-resilient" else ace_jax.get_method(name)


def select_on(method: str) -> str:
    """Which model the validation selection looks at: the one the method deploys (the full one
    for ``ace-resilient``; :attr:`ace_jax.Method.deployed`)."""
    return ace_jax.get_method(method).deployed


def constant_velocity_mse(split: Mapping[str, np.ndarray], frames_ahead: int) -> float:
    """Reference: last-frame MSE of ``x + frames_ahead · v`` (no learning)."""
    pred = split["loc"] + frames_ahead * split["vel"]
    return float(np.mean((pred - split["target"][:, -1]) ** 2))


def run_study(
    out: str | Path,
    preset: str = "quick",
    *,
    methods: Sequence[str] | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    first_seed: int = 0,
    data_path: str | Path | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Run the study and write its outputs to ``out``; returns the ``results.json`` dict.

    Args:
      out: output folder.
      preset: a key of :data:`PRESETS`.
      methods: subset of :data:`METHODS` (default all three).
      seeds, epochs: override the preset's numbers.
      first_seed: seeds are ``first_seed .. first_seed + seeds − 1``.
      data_path: a MoCap ``.npz`` (default: the shipped "Run" file).
      overrides: further :class:`StudyConfig` fields to replace (e.g. a small model).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    changes = dict(overrides or {})
    if seeds is not None:
        changes["seeds"] = seeds
    if epochs is not None:
        changes["epochs"] = epochs
    known_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    if bad := sorted(set(changes) - known_fields):
        raise ValueError(f"unknown StudyConfig fields {bad}; known: {sorted(known_fields)}")
    config = dataclasses.replace(PRESETS[preset], **changes)

    out = Path(out)
    data = load_mocap(data_path, num_timesteps=config.num_timesteps)
    train = _model_arrays(data.train, config.max_train)
    val = _model_arrays(data.val, config.max_eval)
    test = _model_arrays(data.test, config.max_eval)
    if config.batch_size > len(train["loc"]):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train['loc'])} training samples")
    eval_batch = min(config.eval_batch_size, len(val["loc"]))
    config = dataclasses.replace(config, eval_batch_size=eval_batch)
    model = build_model(config, train)
    task = make_task(model, data, {k: v[0] for k, v in train.items()})

    results: dict[str, dict] = {}
    histories: dict[str, list] = {}
    # the file's name and a hash of the arrays trained and evaluated on (not the name alone)
    file_name = Path(DEFAULT_MOCAP_PATH if data_path is None else data_path).name
    data_name = f"{file_name}, arrays {array_digest([train, val, test, data.edges, data.edge_attr, data.target_offsets])}"
    for method in methods:
        per_seed = []
        for seed in range(first_seed, first_seed + config.seeds):
            run_dir = out / method / f"seed{seed}"
            train_config = _train_config(config, method, seed, run_dir, progress, data_name)
            fit = fit_seed(lambda: ace_jax.fit(task, train, val, test, study_method(method, config), train_config), seed)
            if isinstance(fit, Diverged):  # recorded; its NaN voids the method's mean (summarize)
                per_seed.append({"method": method, "seed": seed, "diverged": fit.error})
                continue
            summary = {
                "method": method,
                "seed": seed,
                "best_epoch": fit.best_epoch,
                "val": fit.val,
                "test": fit.test,
                "final_gammas": ace_jax.named_leaves(jax.device_get(fit.state.gamma)),
                "final_multipliers": ace_jax.named_leaves(jax.device_get(fit.state.multipliers)),
                "final_slacks": ace_jax.named_leaves(jax.device_get(fit.state.slacks)),
                "seconds": fit.seconds,
                "train_seconds": fit.train_seconds,  # every epoch, also those of earlier calls of a resumed run
            }
            write_json(run_dir / "summary.json", summary)
            plot_trajectories(fit.history, run_dir / "trajectories.png", f"EGNO MoCap Run — {method}, seed {seed}")
            per_seed.append(summary)
            histories.setdefault(method, fit.history)
        if method in histories:
            plot_trajectories(histories[method], out / f"trajectories_{method}.png", f"EGNO MoCap Run — {method}")
        nan = float("nan")
        results[method] = {
            "test_mse_projection": summarize([nan if "diverged" in s else s["test"]["projection"][SELECT_METRIC] / UNIT
                                              for s in per_seed]),
            "test_mse_full": summarize([nan if "diverged" in s else s["test"]["full"][SELECT_METRIC] / UNIT
                                        for s in per_seed]),
            "final_gammas": [None if "diverged" in s else {k: float(v) for k, v in s["final_gammas"].items()}
                             for s in per_seed],
            "best_epoch": [None if "diverged" in s else int(s["best_epoch"]) for s in per_seed],
            "wall_s": float(sum(s.get("seconds", 0.0) for s in per_seed)),
            "train_s": float(sum(s.get("train_seconds", 0.0) for s in per_seed)),
            "diverged": [{"seed": s["seed"], "error": s["diverged"]} for s in per_seed if "diverged" in s],
        }

    frames_ahead = int(data.target_offsets[-1])
    report = {
        "config": {
            "preset": preset,
            **dataclasses.asdict(config),
            "seed_list": list(range(first_seed, first_seed + config.seeds)),
            "methods": methods,
            "select_on": {m: select_on(m) for m in methods},
            "select_metric": f"validation {SELECT_METRIC} (MSE of the last predicted frame)",
            "loss": "MSE over all predicted frames",
            "reported_metric": f"test {SELECT_METRIC} / 1e-2",
            "data": str(Path(data_path) if data_path is not None else "shipped CMU MoCap Run"),
            "num_samples": {"train": len(train["loc"]), "val": len(val["loc"]), "test": len(test["loc"])},
            "length_scale": model.length_scale,
            "velocity_scale": model.velocity_scale,
            "reference_constant_velocity_test_mse": constant_velocity_mse(test, frames_ahead) / UNIT,
            "backend": jax.default_backend(),
        },
        "unit": "1e-2",
        "methods": results,
    }
    write_json(out / "results.json", report)
    (out / "table.md").write_text(results_table(report))
    title = "EGNO MoCap Run: validation MSE (last frame)"
    plot_curves(histories, out / "val_curves.png", metric=SELECT_METRIC, title=title)
    return report


def results_table(report: Mapping[str, Any]) -> str:
    """Markdown table in the layout of the paper's Table 1 (test MSE ×10⁻², "Run" column)."""
    methods = report["methods"]
    rows = []

    def cell(entry):
        return mean_std_cell(entry, 1.0, ".2f", ".2f")

    labels = [
        ("vanilla", "test_mse_projection", "EGNO (vanilla, equivariant)", "vanilla"),
        ("ace", "test_mse_projection", "EGNO + ACE, projection (γ = 0)", "ace/projection"),
        ("ace", "test_mse_full", "EGNO + ACE, full model", "ace/full"),
        ("ace-resilient", "test_mse_full", "EGNO + ACE resilient, full model (partial equivariance)",
         "ace-resilient/full"),
        ("ace-resilient", "test_mse_projection", "EGNO + ACE resilient, projection (γ = 0)", None),
    ]
    for method, key, label, paper_key in labels:
        if method in methods:
            paper = f"{PAPER_TABLE_RUN[paper_key]:.1f}" if paper_key else "—"
            rows.append([label, cell(methods[method][key]), paper, f"{methods[method]['wall_s']:.0f}"])
    config = report["config"]
    rows.append(["constant velocity x + 30·v (reference, no learning)",
                 f"{config['reference_constant_velocity_test_mse']:.2f}", "—", "0"])
    header = ["Model", "Run test MSE (×10⁻²)", "paper (×10⁻²)", "wall s"]
    notes = (
        f"\nPreset `{config['preset']}`: {config['epochs']} epochs, {config['seeds']} seed(s), hidden "
        f"{config['hidden']}, {config['num_layers']} layers, batch {config['batch_size']}, lr "
        f"{config['learning_rate']}, dual lr {config['dual_learning_rate']} ({config['dual_optimizer']}). "
        "Mean ± sample std over seeds. Selection: validation last-frame MSE of the projection (ace-resilient: of "
        "the full model).\n"
    )
    return "# EGNO on CMU MoCap Run (test MSE of the last frame, ×10⁻²)\n\n" + markdown_table(header, rows) + notes


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.mocap", description=__doc__.splitlines()[0])
    add_study_args(parser, PRESETS)
    parser.add_argument("--data", default=None, help="MoCap .npz file (default: the shipped CMU 'Run' set)")
    args = parser.parse_args(argv)
    methods = parse_list(args.methods, METHODS, "methods")
    t0 = time.perf_counter()
    report = run_study(
        args.out, args.preset, methods=methods, seeds=args.seeds, epochs=args.epochs, first_seed=args.seed,
        data_path=args.data, progress=not args.no_progress,
    )
    print(Path(args.out, "table.md").read_text())
    print(f"total wall time: {time.perf_counter() - t0:.1f} s")
    return report


if __name__ == "__main__":
    raise SystemExit(report_diverged(main(sys.argv[1:])))
