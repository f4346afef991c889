"""Checkpoint and resume of vmapped seeds (experiments/vmapped_seeds.py): the same per-seed
checkpoints as ``fit``, seeds left at different epochs brought level, diverged seeds kept."""

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import ace_jax as aj
from experiments import vmapped_seeds
from experiments.common import Diverged
from experiments.vmapped_seeds import fit_seeds_vmapped
from cpu_devices import run_on_cpu_devices
from toy_models import odd_task

SEEDS = [0, 1, 2]


def _data(n=48):
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([[1.0], [-2.0]]) + 0.5).astype(np.float32)}


def _config(**kw):
    base = dict(epochs=4, batch_size=8, eval_batch_size=16, learning_rate=2e-2, dual_learning_rate=5e-2,
                progress=False)
    return aj.TrainConfig(**{**base, **kw})


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _count_saves(monkeypatch, save):
    """Patch vmapped_seeds.save_checkpoint to record which seed folder (its index) each save writes."""
    saved = []

    def counting(path, *args):
        saved.append(int(path.parent.name[1:]))
        save(path, *args)

    monkeypatch.setattr(vmapped_seeds, "save_checkpoint", counting)
    return saved


def _strip_log(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "log.jsonl")]


def _assert_same_run(got, want, rtol=1e-6):
    assert got.best_epoch == want.best_epoch
    assert [r["epoch"] for r in got.history] == [r["epoch"] for r in want.history]
    for mine, theirs in zip(got.history, want.history):
        for key in ("train_loss", "train_lagrangian"):
            np.testing.assert_allclose(mine[key], theirs[key], rtol=rtol)
        for key in ("gamma", "multiplier"):
            np.testing.assert_allclose(list(mine[key].values()), list(theirs[key].values()), rtol=rtol, atol=1e-8)
    for mode in ("projection", "full"):
        np.testing.assert_allclose(got.test[mode]["metric"], want.test[mode]["metric"], rtol=rtol)
    assert int(got.state.step) == int(want.state.step)  # a held seed's step counter (its key stream) stood still
    for a, b in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(want.state.params)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-8)


@pytest.mark.parametrize("method", ["ace", "unconstrained"])  # unconstrained: each step's key draws the flips
def test_a_run_killed_between_two_seeds_checkpoints_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch,
                                                                                       method):
    task, _ = odd_task()
    data = _data()
    whole = fit_seeds_vmapped(task, data, data, data, method, _config(), SEEDS,
                              out_dirs=[tmp_path / "whole" / f"s{s}" for s in SEEDS])
    # killed while writing epoch 1: seed 0 has saved it, seeds 1 and 2 stand at epoch 0
    save, calls = vmapped_seeds.save_checkpoint, []

    def killed_at_the_fifth_save(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        save(*args)

    cut_dirs = [tmp_path / "cut" / f"s{s}" for s in SEEDS]
    monkeypatch.setattr(vmapped_seeds, "save_checkpoint", killed_at_the_fifth_save)
    with pytest.raises(KeyboardInterrupt):
        fit_seeds_vmapped(task, data, data, data, method, _config(), SEEDS, out_dirs=cut_dirs)
    assert [len(list(open(d / "log.jsonl"))) for d in cut_dirs] == [2, 2, 1]  # seed 1 logged epoch 1, unsaved
    saved = _count_saves(monkeypatch, save)
    resumed = fit_seeds_vmapped(task, data, data, data, method, _config(), SEEDS, out_dirs=cut_dirs)
    assert saved == [1, 2, 0, 1, 2, 0, 1, 2]  # only the missing epochs: seeds 1, 2 catch up, then all three
    for got, want, d in zip(resumed, whole, cut_dirs):
        _assert_same_run(got, want)
        assert [r["epoch"] for r in got.history] == [0, 1, 2, 3]
        assert len(list(open(d / "log.jsonl"))) == 4
    # each seed's folder is a fit run's folder: fit resumes the finished checkpoint as its own
    again = aj.fit(task, data, data, data, method, _config(seed=1, out_dir=str(cut_dirs[1])))
    assert again.best_epoch == resumed[1].best_epoch and _strip(again.history) == _strip(resumed[1].history)
    np.testing.assert_allclose(again.test["full"]["metric"], resumed[1].test["full"]["metric"], rtol=1e-6)


def test_a_seed_added_later_catches_up_and_equals_its_own_run(tmp_path, monkeypatch):
    task, _ = odd_task()
    data = _data()
    dirs = [tmp_path / f"s{s}" for s in SEEDS]
    aj.fit(task, data, data, data, "ace", _config(seed=0, epochs=2, out_dir=str(dirs[0])))  # seed 0 alone, by fit
    saved = _count_saves(monkeypatch, vmapped_seeds.save_checkpoint)
    got = fit_seeds_vmapped(task, data, data, data, "ace", _config(), SEEDS, out_dirs=dirs)
    assert saved == [1, 2, 1, 2, 0, 1, 2, 0, 1, 2]  # seeds 1, 2 from scratch, then seed 0 joins at epoch 2
    for seed, result in zip(SEEDS, got):
        want = aj.fit(task, data, data, data, "ace", _config(seed=seed))
        _assert_same_run(result, want, rtol=1e-5)  # batched against single matmuls: round-off only


def test_a_diverged_seed_diverges_again_on_resume_and_the_others_are_kept(tmp_path):
    # NaN wherever the first weight is > 0: some seeds start there (fail at step 0, no
    # checkpoint), some cross later (fail after a few good epochs), some never do
    task, _ = odd_task(nan_if_first_weight_positive=True)
    data = _data()
    seeds = list(range(8))
    dirs = [tmp_path / f"s{s}" for s in seeds]
    first = fit_seeds_vmapped(task, data, data, data, "ace", _config(), seeds, out_dirs=dirs)
    late = [i for i, r in enumerate(first) if isinstance(r, Diverged) and (dirs[i] / "checkpoint.msgpack").exists()]
    at_once = [i for i, r in enumerate(first) if isinstance(r, Diverged) and i not in late]
    ok = [i for i, r in enumerate(first) if not isinstance(r, Diverged)]
    assert late and at_once and ok
    kept = {i: (dirs[i] / "checkpoint.msgpack").read_bytes() for i in late + ok}
    logs = {i: _strip_log(dirs[i]) for i in late + ok}
    second = fit_seeds_vmapped(task, data, data, data, "ace", _config(), seeds, out_dirs=dirs)
    for i in late + at_once:  # retrained from the last good checkpoint (or from the start): the same failure
        assert isinstance(second[i], Diverged) and second[i].error == first[i].error
        if i in late:  # named as fit names it
            epoch = first[i].error.split("(epoch ")[1].split(")")[0]
            assert f"the last good checkpoint (epoch {int(epoch) - 1}) is kept at {dirs[i] / 'checkpoint.msgpack'}" \
                in first[i].error
    for i in ok:  # finished: restored, not retrained
        _assert_same_run(second[i], first[i], rtol=0)
    for i in late + ok:  # a failure leaves the last good checkpoint; a finished seed is not rewritten
        assert (dirs[i] / "checkpoint.msgpack").read_bytes() == kept[i]
        assert _strip_log(dirs[i]) == logs[i] and logs[i]


def test_vmapped_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    task, _ = odd_task()
    data = _data()
    dirs = [tmp_path / f"s{s}" for s in SEEDS[:2]]
    fit_seeds_vmapped(task, data, data, data, "ace", _config(epochs=2), SEEDS[:2], out_dirs=dirs)
    with pytest.raises(ValueError, match=r"s0.*learning_rate: checkpoint 0.02, this run 0.01"):
        fit_seeds_vmapped(task, data, data, data, "ace", _config(epochs=2, learning_rate=1e-2), SEEDS[:2],
                          out_dirs=dirs)
    # resume=False starts afresh (and overwrites)
    fresh = fit_seeds_vmapped(task, data, data, data, "ace", _config(epochs=1, learning_rate=1e-2, resume=False),
                              SEEDS[:2], out_dirs=dirs)
    assert [r["epoch"] for r in fresh[0].history] == [0]
    assert [len(list(open(d / "log.jsonl"))) for d in dirs] == [1, 1]  # the old logs are not continued


def test_seeds_split_over_two_devices_give_the_one_device_numbers(tmp_path):
    # the seed axis sharded over 2 (forced host) devices, a seed catching up included
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).parent)!r}); sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import jax
        import ace_jax as aj
        from experiments.vmapped_seeds import fit_seeds_vmapped, seed_devices
        from test_vmapped_resume import _data, _config
        from toy_models import odd_task
        assert jax.local_device_count() == 2, jax.devices()
        counts = [len(seed_devices(n)) for n in (1, 2, 3, 4)] + [len(seed_devices(4, data_parallel=False))]
        task, _ = odd_task()
        data = _data()
        out = {{"counts": counts}}
        for dp in (True, False):
            root = {str(tmp_path)!r} + f"/{{dp}}"
            aj.fit(task, data, data, data, "unconstrained", _config(seed=0, epochs=2, out_dir=root + "/s0"))
            got = fit_seeds_vmapped(task, data, data, data, "unconstrained", _config(data_parallel=dp), [0, 1],
                                    out_dirs=[root + "/s0", root + "/s1"])
            out[str(dp)] = [[r["train_loss"] for r in g.history] + [g.test["full"]["metric"], int(g.state.step)]
                            for g in got]
        print(json.dumps(out))
        """
    )
    out = run_on_cpu_devices(script)
    assert out["counts"] == [1, 2, 1, 2, 1]
    np.testing.assert_allclose(out["True"], out["False"], rtol=1e-5)
