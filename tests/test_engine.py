"""The training engine: learning, resume == uninterrupted, NaN guard, clear errors, sharding."""

import json
import textwrap
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ace_jax as aj
from cpu_devices import run_on_cpu_devices
from toy_models import OddModel


def _data(n=256, seed=0, bias=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([[1.0], [-2.0]]) + bias).astype(np.float32)}


def _task(model=OddModel()):
    x0 = np.zeros(2, np.float32)
    return aj.Task(
        init=lambda k, has_branches: model.init(k, x0, project=not has_branches),
        loss=lambda v, ex, r, p: jnp.mean((model.apply(v, ex["x"], project=p) - ex["y"]) ** 2),
        transform=lambda r, ex: {"x": -ex["x"], "y": -ex["y"]},
    )


def _config(**kw):
    base = dict(epochs=4, batch_size=32, learning_rate=2e-2, dual_learning_rate=2e-2, progress=False)
    base.update(kw)
    return aj.TrainConfig(**base)


def test_resilient_learns_the_symmetry_breaking_bias():
    data = _data()
    res = aj.fit(_task(), data, data, data, "ace-resilient", _config(epochs=25, select_on="full"))
    van = aj.fit(_task(), data, data, data, "vanilla", _config(epochs=25))
    # The odd (equivariant) model cannot represent the +0.5 bias: floor 0.25.
    assert van.test["projection"]["metric"] > 0.2
    assert res.test["full"]["metric"] < 0.1
    assert abs(res.history[-1]["gamma"]["breaking/gamma"]) > 0.05
    assert res.history[-1]["slack"]["breaking/gamma"] >= 0.0
    assert res.history[-1]["multiplier"]["breaking/gamma"] >= 0.0


class BiasBranchModel(nn.Module):
    """Odd linear part plus γ times a fixed unit bias (the loss is curved in γ)."""

    @nn.compact
    def __call__(self, x, project=False):
        y = nn.Dense(1, use_bias=False)(x)
        if not project:
            y = y + aj.SymmetryBreaking(_UnitBias(), name="breaking")(x)
        return y


class _UnitBias(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.ones((1,), x.dtype)


def test_equality_drives_gamma_to_zero_on_symmetric_data():
    data = _data(bias=0.0)  # symmetric data: nothing to gain from breaking
    res = aj.fit(_task(BiasBranchModel()), data, data, data, "ace", _config(epochs=30))
    gammas = [r["gamma"]["breaking/gamma"] for r in res.history]
    assert abs(gammas[-1]) < 0.05 * abs(gammas[0])
    assert res.test["projection"]["metric"] < 2e-2  # vs 5.0 for an untrained model


@pytest.mark.parametrize("dual", [dict(), dict(dual_optimizer="adam"), dict(dual_proportional=5.0)])
def test_resume_gives_the_uninterrupted_numbers(tmp_path, dual):
    """Also with dual transforms that carry state (Adam moments, the PI term's last violation)."""
    data = _data()
    full = aj.fit(_task(), data, data, data, "ace-resilient", _config(out_dir=str(tmp_path / "a"), **dual))
    part = aj.fit(_task(), data, data, data, "ace-resilient", _config(epochs=2, out_dir=str(tmp_path / "b"), **dual))
    resumed = aj.fit(_task(), data, data, data, "ace-resilient", _config(out_dir=str(tmp_path / "b"), **dual))
    # the training time counts both calls' epochs: the two restored records and the two trained now
    assert resumed.history[:2] == part.history and len(resumed.history) == 4
    assert resumed.train_seconds == pytest.approx(part.train_seconds + sum(r["seconds"] for r in resumed.history[2:]))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.test == full.test
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2, 3]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    data = _data(64)
    out = str(tmp_path / "run")
    aj.fit(_task(), data, data, data, "ace", _config(epochs=1, out_dir=out))
    for changed, name in ((dict(seed=1), "seed"), (dict(learning_rate=1e-2), "learning_rate"),
                          (dict(batch_size=16), "batch_size"), (dict(run_settings={"field": 0.3}), "run_settings")):
        with pytest.raises(ValueError, match=f"other settings .*{name}: checkpoint"):
            aj.fit(_task(), data, data, data, "ace", _config(epochs=2, out_dir=out, **changed))
    with pytest.raises(ValueError, match="train_examples"):
        aj.fit(_task(), _data(96), data, data, "ace", _config(epochs=2, out_dir=out))
    # extending a schedule-free run is allowed (test above); a γ schedule depends on the total
    scheduled = aj.get_method("scheduled", regularizer_weight=0.0)
    aj.fit(_task(), data, data, data, scheduled, _config(epochs=2, out_dir=str(tmp_path / "sch")))
    with pytest.raises(ValueError, match="epochs: checkpoint 2, this run 4"):
        aj.fit(_task(), data, data, data, scheduled, _config(epochs=4, out_dir=str(tmp_path / "sch")))
    # numpy scalars and tuples in the settings survive the round trip through the checkpoint
    settings = {"field": np.float32(0.5), "sizes": (3, np.int64(4))}
    aj.fit(_task(), data, data, data, "ace", _config(epochs=1, out_dir=str(tmp_path / "np"), run_settings=settings))
    again = aj.fit(_task(), data, data, data, "ace", _config(epochs=2, out_dir=str(tmp_path / "np"), run_settings=settings))
    assert [r["epoch"] for r in again.history] == [0, 1]
    with pytest.raises(ValueError, match="JSON-serialisable"):
        aj.fit(_task(), data, data, data, "ace", _config(epochs=1, run_settings={"f": object()}))
    # resume=False starts afresh in the same directory
    fresh = aj.fit(_task(), data, data, data, "ace", _config(epochs=1, seed=1, out_dir=out, resume=False))
    assert [r["epoch"] for r in fresh.history] == [0]


def test_resume_with_another_epoch_count_only_where_it_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = _data(64)
    # a finished 4-epoch run is not a 2-epoch run: its history and selection reach past epoch 1
    aj.fit(_task(), data, data, data, "ace", _config(epochs=4, out_dir=str(tmp_path / "long")))
    with pytest.raises(ValueError, match="trained 4 epochs, more than this run's epochs=2"):
        aj.fit(_task(), data, data, data, "ace", _config(epochs=2, out_dir=str(tmp_path / "long")))
    # 3 epochs with eval_every=2 evaluated epoch 2 off schedule; a 5-epoch run would not
    aj.fit(_task(), data, data, data, "ace", _config(epochs=3, eval_every=2, out_dir=str(tmp_path / "odd")))
    with pytest.raises(ValueError, match="outside the eval_every=2 schedule"):
        aj.fit(_task(), data, data, data, "ace", _config(epochs=5, eval_every=2, out_dir=str(tmp_path / "odd")))
    # a 10-epoch run stopped after 3 epochs (no evaluation yet), resumed as a 3-epoch run: that
    # run evaluates its final epoch 2, which the checkpoint never did
    save, calls = aj.engine.save_checkpoint, []

    def stop_after_three(*args):
        save(*args)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(aj.engine, "save_checkpoint", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        aj.fit(_task(), data, data, data, "ace", _config(epochs=10, eval_every=5, out_dir=str(tmp_path / "cut")))
    monkeypatch.setattr(aj.engine, "save_checkpoint", save)
    with pytest.raises(ValueError, match="without evaluating it"):
        aj.fit(_task(), data, data, data, "ace", _config(epochs=3, eval_every=5, out_dir=str(tmp_path / "cut")))
    resumed = aj.fit(_task(), data, data, data, "ace", _config(epochs=10, eval_every=5, out_dir=str(tmp_path / "cut")))
    assert [r["epoch"] for r in resumed.history] == list(range(10))
    # 2 epochs with eval_every=2 extend to the numbers of an uninterrupted 4-epoch run
    aj.fit(_task(), data, data, data, "ace", _config(epochs=2, eval_every=2, out_dir=str(tmp_path / "even")))
    extended = aj.fit(_task(), data, data, data, "ace", _config(epochs=4, eval_every=2, out_dir=str(tmp_path / "even")))
    whole = aj.fit(_task(), data, data, data, "ace", _config(epochs=4, eval_every=2))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(extended.history) == strip(whole.history)
    assert extended.best_epoch == whole.best_epoch and extended.test == whole.test


def test_train_config_refuses_nan_and_negative_settings():
    for name in ("dual_proportional", "weight_decay", "slack_init"):
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
                _config(**{name: bad})
    with pytest.raises(ValueError, match="grad_clip must be finite and > 0"):
        _config(grad_clip=float("nan"))


class GrowingWeight(nn.Module):
    """y = w x (+ branch); w starts at 0 and grows towards the target 5 under training. With
    ``nan_above`` the output turns NaN once w passes it (reached after a few epochs)."""

    nan_above: float = float("inf")

    @nn.compact
    def __call__(self, x, project=False):
        w = self.param("w", nn.initializers.zeros, ())
        y = w * x
        if not project:
            y = y + aj.SymmetryBreaking(aj.MLPBranch(1))(x)
        return jnp.where(w > self.nan_above, jnp.nan, y)


def _growing_task(nan_below):
    model = GrowingWeight()

    def metric(v, ex, p):  # NaN while w < nan_below: a model broken on the validation split
        err = jnp.mean((model.apply(v, ex["x"], project=p) - ex["y"]) ** 2)
        return jnp.where(v["params"]["w"] < nan_below, jnp.nan, err)

    return aj.Task(
        init=lambda k, hb: model.init(k, np.ones(1, np.float32), project=not hb),
        loss=lambda v, ex, r, p: jnp.mean((model.apply(v, ex["x"], project=p) - ex["y"]) ** 2),
        metric=metric,
    )


def test_a_nan_validation_score_is_never_selected():
    data = {"x": np.ones((64, 1), np.float32), "y": np.full((64, 1), 5.0, np.float32)}
    cfg = _config(epochs=6, batch_size=16, learning_rate=0.05)
    res = aj.fit(_growing_task(nan_below=0.5), data, data, data, "ace", cfg)
    vals = [r["val"]["projection"]["metric"] for r in res.history]
    assert np.isnan(vals[0]) and np.isfinite(vals[-1])  # the first evaluation is NaN
    assert res.best_epoch == int(np.nanargmin(vals)) > 0
    assert np.isfinite(res.test["projection"]["metric"])
    with pytest.raises(aj.NonFiniteError, match="never finite"):
        aj.fit(_growing_task(nan_below=1e9), data, data, data, "ace", cfg)


def test_several_metrics_need_select_metric():
    data = _data(64)
    base = _task()
    two = aj.Task(init=base.init, loss=base.loss,
                  metric=lambda v, ex, p: {"mse": base.loss(v, ex, None, p), "abs": jnp.sqrt(base.loss(v, ex, None, p))})
    with pytest.raises(ValueError, match="several metrics .*select_metric"):
        aj.fit(two, data, data, data, "ace", _config(epochs=1))
    res = aj.fit(two, data, data, data, "ace", _config(epochs=1, select_metric="abs"))
    assert set(res.val["projection"]) == {"mse", "abs"}


def test_weight_decay_acts_on_params_not_on_gamma():
    tx = aj.engine._primal_optimizer(_config(weight_decay=0.1))
    primal = {"params": {"w": jnp.ones(3)}, "gamma": {"g": jnp.ones(())}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, primal), tx.init(primal), primal)
    assert float(jnp.max(jnp.abs(updates["params"]["w"]))) > 0  # decay moves the weights
    assert float(updates["gamma"]["g"]) == 0.0  # γ moves by ∇_γ L alone


def test_same_seed_same_numbers_and_other_seed_differs():
    data = _data()
    a = aj.fit(_task(), data, data, data, "ace", _config(epochs=2))
    b = aj.fit(_task(), data, data, data, "ace", _config(epochs=2))
    c = aj.fit(_task(), data, data, data, "ace", _config(epochs=2, seed=1))
    assert a.test == b.test and a.test != c.test


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = {"x": np.ones((64, 1), np.float32), "y": np.full((64, 1), 5.0, np.float32)}
    model = GrowingWeight(nan_above=1.0)  # the loss turns NaN after a few epochs
    task = aj.Task(
        init=lambda k, hb: model.init(k, np.ones(1, np.float32), project=not hb),
        loss=lambda v, ex, r, p: jnp.mean((model.apply(v, ex["x"], project=p) - ex["y"]) ** 2),
    )
    cfg = _config(epochs=50, batch_size=16, learning_rate=0.05, out_dir=str(tmp_path))
    with pytest.raises(aj.NonFiniteError, match="non-finite .* step .* last good checkpoint"):
        aj.fit(task, data, data, None, "ace", cfg)
    raw = flax.serialization.msgpack_restore((tmp_path / "checkpoint.msgpack").read_bytes())
    w = float(raw["state"]["params"]["w"])
    assert np.isfinite(w) and w <= 1.0
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert raw["epoch"] == log[-1]["epoch"] and 0 < len(log) < 50


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_overflowing_update_stops_the_run_although_the_gradient_is_finite(tmp_path, optimizer):
    # loss ~ 1e20 (x ~ 1e10): the gradient is finite in float32, but SGD's step (lr 1e20) and Adam's
    # second moment (g² ~ 1e40) overflow; such a step must stop the run, not be checkpointed
    # (SGD) or freeze the weight silently with ν = inf (Adam)
    data = {"x": np.full((64, 2), 1e10, np.float32), "y": np.zeros((64, 1), np.float32)}
    tx = optax.sgd(1e20) if optimizer == "sgd" else optax.adam(1e-3)
    cfg = _config(epochs=3, optimizer=tx, out_dir=str(tmp_path))
    with pytest.raises(aj.NonFiniteError, match="updated state at step 0 "):
        aj.fit(_task(), data, data, None, "vanilla", cfg)
    assert not (tmp_path / "checkpoint.msgpack").exists()  # no epoch finished cleanly


def test_bad_settings_raise_clear_errors():
    data = _data(64)
    with pytest.raises(ValueError, match="learning_rate"):
        _config(learning_rate=-1e-3)
    with pytest.raises(ValueError, match="dual_learning_rate"):
        _config(dual_learning_rate=0.0)
    with pytest.raises(ValueError, match="unknown method 'aec'"):
        aj.fit(_task(), data, data, data, "aec", _config())
    with pytest.raises(ValueError, match="dual_optimizer"):
        _config(dual_optimizer="sgd")
    for name in ("learning_rate", "dual_learning_rate", "slack_learning_rate"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            _config(**{name: float("inf")})
    # a custom optimizer replaces the default Adam: settings only that Adam reads are refused, not ignored
    for name, value in (("weight_decay", 1e-4), ("grad_clip", 1.0), ("lr_schedule", lambda step: 1e-3)):
        with pytest.raises(ValueError, match=f"{name} would be ignored"):
            _config(optimizer=optax.sgd(0.1), **{name: value})
    with pytest.raises(ValueError, match="exceeds"):
        aj.fit(_task(), data, data, data, "ace", _config(batch_size=128 * 4))
    bad = {"x": data["x"], "y": data["y"][:10]}
    with pytest.raises(ValueError, match="leading example axis"):
        aj.fit(_task(), bad, data, data, "ace", _config())
    with pytest.raises(ValueError, match="transform"):
        aj.fit(aj.Task(init=_task().init, loss=_task().loss), data, data, data, "penalty", _config())


def test_vanilla_has_no_gamma_and_penalty_and_augmentation_run():
    data = _data(64)
    van = aj.fit(_task(), data, data, data, "vanilla", _config(epochs=1))
    assert van.history[0]["gamma"] == {} and van.test["projection"] == van.test["full"]
    for method in ("unconstrained", "penalty", "ace-inequality"):
        res = aj.fit(_task(), data, data, data, method, _config(epochs=1))
        assert np.isfinite(res.test["full"]["metric"])


def test_data_parallel_over_two_cpu_devices_matches_one_device(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).parent)!r}); sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import jax, numpy as np
        import ace_jax as aj
        from test_engine import _task, _data, _config
        assert jax.local_device_count() == 2, jax.devices()
        data = _data()
        out = {{}}
        for dp in (True, False):
            r = aj.fit(_task(), data, data, data, "ace-resilient", _config(data_parallel=dp))
            out[str(dp)] = [r.test["full"]["metric"], r.history[-1]["gamma"]["breaking/gamma"]]
        print(json.dumps(out))
        """
    )
    out = run_on_cpu_devices(script)
    np.testing.assert_allclose(out["True"], out["False"], rtol=1e-4, atol=1e-6)


def test_fit_refuses_invalid_example_weights():
    data = _data(64)
    for bad in (np.full(64, -1.0), np.zeros(64), np.ones((64, 1)), np.r_[np.ones(63), np.nan]):
        with pytest.raises(ValueError, match="'weight' must be one finite value >= 0 per example"):
            aj.fit(_task(), {**data, "weight": bad.astype(np.float32)}, data, data, "ace", _config(epochs=1))


def test_methods_refuse_contradictory_settings_and_unused_options():
    with pytest.raises(ValueError, match="needs γ learned"):
        aj.Method("x", formulation=aj.Equality(), learn_gamma=False)
    with pytest.raises(ValueError, match="needs learn_gamma=False"):
        aj.Method("x", gamma_schedule="triangle")
    with pytest.raises(ValueError, match="no γ to learn"):
        aj.Method("x", has_branches=False)
    with pytest.raises(ValueError, match="penalty_weight must be finite and >= 0"):
        aj.get_method("penalty", penalty_weight=float("nan"))
    with pytest.raises(ValueError, match="does not use 'alpha'"):
        aj.get_method("ace", alpha=2.0)
    with pytest.raises(ValueError, match="unknown get_method option"):
        aj.get_method("ace-resilient", alhpa=2.0)
    assert aj.get_method("ace-resilient", alpha=2.0).formulation.alpha == 2.0
    assert aj.get_method("scheduled").regularizer_weight == 0.01


def test_triangle_schedule_rises_to_one_and_returns_to_zero():
    assert [aj.triangle_schedule(e, 4) for e in range(4)] == [0.0, 0.5, 1.0, 0.5]
    for outside in (-3, 4):
        with pytest.raises(ValueError, match=r"epoch must be in \[0, 4\)"):
            aj.triangle_schedule(outside, 4)


def test_method_losses_follow_their_definitions():
    """Hand-derived: loss = y (+100 when the projection is used), transform y ↦ 10 y + 1."""
    task = aj.Task(
        init=lambda k, has: {},
        loss=lambda v, ex, r, project: ex["y"] + 100.0 * project,
        transform=lambda r, ex: {"y": 10.0 * ex["y"] + 1.0},
    )
    example, key = {"y": jnp.asarray(2.0)}, jax.random.PRNGKey(0)
    expected = {
        "vanilla": 102.0,  # the projection, no branches
        "ace": 2.0,
        "unconstrained": 21.0,  # ℓ(g·x)
        "penalty": 2.0 + 21.0,  # ℓ(x) + β ℓ(g·x), β = 1
    }
    for name, value in expected.items():
        got = aj.engine.method_loss(task, aj.get_method(name))({}, example, key)
        assert float(got) == pytest.approx(value), name
    half = aj.engine.method_loss(task, aj.get_method("penalty", penalty_weight=0.5))({}, example, key)
    assert float(half) == pytest.approx(2.0 + 0.5 * 21.0)


def test_deployed_model_of_every_method():
    deployed = {name: aj.get_method(name).deployed for name in aj.METHOD_NAMES}
    assert deployed == {
        "vanilla": "projection", "ace": "projection", "scheduled": "projection",
        "ace-resilient": "full", "ace-inequality": "full", "unconstrained": "full", "penalty": "full",
    }


def test_scheduled_sets_gamma_by_the_triangle_and_adds_the_weighted_regularizer():
    data = _data(64)
    task = _task()
    constant = aj.Task(init=task.init, loss=task.loss, transform=task.transform,
                       regularizer=lambda v, batch, rng: jnp.asarray(3.0))
    res = aj.fit(constant, data, data, data, aj.get_method("scheduled", regularizer_weight=0.5), _config(epochs=4))
    assert [r["gamma"]["breaking/gamma"] for r in res.history] == [0.0, 0.5, 1.0, 0.5]
    for r in res.history:  # L = loss + 0.5 · 3
        assert r["train_lagrangian"] - r["train_loss"] == pytest.approx(1.5, abs=1e-5)


def test_default_selection_reads_the_model_the_method_deploys():
    # ace-resilient deploys the full model, ace the projection. A metric that ranks the epochs in
    # opposite orders for the two models (−MSE for the projection) makes reading the wrong one show.
    import dataclasses

    base = _task()
    mse = lambda v, ex, project: base.loss(v, ex, None, project)  # noqa: E731
    task = dataclasses.replace(base, metric=lambda v, ex, project: -mse(v, ex, project) if project else mse(v, ex, project))
    data = _data()
    for name in ("ace-resilient", "ace"):
        res = aj.fit(task, data, data, None, name, _config(epochs=5))
        on = aj.get_method(name).deployed
        scores = [r["val"][on]["metric"] for r in res.history]
        other = [r["val"]["full" if on == "projection" else "projection"]["metric"] for r in res.history]
        assert np.argmin(scores) != np.argmin(other)
        assert res.best_epoch == int(np.argmin(scores)), name
    explicit = aj.fit(task, data, data, None, "ace-resilient", _config(epochs=5, select_on="projection"))
    assert explicit.best_epoch == int(np.argmin([r["val"]["projection"]["metric"] for r in explicit.history]))


def test_a_branch_method_on_a_model_without_gamma_is_a_clear_error():
    # a task.init that ignores has_branches builds no γ: every method with branches would silently
    # train the vanilla model, so each is refused with the reason
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, project=False):
            return nn.Dense(1, use_bias=False)(x)

    model = Plain()
    base = _task()
    task = aj.Task(init=lambda k, has_branches: model.init(k, np.zeros(2, np.float32)),
                   loss=lambda v, ex, r, p: jnp.mean((model.apply(v, ex["x"]) - ex["y"]) ** 2),
                   transform=base.transform, regularizer=lambda v, b, r: jnp.zeros(()))
    data = _data(64)
    for name, what in (("ace", "constrains"), ("ace-resilient", "constrains"), ("scheduled", "schedules"),
                       ("unconstrained", "trains"), ("penalty", "trains")):
        with pytest.raises(ValueError, match=f"'{name}' {what} γ but the model has no 'gamma'"):
            aj.fit(task, data, data, None, name, _config(epochs=1))
    assert aj.fit(task, data, data, None, "vanilla", _config(epochs=1)).best_epoch == 0


def _one_step(method, **config):
    """(state before, state after) of one step of the engine's own trainer on the odd toy task."""
    data = _data(32)
    state, step = aj.make_trainer(_task(), method, _config(**config), jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    new, metrics = step(state, {"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"])})
    assert bool(metrics["applied"])
    return state, new


def _only(tree):
    (leaf,) = jax.tree.leaves(tree)
    return float(leaf)


def test_the_configs_dual_and_slack_rates_and_the_multiplier_sign_reach_the_step():
    # γ starts at 1, λ at 0; every dual/slack update reads the state before the step.
    # ace: λ₁ = 0 + η_λ·γ₀ = 0.5 (not the primal rate 1e-3).
    before, after = _one_step("ace", learning_rate=1e-3, dual_learning_rate=0.5)
    assert _only(before.gamma) == 1.0 and _only(after.multipliers) == pytest.approx(0.5)
    # Adam on the dual: its first step is ≈ η_λ·sign(γ₀)
    _, after = _one_step("ace", learning_rate=1e-3, dual_learning_rate=0.5, dual_optimizer="adam")
    assert _only(after.multipliers) == pytest.approx(0.5, rel=1e-3)
    # ace-resilient (α = 1): u₁ = u₀ − η_u (α u₀ − λ₀) = 1 − 0.3 = 0.7; λ₁ = [0 + 0.1 (|γ₀| − u₀)]₊ = 0
    _, after = _one_step("ace-resilient", dual_learning_rate=0.1, slack_learning_rate=0.3, slack_init=1.0)
    assert _only(after.slacks) == pytest.approx(0.7) and _only(after.multipliers) == 0.0
    # ace-inequality, ε = 2: c = |γ₀| − ε = −1, so λ₁ = [0 − 0.1]₊ = 0, never negative
    _, after = _one_step(aj.get_method("ace-inequality", epsilon=2.0), dual_learning_rate=0.1)
    assert _only(after.multipliers) == 0.0
    # ε = 0.5: c = 0.5 > 0, λ₁ = 0.05
    _, after = _one_step(aj.get_method("ace-inequality", epsilon=0.5), dual_learning_rate=0.1)
    assert _only(after.multipliers) == pytest.approx(0.05)


def test_the_test_split_is_evaluated_on_the_selected_epochs_variables():
    # the test split equals the validation split: the reported test scores must be the selected
    # epoch's validation scores exactly (not the final state's, when the best epoch is earlier)
    import dataclasses

    base = _task()
    mse = lambda v, ex, project: base.loss(v, ex, None, project)  # noqa: E731
    task = dataclasses.replace(base, metric=lambda v, ex, project: -mse(v, ex, project) if project else mse(v, ex, project))
    data = _data()
    res = aj.fit(task, data, data, data, "ace", _config(epochs=5))
    assert res.best_epoch < 4  # an earlier epoch than the last is selected here
    assert res.test == res.history[res.best_epoch]["val"] == res.val


def test_select_mode_max_selects_the_largest_validation_score():
    import dataclasses

    base = _task()
    mse = lambda v, ex, project: base.loss(v, ex, None, project)  # noqa: E731
    task = dataclasses.replace(base, metric=lambda v, ex, project: -mse(v, ex, project))
    data = _data()
    res = aj.fit(task, data, data, None, "ace", _config(epochs=5, select_mode="max"))
    scores = [r["val"]["projection"]["metric"] for r in res.history]
    assert int(np.argmax(scores)) != int(np.argmin(scores))
    assert res.best_epoch == int(np.argmax(scores))


@pytest.mark.parametrize("changed", [
    dict(dual_learning_rate=1e-2), dict(slack_learning_rate=0.5), dict(dual_optimizer="adam"),
    dict(dual_proportional=1.0), dict(weight_decay=1e-4), dict(grad_clip=1.0), dict(slack_init=0.5),
    dict(eval_every=2), dict(select_mode="max"), dict(method=aj.get_method("ace-resilient", alpha=2.0)),
])
def test_resume_refuses_every_other_trajectory_setting(tmp_path, changed):
    data = _data(64)
    out = str(tmp_path / "run")
    aj.fit(_task(), data, data, data, "ace-resilient", _config(epochs=2, out_dir=out))
    changed = dict(changed)
    method = changed.pop("method", "ace-resilient")
    name = "method" if not changed else next(iter(changed))
    with pytest.raises(ValueError, match=f"other settings .*{name}: checkpoint"):
        aj.fit(_task(), data, data, data, method, _config(epochs=2, out_dir=out, **changed))


def test_evaluation_leaves_padding_out_of_the_mean():
    # make_evaluator pads 5 examples to two batches of 4 with copies of the first (x = 1): the
    # mean of x = 1..5 is 3.0 (the padding counted would give (15 + 3)/5 = 3.6 or 18/8 = 2.25)
    task = aj.Task(init=lambda k, b: {"params": {}}, loss=lambda v, ex, r, p: ex["x"],
                   metric=lambda v, ex, p: ex["x"])
    data = {"x": np.arange(1.0, 6.0, dtype=np.float32)}
    evaluate = aj.engine.make_evaluator(task, 4)
    scores = evaluate({"params": {}}, data, True)
    assert scores == {"metric": pytest.approx(3.0)}
