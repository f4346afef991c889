"""The 2-D C4 toy study (ACE paper, App. A.4): Curie's principle and learned symmetry breaking.

    python -m experiments.c4_toy --preset quick|full --out DIR [--seeds N] [--epochs N] [--tasks a,b]
        [--branch in-kernel|normalize|tanh-shared] [--seed S] [--no-progress]

``quick``: 256 / 64 / 128 images per task, 30 epochs, one seed (minutes on a CPU); ``full``:
2048 / 256 / 512 images, 60 epochs, three seeds.

For each task of :mod:`data.c4_toy` (square → square / rectangle / non-symmetric shape) it
trains the strictly C4-equivariant CNN of :mod:`models.c4_cnn` (method ``vanilla``, the
baseline) and the same CNN with ACE branches under the resilient formulation
(``ace-resilient``, METHOD.md §3), and reports test MSE per pixel of

- the baseline,
- the ACE projection (γ = 0, branches not evaluated) and the ACE full model,
- the error floor of ANY strictly C4-equivariant model, mean ``c4_floor_mse`` over the test
  targets (inputs are C4-invariant, so an equivariant model outputs a C4-invariant image).

ACE is selected on the FULL model's validation MSE: this study is about partial
equivariance (METHOD.md §4), i.e. whether the learned γ_i open up exactly when the data asks
for less symmetry than the input has. Expected: γ → ~0 on square → square; γ clearly
non-zero on the other two tasks, where the full model goes below the floor.

Outputs in DIR: ``results.json`` (schema below; means over seeds), ``per_seed.json``
(every seed's numbers, plus two diagnostics of the ACE model on the test inputs: the RMS per
pixel of the branches' total effect, full − projection, and the full model's C4
equivariance error),
``fig8_<task>.png`` (rows of test examples: input, equivariant part = projection output,
correction = full − projection, sum = full output, target), ``trajectories_<task>.png``
(γ/λ/u per epoch), both of the first seed whose ACE run did not diverge (none and any older
figure of the task removed, with a note, if every seed diverged), and the engine's logs under
``runs/``.

    {"config": {...},
     "tasks": {task: {"baseline_mse", "ace_projection_mse", "ace_full_mse", "floor_mse",
                      "final_abs_gammas": [mean over seeds of |γ| at the last epoch, per branch,
                                           order config["gamma_names"]],
                      "diverged": [{"seed", "method", "error"}]}}}

(|γ| because (γ, δW) and (−γ, −δW) are the same function: a signed mean over seeds could
cancel. ``per_seed.json`` has each seed's signed γ at the last epoch, ``final_gammas``, and
at the selected epoch, ``selected_gammas``.) A run that stops on a non-finite step is recorded
as in the other studies (:class:`experiments.common.Diverged`): the study goes on, the
numbers it would have given are null (so are the means over seeds that include it), the run
is listed under ``"diverged"``, its folder keeps the last good checkpoint, and the script
exits with status 1.

Settings (the ``Preset`` fields; chosen on square → rectangle / square → square runs of the
quick budget, then used unchanged for every task):

- branches: 1×1 spectral-normalised affine convs of each layer's input, folded into the
  layer's conv (``branch_in_kernel``, ``C4CNN`` docstring), so the breaking of layer i is at
  most |γ_i| times its input per pixel; ``--branch normalize`` (unit-norm input pixels,
  post-activation) and ``--branch tanh-shared`` select the earlier forms. Branches added after
  the activation without a bound let the network keep a large correction while γ → 0 by
  inflating the features they read (the tanh / shared-orientation form did the same on
  square → square, see ``C4CNN``);
- α = 0.1: the loss is a per-pixel MSE of order 1e-2, so α = 1 priced any useful γ above
  the loss it could save; u starts at |γ_0| = 1 (a feasible start, no early λ spike) and the
  slacks move fast (η_u = 0.2, so u tracks λ/α within ~1/(η_u α) = 50 steps);
- η_θ = 5e-3 (Adam), η_λ = 1e-3 (plain ascent), 30 epochs of 16 steps in the quick preset.

:func:`benchmark_case` gives the Task and one training batch for the step benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from ace_jax import FitResult, Task, TrainConfig, c4_act, equivariance_error, fit, gammas, get_method, named_leaves
from data.c4_toy import TASKS, c4_floor_mse, make_c4_toy
from experiments.common import (Diverged, fit_seed, markdown_table, parse_list, preset_run_settings, report_diverged,
                                write_json)
from models.c4_cnn import C4CNN

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE_METHOD = "vanilla"
ACE_METHOD = "ace-resilient"
# the ACE run's numbers in a task summary (NaN when that run diverged)
ACE_NUMBERS = ("ace_projection_mse", "ace_full_mse", "ace_correction_rms", "ace_full_equivariance_error")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Every setting of one study run (data, model, optimisation)."""

    num_train: int
    num_val: int
    num_test: int
    epochs: int
    seeds: int
    size: int = 16
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 5e-3
    dual_learning_rate: float = 1e-3
    slack_learning_rate: float | None = 0.2
    slack_init: float = 1.0
    alpha: float = 0.1
    channels: int = 8
    num_layers: int = 4
    kernel_size: int = 3
    branch_kernel_size: int = 1
    spectral: bool = True
    branch_bound: str = "none"
    branch_shared: bool = False
    branch_in_kernel: bool = True
    gamma_init: float = 1.0


# --branch NAME: how the ACE branches are built (see models/c4_cnn.py).
BRANCHES = {
    "normalize": dict(branch_bound="normalize", branch_shared=False, branch_in_kernel=False),
    "in-kernel": dict(branch_bound="none", branch_shared=False, branch_in_kernel=True),
    "tanh-shared": dict(branch_bound="tanh", branch_shared=True, branch_in_kernel=False),
}

PRESETS = {
    "quick": Preset(num_train=256, num_val=64, num_test=128, epochs=30, seeds=1),
    "full": Preset(num_train=2048, num_val=256, num_test=512, epochs=60, seeds=3),
}


# --------------------------------------------------------------------------- task


def build_model(preset: Preset) -> C4CNN:
    return C4CNN(
        channels=preset.channels,
        num_layers=preset.num_layers,
        kernel_size=preset.kernel_size,
        branch_kernel_size=preset.branch_kernel_size,
        spectral=preset.spectral,
        branch_bound=preset.branch_bound,
        branch_shared=preset.branch_shared,
        branch_in_kernel=preset.branch_in_kernel,
        gamma_init=preset.gamma_init,
    )


def random_c4_rotation(rng: jax.Array, example: dict) -> dict:
    """Rotate input and target of one example by the same random multiple of 90°."""
    k = jax.random.randint(rng, (), 0, 4)
    rotate = lambda tree, j: jax.tree.map(lambda a: c4_act(a, j), tree)  # noqa: E731
    return jax.lax.switch(k, [lambda e, j=j: rotate(e, j) for j in range(4)], example)


def make_task(model: C4CNN, size: int) -> Task:
    """The engine's view of the toy: per-example per-pixel MSE as loss and metric ``"mse"``."""
    example_x = jnp.zeros((size, size, 1), jnp.float32)

    def mse(variables, example, project):
        prediction = model.apply(variables, example["x"], project=project)
        return jnp.mean((prediction - example["y"]) ** 2)

    return Task(
        init=lambda rng, has_branches: model.init(rng, example_x, project=not has_branches),
        loss=lambda variables, example, rng, project: mse(variables, example, project),
        metric=lambda variables, example, project: {"mse": mse(variables, example, project)},
        transform=random_c4_rotation,
    )


def benchmark_case(batch: int, seed: int = 0) -> tuple[Task, dict]:
    """The quick preset's Task and one training batch ``{"x", "y": (batch, 16, 16, 1)}``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    preset = PRESETS["quick"]
    data = make_c4_toy("square_to_rectangle", batch, 0, 0, size=preset.size, seed=seed)["train"]
    return make_task(build_model(preset), preset.size), data


# --------------------------------------------------------------------------- study


def ordered_gamma_names(variables: dict) -> list[str]:
    """γ names in network order: ``layer0_breaking/gamma`` … ``layer{L−1}…``, then ``output…``."""

    def position(name: str) -> tuple[int, int]:
        match = re.match(r"layer(\d+)_", name)
        return (0, int(match.group(1))) if match else (1, 0)

    return sorted(named_leaves(gammas(variables)), key=position)


def predict(model: C4CNN, variables: dict, x: np.ndarray, project: bool) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, a: model.apply(v, a, project=project))(variables, jnp.asarray(x)))


class TaskRun(NamedTuple):
    """One task × seed: the JSON-ready ``summary`` and what the figures need (a run that
    diverged is a :class:`experiments.common.Diverged`, its numbers NaN in ``summary``)."""

    summary: dict
    ace: FitResult | Diverged
    baseline: FitResult | Diverged
    model: C4CNN
    test: dict


def run_task(task_name: str, preset: Preset, seed: int, out_dir: Path, progress: bool) -> TaskRun:
    """Train the baseline and ACE on one task with one seed and evaluate both on the test split."""
    data = make_c4_toy(task_name, preset.num_train, preset.num_val, preset.num_test, preset.size, seed=seed)
    model = build_model(preset)
    task = make_task(model, preset.size)
    common = dict(
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        eval_batch_size=preset.eval_batch_size,
        learning_rate=preset.learning_rate,
        dual_learning_rate=preset.dual_learning_rate,
        slack_learning_rate=preset.slack_learning_rate,
        slack_init=preset.slack_init,
        seed=seed,
        progress=progress,
        run_settings=preset_run_settings(preset, task=task_name),  # rerunning into out_dir resumes
    )
    run_dir = out_dir / "runs" / f"{task_name}_seed{seed}"
    # a diverged run is recorded (Diverged) and the study goes on; its folder keeps the last good checkpoint
    baseline = fit_seed(lambda: fit(
        task, data["train"], data["val"], data["test"], BASELINE_METHOD,
        TrainConfig(**common, select_on="projection", out_dir=str(run_dir / BASELINE_METHOD)),
    ), seed)
    ace = fit_seed(lambda: fit(
        task, data["train"], data["val"], data["test"], get_method(ACE_METHOD, alpha=preset.alpha),
        TrainConfig(**common, select_on="full", out_dir=str(run_dir / ACE_METHOD)),
    ), seed)
    nan = float("nan")
    names = ordered_gamma_names(jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), True)))
    summary = {
        "seed": seed,
        "baseline_mse": nan if isinstance(baseline, Diverged) else baseline.test["projection"]["mse"],
        "floor_mse": float(np.mean(c4_floor_mse(data["test"]["y"]))),
        "gamma_names": names,
        "diverged": [{"seed": seed, "method": method, "error": run.error}
                     for method, run in ((BASELINE_METHOD, baseline), (ACE_METHOD, ace)) if isinstance(run, Diverged)],
        "seconds": {name: None if isinstance(run, Diverged) else run.seconds
                    for name, run in (("baseline", baseline), ("ace", ace))},
        "train_seconds": {name: None if isinstance(run, Diverged) else run.train_seconds  # all epochs, resumed too
                          for name, run in (("baseline", baseline), ("ace", ace))},
    }
    if isinstance(ace, Diverged):  # the keys below, with nothing measured
        summary.update({key: nan for key in ACE_NUMBERS}, final_gammas=[nan] * len(names),
                       selected_gammas=[nan] * len(names), ace_best_epoch=None)
        return TaskRun(summary, ace, baseline, model, data["test"])
    selected = named_leaves(gammas(ace.best_variables))  # the deployed (selected) epoch
    final = ace.history[-1]["gamma"]  # the last epoch, where the trajectory plots end
    x_test = jnp.asarray(data["test"]["x"])
    full_fn = jax.jit(lambda a: model.apply(ace.best_variables, a))
    correction = full_fn(x_test) - model.apply(ace.best_variables, x_test, project=True)
    rotate = lambda k, a: c4_act(a, k)  # noqa: E731
    numbers = {
        "ace_projection_mse": ace.test["projection"]["mse"],
        "ace_full_mse": ace.test["full"]["mse"],
        # Diagnostics on the test inputs: RMS per pixel of the branches' total effect
        # (full − projection) and the full model's C4 equivariance error (mean |f(gx) − g f(x)|
        # per pixel over the 3 non-trivial rotations).
        "ace_correction_rms": float(jnp.sqrt(jnp.mean(correction**2))),
        "ace_full_equivariance_error": float(equivariance_error(full_fn, x_test, (1, 2, 3), rotate, rotate)),
    }
    summary.update(numbers, final_gammas=[float(final[n]) for n in names],
                   selected_gammas=[float(selected[n]) for n in names], ace_best_epoch=ace.best_epoch)
    return TaskRun(summary, ace, baseline, model, data["test"])


def plot_fig8(model: C4CNN, ace_variables: dict, test: dict, path: Path, title: str, num_rows: int = 4) -> None:
    """Rows of test examples (distinct square sizes): input, equivariant part, correction, sum, target."""
    x, y = test["x"], test["y"]
    sides = (x[..., 0] > 0).sum(axis=(1, 2))
    order = np.argsort(sides, kind="stable")
    picks = order[np.linspace(0, len(order) - 1, min(num_rows, len(order))).astype(int)]
    projection = predict(model, ace_variables, x[picks], project=True)
    full = predict(model, ace_variables, x[picks], project=False)
    columns = [
        ("input", x[picks]),
        ("equivariant part\n(projection, γ=0)", projection),
        ("correction\n(full − projection)", full - projection),
        ("sum (full model)", full),
        ("target", y[picks]),
    ]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(2.2 * len(columns), 2.2 * len(picks)), squeeze=False)
    for row in range(len(picks)):
        vmax = float(max(np.abs(c[1][row]).max() for c in columns)) or 1.0
        vmin = min(0.0, float(min(c[1][row].min() for i, c in enumerate(columns) if i != 2)))
        for col, (label, images) in enumerate(columns):
            ax = axes[row, col]
            diverging = col == 2
            # outputs can be negative (the readout is affine): the colour scale starts at the
            # row's minimum, so a negative pixel is not drawn as 0
            ax.imshow(images[row, ..., 0], cmap="RdBu_r" if diverging else "viridis",
                      vmin=-vmax if diverging else vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(
    preset: Preset, tasks: list[str], first_seed: int, out_dir: Path, progress: bool = True
) -> tuple[dict, dict]:
    """Run every task × seed; write results.json, per_seed.json and the figures.

    Returns ``(results, diagnostics)``: the results.json content and, per task, the mean
    over seeds of ``ace_correction_rms`` and ``ace_full_equivariance_error``.
    """
    from experiments.plotting import plot_trajectories

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    per_seed, results_tasks, diagnostics, gamma_names = {}, {}, {}, None
    for task_name in tasks:
        runs = []
        plotted = False
        for seed in range(first_seed, first_seed + preset.seeds):
            run = run_task(task_name, preset, seed, out_dir, progress)
            runs.append(run.summary)
            if not plotted and not isinstance(run.ace, Diverged):  # the first seed whose ACE run finished
                plotted = True
                title = f"{task_name}: ACE (resilient), seed {seed}"
                plot_fig8(run.model, run.ace.best_variables, run.test, out_dir / f"fig8_{task_name}.png", title)
                plot_trajectories(run.ace.history, out_dir / f"trajectories_{task_name}.png", title + ": γ / λ / u")
        if not plotted:  # no figure rather than one left from an earlier run into this folder
            for figure in (f"fig8_{task_name}.png", f"trajectories_{task_name}.png"):
                (out_dir / figure).unlink(missing_ok=True)
            print(f"{task_name}: every seed's ACE run diverged; no figures", flush=True)
        gamma_names = runs[0]["gamma_names"]
        per_seed[task_name] = runs
        mean = lambda key: float(np.mean([r[key] for r in runs]))  # noqa: E731
        results_tasks[task_name] = {
            "baseline_mse": mean("baseline_mse"),
            "ace_projection_mse": mean("ace_projection_mse"),
            "ace_full_mse": mean("ace_full_mse"),
            "floor_mse": mean("floor_mse"),
            "final_abs_gammas": np.mean(np.abs([r["final_gammas"] for r in runs]), axis=0).tolist(),
            "diverged": [d for r in runs for d in r["diverged"]],
        }
        diagnostics[task_name] = {
            "ace_correction_rms": mean("ace_correction_rms"),
            "ace_full_equivariance_error": mean("ace_full_equivariance_error"),
        }
    config = {
        **dataclasses.asdict(preset),
        "tasks": tasks,
        "first_seed": first_seed,
        "baseline_method": BASELINE_METHOD,
        "ace_method": ACE_METHOD,
        "ace_select_on": "full",
        "selection_note": "ACE selected on the FULL model's validation MSE (resilient = partial equivariance, "
        "METHOD.md §4); the baseline (no branches) on its own validation MSE",
        "metric": "test MSE per pixel; numbers are means over seeds (per_seed.json has each seed)",
        "gamma_names": gamma_names,
        "wall_seconds": time.perf_counter() - t_start,
    }
    results = {"config": config, "tasks": results_tasks}
    write_json(out_dir / "results.json", results)
    write_json(out_dir / "per_seed.json", {"per_seed": per_seed, "diagnostics": diagnostics})
    return results, diagnostics


def results_table(results: dict, diagnostics: dict) -> str:
    """Markdown table: test MSEs per pixel, final |γ| per branch, branch-effect diagnostics."""
    short = [n.split("_breaking")[0] for n in results["config"]["gamma_names"]]
    header = ["task", "baseline", "ACE projection", "ACE full", "C4 floor", f"final |γ| ({', '.join(short)})",
              "RMS(full − proj)", "full equiv. err"]
    def cell(value: float, spec: str) -> str:  # NaN: a seed of that mean diverged
        return f"{value:{spec}}" if np.isfinite(value) else "no mean (diverged)"

    rows = []
    for name, r in results["tasks"].items():
        d = diagnostics[name]
        rows.append(
            [name]
            + [cell(r[k], ".3e") for k in ("baseline_mse", "ace_projection_mse", "ace_full_mse", "floor_mse")]
            + [", ".join(cell(g, ".3f") for g in r["final_abs_gammas"])]
            + [cell(d["ace_correction_rms"], ".3g"), cell(d["ace_full_equivariance_error"], ".3g")]
        )
    return markdown_table(header, rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="budget preset")
    parser.add_argument("--out", required=True, help="output folder (results.json, figures, logs)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--branch", choices=sorted(BRANCHES), default=None,
                        help="ACE branch construction (default: the preset's)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.branch is not None:
        preset = dataclasses.replace(preset, **BRANCHES[args.branch])
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
        preset = dataclasses.replace(preset, seeds=args.seeds)
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
        preset = dataclasses.replace(preset, epochs=args.epochs)
    tasks = parse_list(args.tasks, TASKS, "tasks")
    results, diagnostics = run_study(preset, tasks, args.seed, Path(args.out), progress=not args.no_progress)
    print(results_table(results, diagnostics))
    print(f"wall time {results['config']['wall_seconds']:.1f} s; results in {Path(args.out) / 'results.json'}")
    return results


if __name__ == "__main__":
    raise SystemExit(report_diverged(main()))
