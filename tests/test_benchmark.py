"""The step benchmark: every method of one model is compiled and timed, interleaved."""

import json

import pytest

from experiments import benchmark


def test_time_methods_reports_every_method_with_positive_times():
    task, batch, size = benchmark.load_case("c4_cnn", 2)
    timings = benchmark.time_methods(task, batch, ["vanilla", "ace"], steps=4, warmup=1, rounds=2)
    assert set(timings) == {"vanilla", "ace"}
    for record in timings.values():
        assert record["step_ms_median"] > 0 and record["step_ms_p90"] >= record["step_ms_median"]
        assert record["compile_s"] > 0
    # ACE adds branch parameters to the same equivariant network.
    assert timings["ace"]["params"] > timings["vanilla"]["params"]


def test_cli_writes_the_documented_records(tmp_path, capsys):
    # ACE listed first: its ratio is still taken against vanilla
    benchmark.main(["--out", str(tmp_path), "--models", "c4_cnn", "--methods", "ace,vanilla", "--steps", "2", "--batch", "2"])
    records = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["method"] for r in records] == ["ace", "vanilla"]
    for r in records:
        assert set(r) == {
            "model", "method", "batch", "params", "compile_s", "step_ms_median", "step_ms_p90", "temp_mib",
            "page_faults_per_step", "timed_steps", "devices", "device",
        }
        assert r["model"] == "c4_cnn" and r["batch"] == 2 and r["timed_steps"] == 10  # 2 rounded up to 10 rounds
        assert r["temp_mib"] > 0 and r["page_faults_per_step"] >= 0
        assert r["devices"] == 1
    out = capsys.readouterr().out
    ace_row = next(line for line in out.splitlines() if line.startswith("| c4_cnn | ace |"))
    vanilla_row = next(line for line in out.splitlines() if line.startswith("| c4_cnn | vanilla |"))
    ace, vanilla = (next(r for r in records if r["method"] == m)["step_ms_median"] for m in ("ace", "vanilla"))
    assert ace_row.split("|")[8].strip() == f"{ace / vanilla:.2f}x"  # ACE over vanilla, not the inverse
    assert vanilla_row.split("|")[8].strip() == "1.00x"


def test_scratch_memory_is_the_compiled_steps_temp_buffer():
    """Hand-checked: sin(2x) @ cos(3x) on a 1 MiB float32 x keeps two 1 MiB operands: ≤ 2 MiB."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x * 2.0) @ jnp.cos(x * 3.0)).lower(jnp.ones((512, 512))).compile()
    assert 0 < benchmark.scratch_mib(f) <= 2.0 + 1e-6


def test_unknown_model_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown model"):
        benchmark.main(["--out", str(tmp_path), "--models", "resnet"])


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--methods", ","], "no methods given"),
    (["--methods", "ace,ace"], "methods named more than once: ace"),
    (["--methods", "ace,bogus"], "unknown methods: bogus"),
    (["--models", "c4_cnn,c4_cnn"], "models named more than once: c4_cnn"),
    (["--devices", "0"], "--devices must be >= 1"),
    (["--devices", "2"], "--devices 2: JAX sees 1 local device"),
])
def test_invalid_cli_values_are_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(["--out", str(tmp_path), "--models", "c4_cnn", *flags])


def test_data_parallel_step_splits_the_batch_and_keeps_the_numbers():
    """Under two forced host devices, ``--devices 2`` times the step with the batch split over both
    and the state replicated on both, and that step computes the one-device step (same
    parameters after three steps, to float32 round-off). A batch that does not divide is refused,
    by the CLI before anything is timed."""
    from tests.cpu_devices import run_on_cpu_devices

    script = """
import json
import jax, numpy as np
from experiments import benchmark
task, batch, _ = benchmark.load_case("c4_cnn", 4)
params = {}
for devices in (1, 2):
    b, sharding = benchmark.data_parallel(batch, devices)
    state, step, _ = benchmark.compile_step(task, b, "ace", state_sharding=sharding)
    for _ in range(3):
        state, _ = step(state, b)
    params[devices] = state.params
    if devices == 2:
        assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(b)} == {2}
        assert {s.data.shape[0] for leaf in jax.tree.leaves(b) for s in leaf.addressable_shards} == {2}  # 4 = 2 + 2
        assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state.params)} == {2}
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2])))
timed = benchmark.time_methods(task, batch, ["ace"], steps=1, warmup=1, rounds=1, devices=2)
refused = []
try:
    benchmark.data_parallel(benchmark.load_case("c4_cnn", 3)[1], 2)
except ValueError as err:
    refused.append(str(err))
try:
    benchmark.main(["--out", "/dev/null/never", "--models", "c4_cnn,segnn", "--batch", "3", "--devices", "2"])
except SystemExit as err:
    refused.append(str(err))
print(json.dumps({"diff": diff, "devices": {m: r["devices"] for m, r in timed.items()}, "refused": refused}))
"""
    out = run_on_cpu_devices(script)
    assert out["diff"] < 1e-5
    assert out["devices"] == {"ace": 2}
    assert out["refused"] == [
        "a batch of [3] examples cannot be split evenly over 2 devices",
        "c4_cnn: a batch of 3 examples cannot be split evenly over 2 devices",
    ]
