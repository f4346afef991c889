"""Tests of the MoCap study (experiments/mocap.py): results schema of a tiny run, the task's
loss/metric, the group action used for augmentation, and the benchmark hook."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from ace_jax.engine import strict_json
from data.mocap import DEFAULT_MOCAP_PATH, load_mocap
from experiments import mocap as study
from models.egno import EGNO

pytestmark = pytest.mark.skipif(not DEFAULT_MOCAP_PATH.is_file(), reason=f"missing {DEFAULT_MOCAP_PATH}")

TINY = {"hidden": 8, "num_layers": 1, "time_embed": 4, "max_train": 12, "max_eval": 12, "batch_size": 6}
METHOD_KEYS = {"test_mse_projection", "test_mse_full", "final_gammas", "best_epoch", "wall_s", "train_s", "diverged"}


@pytest.fixture(scope="module")
def data():
    return load_mocap()


def test_tiny_study_writes_the_results_schema(tmp_path):
    # vanilla (no branches) and ace-resilient (branches, selection on the full model) cover
    # both code paths; "ace" differs from "ace-resilient" only in the engine's formulation.
    methods = ["vanilla", "ace-resilient"]
    report = study.run_study(tmp_path, "quick", methods=methods, seeds=1, epochs=2, progress=False, overrides=TINY)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == strict_json(report)
    assert set(on_disk) == {"config", "unit", "methods"}
    assert on_disk["unit"] == "1e-2"
    assert list(on_disk["methods"]) == methods
    config = on_disk["config"]
    assert config["select_on"] == {"vanilla": "projection", "ace-resilient": "full"}
    assert config["epochs"] == 2 and config["num_samples"] == {"train": 12, "val": 12, "test": 12}
    # the reference: x + 30·v against the frame 30 ahead (the last target), on the same 12 test samples
    test = study._model_arrays(load_mocap().test, 12)
    assert config["reference_constant_velocity_test_mse"] == pytest.approx(
        float(np.mean((test["loc"] + 30 * test["vel"] - test["target"][:, -1]) ** 2)) / 1e-2)
    for name, entry in on_disk["methods"].items():
        assert set(entry) == METHOD_KEYS, name
        for key in ("test_mse_projection", "test_mse_full"):
            assert set(entry[key]) == {"mean", "std"}
            assert np.isfinite(entry[key]["mean"]) and entry[key]["std"] is None  # one seed: no sample std
        assert len(entry["best_epoch"]) == 1 and 0 <= entry["best_epoch"][0] < 2
        assert entry["wall_s"] > 0
        summary = json.loads((tmp_path / name / "seed0" / "summary.json").read_text())
        # the unit: reported value = last-frame MSE / 1e-2
        assert entry["test_mse_projection"]["mean"] == pytest.approx(summary["test"]["projection"]["mse_last"] / 1e-2)
        assert entry["test_mse_full"]["mean"] == pytest.approx(summary["test"]["full"]["mse_last"] / 1e-2)
        log = [json.loads(line) for line in (tmp_path / name / "seed0" / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [0, 1]
        assert summary["train_seconds"] == pytest.approx(sum(r["seconds"] for r in log))
        assert entry["train_s"] == pytest.approx(summary["train_seconds"]) and 0 < entry["train_s"] < entry["wall_s"]
        assert (tmp_path / name / "seed0" / "trajectories.png").is_file()
        assert (tmp_path / f"trajectories_{name}.png").is_file()
    vanilla = on_disk["methods"]["vanilla"]
    assert vanilla["final_gammas"] == [{}]
    assert vanilla["test_mse_full"] == vanilla["test_mse_projection"]  # no branches: full = projection
    gammas = on_disk["methods"]["ace-resilient"]["final_gammas"][0]
    assert set(gammas) == {"layer_0/coordinate_breaking/gamma"}  # one layer: no feature branch (its h is unused)
    assert all(g != 1.0 for g in gammas.values())  # γ is trained
    assert (tmp_path / "val_curves.png").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "EGNO + ACE resilient, full model" in table and "constant velocity" in table


def test_unknown_method_and_field_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        study.run_study(tmp_path, "quick", methods=["segnn"])
    with pytest.raises(ValueError, match="unknown StudyConfig fields"):
        study.run_study(tmp_path, "quick", overrides={"hiden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        study.run_study(tmp_path, "huge")
    with pytest.raises(ValueError, match="positive integer"):
        study.StudyConfig(epochs=0)


def test_loss_and_metric_against_numpy_and_invariance_under_the_group(data):
    train = {k: np.asarray(v[:2]) for k, v in data.train.items() if k in study.MODEL_KEYS}
    model = EGNO(hidden=8, num_layers=1, time_embed=4, length_scale=5.0, velocity_scale=0.3)
    task = study.make_task(model, data, {k: v[0] for k, v in train.items()})
    variables = task.init(jax.random.key(0, impl="rbg"), True)
    example = {k: jnp.asarray(v[1]) for k, v in train.items()}
    apply = jax.jit(partial(model.apply, project=True))
    pred = np.asarray(apply(variables, example["loc"], example["vel"], example["node_features"],
                            jnp.asarray(data.edges), jnp.asarray(data.edge_attr)))
    err = (pred.astype(np.float64) - train["target"][1]) ** 2
    loss = jax.jit(task.loss, static_argnums=3)
    metric = jax.jit(task.metric, static_argnums=2)(variables, example, True)
    np.testing.assert_allclose(metric["mse_last"], err[-1].mean(), rtol=1e-5)
    np.testing.assert_allclose(metric["mse"], err.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss(variables, example, jax.random.PRNGKey(0), True), err.mean(), rtol=1e-5)
    # The projection is equivariant to the data's group, so its loss is invariant under it.
    transform = jax.jit(partial(study.vertical_rigid_transform, translation_scale=5.0))
    for seed in range(3):
        moved = transform(jax.random.PRNGKey(seed), example)
        np.testing.assert_allclose(moved["node_features"], example["node_features"])
        assert not np.allclose(moved["loc"], example["loc"])
        np.testing.assert_allclose(moved["loc"][:, 1], example["loc"][:, 1], atol=1e-5)  # heights kept
        np.testing.assert_allclose(loss(variables, moved, jax.random.PRNGKey(0), True),
                                   loss(variables, example, jax.random.PRNGKey(0), True), rtol=1e-4)


def test_constant_velocity_reference_by_hand():
    split = {
        "loc": np.zeros((1, 2, 3)),
        "vel": np.ones((1, 2, 3)),
        "target": np.concatenate([np.zeros((1, 4, 2, 3)), np.full((1, 1, 2, 3), 5.0)], axis=1),
    }
    # prediction 0 + 3·1 = 3 against 5 in every coordinate: MSE (5 − 3)² = 4
    assert study.constant_velocity_mse(split, 3) == pytest.approx(4.0)


def test_benchmark_case_gives_the_paper_model_and_a_real_batch(data):
    task, batch = study.benchmark_case(4, seed=1)
    assert set(batch) == set(study.MODEL_KEYS)
    assert batch["loc"].shape == (4, 31, 3) and batch["target"].shape == (4, 5, 31, 3)
    assert batch["node_features"].shape == (4, 31, 2)
    rows = [np.flatnonzero((data.train["loc"] == b).all(axis=(1, 2))) for b in batch["loc"]]
    assert all(len(r) >= 1 for r in rows)  # real training samples
    _, again = study.benchmark_case(4, seed=1)
    np.testing.assert_array_equal(again["loc"], batch["loc"])
    shapes = jax.eval_shape(lambda k: task.init(k, True), jax.random.PRNGKey(0))
    assert len(ace_jax.named_leaves(shapes["gamma"])) == 11  # 6 layers × (features, coordinates), no feature branch in the last
    assert shapes["params"]["embedding"]["kernel"].shape[-1] == 128
    assert "gamma" not in jax.eval_shape(lambda k: task.init(k, False), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="batch"):
        study.benchmark_case(0)


class _Stop(Exception):
    pass


def _first_fit_call(monkeypatch, tmp_path, method, **kwargs):
    """(method, TrainConfig) of the study's first ``ace_jax.fit`` call (the fit itself is stopped)."""
    seen = {}

    def fake_fit(task, train, val, test, method_arg, config):
        seen["method"], seen["config"] = method_arg, config
        raise _Stop

    monkeypatch.setattr(ace_jax, "fit", fake_fit)
    with pytest.raises(_Stop):
        study.run_study(tmp_path / "out", "quick", methods=[method], seeds=1, epochs=1, progress=False,
                        overrides={**TINY, **kwargs.pop("overrides", {})}, **kwargs)
    return seen["method"], seen["config"]


def test_the_resilient_slack_cost_alpha_reaches_the_engine(monkeypatch, tmp_path):
    method, config = _first_fit_call(monkeypatch, tmp_path, "ace-resilient", overrides={"alpha": 0.1})
    assert method.name == "ace-resilient" and method.formulation.alpha == 0.1  # not the default 1.0
    assert config.run_settings["alpha"] == 0.1


def test_a_checkpoint_is_tied_to_the_data_arrays_not_to_the_file_name(monkeypatch, tmp_path):
    with np.load(DEFAULT_MOCAP_PATH) as archive:
        arrays = {k: archive[k] for k in archive.files}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "a" / "run.npz", **arrays)
    arrays["trial_01"] = arrays["trial_01"] * np.float32(1.01)  # a training trial, same name and shapes
    np.savez(tmp_path / "b" / "run.npz", **arrays)
    settings = {}
    for source in (None, DEFAULT_MOCAP_PATH, tmp_path / "a" / "run.npz", tmp_path / "b" / "run.npz"):
        _, config = _first_fit_call(monkeypatch, tmp_path, "ace", data_path=source)
        settings[str(source)] = config.run_settings["data"]
    values = list(settings.values())
    assert values[0] == values[1]  # the shipped file, named or not, is the same data
    assert values[2].startswith("run.npz") and values[3].startswith("run.npz")
    assert values[2] != values[3]  # same name, other numbers: another checkpoint
    assert values[2].split("arrays")[1] == values[0].split("arrays")[1]  # same arrays, other name


def test_a_finished_run_is_extended_by_a_longer_epochs(tmp_path):
    # MoCap has no learning-rate schedule: 1 epoch then 2 equals an uninterrupted 2-epoch run
    # (the engine's rule), so a longer --epochs continues the checkpoint instead of refusing it.
    run = partial(study.run_study, tmp_path, "quick", methods=["vanilla"], seeds=1, progress=False, overrides=TINY)
    run(epochs=1)
    log = tmp_path / "vanilla" / "seed0" / "log.jsonl"
    first_epoch = log.read_text().splitlines()
    run(epochs=2)
    lines = log.read_text().splitlines()
    assert lines[: len(first_epoch)] == first_epoch and len(lines) > len(first_epoch)  # epoch 0 kept, epoch 1 added
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_the_data_hash_covers_the_skeleton(monkeypatch, tmp_path):
    with np.load(DEFAULT_MOCAP_PATH) as archive:
        arrays = {k: archive[k] for k in archive.files}
    np.savez(tmp_path / "full.npz", **arrays)
    arrays["edges"] = arrays["edges"][:-1]  # one bone less: the same samples on another graph
    np.savez(tmp_path / "fewer.npz", **arrays)
    hashes = [_first_fit_call(monkeypatch, tmp_path, "ace", data_path=tmp_path / f)[1].run_settings["data"].split("arrays")[1]
              for f in ("full.npz", "fewer.npz")]
    assert hashes[0] != hashes[1]
