"""The point-cloud study: point dropout in jax, accuracies, class subsets, a tiny run's files."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace_jax.engine import strict_json
from experiments.modelnet import (
    METRICS, Preset, accuracies, build_parser, drop_points_jax, drop_points_to_first_jax, main, make_task,
    load_data, preset_from_args, primal_optimizer, run_study, subset_classes,
)


def tiny_preset(**changes) -> Preset:
    """A one-epoch ACE run on two classes of 16-point clouds (a single small compiled model)."""
    settings = dict(
        epochs=1, seeds=1, batch_size=4, num_points=16, k=4, width=1, head_hidden=(4,), optimizer="adam",
        learning_rate=1e-3, dual_learning_rate=1e-3, classes=("sphere", "cube"), num_per_class_train=4,
        num_per_class_val=2, num_per_class_test=3, eval_batch_size=4, spectral_branch=False, methods=("ace",),
    )
    return Preset(**{**settings, **changes})


def test_drop_points_jax_keeps_shape_and_only_kept_points():
    points = jnp.asarray(np.random.default_rng(0).normal(size=(20, 3)), jnp.float32)
    dropped = np.asarray(drop_points_jax(jax.random.PRNGKey(0), points, 0.25))
    assert dropped.shape == (20, 3)
    original = np.asarray(points)
    # Every row is an original point, exactly 20 − 5 distinct ones survive, and the slots
    # that still hold their own point are exactly the 15 kept ones.
    matches = (np.abs(dropped[:, None, :] - original[None, :, :]).max(-1) == 0)
    assert matches.any(axis=1).all()
    assert len({int(np.argmax(row)) for row in matches}) == 15
    assert int((np.abs(dropped - original).max(-1) == 0).sum()) == 15
    other = np.asarray(drop_points_jax(jax.random.PRNGKey(1), points, 0.25))
    assert not np.array_equal(other, dropped)  # a new key drops other points
    np.testing.assert_array_equal(drop_points_jax(jax.random.PRNGKey(0), points, 0.0), points)
    with pytest.raises(ValueError, match="fraction"):
        drop_points_jax(jax.random.PRNGKey(0), points, 1.0)


def test_drop_points_to_first_moves_points_onto_the_first_one():
    points = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)), jnp.float32)
    original = np.asarray(points)
    fractions = []
    for seed in range(200):
        out = np.asarray(drop_points_to_first_jax(jax.random.PRNGKey(seed), points, 0.8))
        assert out.shape == (64, 3)
        kept = (out == original).all(-1)
        moved = (out == original[0]).all(-1)
        assert (kept | moved).all()  # each slot holds its own point or a copy of the first
        np.testing.assert_array_equal(out[0], original[0])
        fractions.append(1.0 - kept.mean())
    # r ~ U(0, 0.8), each point dropped with probability r: E[fraction] = 0.4, spread over [0, 0.8].
    assert np.mean(fractions) == pytest.approx(0.4, abs=0.03)
    assert min(fractions) < 0.1 and 0.7 < max(fractions) <= 0.8 + 0.15
    # The rule commutes with rotations (same key): the dropout study's order of rotate-then-drop
    # does not matter.
    rotation = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0], jnp.float32)
    key = jax.random.PRNGKey(7)
    rotated_first = drop_points_to_first_jax(key, points @ rotation.T, 0.8)
    np.testing.assert_allclose(rotated_first, drop_points_to_first_jax(key, points, 0.8) @ rotation.T, atol=1e-6)
    np.testing.assert_array_equal(drop_points_to_first_jax(key, points, 0.0), points)
    with pytest.raises(ValueError, match="max drop fraction"):
        drop_points_to_first_jax(key, points, 1.0)
    with pytest.raises(ValueError, match="one cloud"):
        drop_points_to_first_jax(key, points[None], 0.5)


def test_dropout_rule_reaches_the_loss_and_is_validated(tmp_path):
    from models.vn_dgcnn import VNDGCNN, init_variables

    # Same key, so the same rotation: without dropout the two rules give the same loss, with
    # dropout they damage the cloud differently.
    model = VNDGCNN(num_classes=2, k=4, width=1, head_hidden=(4,))
    cloud = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
    variables = init_variables(model, jax.random.PRNGKey(0), 16)
    example = {"points": cloud, "label": jnp.asarray(1)}

    def loss(fraction, rule):
        task = make_task(model, 16, fraction, 0.2, rule)
        return float(task.loss(variables, example, jax.random.PRNGKey(3), True))

    assert loss(0.0, "refill") == pytest.approx(loss(0.0, "first-point"), abs=1e-6)
    assert loss(0.75, "refill") != pytest.approx(loss(0.75, "first-point"), abs=1e-6)
    # make_task's default rule is the presets' (first-point), so direct callers get the same.
    default = make_task(model, 16, 0.75, 0.2).loss(variables, example, jax.random.PRNGKey(3), True)
    assert float(default) == loss(0.75, "first-point")
    assert tiny_preset().dropout_rule == "first-point"
    with pytest.raises(ValueError, match="dropout_rule"):
        make_task(model, 16, 0.5, 0.2, "nonsense")
    with pytest.raises(ValueError, match="dropout_rule"):
        tiny_preset(dropout_rule="nonsense")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--dropout-rule", "nonsense"])


def test_accuracies_hand_values():
    # per class: label 0 → 1/1, label 1 → 2/3, label 2 → 0/1; instances 3/5.
    class_acc, instance_acc = accuracies(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 2]))
    assert class_acc == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert instance_acc == pytest.approx(0.6)


def test_subset_classes_relabels_in_given_order():
    points = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    labels = np.array([0, 1, 2, 0, 1, 2])
    data = {s: (points, labels) for s in ("train", "val", "test")}
    data["class_names"] = ["a", "b", "c"]
    out = subset_classes(data, ("c", "a"))
    assert out["class_names"] == ["c", "a"]
    np.testing.assert_array_equal(out["train"][1], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["train"][0], points[[0, 2, 3, 5]])
    with pytest.raises(ValueError, match="unknown classes"):
        subset_classes(data, ("d",))


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--dropout", "1.5"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--methods", "vanilla,nonsense"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--data", str(tmp_path / "missing")])


def test_tiny_run_writes_the_schema(tmp_path):
    # One epoch of ACE on the dropout study (the schema's keys are "clean" | "dropout"; one
    # study keeps this test to a single compiled model on a 2-core CPU).
    preset = tiny_preset(dropout=0.25)
    results = run_study(preset, tmp_path, studies=("dropout",), progress=False, cache_dir=tmp_path / "cache")
    stored = json.loads((tmp_path / "results.json").read_text())
    assert set(stored) == {"config", "runs"}
    assert set(stored["runs"]) == {"dropout"}
    assert set(stored["runs"]["dropout"]) == {"ace"}
    entry = stored["runs"]["dropout"]["ace"]
    assert set(entry) == {*METRICS, "diverged"} and entry["diverged"] == []
    for metric in METRICS:
        assert set(entry[metric]) == {"mean", "std"}
        assert 0.0 <= entry[metric]["mean"] <= 1.0 and entry[metric]["std"] is None  # one seed: no sample std
        # 3 test clouds per class: every accuracy is a multiple of 1/6.
        assert entry[metric]["mean"] * 6 == pytest.approx(round(entry[metric]["mean"] * 6), abs=1e-6)
    assert stored["config"]["studies"] == {"dropout": 0.25}
    assert stored["config"]["split_sizes"] == {"train": 8, "val": 4, "test": 6}
    assert strict_json(results["runs"]) == stored["runs"]  # one seed: std NaN in memory, null on disk
    for name in ("table.md", "curves_dropout.png", "train_loss_dropout.png", "gamma_dropout_ace.png", "per_seed.json"):
        assert (tmp_path / name).is_file(), name
    per_seed = json.loads((tmp_path / "per_seed.json").read_text())["dropout"]["ace"][0]
    assert len(per_seed["final_gammas"]) == 15
    log_path = tmp_path / "runs" / "dropout" / "ace" / "seed0" / "log.jsonl"
    log = log_path.read_text()
    logged_seconds = sum(json.loads(line)["seconds"] for line in log.splitlines())
    assert per_seed["train_seconds"] == pytest.approx(logged_seconds)
    # rerunning into the same folder resumes the finished run (no epoch retrained: the logged
    # per-epoch wall times are the first run's) and gives the same numbers ...
    again = run_study(preset, tmp_path, studies=("dropout",), progress=False, cache_dir=tmp_path / "cache")
    assert log_path.read_text() == log and strict_json(again["runs"]) == strict_json(results["runs"])
    # the resumed call trained nothing, yet its record still counts the epoch trained before
    again_seed = json.loads((tmp_path / "per_seed.json").read_text())["dropout"]["ace"][0]
    assert again_seed["train_seconds"] == pytest.approx(logged_seconds)
    # ... and a checkpoint trained under another preset is refused, not silently continued
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        run_study(tiny_preset(dropout=0.25, learning_rate=2e-3), tmp_path, studies=("dropout",), progress=False,
                  cache_dir=tmp_path / "cache")


def test_every_preset_names_known_classes_and_methods():
    from data.shapes import SHAPE_CLASS_NAMES
    from experiments.modelnet import PRESETS, SUPPORTED_METHODS

    for name, preset in PRESETS.items():
        assert preset.classes is None or set(preset.classes) <= set(SHAPE_CLASS_NAMES), name
        assert preset.classes is None or len(set(preset.classes)) == len(preset.classes), name
        assert set(preset.methods) <= set(SUPPORTED_METHODS), name
        assert preset.num_points >= preset.k, name


def test_dual_proportional_setting_reaches_the_dual_update(tmp_path):
    def final_multipliers(gain):
        preset = tiny_preset(dual_learning_rate=1e-2, num_per_class_train=8, dual_proportional=gain)
        out = tmp_path / f"k{gain}"
        run_study(preset, out, studies=("clean",), progress=False, cache_dir=tmp_path / "cache")
        assert json.loads((out / "results.json").read_text())["config"]["dual_proportional"] == gain
        log = (out / "runs" / "clean" / "ace" / "seed0" / "log.jsonl").read_text().splitlines()
        return np.array(list(json.loads(log[-1])["multiplier"].values()))

    plain, damped = final_multipliers(0.0), final_multipliers(50.0)
    assert np.all(np.isfinite(damped)) and not np.allclose(plain, damped)
    with pytest.raises(ValueError, match="dual_proportional"):
        tiny_preset(dual_proportional=-1.0)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--dual-proportional", "-1"])


def test_optimizer_options_reach_the_preset_and_are_validated():
    def preset(*options):
        return preset_from_args(build_parser().parse_args(["--out", "x", *options]))

    quick = preset("--preset", "quick", "--optimizer", "sgd", "--learning-rate", "0.05",
                   "--final-learning-rate", "1e-3", "--weight-decay", "1e-4")
    assert (quick.optimizer, quick.learning_rate, quick.final_learning_rate, quick.weight_decay) == (
        "sgd", 0.05, 1e-3, 1e-4)
    assert quick.width == 3 and quick.epochs == 12  # the rest of the quick preset is kept
    cpu_adam = preset("--preset", "cpu", "--optimizer", "adam", "--learning-rate", "1e-3")
    assert (cpu_adam.optimizer, cpu_adam.learning_rate, cpu_adam.final_learning_rate, cpu_adam.weight_decay) == (
        "adam", 1e-3, None, 0.0)
    cpu = preset("--preset", "cpu")
    assert (cpu.optimizer, cpu.learning_rate, cpu.final_learning_rate, cpu.weight_decay) == ("sgd", 0.1, 1e-3, 1e-4)
    # the cosine schedule: 0.1 at the first step, 1e-3 at the last (lr = -update / grad for SGD)
    tx = primal_optimizer(dataclasses.replace(cpu, weight_decay=0.0, momentum=0.0), steps_per_epoch=5, epochs=2)
    grads = {"params": {"w": jnp.ones(())}}
    state = tx.init(grads)
    rates = []
    for _ in range(11):
        update, state = tx.update(grads, state)
        rates.append(-float(update["params"]["w"]))
    assert rates[0] == pytest.approx(0.1) and rates[10] == pytest.approx(1e-3)
    for bad in (["--learning-rate", "0"], ["--final-learning-rate", "1.0"], ["--weight-decay", "-1"],
                ["--optimizer", "adam"], ["--optimizer", "adam", "--learning-rate", "1e-3", "--weight-decay", "1e-4"]):
        with pytest.raises(SystemExit):
            preset("--preset", "cpu", *bad)
    with pytest.raises(SystemExit):
        preset("--preset", "quick", "--weight-decay", "1e-4")  # Adam: no weight decay here
    # switching the Adam preset to SGD gives the paper's SGD (cosine decay to 1e-3, weight decay 1e-4),
    # not a constant-rate SGD without weight decay
    sgd = preset("--preset", "quick", "--optimizer", "sgd", "--learning-rate", "0.1")
    assert (sgd.optimizer, sgd.final_learning_rate, sgd.weight_decay) == ("sgd", 1e-3, 1e-4)
    sgd = preset("--preset", "quick", "--optimizer", "sgd", "--learning-rate", "0.1", "--weight-decay", "0")
    assert (sgd.final_learning_rate, sgd.weight_decay) == (1e-3, 0.0)
    sgd = preset("--preset", "quick", "--optimizer", "sgd", "--learning-rate", "5e-4")  # below the paper's end rate
    assert sgd.final_learning_rate == pytest.approx(5e-6)  # the paper's ratio, 1 % of the initial rate


def test_an_empty_methods_option_keeps_the_presets_methods():
    def methods(*options):
        return preset_from_args(build_parser().parse_args(["--out", "x", "--preset", "cpu", *options])).methods

    assert methods("--methods", "") == methods() == ("vanilla", "ace")
    assert methods("--methods", "ace") == ("ace",)


def test_a_refill_dropout_that_keeps_no_point_is_refused_when_the_preset_is_built():
    assert tiny_preset(dropout=0.9, dropout_rule="refill").dropout == 0.9  # round(14.4) = 14 of 16 dropped
    with pytest.raises(ValueError, match="drops all 16 points"):
        tiny_preset(dropout=0.98, dropout_rule="refill")  # round(15.68) = 16: before any training, not after
    assert tiny_preset(dropout=0.98).dropout == 0.98  # first-point draws a fraction in U(0, P): always keeps one


def test_a_split_missing_a_class_or_holding_non_finite_points_is_refused(monkeypatch, tmp_path):
    import data.shapes

    real = data.shapes.make_shapes

    def without_test_cubes(*args, **kwargs):
        raw = real(*args, **kwargs)
        points, labels = raw["test"]
        cube = raw["class_names"].index("cube")
        return {**raw, "test": (points[labels != cube], labels[labels != cube])}

    monkeypatch.setattr(data.shapes, "make_shapes", without_test_cubes)
    with pytest.raises(ValueError, match="test split has no cloud of class.*cube"):
        load_data("synthetic", tiny_preset(), tmp_path)

    def with_nan(*args, **kwargs):
        raw = real(*args, **kwargs)
        points, labels = raw["val"]
        points = np.array(points)
        points[np.flatnonzero(labels == raw["class_names"].index("cube"))[1], 3, 0] = np.nan
        return {**raw, "val": (points, labels)}

    monkeypatch.setattr(data.shapes, "make_shapes", with_nan)
    with pytest.raises(ValueError, match="val split has non-finite coordinates"):
        load_data("synthetic", tiny_preset(), tmp_path)


def test_a_method_whose_every_seed_diverges_is_recorded(tmp_path, monkeypatch):
    # every fit raises NonFiniteError: the study still writes its files, with null accuracies and
    # both seeds listed as diverged (no plot of a history that does not exist), and exit status 1
    import ace_jax
    from experiments import modelnet
    from experiments.common import report_diverged

    def diverge(task, train, val, test, method, config):
        raise ace_jax.NonFiniteError(f"non-finite loss at step 0 (epoch 0), seed {config.seed}")

    monkeypatch.setattr(modelnet, "fit", diverge)
    results = run_study(tiny_preset(seeds=2), tmp_path, studies=("clean",), progress=False, cache_dir=tmp_path / "cache")
    entry = json.loads((tmp_path / "results.json").read_text())["runs"]["clean"]["ace"]
    assert [d["seed"] for d in entry["diverged"]] == [0, 1]
    assert all(entry[m] == {"mean": None, "std": None} for m in METRICS)
    assert "diverged" in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "gamma_clean_ace.png").exists() and (tmp_path / "curves_clean.png").is_file()
    assert report_diverged(results) == 1


def test_label_smoothing_by_hand_and_the_papers_value():
    from experiments.modelnet import PRESETS, smoothed_cross_entropy

    # logits [ln 3, 0] → softmax [0.75, 0.25]; s = 0.2 over 2 classes → targets [0.9, 0.1]
    loss = smoothed_cross_entropy(jnp.log(jnp.array([3.0, 1.0])), jnp.asarray(0), 0.2)
    assert float(loss) == pytest.approx(-0.9 * np.log(0.75) - 0.1 * np.log(0.25), rel=1e-6)
    assert all(p.label_smoothing == 0.2 for p in PRESETS.values())


def test_validation_and_test_clouds_are_randomly_rotated_and_training_clouds_are_not():
    import data.shapes

    preset = tiny_preset()
    canonical = data.shapes.make_shapes(preset.num_per_class_train, preset.num_per_class_val,
                                        preset.num_per_class_test, num_points=preset.num_points,
                                        seed=preset.data_seed)
    canonical = subset_classes(canonical, preset.classes)
    loaded = load_data("synthetic", preset)
    for split in ("train", "val", "test"):
        original, moved = canonical[split][0], loaded[split]["points"]
        distances = lambda p: np.linalg.norm(p[:, :, None] - p[:, None, :], axis=-1)  # noqa: E731
        np.testing.assert_allclose(distances(moved), distances(original), atol=1e-5)  # a rigid motion
        change = np.max(np.abs(moved - original), axis=(1, 2))
        if split == "train":
            assert np.all(change == 0)  # rotated afresh at every step by the loss, not here
        else:
            assert np.all(change > 0.1)  # every cloud rotated (once, seeded)
    again = load_data("synthetic", preset)
    np.testing.assert_array_equal(again["test"]["points"], loaded["test"]["points"])
