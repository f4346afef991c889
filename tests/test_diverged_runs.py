"""A diverged seed: vmapped seeds stop it alone, studies record it (NaN summaries, exit status 1)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax as aj
from experiments import nbody
from experiments.common import Diverged, diverged_list, fit_seed, report_diverged, summarize
from experiments.vmapped_seeds import fit_seeds_vmapped, make_seed_evaluator
from toy_models import odd_task


def _first_weight(model, seed):
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    return float(model.init(init_key, np.zeros(2, np.float32))["params"]["Dense_0"]["kernel"][0, 0])


def _data(n=32):
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([[1.0], [-2.0]])).astype(np.float32)}


def test_vmapped_seeds_stop_a_diverged_seed_alone(tmp_path):
    task, model = odd_task(nan_if_first_weight_positive=True)
    signs = {s: _first_weight(model, s) > 0 for s in range(12)}
    good, bad = next(s for s, p in signs.items() if not p), next(s for s, p in signs.items() if p)
    data = _data()
    config = aj.TrainConfig(epochs=2, batch_size=8, eval_batch_size=8, progress=False, learning_rate=1e-2)
    dirs = [tmp_path / "good", tmp_path / "bad"]
    got_good, got_bad = fit_seeds_vmapped(task, data, data, data, "ace", config, [good, bad], out_dirs=dirs)
    assert isinstance(got_bad, Diverged) and got_bad.seed == bad and f"seed {bad}" in got_bad.error
    assert not (tmp_path / "bad" / "log.jsonl").exists()  # it failed in epoch 0: no record, as fit
    with pytest.raises(aj.NonFiniteError):
        aj.fit(task, data, data, data, "ace", aj.TrainConfig(**{**config.__dict__, "seed": bad}))
    ref = aj.fit(task, data, data, data, "ace", aj.TrainConfig(**{**config.__dict__, "seed": good}))
    assert got_good.best_epoch == ref.best_epoch
    np.testing.assert_allclose([r["train_loss"] for r in got_good.history], [r["train_loss"] for r in ref.history],
                               rtol=1e-5)
    np.testing.assert_allclose(got_good.test["projection"]["metric"], ref.test["projection"]["metric"], rtol=1e-5)
    assert len((tmp_path / "good" / "log.jsonl").read_text().splitlines()) == 2


def test_seed_evaluator_keeps_padding_out_of_the_sums():
    # the last batch [x4, pad, pad, pad] pads with copies of x4 at weight 0; an inf metric of x4
    # must give inf, as the engine's evaluator does, not 0·inf = NaN from the padding
    task = aj.Task(init=None, loss=None,
                   metric=lambda v, ex, p: jnp.where(ex["x"] > 0, jnp.inf, v["w"] * ex["x"]))
    data = {"x": np.array([-1.0, -2.0, -3.0, -1.0, 1.0], np.float32)}
    engine = aj.make_evaluator(task, 4)({"w": jnp.float32(1.0)}, data, True)
    seeds = make_seed_evaluator(task, 4)({"w": jnp.ones(2, jnp.float32)}, data, True)
    assert engine == {"metric": np.inf} and seeds == [{"metric": np.inf}] * 2


def test_fit_seed_records_a_divergence_and_the_study_summary_voids_the_mean(capsys):
    task, model = odd_task(nan_if_first_weight_positive=True)
    bad = next(s for s in range(12) if _first_weight(model, s) > 0)
    data = _data()
    config = aj.TrainConfig(epochs=1, batch_size=8, progress=False, seed=bad)
    run = fit_seed(lambda: aj.fit(task, data, data, None, "ace", config), bad)
    assert isinstance(run, Diverged) and "non-finite" in run.error
    assert f"seed {bad} diverged" in capsys.readouterr().out

    class Done:  # the FitResult fields method_summary reads
        test = {"projection": {"mse": 0.5}, "full": {"mse": 0.25}}
        best_epoch = 3
        history = [{"gamma": {"g": 0.1}, "multiplier": {"g": 1.0}, "slack": {}}]
        train_seconds = 7.5

    entry = nbody.method_summary([Done(), run], [0, bad])
    assert entry["test_mse_projection_per_seed"][0] == 0.5 and np.isnan(entry["test_mse_projection_per_seed"][1])
    assert np.isnan(entry["test_mse_projection"]["mean"]) and np.isnan(entry["test_mse_full"]["std"])
    assert entry["best_epoch"] == [3, None] and entry["final_gammas"] == [{"g": 0.1}, None]
    assert entry["train_s_per_seed"] == [7.5, None] and entry["train_s"] == 7.5  # the diverged seed is not counted
    assert entry["diverged"] == diverged_list([run]) == [{"seed": bad, "error": run.error}]
    results = {"config": {}, "methods": {"vanilla": {"diverged": []}, "ace": entry}}
    capsys.readouterr()
    assert report_diverged(results) == 1 and report_diverged({"methods": {"vanilla": {"diverged": []}}}) == 0
    assert capsys.readouterr().out == f"methods / ace, seed {bad}: DIVERGED ({run.error})\n"
    assert summarize([0.5, 0.25]) == {"mean": 0.375, "std": pytest.approx(0.1767767, rel=1e-6)}
    # the entry is written as strict JSON: NaN -> null
    assert json.loads(json.dumps(aj.engine.strict_json(entry), allow_nan=False))["test_mse_projection"]["mean"] is None


def test_vmapped_seed_without_a_finite_validation_score_is_diverged():
    # the metric is NaN for one seed's model only (training itself stays finite): as fit, that
    # seed cannot select an epoch; the other seed is unaffected
    task, model = odd_task(nan_if_first_weight_positive=True)
    signs = {s: _first_weight(model, s) > 0 for s in range(12)}
    good, bad = next(s for s, p in signs.items() if not p), next(s for s, p in signs.items() if p)
    finite_loss = lambda v, ex, rng, project: jnp.mean((model.apply(v, ex["x"], project=project) - ex["y"]) ** 2)  # noqa: E731
    task = aj.Task(init=task.init, loss=finite_loss,
                   metric=lambda v, ex, project: finite_loss(v, ex, None, project)
                   + jnp.where(v["params"]["Dense_0"]["kernel"][0, 0] > 0, jnp.nan, 0.0))
    data = _data()
    config = aj.TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, progress=False, learning_rate=1e-3)
    got_good, got_bad = fit_seeds_vmapped(task, data, data, data, "ace", config, [good, bad])
    assert isinstance(got_bad, Diverged) and "never finite" in got_bad.error
    assert not isinstance(got_good, Diverged) and np.isfinite(got_good.test["projection"]["metric"])


def test_log_lines_are_strict_json_with_null_for_nan(tmp_path):
    # a NaN validation metric is logged as null (Python's json would write the token NaN)
    task, model = odd_task(nan_if_first_weight_positive=True)
    finite_loss = lambda v, ex, rng, project: jnp.mean((model.apply(v, ex["x"], project=project) - ex["y"]) ** 2)  # noqa: E731
    task = aj.Task(init=task.init, loss=finite_loss,
                   metric=lambda v, ex, project: {"mse": finite_loss(v, ex, None, project), "nan": jnp.nan})
    data = _data()
    aj.fit(task, data, data, None, "ace", aj.TrainConfig(epochs=1, batch_size=8, progress=False,
                                                        select_metric="mse", out_dir=str(tmp_path)))

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0], parse_constant=refuse)
    assert record["val"]["projection"]["nan"] is None and record["val"]["projection"]["mse"] > 0


def test_step_latches_after_a_bad_step_and_reports_it():
    # after one non-finite step every later step is a no-op, and metrics["applied"] says so
    import optax

    lagrangian = aj.make_lagrangian(lambda v, ex, rng: (v["params"]["w"] - ex["y"]) ** 2, None)
    tx = optax.sgd(0.1)
    state = aj.init_train_state({"params": {"w": jnp.asarray(1.0)}}, tx, None, None, None, True)
    step = jax.jit(aj.make_train_step(lagrangian, tx, None, None, None, True))
    key = jax.random.PRNGKey(0)
    state, m = step(state, {"y": jnp.array([jnp.nan])}, key)
    assert not bool(m["finite"]) and not bool(m["applied"]) and int(state.first_bad_step) == 0
    for _ in range(2):
        state, m = step(state, {"y": jnp.array([0.0])}, key)
        assert bool(m["finite"]) and not bool(m["applied"])
    assert float(state.params["w"]) == 1.0
