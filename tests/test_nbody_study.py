"""Tests of the N-body study (experiments/nbody.py) and of vmapped multi-seed training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from experiments import nbody as study
from experiments.vmapped_seeds import fit_seeds_vmapped
from models.egnn import EGNN


def simulated_task_data(num: int, seed: int = 0) -> dict:
    """Frames 30 → 40 of ``num`` freshly simulated trajectories (data.nbody physics)."""
    from data import nbody

    charges, loc0, vel0 = nbody.draw_initial_conditions(np.random.RandomState(seed), num)
    loc, vel = nbody.simulate(charges, loc0, vel0, num_steps=4200)  # frames 0 … 40

    def nodes_last(frames):
        return frames.transpose(0, 2, 1).astype(np.float32)

    return {
        "loc": nodes_last(loc[:, 30]),
        "vel": nodes_last(vel[:, 30]),
        "charges": charges.astype(np.float32),
        "target": nodes_last(loc[:, 40]),
    }


def random_data(num: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    loc = rng.standard_normal((num, 5, 3))
    vel = 0.5 * rng.standard_normal((num, 5, 3))
    data = {"loc": loc, "vel": vel, "charges": rng.choice([-1.0, 1.0], (num, 5, 1)), "target": loc + vel}
    return {k: v.astype(np.float32) for k, v in data.items()}


def split(data: dict, *sizes: int) -> list[dict]:
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in data.items()})
        start += size
    return out


@pytest.fixture(scope="module")
def tiny_task():
    """One small EGNN task shared by the tests (its jitted init compiles once)."""
    return study.make_task(EGNN(hidden=8, num_layers=1), {k: v[0] for k, v in random_data(1).items()})


def test_short_training_beats_constant_velocity_baseline():
    train, val = split(simulated_task_data(160), 128, 32)
    baseline = float(np.mean((val["loc"] + val["vel"] - val["target"]) ** 2))  # x + v·1.0
    assert 0.05 < baseline < 0.3  # the published ≈ 0.107 on this physics
    task = study.make_task(EGNN(hidden=32, num_layers=1), {k: v[0] for k, v in train.items()})
    config = ace_jax.TrainConfig(epochs=25, batch_size=32, learning_rate=3e-3, eval_every=25, progress=False)
    result = ace_jax.fit(task, train, val, None, "vanilla", config)
    assert result.history[-1]["train_loss"] < 0.5 * baseline
    assert result.val["projection"]["mse"] < 0.6 * baseline


def test_rotate_example_acts_consistently():
    example = random_data(1)
    example = {k: v[0] for k, v in example.items()}
    rotated = jax.device_get(jax.jit(study.rotate_example)(jax.random.PRNGKey(3), example))
    np.testing.assert_array_equal(rotated["charges"], example["charges"])
    # One orthogonal Q for all three: recover it from loc and check vel and target use it.
    q, *_ = np.linalg.lstsq(example["loc"], rotated["loc"], rcond=None)  # loc @ q = rotated loc
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-4)
    np.testing.assert_allclose(example["vel"] @ q, rotated["vel"], atol=1e-4)
    np.testing.assert_allclose(example["target"] @ q, rotated["target"], atol=1e-4)


def test_field_augmentation_keeps_z_and_is_orthogonal():
    example = {k: v[0] for k, v in random_data(1).items()}
    draws = [jax.device_get(jax.jit(study.rotate_example_about_z)(jax.random.PRNGKey(s), example)) for s in range(16)]
    dets = []
    for rotated in draws:
        q, *_ = np.linalg.lstsq(example["loc"], rotated["loc"], rcond=None)
        np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-4)
        np.testing.assert_allclose(q[:, 2], [0, 0, 1], atol=1e-4)  # z ↦ z: the field's direction is kept
        np.testing.assert_allclose(example["vel"] @ q, rotated["vel"], atol=1e-4)
        np.testing.assert_allclose(example["target"] @ q, rotated["target"], atol=1e-4)
        dets.append(np.linalg.det(q))
    assert min(dets) < -0.99 and max(dets) > 0.99  # rotations and reflections both occur
    model = study.make_model("egnn")
    assert study.make_task(model, example, field=0.3).transform is study.rotate_example_about_z
    assert study.make_task(model, example).transform is study.rotate_example


def test_lie_regularizer_matches_commutator_formula():
    """f(x) = x + c·x M (branch term c x M): L_A f = c x (M A − A M), by hand (numpy)."""
    batch = random_data(6)
    rng = jax.random.PRNGKey(5)
    gens = np.asarray(jax.jit(jax.vmap(study.random_generator))(jax.random.split(rng, 6)))
    np.testing.assert_allclose(gens, -gens.transpose(0, 2, 1))  # skew-symmetric
    np.testing.assert_allclose(np.linalg.norm(gens, axis=(1, 2)), np.sqrt(2.0), rtol=1e-5)  # unit axis
    loc = batch["loc"].astype(np.float64)
    for m in (np.array([[1.0, 0.3, 0.0], [0.3, -0.5, 0.2], [0.0, 0.2, -0.5]]), np.eye(3)):

        def predict(variables, ex, project, m=m):
            return ex["loc"] if project else ex["loc"] + variables["c"] * ex["loc"] @ jnp.asarray(m, jnp.float32)

        value = jax.jit(study.make_lie_regularizer(predict))({"c": 0.7}, batch, rng)
        lie = np.stack([0.7 * loc[n] @ (m @ gens[n] - gens[n] @ m) for n in range(6)])  # zero for m = I
        expected = np.sqrt(np.mean(np.sum(lie**2, axis=(1, 2)))) + np.sqrt(
            np.mean(np.sum((0.7 * loc @ m) ** 2, axis=(1, 2))))
        np.testing.assert_allclose(value, expected, rtol=1e-4)


def test_lie_regularizer_on_egnn_vanishes_at_projection(tiny_task):
    data = random_data(4)
    variables = tiny_task.init(jax.random.PRNGKey(0), True)
    regularizer = jax.jit(tiny_task.regularizer)
    rng = jax.random.PRNGKey(1)
    assert float(regularizer(variables, data, rng)) > 1e-2  # γ = 1: branches break rotations
    assert float(regularizer(ace_jax.projected_variables(variables), data, rng)) < 1e-4  # γ = 0


def test_benchmark_case_shapes():
    task, batch = study.benchmark_case("egnn", 7, seed=1)
    assert {k: v.shape for k, v in batch.items()} == {
        "loc": (7, 5, 3), "vel": (7, 5, 3), "charges": (7, 5, 1), "target": (7, 5, 3)}
    assert all(v.dtype == np.float32 for v in batch.values())
    np.testing.assert_allclose(np.linalg.norm(batch["vel"], axis=-1).clip(0.5, 1.0),
                               np.linalg.norm(batch["vel"], axis=-1), rtol=1e-5)
    shapes = jax.eval_shape(lambda key: task.init(key, True), jax.random.PRNGKey(0))
    assert len(ace_jax.named_leaves(shapes["gamma"])) == 7
    with pytest.raises(ValueError, match="unknown model"):
        study.benchmark_case("mlp", 2)


def test_cli_writes_results_schema(tmp_path, monkeypatch, tiny_task):
    data = random_data(24)
    monkeypatch.setattr(study, "load_splits", lambda *a, **k: dict(zip(("train", "val", "test"), split(data, 8, 8, 8))))
    monkeypatch.setattr(study, "make_model", lambda *a, **k: EGNN(hidden=8, num_layers=1))  # tiny_task's model
    monkeypatch.setattr(study, "make_task", lambda model, example, field=0.0: tiny_task)
    monkeypatch.setitem(study.PRESETS, "quick", {**study.PRESETS["quick"], "batch_size": 4})
    out = tmp_path / "run"
    study.main(["--preset", "quick", "--out", str(out), "--model", "egnn", "--methods", "ace-resilient",
                "--epochs", "1", "--seeds", "1", "--spectral-branch", "off", "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "methods"}
    assert results["config"]["epochs"] == 1 and results["config"]["model"] == "egnn"
    assert results["config"]["branch_init_scale"] == 0.01  # EGNN's default, recorded as used
    assert set(results["methods"]) == {"ace-resilient"}
    keys = {"test_mse_projection", "test_mse_full", "test_mse_projection_per_seed", "test_mse_full_per_seed",
            "best_epoch", "seeds", "final_gammas", "final_multipliers", "final_slacks", "equivariance_full", "wall_s",
            "diverged", "train_s", "train_s_per_seed"}
    for name, entry in results["methods"].items():
        assert set(entry) == keys, name
        assert entry["diverged"] == []
        for key in ("test_mse_projection", "test_mse_full"):
            assert set(entry[key]) == {"mean", "std"} and entry[key]["mean"] > 0
            assert entry[f"{key}_per_seed"] == [pytest.approx(entry[key]["mean"])]  # one seed: its value is the mean
        assert entry["seeds"] == [0] and entry["best_epoch"] == [0] and entry["wall_s"] > 0
        logged = [json.loads(line)["seconds"] for line in (out / name / "seed0" / "log.jsonl").read_text().splitlines()]
        assert entry["train_s_per_seed"] == [pytest.approx(sum(logged))] and entry["train_s"] == pytest.approx(sum(logged))
        assert 0 < entry["train_s"] < entry["wall_s"]  # wall_s also counts evaluation and set-up
        assert len(entry["final_gammas"][0]) == 1  # one layer: only the coordinate branch
        equivariance = entry["equivariance_full"]
        assert equivariance["examples"] == 8 and equivariance["rotations"] == study.EQUIVARIANCE_ROTATIONS
        for group in ("so3", "z"):  # γ ≠ 0 after one epoch: the full model is not equivariant
            assert equivariance[group]["mean"] > 1e-6 and len(equivariance[f"{group}_per_seed"]) == 1
        assert (out / name / "seed0" / "log.jsonl").exists()
        assert (out / f"trajectories_{name}.png").exists()
    resilient = results["methods"]["ace-resilient"]
    names = ["layer_0/coord_breaking/gamma"]
    for key in ("final_gammas", "final_multipliers", "final_slacks"):
        assert list(resilient[key][0]) == names, key
    assert resilient["final_multipliers"][0][names[0]] >= 0 and resilient["final_slacks"][0][names[0]] >= 0
    assert 0 < resilient["final_gammas"][0][names[0]] < 1  # γ starts at 1 and is pushed down
    assert (out / "val_curves.png").exists()
    table = (out / "table.md").read_text()
    assert "EGNN + ACE (resilient)" in table and "full" in table


@pytest.mark.parametrize("method", ["ace", "unconstrained"])  # unconstrained: random rotations use each step's key
def test_vmapped_seeds_equal_separate_runs(tiny_task, method):
    train, val, test = split(random_data(20, seed=2), 8, 6, 6)
    task = tiny_task
    config = ace_jax.TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, dual_learning_rate=1e-1,
                                 eval_batch_size=4, progress=False)
    vmapped = fit_seeds_vmapped(task, train, val, test, method, config, seeds=[3, 4])
    for seed, got in zip([3, 4], vmapped):
        ref = ace_jax.fit(task, train, val, test, method, ace_jax.TrainConfig(**{**config.__dict__, "seed": seed}))
        assert got.best_epoch == ref.best_epoch
        for key in ("train_loss", "train_lagrangian"):
            np.testing.assert_allclose([r[key] for r in got.history], [r[key] for r in ref.history], rtol=1e-5)
        for key in ("gamma", "multiplier"):
            for mine, theirs in zip(got.history, ref.history):
                assert mine[key].keys() == theirs[key].keys()
                np.testing.assert_allclose(list(mine[key].values()), list(theirs[key].values()), rtol=1e-5, atol=1e-7)
        for mode in ("projection", "full"):
            np.testing.assert_allclose(got.val[mode]["mse"], ref.val[mode]["mse"], rtol=1e-5)
            np.testing.assert_allclose(got.test[mode]["mse"], ref.test[mode]["mse"], rtol=1e-5)
    # The two seeds really are different runs.
    assert vmapped[0].history[-1]["train_loss"] != vmapped[1].history[-1]["train_loss"]


def test_branch_rank_reaches_segnn_and_invalid_uses_raise():
    """--branch-rank builds SEGNN with rank-r dense branches; EGNN, the folded kinds and r < 1
    are invalid settings, named in the error."""
    pytest.importorskip("e3nn_jax")
    assert study.make_model("segnn", branch_rank=8).branch_rank == 8
    assert study.make_model("segnn").branch_rank is None
    for kwargs in ({"model_name": "egnn"}, {"model_name": "segnn", "branch_kind": "in_kernel"},
                   {"model_name": "segnn", "branch_rank_": 0}):
        rank = kwargs.pop("branch_rank_", 8)
        with pytest.raises(ValueError, match="--branch-rank"):
            study.make_model(**kwargs, branch_rank=rank)


def test_branch_init_scale_reaches_egnn_only():
    assert study.make_model("egnn", branch_init_scale=0.01).branch_init_scale == 0.01
    with pytest.raises(ValueError, match="--branch-init-scale"):
        study.make_model("segnn", branch_init_scale=0.01)
    assert study.egnn_branch_init_scale("egnn", None) == study.make_model("egnn").branch_init_scale == 0.01
    assert study.egnn_branch_init_scale("egnn", 1.0) == 1.0 and study.egnn_branch_init_scale("segnn", None) is None


def test_equivariance_report_matches_hand_result_for_a_field_like_model():
    """d(x) = v + c ẑ commutes with rotations about z only: e(z) is round-off, and e(SO(3)) is
    mean_R c‖ẑ − R ẑ‖ / mean ‖v_i + c ẑ‖ exactly (same rotations, drawn from the same key)."""
    data = random_data(40, seed=5)
    c = 0.7
    z = jnp.array([0.0, 0.0, 1.0])

    def predict(variables, ex, project):
        del variables, project
        return ex["loc"] + ex["vel"] + c * z

    key = jax.random.PRNGKey(9)
    report = study.equivariance_report(predict, {}, data, key, num_examples=30, num_rotations=5)
    assert report["z"] < 1e-6
    key_all, _ = jax.random.split(key)
    rotations = np.asarray(ace_jax.random_rotation(key_all, (5,)))
    numerator = np.mean([c * np.linalg.norm(np.asarray(z) - r @ np.asarray(z)) for r in rotations])
    denominator = np.mean(np.linalg.norm(data["vel"][:30] + c * np.asarray(z), axis=-1))
    assert report["so3"] == pytest.approx(numerator / denominator, rel=1e-4)
    with pytest.raises(ValueError, match="num_rotations"):
        study.equivariance_report(predict, {}, data, key, num_rotations=0)


def test_equivariance_report_is_round_off_without_branches_and_large_with_them():
    data = random_data(12, seed=6)
    model = EGNN(hidden=8, num_layers=1, branch_init_scale=1.0)
    predict = study.make_predict(model)
    ex = {k: v[0] for k, v in data.items()}
    key = jax.random.PRNGKey(0)
    vanilla = model.init(key, ex["loc"], ex["vel"], ex["charges"], project=True)
    broken = model.init(key, ex["loc"], ex["vel"], ex["charges"], project=False)  # γ = 1
    exact = study.equivariance_report(predict, vanilla, data, key, num_examples=12, num_rotations=3)
    assert exact["so3"] < 1e-5 and exact["z"] < 1e-5
    full = study.equivariance_report(predict, broken, data, key, num_examples=12, num_rotations=3)
    assert full["so3"] > 1e-3 and full["z"] > 1e-3


def test_a_diverged_seed_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch, tiny_task):
    # seed 1's fit raises NonFiniteError (as a diverging run does): the study still writes every
    # file, seed 0's numbers, null mean/std for the method, the seed under "diverged", and exit 1
    data = random_data(24)
    monkeypatch.setattr(study, "load_splits", lambda *a, **k: dict(zip(("train", "val", "test"), split(data, 8, 8, 8))))
    monkeypatch.setattr(study, "make_model", lambda *a, **k: EGNN(hidden=8, num_layers=1))
    monkeypatch.setattr(study, "make_task", lambda model, example, field=0.0: tiny_task)
    monkeypatch.setitem(study.PRESETS, "quick", {**study.PRESETS["quick"], "batch_size": 4})
    real_fit = ace_jax.fit

    def fit(task, train, val, test, method, config):
        if config.seed == 1:
            raise ace_jax.NonFiniteError("non-finite loss at step 3 (epoch 0)")
        return real_fit(task, train, val, test, method, config)

    monkeypatch.setattr(study.ace_jax, "fit", fit)
    out = tmp_path / "run"
    results = study.main(["--preset", "quick", "--out", str(out), "--model", "egnn", "--methods", "ace",
                          "--epochs", "1", "--seeds", "2", "--no-progress"])
    stored = json.loads((out / "results.json").read_text())
    entry = stored["methods"]["ace"]
    assert entry["diverged"] == [{"seed": 1, "error": "non-finite loss at step 3 (epoch 0)"}]
    assert entry["test_mse_projection"] == {"mean": None, "std": None}
    assert entry["test_mse_projection_per_seed"][0] > 0 and entry["test_mse_projection_per_seed"][1] is None
    assert entry["best_epoch"] == [0, None] and entry["final_gammas"][1] is None
    assert entry["train_s_per_seed"][1] is None and entry["train_s"] == pytest.approx(entry["train_s_per_seed"][0])
    assert "diverged" in (out / "table.md").read_text()
    assert (out / "trajectories_ace.png").is_file()
    from experiments.common import report_diverged

    assert report_diverged(results) == 1


@pytest.mark.parametrize("options", [["--model", "egnn", "--branch-rank", "4"],
                                     ["--model", "segnn", "--branch-init-scale", "0.01"],
                                     ["--model", "egnn", "--parameterization", "normal"]])
def test_a_model_option_for_the_other_model_fails_before_the_data_is_loaded(tmp_path, monkeypatch, options):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the options were checked")

    monkeypatch.setattr(study, "load_splits", no_data)
    with pytest.raises(ValueError, match="applies to|--branch-rank"):
        study.main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", *options])


def test_vmap_seeds_folders_resume_either_way(tmp_path, monkeypatch, tiny_task):
    """--vmap-seeds writes the per-seed checkpoints fit writes: a vmapped 1-epoch study extended
    to 2 epochs without --vmap-seeds continues it (one more epoch per seed, not two) and ends
    where an uninterrupted 2-epoch study ends."""
    data = random_data(24)
    monkeypatch.setattr(study, "load_splits", lambda *a, **k: dict(zip(("train", "val", "test"), split(data, 8, 8, 8))))
    monkeypatch.setattr(study, "make_model", lambda *a, **k: EGNN(hidden=8, num_layers=1))
    monkeypatch.setattr(study, "make_task", lambda model, example, field=0.0: tiny_task)
    monkeypatch.setitem(study.PRESETS, "quick", {**study.PRESETS["quick"], "batch_size": 4, "eval_every": 1})
    common = ["--preset", "quick", "--model", "egnn", "--methods", "ace", "--seeds", "2", "--no-progress"]
    vmapped = study.main([*common, "--out", str(tmp_path / "a"), "--epochs", "1", "--vmap-seeds"])["methods"]["ace"]
    # both seeds' records hold the one shared pass's time: the method's total counts it once
    assert vmapped["train_s_per_seed"][0] == vmapped["train_s_per_seed"][1] == vmapped["train_s"] > 0
    first = [(tmp_path / "a" / "ace" / f"seed{s}" / "log.jsonl").read_text() for s in (0, 1)]
    assert all((tmp_path / "a" / "ace" / f"seed{s}" / "checkpoint.msgpack").exists() for s in (0, 1))
    resumed = study.main([*common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    whole = study.main([*common, "--out", str(tmp_path / "b"), "--epochs", "2"])
    for s in (0, 1):
        lines = (tmp_path / "a" / "ace" / f"seed{s}" / "log.jsonl").read_text().splitlines()
        assert len(lines) == 2 and lines[0] + "\n" == first[s]  # epoch 0 kept from the vmapped run
        # the resumed run's training time counts both parts: the vmapped epoch 0 and epoch 1
        assert resumed["methods"]["ace"]["train_s_per_seed"][s] == pytest.approx(
            vmapped["train_s_per_seed"][s] + json.loads(lines[1])["seconds"])
    assert resumed["methods"]["ace"]["train_s"] == pytest.approx(sum(resumed["methods"]["ace"]["train_s_per_seed"]))
    for key in ("test_mse_projection_per_seed", "test_mse_full_per_seed"):
        np.testing.assert_allclose(resumed["methods"]["ace"][key], whole["methods"]["ace"][key], rtol=1e-5)
