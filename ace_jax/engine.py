"""The training engine shared by every study: epochs, evaluation, selection, logging, resume.

Read top to bottom, :func:`fit` does:

1. initialise the model (branches built unless the method is ``vanilla``), λ = 0, u = 0;
2. for each epoch: shuffle (seeded by ``(seed, epoch)``), run jitted primal–dual steps on
   batches sharded over all local devices (``jax.sharding``), set γ by schedule if the
   method says so;
3. every ``eval_every`` epochs evaluate the projection (γ = 0, branches not computed) and the
   full model on the validation set, keep the best variables by the metric of the model the
   method deploys (``TrainConfig.select_on``, by default ``method.deployed``; a non-finite
   validation score is never selected), append a JSON line with losses and every γ_i, λ_i, u_i;
4. checkpoint after every finished epoch (atomic write), with the run's settings
   (:func:`run_fingerprint`). A non-finite Lagrangian, gradient or updated state stops the run with
   :class:`NonFiniteError`; the checkpoint on disk is the last good one. ``resume=True``
   continues from it and gives the numbers of an uninterrupted run; a checkpoint written
   under other settings (seed, method, learning rates, batch size, …) is refused with an
   error naming them. A changed ``epochs`` is accepted only where the result is that of an
   uninterrupted run of the new length (:func:`_check_fingerprint`): no schedule depends on
   it, the checkpoint has not trained past it, and the two epoch counts agree on whether the
   checkpoint's last epoch was evaluated;
5. evaluate the selected variables on the test set, projection and full model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ace_jax.dual import dual_ascent, slack_descent
from ace_jax.homotopic import named_leaves
from ace_jax.lagrangian import make_lagrangian
from ace_jax.methods import Method, get_method, triangle_schedule
from ace_jax.train_step import TrainState, init_train_state, make_train_step

Dataset = Mapping[str, np.ndarray]
"""A split: arrays sharing the leading example axis N."""


class NonFiniteError(FloatingPointError):
    """Raised when the loss, a gradient or the updated state becomes NaN/Inf during training."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A learning problem as the engine sees it.

    Attributes:
      init: ``init(rng, has_branches) -> variables``; with ``has_branches=False`` build the
        model with ``project=True`` (no branch parameters, no γ).
      loss: ``loss(variables, example, rng, project) -> scalar`` for ONE example.
      metric: ``metric(variables, example, project) -> scalar | dict[str, scalar]`` for one
        example, averaged over a split (default: ``loss`` with a fixed key).
      transform: ``transform(rng, example) -> example``, a random group element acting on
        input and target; needed by the ``unconstrained`` (augmentation) and ``penalty``
        methods.
      regularizer: ``regularizer(variables, batch, rng) -> scalar`` (scheduled relaxation).
    """

    init: Callable[[jax.Array, bool], dict]
    loss: Callable[[Any, Any, jax.Array, bool], jax.Array]
    metric: Callable[[Any, Any, bool], Any] | None = None
    transform: Callable[[jax.Array, Any], Any] | None = None
    regularizer: Callable[[Any, Any, jax.Array], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`fit`. Learning rates must be positive; ``dual_optimizer`` is
    ``"ascent"`` (plain projected ascent, default) or ``"adam"`` (as the public ACE code);
    ``dual_proportional`` > 0 adds a damping proportional term to the dual update.
    ``optimizer`` replaces the default primal optimizer (Adam(learning_rate), with
    ``grad_clip``/``weight_decay``) by any optax transform acting on params and γ.
    ``run_settings`` (a JSON-able mapping) names what else a run depends on — data set, model
    options — so that a checkpoint is resumed only under the same values (:func:`run_fingerprint`)."""

    epochs: int
    batch_size: int
    learning_rate: float = 1e-3
    dual_learning_rate: float = 1e-3
    slack_learning_rate: float | None = None
    dual_optimizer: str = "ascent"
    dual_proportional: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    lr_schedule: Callable[[int], float] | None = None
    eval_every: int = 1
    eval_batch_size: int = 256
    select_on: str | None = None  # None: the model the method deploys, ``get_method(name).deployed``
    select_metric: str | None = None
    select_mode: str = "min"
    slack_init: float = 0.0
    seed: int = 0
    out_dir: str | None = None
    resume: bool = True
    progress: bool = True
    data_parallel: bool = True
    optimizer: optax.GradientTransformation | None = None
    run_settings: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        for name in ("learning_rate", "dual_learning_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")
        if self.slack_learning_rate is not None and not (
                math.isfinite(self.slack_learning_rate) and self.slack_learning_rate > 0):
            raise ValueError(f"slack_learning_rate must be finite and > 0, got {self.slack_learning_rate}")
        if self.optimizer is not None:  # it replaces the default Adam and everything built around it
            ignored = [name for name, unset in (("weight_decay", self.weight_decay == 0), ("grad_clip", self.grad_clip is None),
                                                 ("lr_schedule", self.lr_schedule is None)) if not unset]
            if ignored:
                raise ValueError(f"{', '.join(ignored)} would be ignored: a custom optimizer replaces the default "
                                 "Adam with its weight decay, clipping and schedule; build them into the optimizer")
        if self.dual_optimizer not in ("ascent", "adam"):
            raise ValueError(f"dual_optimizer must be 'ascent' or 'adam', got {self.dual_optimizer!r}")
        if self.select_on not in (None, "projection", "full"):
            raise ValueError(f"select_on must be None, 'projection' or 'full', got {self.select_on!r}")
        if self.select_mode not in ("min", "max"):
            raise ValueError(f"select_mode must be 'min' or 'max', got {self.select_mode!r}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")
        for name in ("dual_proportional", "weight_decay", "slack_init"):  # NaN and inf refused too
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be finite and > 0, got {self.grad_clip}")


class FitResult(NamedTuple):
    best_variables: dict
    best_epoch: int
    val: dict  # {"projection": {metric: value}, "full": {...}} at the best epoch
    test: dict  # same layout, on the test split
    history: list  # one record per epoch (also written to log.jsonl)
    state: TrainState  # final state
    seconds: float  # wall time of this call (training + evaluation)

    @property
    def train_seconds(self) -> float:
        """Σ of the history's per-epoch ``seconds``: every epoch of a run resumed from its
        checkpoint in several calls, where ``seconds`` times only the last call. (Vmapped seeds,
        experiments/vmapped_seeds.py, each record the time of the pass they share.)"""
        return float(sum(record["seconds"] for record in self.history))


# --------------------------------------------------------------------------- helpers


def strict_json(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays made plain Python and NaN/±inf replaced by ``None``
    (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def log_line(record: Mapping) -> str:
    """One ``log.jsonl`` line: strict JSON, a NaN or ±inf metric written as ``null``.

    (Python's ``json`` would write the tokens ``NaN``/``Infinity``, which other JSON readers
    reject.) The checkpoint keeps the exact values; only the log is lossy here.
    """
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def with_selection(config: TrainConfig, method: Method) -> TrainConfig:
    """``config`` with ``select_on`` resolved: None selects on the model ``method`` deploys
    (the projection for vanilla/ace/scheduled, the full model for the others)."""
    return config if config.select_on is not None else dataclasses.replace(config, select_on=method.deployed)


def check_split(name: str, data: Dataset) -> int:
    """Number of examples in a split; raises if its arrays disagree on the leading axis."""
    if not data:
        raise ValueError(f"{name} split is empty")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in data.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"{name} split: every array needs the same leading example axis, got {sizes}")
    if "weight" in data:  # per-example loss weights (make_lagrangian): one finite w >= 0 per example
        weight = np.asarray(data["weight"])
        if weight.ndim != 1 or not np.all(np.isfinite(weight)) or np.any(weight < 0) or not np.any(weight > 0):
            raise ValueError(f"{name} split: 'weight' must be one finite value >= 0 per example, not all zero "
                             f"(shape {weight.shape}, min {np.min(weight) if weight.size else None})")
    return next(iter(sizes.values()))


def _primal_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    if config.optimizer is not None:
        return config.optimizer
    lr = config.lr_schedule if config.lr_schedule is not None else config.learning_rate
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.weight_decay:
        # decoupled decay on the network weights only: γ moves by ∇_γ L alone (METHOD.md §2)
        parts.append(optax.adamw(lr, weight_decay=config.weight_decay, mask=_params_only))
    else:
        parts.append(optax.adam(lr))
    return optax.chain(*parts)


def _params_only(primal: dict) -> dict:
    """Mask for the primal tree ``{"params", "gamma"?}``: True on params, False on γ."""
    return {name: jax.tree.map(lambda _: name == "params", tree) for name, tree in primal.items()}


def method_loss(task: Task, method: Method):
    """The per-example training loss a method optimises (augmentation, REMUL penalty)."""
    project = not method.has_branches
    needs_transform = method.augment or method.penalty_weight > 0
    if needs_transform and task.transform is None:
        raise ValueError(f"method {method.name!r} needs task.transform (a random group action on examples)")

    def loss(variables, example, rng):
        k_loss, k_g, k_pen = jax.random.split(rng, 3)
        if method.augment:
            example = task.transform(k_g, example)
        value = task.loss(variables, example, k_loss, project)
        if method.penalty_weight > 0:
            value = value + method.penalty_weight * task.loss(variables, task.transform(k_g, example), k_pen, project)
        return value

    return loss


def _as_metric_dict(value) -> dict:
    return dict(value) if isinstance(value, Mapping) else {"metric": value}


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _scalars(tree) -> dict:
    return {k: float(v) for k, v in named_leaves(jax.device_get(tree)).items()}


# --------------------------------------------------------------------------- evaluation


def weighted_metric_sums(metric: Callable, variables, batch, weights: jax.Array, project: bool) -> dict:
    """``{name: Σ_n w_n m_n}`` of the per-example metric over one padded batch ``(B, …)``.

    Padding (weight 0) never enters a sum, even where its value is not finite.
    """
    values = jax.vmap(lambda ex: _as_metric_dict(metric(variables, ex, project)))(batch)
    return {k: jnp.sum(jnp.where(weights > 0, v * weights, 0.0)) for k, v in values.items()}


def make_evaluator(task: Task, batch_size: int, sharding=None):
    """``evaluate(variables, data, project) -> {metric: mean}`` over a whole split.

    Batches are padded to ``batch_size`` with zero-weight copies of the first example so
    that one compiled program serves every batch; padding never enters the mean. The mean is
    over examples, unweighted: a split's ``"weight"`` field (which weights the training loss,
    :func:`ace_jax.lagrangian.make_lagrangian`) reaches the metric as an ordinary field.
    """
    metric = task.metric or (lambda v, ex, project: task.loss(v, ex, jax.random.PRNGKey(0), project))

    batch_sums = jax.jit(partial(weighted_metric_sums, metric), static_argnums=(3,))

    def evaluate(variables, data: Dataset, project: bool) -> dict:
        n = check_split("eval", data)
        totals: dict = {}
        for batch, weights in padded_batches(data, batch_size):
            if sharding is not None:
                batch, weights = jax.device_put((batch, weights), sharding)
            sums = batch_sums(variables, batch, weights, project)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: float(v) / n for k, v in totals.items()}

    return evaluate


def padded_batches(data: Dataset, batch_size: int):
    """Yield ``(batch, weights)`` covering a split in order, every batch of ``batch_size``.

    The last batch is padded with copies of its first example at weight 0, so one compiled
    program serves every batch and padding never enters a weighted sum.
    """
    n = check_split("eval", data)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        weights = np.zeros(batch_size, np.float32)
        weights[: len(idx)] = 1.0
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        yield {k: np.asarray(v)[idx] for k, v in data.items()}, weights


# --------------------------------------------------------------------------- trainer


def build_step(task: Task, method: Method | str, config: TrainConfig):
    """The pieces of training, unjitted: ``(init_state, step)``.

    ``init_state(init_key) -> TrainState`` initialises the model (λ = 0, u = slack_init)
    and the optimizer states; ``step(state, batch, rng) -> (state, metrics)`` is one pure
    primal–dual step. :func:`make_trainer` jits it; vmapping it over stacked states trains
    several seeds in one program.
    """
    method = get_method(method) if isinstance(method, str) else method
    formulation = method.formulation
    primal_tx = _primal_optimizer(config)
    dual_tx = slack_tx = None
    if formulation is not None:
        dual_tx = dual_ascent(
            config.dual_learning_rate,
            optimizer=optax.adam(config.dual_learning_rate) if config.dual_optimizer == "adam" else None,
            nonnegative=formulation.nonnegative_multipliers,
            proportional=config.dual_proportional,
        )
        slack_tx = slack_descent(config.slack_learning_rate or config.dual_learning_rate)

    def init_state(init_key: jax.Array) -> TrainState:
        variables = task.init(init_key, method.has_branches)
        state = init_train_state(
            variables, primal_tx, dual_tx, slack_tx, formulation, method.learn_gamma, config.slack_init
        )
        if method.has_branches and not jax.tree.leaves(state.gamma):  # else it would silently train a vanilla model
            what = "constrains" if formulation is not None else ("schedules" if method.gamma_schedule else "trains")
            raise ValueError(f"method {method.name!r} {what} γ but the model has no 'gamma' variables "
                             "(does task.init build the branches when has_branches is True?)")
        return state

    regularizer = None
    if method.regularizer_weight > 0:
        if task.regularizer is None:
            raise ValueError(f"method {method.name!r} needs task.regularizer")
        regularizer = lambda v, b, r: method.regularizer_weight * task.regularizer(v, b, r)  # noqa: E731
    lagrangian = make_lagrangian(method_loss(task, method), formulation, regularizer=regularizer)
    step = make_train_step(lagrangian, primal_tx, dual_tx, slack_tx, formulation, method.learn_gamma)
    return init_state, step


def data_shardings(devices) -> tuple[NamedSharding, NamedSharding]:
    """``(batch_sharding, replicated)`` of data-parallel training over ``devices``: a one-axis mesh
    ``"data"``; batches split along their leading (example) axis, the state copied to every device."""
    mesh = Mesh(np.array(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def make_trainer(task: Task, method: Method | str, config: TrainConfig, init_key: jax.Array, train_key: jax.Array):
    """Initial :class:`TrainState` and the jitted ``train_step(state, batch) -> (state, metrics)``.

    The step's PRNG key is ``fold_in(train_key, state.step)``, so a resumed run draws the
    same keys as an uninterrupted one. Used by :func:`fit` and by the benchmarks.
    """
    init_state, step_fn = build_step(task, method, config)

    @jax.jit
    def train_step(state, batch):
        return step_fn(state, batch, jax.random.fold_in(train_key, state.step))

    return init_state(init_key), train_step


# --------------------------------------------------------------------------- fit


def fit(
    task: Task,
    train: Dataset,
    val: Dataset,
    test: Dataset | None,
    method: Method | str,
    config: TrainConfig,
) -> FitResult:
    """Train ``task`` with ``method`` (a :class:`Method` or its name); see the module doc."""
    t_start = time.perf_counter()
    method = get_method(method) if isinstance(method, str) else method
    config = with_selection(config, method)
    n_train = check_split("train", train)
    check_split("val", val)
    if test is not None:
        check_split("test", test)
    if n_train < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training examples")

    # Devices: data parallel over all local devices through jax.sharding.
    devices = jax.local_devices() if config.data_parallel else jax.local_devices()[:1]
    if config.batch_size % len(devices) or config.eval_batch_size % len(devices):
        raise ValueError(
            f"batch_size {config.batch_size} and eval_batch_size {config.eval_batch_size} must be divisible "
            f"by the number of devices ({len(devices)})"
        )
    batch_sharding, replicated = data_shardings(devices)

    # Model, optimizers, state, and the jitted primal–dual step.
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state, train_step = make_trainer(task, method, config, init_key, train_key)

    # The training split is staged on the devices once; each step gathers its batch there.
    train_on_device = jax.device_put({k: np.asarray(v) for k, v in train.items()}, replicated)

    @jax.jit
    def indexed_step(state, data, idx):
        batch = jax.tree.map(lambda a: a[idx], data)
        if len(devices) > 1:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return train_step(state, batch)

    evaluate = make_evaluator(task, config.eval_batch_size, batch_sharding if len(devices) > 1 else None)
    # Vanilla has no branches: its "full" model is the projection itself.
    project_eval = {"projection": True, "full": not method.has_branches}

    # Output files and resume.
    out_dir = Path(config.out_dir) if config.out_dir else None
    ckpt_path = log_path = None
    start_epoch, history = 0, []
    best = {"score": None, "epoch": -1, "variables": state.variables(), "val": {}}
    fingerprint = run_fingerprint(config, method, n_train)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path, log_path = out_dir / "checkpoint.msgpack", out_dir / "log.jsonl"
        if config.resume and ckpt_path.exists():
            state, best, start_epoch, history = restore_checkpoint(ckpt_path, state, best, fingerprint)
            log_path.write_text("".join(log_line(r) for r in history))
        elif log_path.exists():
            log_path.unlink()
    state = jax.device_put(state, replicated)

    steps_per_epoch = n_train // config.batch_size
    sign = 1.0 if config.select_mode == "min" else -1.0
    epochs = range(start_epoch, config.epochs)
    bar = _progress(epochs, config.progress, method.name)
    for epoch in bar:
        t0 = time.perf_counter()
        if method.gamma_schedule == "triangle":
            value = triangle_schedule(epoch, config.epochs)
            state = state.replace(gamma=jax.tree.map(lambda g: jnp.full_like(g, value), state.gamma))
        order = np.random.default_rng((config.seed, epoch)).permutation(n_train)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size].astype(np.int32)
            state, metrics = indexed_step(state, train_on_device, idx)
            losses.append((metrics["loss"], metrics["lagrangian"]))
        bad = int(state.first_bad_step)
        if bad >= 0:
            raise NonFiniteError(non_finite_step_message(bad, epoch, method.name, history, ckpt_path))
        loss_arr = np.asarray(jax.device_get(losses), np.float64)
        record = {
            "epoch": epoch,
            "train_loss": float(loss_arr[:, 0].mean()),
            "train_lagrangian": float(loss_arr[:, 1].mean()),
            "gamma": _scalars(state.gamma),
            "multiplier": _scalars(state.multipliers),
            "slack": _scalars(state.slacks),
        }
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            variables = state.variables()
            val_scores = {name: evaluate(variables, val, p) for name, p in project_eval.items()}
            record["val"] = val_scores
            metric_name = selection_metric(config.select_metric, val_scores[config.select_on])
            score = sign * val_scores[config.select_on][metric_name]
            # a non-finite validation score never becomes (or stays) the selected epoch
            if np.isfinite(score) and (best["score"] is None or score < best["score"]):
                best = {"score": score, "epoch": epoch, "variables": jax.device_get(variables), "val": val_scores}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['train_loss']:.3g}", val=f"{val_scores['projection'][metric_name]:.3g}")
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if out_dir is not None:
            with open(log_path, "a") as fh:
                fh.write(log_line(record))
            save_checkpoint(ckpt_path, state, best, epoch, history, fingerprint)

    if best["score"] is None and history:
        raise NonFiniteError(never_finite_message(method.name, config.select_on))
    test_scores = {}
    if test is not None:
        test_scores = {name: evaluate(best["variables"], test, p) for name, p in project_eval.items()}
    return FitResult(
        best_variables=best["variables"],
        best_epoch=best["epoch"],
        val=best["val"],
        test=test_scores,
        history=history,
        state=state,
        seconds=time.perf_counter() - t_start,
    )


def non_finite_step_message(step: int, epoch: int, method_name: str, history: list, checkpoint: Path | None,
                            seed: int | None = None) -> str:
    """Why a run stopped at its first non-finite step, naming its last good checkpoint (if
    ``checkpoint`` is given and ``history`` holds a finished epoch)."""
    who = f"method {method_name!r}" + ("" if seed is None else f", seed {seed}")
    where = ""
    if checkpoint is not None and history:
        where = f"; the last good checkpoint (epoch {history[-1]['epoch']}) is kept at {checkpoint}"
    return (f"non-finite loss, gradient or updated state at step {step} (epoch {epoch}) with {who}: "
            f"training stopped{where}. Lower the learning rate or check the data.")


def never_finite_message(method_name: str, select_on: str, seed: int | None = None) -> str:
    """Why a run has no selectable epoch: its validation metric was never finite."""
    who = f"method {method_name!r}" + ("" if seed is None else f", seed {seed}")
    return (f"{who}: the validation {select_on} metric was never finite, so no epoch can be selected; the model "
            "produces NaN/inf on the validation split")


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def selection_metric(select_metric: str | None, scores: Mapping[str, float]) -> str:
    """The metric model selection reads: ``select_metric``, or the task's only metric.

    A task with several metrics must name one (jit returns metric dicts with sorted keys, so
    "the first" would be the alphabetically first, not the task's first).
    """
    if select_metric is None:
        if len(scores) != 1:
            raise ValueError(f"the task reports several metrics {sorted(scores)}: set TrainConfig.select_metric")
        return next(iter(scores))
    if select_metric not in scores:
        raise ValueError(f"select_metric {select_metric!r} not among {sorted(scores)}")
    return select_metric


# Settings that shape a run's trajectory: a checkpoint resumes only under the same values.
_FINGERPRINT_FIELDS = (
    "epochs", "batch_size", "learning_rate", "dual_learning_rate", "slack_learning_rate", "dual_optimizer",
    "dual_proportional", "weight_decay", "grad_clip", "eval_every", "select_on", "select_metric", "select_mode",
    "slack_init", "seed",
)


def run_fingerprint(config: TrainConfig, method: Method, n_train: int) -> dict:
    """What a checkpoint records of its run's settings (JSON-able): the trajectory-shaping
    :class:`TrainConfig` fields, the method, the training-set size, whether a custom
    learning-rate schedule or optimizer was given (callables cannot be compared), and the
    study's ``run_settings``. Not recorded: ``eval_batch_size`` and the device count, which
    change the evaluation sums only by float round-off."""
    out = {name: getattr(config, name) for name in _FINGERPRINT_FIELDS}
    out.update(method=repr(method), gamma_schedule=method.gamma_schedule, train_examples=int(n_train),
               lr_schedule=config.lr_schedule is not None, optimizer=config.optimizer is not None,
               run_settings=config.run_settings)

    def scalar(value):  # numpy scalars (e.g. a learning rate read from an array) as Python numbers
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

    try:  # as it will be read back from the checkpoint (tuples -> lists, numpy -> Python)
        return json.loads(json.dumps(out, sort_keys=True, default=scalar))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the run settings must be JSON-serialisable (TrainConfig.run_settings?): {err}") from err


def _cannot_resume(path: Path, reason: str) -> ValueError:
    """The error refusing to resume from ``path``, with the ways to start afresh."""
    return ValueError(f"cannot resume from {path}: {reason}; use a new output directory, delete the checkpoint, "
                      "or pass resume=False")


def _check_fingerprint(path: Path, saved: dict | None, current: dict, trained: int) -> None:
    """Refuse to continue a checkpoint written under other settings.

    ``trained`` is the number of epochs the checkpoint holds. Only ``epochs`` may change (a run
    extended, or an interrupted run given a shorter total) and only when the result equals an
    uninterrupted run of the new length: nothing may depend on the total (no γ schedule, no
    learning-rate schedule, no custom optimizer, which may hold one), the checkpoint may not
    have trained past the new total, and both totals must agree on whether the checkpoint's
    last epoch is evaluated (a finished run whose ``epochs`` is not a multiple of
    ``eval_every`` evaluated its last epoch off that schedule, and that epoch may be selected;
    an interrupted run cut to end exactly where it stopped would need an evaluation it never made).
    """
    if saved is None:
        raise _cannot_resume(path, "it records no run settings (written by an older version)")
    if trained > current["epochs"]:
        raise _cannot_resume(path, f"it has trained {trained} epochs, more than this run's epochs={current['epochs']}")
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    schedule_free = not (current["lr_schedule"] or current["optimizer"] or current["gamma_schedule"])
    if differ == ["epochs"] and schedule_free:
        # Epochs before the checkpoint's last one are evaluated alike under both totals; the last
        # one (trained − 1) is evaluated on the eval_every schedule or as a run's final epoch.
        every = current["eval_every"]
        evaluated = trained % every == 0 or trained == saved["epochs"]
        would_be = trained % every == 0 or trained == current["epochs"]
        if evaluated and not would_be:
            raise _cannot_resume(path, f"its run ended at epoch {trained - 1} with an evaluation outside the "
                                       f"eval_every={every} schedule, which an uninterrupted {current['epochs']}-epoch "
                                       "run would not make (and which may be the selected epoch)")
        if would_be and not evaluated:
            raise _cannot_resume(path, f"it stopped after epoch {trained - 1} without evaluating it, and "
                                       f"epochs={current['epochs']} makes that the final epoch, which an "
                                       "uninterrupted run evaluates")
        return
    if differ:
        what = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in differ)
        why = (" (a learning-rate or γ schedule, or a custom optimizer, depends on the total epochs, so a "
               "longer run is not this one continued)" if differ == ["epochs"] else "")
        raise _cannot_resume(path, f"it was written under other settings ({what}){why}; rerun with the "
                                   "checkpoint's settings to continue it")


def save_checkpoint(path: Path, state: TrainState, best: dict, epoch: int, history: list, fingerprint: dict) -> None:
    """Write one run's checkpoint atomically: its state after ``epoch``, the selected epoch
    (``best``: ``{"score", "epoch", "variables", "val"}``), the per-epoch records and the run's
    settings (:func:`run_fingerprint`). :func:`restore_checkpoint` reads it back."""
    payload = {
        "state": flax.serialization.to_state_dict(jax.device_get(state)),
        "best_variables": flax.serialization.to_state_dict(best["variables"]),
        "best_score": np.float64(np.nan if best["score"] is None else best["score"]),
        "best_epoch": best["epoch"],
        "best_val": json.dumps(best["val"]),
        "epoch": epoch,
        "history": json.dumps(history),
        "settings": json.dumps(fingerprint),
    }
    _write_atomic(path, flax.serialization.msgpack_serialize(payload))


def restore_checkpoint(path: Path, state: TrainState, best: dict, fingerprint: dict):
    """``(state, best, next_epoch, history)`` from a checkpoint of :func:`save_checkpoint`, with
    ``state`` and ``best`` (a fresh run's) as the templates of the trees; refused (ValueError
    naming the reason) if it was written under settings other than ``fingerprint`` allows
    (:func:`_check_fingerprint`), is unreadable, or belongs to another model or method."""
    try:
        raw = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise ValueError(f"cannot resume from {path}: not a readable checkpoint ({err})") from err
    _check_fingerprint(path, json.loads(raw["settings"]) if "settings" in raw else None, fingerprint,
                       int(raw["epoch"]) + 1)
    try:
        state = flax.serialization.from_state_dict(state, raw["state"])
        best_vars = flax.serialization.from_state_dict(best["variables"], raw["best_variables"])
    except Exception as err:  # a checkpoint of another model or a corrupt file
        raise ValueError(f"cannot resume from {path}: it does not match this model/method ({err})") from err
    score = float(raw["best_score"])
    best = {
        "score": None if np.isnan(score) else score,
        "epoch": int(raw["best_epoch"]),
        "variables": best_vars,
        "val": json.loads(raw["best_val"]),
    }
    return state, best, int(raw["epoch"]) + 1, json.loads(raw["history"])
