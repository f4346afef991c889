"""Jit-benchmark one training step per model and method (vanilla, ACE equality, ACE resilient).

    python -m experiments.benchmark --out DIR [--models c4_cnn,segnn] [--methods vanilla,ace] [--steps 50] [--batch N]
        [--devices N]

For each model and method the step built by :func:`ace_jax.engine.make_trainer` (the same
program ``fit`` runs: vmapped loss, primal Adam, dual ascent, slack descent) is compiled, warmed
up, then timed over ``--steps`` calls (rounded up to a multiple of 10) with
``block_until_ready``; the methods of one model are timed interleaved (round-robin blocks of
steps) so machine noise does not bias their ratio. Every method of a model times the model
its study module's ``benchmark_case`` builds; for the N-body models that is the model with
plain (not spectrally normalised) branches, so their ``ace-resilient`` rows time
``experiments.nbody --spectral-branch off``, not that study's default for ace-resilient
(spectral branches, 10 power steps per branch and step). Prints a table (with the ACE /
vanilla step ratio) and writes DIR/benchmark.json after every model: a list of records
``{"model", "method", "batch", "params", "compile_s", "step_ms_median", "step_ms_p90",
"temp_mib", "page_faults_per_step", "timed_steps", "devices", "device"}``. Without ``--models``, a model
whose study module or data is missing (EGNO without ../shared/data; the QM9 rows need no
qm9pack, their batch comes from the tests' tiny QM9 file) is skipped with a message; named in
``--models``, it is an error.

``--devices N`` times the step ``fit`` runs on N devices (``TrainConfig(data_parallel=True)``,
the default, uses every local device): each batch split along its example axis over the first
N local devices (a one-axis ``jax.sharding`` mesh), the state replicated; ``devices`` in a
record is the number of devices the trained state ends on. Every model's batch must divide by
N (checked before anything is timed). On a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes N host devices.

``temp_mib`` is the compiled step's scratch memory (XLA's memory analysis) and
``page_faults_per_step`` the process's minor page faults per timed step. On the CPU the XLA
runtime allocates the scratch buffer afresh at every call; glibc serves an allocation above
its mmap threshold (at most 32 MiB) with a fresh mapping, so a step whose scratch exceeds
32 MiB faults in (and the kernel zeroes) new pages on every call, a cost that a program just
under the threshold does not pay. Measured on the quiet 2-core CPU, interleaved: the N-body
SEGNN with rank-16 ACE branches as they were before γ was folded into the branch weights
(32.9 MiB scratch) took 5418 faults per step and 1.46× the vanilla step (29.4 MiB, 4
faults); with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment (transparent huge
pages for those mappings) 105 faults and 1.19×. A ratio between a row that faults and one that
does not measures the allocator, not ACE. The QM9 steps (about 150 MiB scratch, 38 000
faults per step) all pay it: with that setting the vanilla QM9-SEGNN step went from 392 to
345 ms and the SchNet step from 199 to 155 ms.

XLA:CPU options do not close the N-body SEGNN gap (batch 100, 2 cores, QM9 runs paused, one
interleaved run of 60 steps per setting, ``XLA_FLAGS=...``; vanilla / ACE median): default
41.4 / 52.0 ms (1.26×); ``--xla_cpu_use_xnnpack=true`` 36.7 / 45.2 ms (1.23×), with
``--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY`` added 44.7 / 52.0
ms (1.16×, the vanilla step slower); ``--xla_cpu_use_onednn=true`` 34.3 / 43.5 ms (1.27×);
``--xla_cpu_enable_concurrency_optimized_scheduler=true`` 36.5 / 45.9 ms (1.26×). The code sets
no XLA flag. Nor does splitting the batch over two host devices, one per core (session 25, both
trainings paused, ``XLA_FLAGS=--xla_force_host_platform_device_count=2``, 60 steps): vanilla /
ACE 28.0 / 37.5 ms (1.34×) with ``--devices 1`` against 33.1 / 43.5 ms (1.31×) with
``--devices 2``.

On one NVIDIA H200 (README, "On a GPU"; one run per model, 100 steps) the small graph steps
run far below the card's arithmetic and memory rates, so their time seems to follow the number
of kernels rather than the arithmetic (an inference; no profiler was run): vanilla / ACE SEGNN 6.76 / 9.84 ms (1.46×),
SEGNN rank 16 7.83 / 12.52 ms (1.60×), EGNN 3.93 / 5.34 ms (1.36×), SchNet 3.93 / 6.08 ms
(1.55×), while VN-DGCNN (batch 32) takes 15.29 / 14.55 ms (0.95×).

Each model's study module provides ``benchmark_case(...) -> (Task, batch)``.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import time

import jax
import numpy as np

from ace_jax import TrainConfig, make_trainer
from ace_jax.engine import data_shardings
from experiments.common import markdown_table, parse_list, write_json

# model name -> (study module, extra positional args to benchmark_case before batch, default
# batch, keyword args of benchmark_case). "<model>_<kind>" rows time another branch kind.
MODELS = {
    "c4_cnn": ("experiments.c4_toy", (), 32, {}),
    "segnn": ("experiments.nbody", ("segnn",), 100, {}),
    "segnn_in_kernel": ("experiments.nbody", ("segnn",), 100, {"branch_kind": "in_kernel"}),
    "segnn_rank16": ("experiments.nbody", ("segnn",), 100, {"branch_rank": 16}),
    "egnn": ("experiments.nbody", ("egnn",), 100, {}),
    "egno": ("experiments.mocap", (), 12, {}),
    "schnet": ("experiments.qm9", ("schnet",), 100, {}),
    "segnn_qm9": ("experiments.qm9", ("segnn",), 32, {}),
    "segnn_qm9_rank16": ("experiments.qm9", ("segnn",), 32, {"branch_rank": 16}),
    "vn_dgcnn": ("experiments.modelnet", (), 32, {}),
    "vn_dgcnn_axis": ("experiments.modelnet", (), 32, {"branch_kind": "axis"}),
}
METHODS = ("vanilla", "ace", "ace-resilient")


def param_count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def compile_step(task, batch, method: str, seed: int = 0, state_sharding=None):
    """``(state, compiled_step, compile_s)`` for ``task`` under ``method`` on one fixed ``batch``.

    ``state_sharding`` (e.g. replicated over a mesh, as ``fit`` places it) places the initial
    state; the compiled step takes the shardings of the state and of ``batch`` as given."""
    config = TrainConfig(epochs=1, batch_size=1, progress=False)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    state, train_step = make_trainer(task, method, config, init_key, train_key)
    if state_sharding is not None:
        state = jax.device_put(state, state_sharding)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    return state, compiled, time.perf_counter() - t0


def data_parallel(batch, devices: int):
    """``(batch, state_sharding)`` for a step over the first ``devices`` local devices, as ``fit``
    runs it with ``TrainConfig(data_parallel=True)``: the batch split along its leading (example)
    axis over a one-axis mesh ``"data"``, the state replicated. One device: the batch on the
    default device and no state placement (the plain single-device step)."""
    available = jax.local_devices()
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if devices > len(available):
        raise ValueError(
            f"{devices} devices requested but JAX sees {len(available)} local device(s) ({available[0].platform}); "
            "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices"
        )
    if devices == 1:
        return jax.device_put(batch), None
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(batch)}
    if any(size % devices for size in sizes):
        raise ValueError(f"a batch of {sorted(sizes)} examples cannot be split evenly over {devices} devices")
    batch_sharding, replicated = data_shardings(available[:devices])  # the shardings fit uses
    return jax.device_put(batch, batch_sharding), replicated


def time_methods(task, batch, methods, steps: int, warmup: int = 5, rounds: int = 10, devices: int = 1) -> dict:
    """Compile every method's step, then time them *interleaved*: ``rounds`` rounds in which each
    method runs ``ceil(steps / rounds)`` steps in turn (so ``steps`` is rounded up to a multiple
    of ``rounds``; the record's ``timed_steps`` says how many were timed) (in reversed order every other round), so
    a slow phase of a shared machine hits all methods alike instead of whichever happened to run
    then, and no method always runs first. Returns per method the
    parameter count, compile seconds, the median / p90 of the per-step wall times and the number
    of devices the trained state ends on (``devices`` > 1: the step of :func:`data_parallel`)."""
    batch, state_sharding = data_parallel(batch, devices)
    runs = {}
    for method in methods:
        state, compiled, compile_s = compile_step(task, batch, method, state_sharding=state_sharding)
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        runs[method] = {"state": state, "step": compiled, "compile_s": compile_s, "times": [], "faults": 0}
    per_round = -(-steps // rounds)
    for round_index in range(rounds):
        order = list(runs.values())
        for run in order if round_index % 2 == 0 else order[::-1]:  # alternate, so no method always goes first
            state = run["state"]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(per_round):
                t = time.perf_counter()
                state, metrics = run["step"](state, batch)
                jax.block_until_ready(state)
                run["times"].append(time.perf_counter() - t)
            run["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            run["state"], run["metrics"] = state, metrics
    out = {}
    for method, run in runs.items():
        if int(run["state"].first_bad_step) >= 0:  # any step, warm-up included (the state froze there)
            raise FloatingPointError(f"{method}: the benchmarked step produced non-finite values at step "
                                     f"{int(run['state'].first_bad_step)}")
        times_ms = 1e3 * np.asarray(run["times"])
        out[method] = {
            "params": param_count(run["state"].params),
            "compile_s": round(run["compile_s"], 3),
            "step_ms_median": round(float(np.median(times_ms)), 3),
            "step_ms_p90": round(float(np.percentile(times_ms, 90)), 3),
            "temp_mib": scratch_mib(run["step"]),
            "page_faults_per_step": round(run["faults"] / len(times_ms), 1),
            "timed_steps": len(times_ms),
            "devices": len(jax.tree.leaves(run["state"].params)[0].sharding.device_set),
        }
    return out


def scratch_mib(compiled) -> float | None:
    """Scratch (temporary) memory of a compiled step in MiB, or None where XLA does not say."""
    analysis = compiled.memory_analysis()
    size = getattr(analysis, "temp_size_in_bytes", None)
    return None if size is None else round(size / 2**20, 2)


def load_case(model: str, batch: int | None):
    module_name, args, default_batch, kwargs = MODELS[model]
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    module = importlib.import_module(module_name)
    size = default_batch if batch is None else batch
    task, data = module.benchmark_case(*args, size, **kwargs)
    return task, data, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps after warm-up (>= 50 recommended)")
    parser.add_argument("--batch", type=int, default=None, help="override every model's default batch")
    parser.add_argument("--devices", type=int, default=1,
                        help="split each batch over this many local devices, state replicated (as fit does)")
    args = parser.parse_args(argv)

    models = parse_list(args.models, tuple(MODELS), "models")  # all models when not given
    methods = parse_list(args.methods, METHODS, "methods")
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.devices < 1:
        raise SystemExit(f"--devices must be >= 1, got {args.devices}")
    if args.devices > jax.local_device_count():
        raise SystemExit(
            f"--devices {args.devices}: JAX sees {jax.local_device_count()} local device(s); on a CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} makes that many host devices"
        )
    for model in models:
        size = args.batch if args.batch is not None else MODELS[model][2]
        if size % args.devices:
            raise SystemExit(f"{model}: a batch of {size} examples cannot be split evenly over {args.devices} devices")

    device = str(jax.devices()[0].device_kind)
    records, rows = [], []
    for model in models:
        try:
            task, batch, size = load_case(model, args.batch)
        except (ImportError, AttributeError, FileNotFoundError) as err:
            if args.models:  # explicitly asked for: fail loudly
                raise
            # e.g. egno without ../shared/data (the MoCap file) or qm9 models without qm9pack
            print(f"skipping {model}: its study module or data is not available ({err})")
            continue
        timings = time_methods(task, batch, methods, args.steps, devices=args.devices)
        base = timings["vanilla"]["step_ms_median"] if "vanilla" in timings else None
        for method in methods:
            rec = {"model": model, "method": method, "batch": size, **timings[method], "device": device}
            records.append(rec)
            ratio = f"{rec['step_ms_median'] / base:.2f}x" if base else "-"
            rows.append([
                model, method, size, rec["params"], rec["compile_s"], rec["step_ms_median"], rec["step_ms_p90"], ratio,
                rec["temp_mib"], rec["page_faults_per_step"],
            ])
            print(
                f"{model:10s} {method:14s} median {rec['step_ms_median']:8.2f} ms  p90 {rec['step_ms_p90']:8.2f} ms  {ratio}"
                f"  scratch {rec['temp_mib']} MiB  {rec['page_faults_per_step']} faults/step",
                flush=True,
            )
        write_json(f"{args.out}/benchmark.json", records)  # after every model: a later failure keeps these
    headers = ["model", "method", "batch", "params", "compile s", "median ms", "p90 ms", "vs vanilla", "scratch MiB", "faults/step"]
    table = markdown_table(headers, rows)
    split = f" x {args.devices} (each batch split over them, state replicated)" if args.devices > 1 else ""
    print(f"\ndevice: {device}{split}\n" + table)
    write_json(f"{args.out}/benchmark.json", records)


if __name__ == "__main__":
    main()
