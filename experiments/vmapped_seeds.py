"""Train every seed of one method in ONE compiled program: the engine's step, vmapped over seeds.

:func:`fit_seeds_vmapped` gives, for seeds s_1 … s_S, the numbers ``ace_jax.fit`` gives run by
run with ``TrainConfig(seed=s_k)`` (up to float round-off of batched vs. single matmuls):

- seed s: ``init_key, train_key = split(PRNGKey(s))``; variables = ``task.init(init_key, ·)``;
  step k uses ``fold_in(train_key, k)``; epoch e visits the training set in the order
  ``default_rng((s, e)).permutation(N)`` — exactly the engine's conventions;
- the train states of all seeds are stacked on a leading seed axis and one jitted
  ``vmap(step)`` advances all of them on their own batches ``(S, B, …)``;
- evaluation vmaps the per-example metric over the stacked variables (one program per
  ``project`` flag); model selection, γ schedules and the log records follow the engine.

With ``out_dirs`` (one folder per seed) every seed gets what ``fit`` writes: ``log.jsonl`` and,
after every epoch, ``checkpoint.msgpack`` in the engine's format with that seed's settings
(:func:`ace_jax.engine.run_fingerprint` of the config with ``seed = s``), so a seed's folder is
interchangeable with a ``fit`` run's: ``fit`` resumes it, and this function resumes folders
``fit`` wrote. With ``config.resume`` (the default) a rerun restores every seed that has a
checkpoint, under the engine's rules (a checkpoint written under other settings is refused with
them named), and starts the others afresh. Seeds that stand at different epochs (a run killed
between two seeds' checkpoints, a seed added later, one that diverged) are brought level first:
each pass trains the seeds furthest behind, the same vmapped step with the others held still,
so every seed follows its uninterrupted trajectory. A seed that diverged resumes from its last
good checkpoint and diverges again at the same step.

Devices (``jax.sharding``): with ``config.data_parallel`` (the default) the seed axis is split
over the local devices — the largest number of them that divides the seed count
(:func:`seed_devices`: 8 seeds on 8 GPUs, one each; 3 seeds on 2 devices stay on one) — where
``fit`` splits each batch instead. The program and the numbers are the same (up to round-off).

Differences from ``ace_jax.fit``: a seed that diverges stops alone (returned as
:class:`experiments.common.Diverged`) where ``fit`` raises. The
round-off of batched matmuls can grow in training: on a toy task with the penalty method and
the Adam dual the validation metric differed by ~1 % after one epoch (exactly equal with one
seed, and independent of which other seeds share the batch).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ace_jax import FitResult, Task, TrainConfig, get_method, named_leaves, triangle_schedule
from ace_jax.engine import (build_step, check_split, log_line, never_finite_message, non_finite_step_message,
                             padded_batches, restore_checkpoint, run_fingerprint, save_checkpoint, selection_metric,
                             weighted_metric_sums, with_selection)
from ace_jax.methods import Method
from experiments.common import Diverged


# Stacking and unstacking run on the host (numpy): no small XLA programs to compile per leaf.
def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *jax.device_get(list(trees)))


def _unstack(host_tree, index: int):
    return jax.tree.map(lambda x: x[index], host_tree)


def _scalars(host_tree) -> dict:
    return {k: float(v) for k, v in named_leaves(host_tree).items()}


CHECKPOINT, LOG = "checkpoint.msgpack", "log.jsonl"  # in each seed's folder


def seed_devices(num_seeds: int, data_parallel: bool = True) -> list:
    """The local devices the seed axis is split over: the largest number k of them that divides
    ``num_seeds`` (each device then trains num_seeds / k seeds), the first one alone without
    ``data_parallel``."""
    devices = jax.local_devices()
    if not data_parallel:
        return devices[:1]
    k = max(k for k in range(1, min(len(devices), num_seeds) + 1) if num_seeds % k == 0)
    return devices[:k]


def _restore_seeds(dirs: list[Path], states: list, best: list, fingerprints: list):
    """Every seed's checkpoint, where it has one: ``(states, best, histories, next_epochs)``,
    a seed without one keeping its fresh state (``states``, ``best``) at epoch 0."""
    states, best = list(states), list(best)
    histories: list[list] = [[] for _ in dirs]
    next_epochs = [0] * len(dirs)
    for s, d in enumerate(dirs):
        if (d / CHECKPOINT).exists():
            states[s], best[s], next_epochs[s], histories[s] = restore_checkpoint(
                d / CHECKPOINT, states[s], best[s], fingerprints[s])
    return states, best, histories, next_epochs


def _per_seed(mask: np.ndarray, x: jax.Array) -> jax.Array:
    """``mask`` (S,) shaped to broadcast against a stacked leaf ``x`` (S, ...)."""
    return jnp.asarray(mask).reshape((-1,) + (1,) * (jnp.ndim(x) - 1))


def make_seed_evaluator(task: Task, batch_size: int):
    """``evaluate(stacked_variables, data, project) -> [ {metric: mean} per seed ]``.

    Same padding and averaging as the engine's evaluator, with the metric vmapped over the
    leading seed axis of ``stacked_variables``.
    """
    metric = task.metric or (lambda v, ex, project: task.loss(v, ex, jax.random.PRNGKey(0), project))

    @partial(jax.jit, static_argnums=(3,))
    def batch_sums(stacked_variables, batch, weights, project):
        return jax.vmap(lambda variables: weighted_metric_sums(metric, variables, batch, weights, project))(
            stacked_variables)

    def evaluate(stacked_variables, data, project: bool) -> list[dict]:
        n = check_split("eval", data)
        totals: dict = {}
        for batch, weights in padded_batches(data, batch_size):
            for k, v in batch_sums(stacked_variables, batch, weights, project).items():
                totals[k] = totals.get(k, 0.0) + v
        totals = {k: np.asarray(jax.device_get(v)) for k, v in totals.items()}
        num_seeds = len(next(iter(totals.values())))
        return [{k: float(v[s]) / n for k, v in totals.items()} for s in range(num_seeds)]

    return evaluate


def fit_seeds_vmapped(
    task: Task,
    train: Mapping[str, np.ndarray],
    val: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray] | None,
    method: Method | str,
    config: TrainConfig,
    seeds: Sequence[int],
    out_dirs: Sequence[str | Path] | None = None,
) -> list[FitResult | Diverged]:
    """Train ``method`` for every seed at once; returns one :class:`FitResult` per seed, or a
    :class:`experiments.common.Diverged` for a seed that ``fit`` would have stopped with
    :class:`ace_jax.NonFiniteError` (a non-finite step, or no finite validation score): that
    seed stops (its log ends at its last good epoch) and the others train on.

    ``config.seed`` is ignored (the seeds come from ``seeds``); ``out_dirs`` (one per seed)
    receive ``log.jsonl`` and ``checkpoint.msgpack`` as from ``fit`` (module doc: resume and
    diverged seeds). ``FitResult.seconds`` is the wall
    time of the whole vmapped run (the same for every seed).
    """
    t_start = time.perf_counter()
    method = get_method(method) if isinstance(method, str) else method
    config = with_selection(config, method)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("fit_seeds_vmapped needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if out_dirs is not None and len(out_dirs) != len(seeds):
        raise ValueError(f"need one out_dir per seed: {len(out_dirs)} for {len(seeds)} seeds")
    n_train = check_split("train", train)
    check_split("val", val)
    if test is not None:
        check_split("test", test)
    if n_train < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training examples")

    init_state, step_fn = build_step(task, method, config)
    states, train_keys = [], []
    for seed in seeds:
        init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
        states.append(jax.device_get(init_state(init_key)))
        train_keys.append(train_key)
    best = [{"score": None, "epoch": -1, "variables": st.variables(), "val": {}} for st in states]
    histories: list[list] = [[] for _ in seeds]
    next_epochs = [0] * len(seeds)  # per seed: the epoch it trains next
    fingerprints = [run_fingerprint(dataclasses.replace(config, seed=s), method, n_train) for s in seeds]
    dirs = [Path(d) for d in out_dirs] if out_dirs is not None else None
    if dirs is not None:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        if config.resume:
            states, best, histories, next_epochs = _restore_seeds(dirs, states, best, fingerprints)
        for d, history in zip(dirs, histories):  # as fit: the restored records, or no log yet
            if history:
                (d / LOG).write_text("".join(log_line(r) for r in history))
            else:
                (d / LOG).unlink(missing_ok=True)
    devices = seed_devices(len(seeds), config.data_parallel)
    by_seed = NamedSharding(Mesh(np.array(devices), ("seed",)), PartitionSpec("seed"))  # leading axis split
    state, train_keys = jax.device_put(_stack(states), by_seed), jax.device_put(_stack(train_keys), by_seed)

    @jax.jit
    def train_step(stacked_state, stacked_batch, keys):
        one = lambda st, batch, key: step_fn(st, batch, jax.random.fold_in(key, st.step))  # noqa: E731
        return jax.vmap(one)(stacked_state, stacked_batch, keys)

    @jax.jit
    def held_step(stacked_state, stacked_batch, keys, active):
        """``train_step`` for the ``active`` seeds; the others keep their state (catching up)."""
        new, metrics = train_step(stacked_state, stacked_batch, keys)
        return jax.tree.map(lambda n, o: jnp.where(_per_seed(active, n), n, o), new, stacked_state), metrics

    evaluate = make_seed_evaluator(task, config.eval_batch_size)
    project_eval = {"projection": True, "full": not method.has_branches}

    num_seeds = len(seeds)
    failed: dict[int, str] = {}  # seed index -> why it stopped
    sign = 1.0 if config.select_mode == "min" else -1.0
    steps_per_epoch = n_train // config.batch_size
    bar = None
    if config.progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.epochs - min(next_epochs), desc=f"{method.name} ×{num_seeds} seeds", leave=False)
        except ImportError:
            pass
    while True:
        running = [s for s in range(num_seeds) if s not in failed and next_epochs[s] < config.epochs]
        if not running:
            break
        epoch = min(next_epochs[s] for s in running)  # the seeds furthest behind train; the rest wait
        active = np.array([s in running and next_epochs[s] == epoch for s in range(num_seeds)])
        # a diverged seed is frozen by its own first_bad_step; any other inactive seed is held
        held = not all(active[s] or s in failed for s in range(num_seeds))
        t0 = time.perf_counter()
        if method.gamma_schedule == "triangle":
            value = triangle_schedule(epoch, config.epochs)
            state = state.replace(gamma=jax.tree.map(
                lambda g: jnp.where(_per_seed(active, g), jnp.asarray(value, g.dtype), g), state.gamma))
        orders = [np.random.default_rng((seed, epoch)).permutation(n_train) for seed in seeds]
        losses = []
        for b in range(steps_per_epoch):
            idx = np.stack([order[b * config.batch_size : (b + 1) * config.batch_size] for order in orders])
            batch = jax.device_put({k: np.asarray(v)[idx] for k, v in train.items()}, by_seed)  # (S, B, ...)
            if held:
                state, metrics = held_step(state, batch, train_keys, active)
            else:
                state, metrics = train_step(state, batch, train_keys)
            losses.append((metrics["loss"], metrics["lagrangian"]))
        host_state = jax.device_get(state)
        bad = np.asarray(host_state.first_bad_step)
        for s in np.flatnonzero(active & (bad >= 0)):  # that seed stops here (its state is frozen); the others go on
            failed[int(s)] = non_finite_step_message(int(bad[s]), epoch, method.name, histories[s],
                                                     None if dirs is None else dirs[s] / CHECKPOINT, seed=seeds[s])
        trained = [s for s in range(num_seeds) if active[s] and s not in failed]
        loss_arr = np.asarray(jax.device_get(losses), np.float64)  # (steps, 2, S)
        evaluated = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        if evaluated and trained:
            stacked_variables = state.variables()
            val_scores = {name: evaluate(stacked_variables, val, p) for name, p in project_eval.items()}
            host_variables = host_state.variables()
        seconds = time.perf_counter() - t0
        duals = {"gamma": host_state.gamma, "multiplier": host_state.multipliers, "slack": host_state.slacks}
        for s in trained:  # as fit: no record for the epoch a seed failed in, nor after
            record = {
                "epoch": epoch,
                "train_loss": float(loss_arr[:, 0, s].mean()),
                "train_lagrangian": float(loss_arr[:, 1, s].mean()),
                **{key: _scalars(_unstack(tree, s)) for key, tree in duals.items()},
            }
            if evaluated:
                scores = {name: per_seed[s] for name, per_seed in val_scores.items()}
                record["val"] = scores
                metric_name = selection_metric(config.select_metric, scores[config.select_on])
                score = sign * scores[config.select_on][metric_name]
                if np.isfinite(score) and (best[s]["score"] is None or score < best[s]["score"]):
                    best[s] = {
                        "score": score,
                        "epoch": epoch,
                        "variables": _unstack(host_variables, s),
                        "val": scores,
                    }
            record["seconds"] = seconds
            histories[s].append(record)
            next_epochs[s] = epoch + 1
            if dirs is not None:
                with open(dirs[s] / LOG, "a") as fh:
                    fh.write(log_line(record))
                save_checkpoint(dirs[s] / CHECKPOINT, _unstack(host_state, s), best[s], epoch, histories[s],
                                fingerprints[s])
        if bar is not None:  # the epochs a pass trains only increase: one tick per pass
            bar.update(1)
    if bar is not None:
        bar.close()

    for s, b in enumerate(best):
        if s not in failed and b["score"] is None:
            failed[s] = never_finite_message(method.name, config.select_on, seed=seeds[s])
    final_states = jax.device_get(state)
    ok = [s for s in range(num_seeds) if s not in failed]
    test_scores = [{} for _ in seeds]
    if test is not None and ok:
        # one stacked program: a failed seed's slot holds a healthy seed's variables, its scores are dropped
        stacked_best = _stack([best[s if s in ok else ok[0]]["variables"] for s in range(num_seeds)])
        per_mode = {name: evaluate(stacked_best, test, p) for name, p in project_eval.items()}
        test_scores = [{name: per_mode[name][s] for name in per_mode} for s in range(num_seeds)]
    seconds = time.perf_counter() - t_start
    return [
        Diverged(seeds[s], failed[s]) if s in failed else FitResult(
            best_variables=best[s]["variables"],
            best_epoch=best[s]["epoch"],
            val=best[s]["val"],
            test=test_scores[s],
            history=histories[s],
            state=_unstack(final_states, s),
            seconds=seconds,
        )
        for s in range(num_seeds)
    ]
