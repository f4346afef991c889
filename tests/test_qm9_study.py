"""QM9 study plumbing: padded batches as engine examples, exact per-molecule MAE, results schema."""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ace_jax
from data.qm9 import parse_csv, target_column
from experiments import qm9 as study

FIXTURE = Path(__file__).parent / "fixtures" / "qm9_tiny.csv"


class ConstantPerGraph(nn.Module):
    """Predicts one learned constant c (init 0) for every real graph, 0 on padding slots."""

    @nn.compact
    def __call__(self, batch, project: bool = False):
        c = self.param("c", nn.initializers.zeros, ())
        return c * jnp.asarray(batch["graph_mask"], jnp.float32)


@pytest.fixture(scope="module")
def molecules():
    return parse_csv(FIXTURE)


def stacked_split(molecules, molecules_per_example):
    from data.graphs import compute_neighbor_lists

    neighbor_lists = compute_neighbor_lists(molecules, 10.0)
    groups = study.group_molecules(np.arange(len(molecules["num_atoms"])), molecules_per_example)
    budget = study.group_budget(molecules, neighbor_lists, groups)
    return study.stack_examples(molecules, neighbor_lists, groups, molecules_per_example, budget), groups


def test_group_molecules_even_sizes_and_coverage():
    groups = study.group_molecules(np.arange(10, 31), 4)  # 21 molecules, at most 4 per example
    sizes = [len(g) for g in groups]
    assert len(groups) == 6 and max(sizes) <= 4 and max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.concatenate(groups), np.arange(10, 31))
    with pytest.raises(ValueError, match="empty"):
        study.group_molecules([], 4)


def test_stacked_examples_layout(molecules):
    split, groups = stacked_split(molecules, 3)
    assert [len(g) for g in groups] == [3, 3, 2]
    assert split["positions"].shape[0] == 3 and split["graph_mask"].shape == (3, 4)
    np.testing.assert_array_equal(split["weight"], [3, 3, 2])
    np.testing.assert_array_equal(split["graph_ids"][2], [6, 7, -1, -1])
    values = np.arange(8, dtype=np.float64) * 10
    targets = study.with_target(split, values)["targets"]
    np.testing.assert_array_equal(targets[2], [60.0, 70.0, 0.0, 0.0])
    np.testing.assert_array_equal(split["graph_mask"].sum(axis=1), [3, 3, 2])


def test_metric_is_exact_per_molecule_mae(molecules):
    """Predicting the mean has MAE = MAD (over the same molecules): a hand-checkable value."""
    split, groups = stacked_split(molecules, 3)  # examples of 3, 3 and 2 molecules
    y = molecules["targets"][:, target_column("Cv")]
    mean, mad = y.mean(), np.abs(y - y.mean()).mean()
    data = study.with_target(split, (y - mean) / mad)
    data = {k: v for k, v in data.items() if k != "graph_ids"}
    model = ConstantPerGraph()
    task = study.make_task(model, study.first_example(data), mad)
    variables = task.init(jax.random.PRNGKey(0), False)
    scores = ace_jax.make_evaluator(task, batch_size=2)(variables, data, True)
    assert scores["mae"] == pytest.approx(mad, rel=1e-5)
    assert scores["abs_error_sum"] / scores["molecules"] == pytest.approx(mad, rel=1e-5)
    # the naive average of per-example means weights the 2-molecule example too much: it differs
    naive = np.mean([np.abs(y[g] - mean).mean() for g in groups])
    assert abs(naive - mad) > 1e-3 * mad
    # training loss: the engine weights examples by their molecule count -> mean over molecules
    lagrangian = ace_jax.make_lagrangian(lambda v, ex, rng: task.loss(v, ex, rng, True), None)
    value, _ = lagrangian(variables["params"], None, {}, {}, data, jax.random.PRNGKey(1))
    assert float(value) == pytest.approx(1.0, rel=1e-5)  # mean |ỹ| over molecules = MAD / MAD


def test_rotate_each_graph_keeps_shapes_of_molecules(molecules):
    split, _ = stacked_split(molecules, 8)
    example = study.first_example(split)
    rotated = study.rotate_each_graph(jax.random.PRNGKey(0), example)
    positions, new = np.asarray(example["positions"]), np.asarray(rotated["positions"])
    senders, receivers, mask = example["senders"], example["receivers"], example["edge_mask"]
    before = np.linalg.norm(positions[senders] - positions[receivers], axis=-1)[mask]
    after = np.linalg.norm(new[senders] - new[receivers], axis=-1)[mask]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(new - positions)) > 0.1


def test_step_decay_schedule():
    schedule = study.step_decay_schedule(1e-3, 100, (0.8, 0.9))
    assert float(schedule(79)) == pytest.approx(1e-3)
    assert float(schedule(85)) == pytest.approx(1e-4)
    assert float(schedule(95)) == pytest.approx(1e-5)
    assert study.step_decay_schedule(1e-3, 100, ()) is None


def test_lr_decay_option_parses_and_reaches_training(tmp_path):
    import argparse

    assert study.parse_decay_fractions("0.8,0.9") == (0.8, 0.9)
    assert study.parse_decay_fractions("none") == ()
    for bad in ("0.8,1.2", "0", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            study.parse_decay_fractions(bad)

    def train_losses(decay):
        out = tmp_path / f"decay{decay}"
        study.main([
            "--preset", "quick", "--out", str(out), "--csv", str(FIXTURE), "--epochs", "3", "--targets", "zpve",
            "--methods", "vanilla", "--features", "8", "--interactions", "1", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--lr-decay-at", decay,
        ])
        config = json.loads((out / "results.json").read_text())["config"]
        log = (out / "runs" / "zpve" / "vanilla" / "seed0" / "log.jsonl").read_text().splitlines()
        return config["lr_decay_at"], [json.loads(line)["train_loss"] for line in log]

    constant, decayed = train_losses("none"), train_losses("0.3")
    assert constant[0] == [] and decayed[0] == [0.3]
    # Same seed, so the first epoch (before the decay at 30 % of the steps) is identical; later ones differ.
    assert constant[1][0] == pytest.approx(decayed[1][0], rel=1e-6)
    assert constant[1][2] != pytest.approx(decayed[1][2], rel=1e-6)


def test_tiny_study_writes_results_schema(tmp_path):
    out = tmp_path / "qm9"
    study.main([
        "--preset", "quick", "--out", str(out), "--csv", str(FIXTURE), "--epochs", "1",
        "--targets", "zpve", "--methods", "vanilla,ace", "--features", "8", "--interactions", "1",
        "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--examples-per-step", "4",
    ])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "model", "targets"}
    assert results["model"] == "schnet"
    assert set(results["targets"]) == {"zpve"}
    assert set(results["targets"]["zpve"]) == {"vanilla", "ace"}
    for entry in results["targets"]["zpve"].values():
        assert set(entry) == {"test_mae_projection", "test_mae_full", "unit", "diverged"}
        assert entry["unit"] == "eV" and entry["diverged"] == []
        for key in ("test_mae_projection", "test_mae_full"):
            assert set(entry[key]) == {"mean", "std"}
            assert np.isfinite(entry[key]["mean"]) and entry[key]["mean"] > 0
    vanilla = results["targets"]["zpve"]["vanilla"]
    assert vanilla["test_mae_projection"] == vanilla["test_mae_full"]  # no branches: full = projection
    assert results["config"]["split_sizes"] == [6, 1, 1]
    # six training molecules make one example: the step takes 1 example, not the preset's batch
    assert results["config"]["examples_per_step"] == 4 and results["config"]["examples_per_step_used"] == 1
    assert "zpve" in (out / "table.md").read_text()
    assert (out / "trajectories" / "zpve_ace.png").is_file()
    assert results["config"]["select_on"] == {"vanilla": "projection", "ace": "projection"}
    # the same folder with another split: its checkpoints were trained on other molecules
    with pytest.raises(ValueError, match="written under other settings"):
        study.main([
            "--preset", "quick", "--out", str(out), "--csv", str(FIXTURE), "--epochs", "1",
            "--targets", "zpve", "--methods", "vanilla", "--features", "8", "--interactions", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--split-seed", "1", "--examples-per-step", "4",
        ])


def test_bad_options_raise(tmp_path):
    base = ["--preset", "quick", "--out", str(tmp_path), "--csv", str(FIXTURE), "--cache-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        study.main(base + ["--targets", "zpve,banana"])
    with pytest.raises(SystemExit, match="exceeds"):
        study.main(base + ["--num-molecules", "9"])
    with pytest.raises(FileNotFoundError):
        study.main(["--preset", "quick", "--out", str(tmp_path), "--csv", str(tmp_path / "missing.csv")])
    with pytest.raises(ValueError, match="unknown model"):
        study.benchmark_case("dimenet", 4)


def test_segnn_parameterization_setting_matches_the_model():
    from models.segnn import PARAMETERIZATIONS

    assert set(study.SEGNN_PARAMETERIZATIONS) == set(PARAMETERIZATIONS)
    settings = study.PRESETS["quick"]["segnn"]
    assert study.build_model("segnn", settings).parameterization == "fan_in"
    normal = study.build_model("segnn", dataclasses.replace(settings, parameterization="normal"))
    assert normal.parameterization == "normal"
    with pytest.raises(ValueError, match="parameterization"):
        dataclasses.replace(settings, parameterization="xavier")


def test_dual_proportional_option_reaches_the_dual_update(tmp_path):
    def final_multipliers(gain):
        out = tmp_path / f"k{gain}"
        study.main([
            "--preset", "quick", "--out", str(out), "--csv", str(FIXTURE), "--epochs", "1", "--targets", "zpve",
            "--methods", "ace", "--features", "8", "--interactions", "1", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--dual-proportional", str(gain),
        ])
        assert json.loads((out / "results.json").read_text())["config"]["dual_proportional"] == gain
        log = (out / "runs" / "zpve" / "ace" / "seed0" / "log.jsonl").read_text().splitlines()
        return np.array(list(json.loads(log[-1])["multiplier"].values()))

    plain, damped = final_multipliers(0.0), final_multipliers(50.0)
    assert np.all(np.isfinite(damped)) and not np.allclose(plain, damped)
    with pytest.raises(ValueError, match="dual_proportional"):
        dataclasses.replace(study.PRESETS["quick"]["schnet"], dual_proportional=-1.0)


def test_benchmark_case_shapes():
    task, batch = study.benchmark_case("schnet", 12, seed=0)
    assert batch["graph_mask"].shape == (1, 13) and int(batch["graph_mask"].sum()) == 12
    assert batch["weight"].tolist() == [12.0]
    # seeded: same seed, same molecules; another seed perturbs them differently
    _, again = study.benchmark_case("schnet", 12, seed=0)
    _, other = study.benchmark_case("schnet", 12, seed=1)
    np.testing.assert_array_equal(batch["positions"], again["positions"])
    assert not np.array_equal(batch["positions"], other["positions"])
    shapes = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), True))
    assert len(ace_jax.named_leaves(shapes["gamma"])) == 6


def test_branch_rank_setting_builds_low_rank_segnn_only():
    """QM9Settings.branch_rank reaches SEGNN; a rank < 1, or a rank for SchNet, is an error."""
    settings = study.PRESETS["quick"]["segnn"]
    assert study.build_model("segnn", dataclasses.replace(settings, branch_rank=4)).branch_rank == 4
    assert study.build_model("segnn", settings).branch_rank is None
    with pytest.raises(ValueError, match="branch_rank must be >= 1"):
        dataclasses.replace(settings, branch_rank=0)
    with pytest.raises(ValueError, match="branch_rank applies to SEGNN"):
        study.build_model("schnet", dataclasses.replace(study.PRESETS["quick"]["schnet"], branch_rank=4))
    with pytest.raises(ValueError, match="parameterization 'normal' applies to SEGNN"):
        study.build_model("schnet", dataclasses.replace(study.PRESETS["quick"]["schnet"], parameterization="normal"))


def test_branch_init_scale_setting_reaches_schnet_only():
    settings = study.PRESETS["quick"]["schnet"]
    assert study.build_model("schnet", dataclasses.replace(settings, branch_init_scale=0.01)).branch_init_scale == 0.01
    assert study.build_model("schnet", settings).branch_init_scale == 1.0  # the model's default
    with pytest.raises(ValueError, match="branch_init_scale must be >= 0"):
        dataclasses.replace(settings, branch_init_scale=-1.0)
    with pytest.raises(ValueError, match="branch_init_scale applies to SchNet"):
        study.build_model("segnn", dataclasses.replace(study.PRESETS["quick"]["segnn"], branch_init_scale=0.01))


def test_a_finished_run_is_extended_without_lr_decay_and_refused_with_it(tmp_path):
    def run(out, epochs, *extra):
        return study.main([
            "--preset", "quick", "--out", str(tmp_path / out), "--csv", str(FIXTURE), "--epochs", str(epochs),
            "--targets", "zpve", "--methods", "vanilla", "--features", "8", "--interactions", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra,
        ])

    run("plain", 1)
    log_path = tmp_path / "plain" / "runs" / "zpve" / "vanilla" / "seed0" / "log.jsonl"
    first = log_path.read_text().splitlines()
    run("plain", 2)  # continues the 1-epoch checkpoint (no schedule depends on the total)
    log = log_path.read_text().splitlines()
    assert log[:1] == first and [json.loads(line)["epoch"] for line in log] == [0, 1]  # epoch 0 not retrained
    # runs.json's training time counts both epochs, the one trained by the first call too
    run_record = json.loads((tmp_path / "plain" / "runs.json").read_text())["zpve"]["methods"]["vanilla"][0]
    assert run_record["train_seconds"] == pytest.approx(sum(json.loads(line)["seconds"] for line in log))
    run("decay", 1, "--lr-decay-at", "0.5")
    with pytest.raises(ValueError, match=r"epochs: checkpoint 1, this run 2\) \(a learning-rate or γ schedule"):
        run("decay", 2, "--lr-decay-at", "0.5")  # the decay step moves with the total: not the same run


def test_the_data_fingerprint_covers_targets_geometry_atoms_and_split(molecules):
    settings = study.PRESETS["quick"]["schnet"]
    splits = study.prepare_splits(molecules, settings, split_seed=0)
    values = molecules["targets"][:, 0]
    base = study.data_fingerprint(molecules, values, splits)
    assert base == study.data_fingerprint(dict(molecules), values.copy(), splits)  # same numbers, same hash
    moved = {**molecules, "positions": molecules["positions"] + np.float32(0.01)}
    other_atoms = {**molecules, "atomic_numbers": molecules["atomic_numbers"][::-1].copy()}
    other_split = study.prepare_splits(molecules, settings, split_seed=1)
    assert len({base, study.data_fingerprint(moved, values, splits), study.data_fingerprint(other_atoms, values, splits),
                study.data_fingerprint(molecules, values + 1.0, splits),
                study.data_fingerprint(molecules, values, other_split)}) == 5


def test_target_statistics_come_from_the_training_molecules_only(tmp_path, monkeypatch):
    seen = []
    real = study.target_stats

    def recording(values):
        seen.append(np.asarray(values).copy())
        return real(values)

    monkeypatch.setattr(study, "target_stats", recording)
    study.main(["--preset", "quick", "--out", str(tmp_path / "out"), "--csv", str(FIXTURE), "--epochs", "1",
                "--targets", "zpve", "--methods", "vanilla", "--features", "8", "--interactions", "1",
                "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    molecules = parse_csv(FIXTURE)
    train_rows = study.split_molecules(len(molecules["num_atoms"]), study.PRESETS["quick"]["schnet"].split, 0).train
    (values,) = seen
    expected = molecules["targets"][np.asarray(train_rows), study.target_column("zpve")]
    assert len(values) == 6 and np.allclose(np.sort(values), np.sort(expected))  # 6 of the 8 molecules


def test_schnet_settings_reach_the_model():
    settings = study.PRESETS["quick"]["schnet"]
    model = study.build_model("schnet", dataclasses.replace(settings, cutoff=7.5))
    assert model.pooling == "sum" and model.cutoff == 7.5  # the radius graph's cutoff is the model's


def test_segnn_settings_reach_the_model_as_the_issue_states():
    # QM9-SEGNN: lmax_h 2, lmax_attr 3, instance norm; width and depth from the settings
    settings = study.PRESETS["quick"]["segnn"]
    model = study.build_model("segnn", dataclasses.replace(settings, features=24, num_interactions=3))
    assert (model.lmax_hidden, model.lmax_attr, model.norm) == (2, 3, "instance")
    assert (model.hidden_scalars, model.num_layers) == (24, 3)
