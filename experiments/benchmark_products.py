"""Does a branch-sized matrix product use more than one CPU core?

    python -m experiments.benchmark_products --out DIR [--rows 500,2000,8000] [--width 128]
        [--rank 16] [--steps 300] [--repeats 2]

A Linear ACE branch on a block's flattened output is, per training step, three products of
the same size: the forward product y = x W and the two backward ones, ∂L/∂x = ȳ Wᵀ and
∂L/∂W = xᵀ ȳ. For x (M, n) and W (n, n) that is 3 · 2Mn² FLOPs. This script jit-compiles
exactly those three products (the value and gradient of ⟨x W, c⟩ for a fixed c) for each row count M,
and with ``--rank r`` also the factored branch x A B (A (n, r), B (r, n)), and times them in
fresh processes: pinned to one CPU (``os.sched_setaffinity`` before JAX starts) and on every
CPU of the process, ``--repeats`` pairs of processes in alternating order (one CPU first, then
all CPUs first, ...), each setting's time the median over its processes. The ratio of the two
is the speed-up the extra cores give that product. Prints a table and writes
DIR/benchmark_products.json: a list of records ``{"rows", "width", "rank", "ms_one_cpu",
"ms_all_cpus", "speedup", "cpus", "ms_one_cpu_runs", "ms_all_cpus_runs"}`` (rank None = the
full n × n product; the ``_runs`` lists hold each process's median). The table below was
measured before the runs were interleaved (one pair of processes per run).

Why it exists. The N-body SEGNN with dense ACE branches (experiments/nbody.py; batch 100
graphs of 5 nodes, features 32x0e + 32x1o = 128 numbers per node) runs eight such branches
per step, each on M = 500 node rows. Measured on this project's 2-core CPU, three runs of
``python -m experiments.benchmark_products --out DIR --rows 500,2000,8000 --rank 16`` (the
last two with ``--steps 1000``), median ms of the three products:

| rows M | full 128 × 128, 1 CPU | 2 CPUs | speed-up | rank 16, 1 CPU | 2 CPUs | speed-up |
|---|---|---|---|---|---|---|
| 500 | 0.53–0.63 | 0.69–0.75 | 0.73–0.90× | 0.21–0.28 | 0.36–0.37 | 0.60–0.76× |
| 2000 | 2.39–2.83 | 2.00–2.53 | 0.95–1.42× | 0.85–0.99 | 0.78–0.87 | 1.02–1.14× |
| 8000 | 10.4–11.4 | 7.2–9.2 | 1.13–1.44× | 4.9–5.6 | 3.0–3.7 | 1.51–1.66× |

(An earlier version timed only the gradient, from which XLA drops the forward product — two
products, not three: 0.357 ms for M = 500 on one CPU, 0.42–0.47 ms on two.)

A product of 500 rows does not get faster with a second core; it gets slower (thread
hand-off costs more than it saves). Splitting it into two independent products of 250 rows
did not help either (XLA's runtime did not run them side by side), and it stayed serial with
XNNPACK off, with the YNNPACK/XNNPACK fusions off and with oneDNN (``XLA_FLAGS``; timed with a
tanh on the product). Larger products gain from the second core (8000 rows: 1.13–1.44×). So
the eight dense branches cost 8 × 0.69–0.75 = 5.5–6.0 ms of products per step on two cores —
most of the 7.2 ms by which the ACE step exceeds the vanilla step there (``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1 python -m experiments.benchmark --models segnn --methods vanilla,ace
--steps 100`` in the same session as the table: 29.98 vs 37.16 ms, 1.24×; an earlier session
measured 23.5 vs 29.7 ms, 1.27×) — while
on one core they are 8 × 0.53–0.63 = 4.2–5.0 ms of a step of about 52 ms (8–10 %; measured
ratio 1.09–1.12×). That is why the issue's ≤ 1.10× on two cores is out of reach for the paper's
dense branch on this CPU: the branch products alone are a fifth of the two-core vanilla step.
Rank-16 branches cost 8 × 0.36 = 2.9 ms of products on two cores (benchmark row
``segnn_rank16``: 1.16×).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def parse_counts(text: str, name: str) -> list[int]:
    """Comma-separated positive integers, e.g. "500,2000"; a clear error otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must list integers >= 1, got {text!r}")
    return values


def time_products(rows: int, width: int, rank: int | None, steps: int, seed: int = 0) -> float:
    """Median wall time (ms) of the forward and both backward products of one Linear branch.

    Full branch: y = x W, x (rows, width), W (width, width). Factored (``rank`` r): y = (x A) B,
    A (width, r), B (r, width). The timed function returns (∂L/∂x, ∂L/∂weights) of L = ⟨y, c⟩.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(keys[0], (rows, width))
    cotangent = jax.random.normal(keys[1], (rows, width))
    if rank is None:
        weights = (jax.random.normal(keys[2], (width, width)),)
    else:
        weights = (jax.random.normal(keys[2], (width, rank)), jax.random.normal(keys[3], (rank, width)))

    def loss(x, weights):
        y = x
        for w in weights:
            y = y @ w
        return jnp.vdot(y, cotangent)

    # value AND gradients: the gradient of a linear loss alone does not need y = x W, and XLA
    # drops that product (2 dots left, not 3); the value keeps it in the program
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(x, weights))
    for _ in range(min(steps, 20)):  # warm-up
        jax.block_until_ready(step(x, weights))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step(x, weights))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _worker(args) -> None:
    if args.one_cpu:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX creates its threads
    ranks = [None] + ([args.rank] if args.rank else [])
    out = []
    for rows in parse_counts(args.rows, "--rows"):
        for rank in ranks:
            out.append({"rows": rows, "width": args.width, "rank": rank,
                        "ms": time_products(rows, args.width, rank, args.steps)})
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "results": out}))


def _run_worker(argv: list[str], one_cpu: bool) -> dict:
    command = [sys.executable, "-m", "experiments.benchmark_products", "--worker", *argv]
    if one_cpu:
        command.append("--one-cpu")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", default="500,2000,8000", help="row counts M (comma-separated)")
    parser.add_argument("--width", type=int, default=128, help="branch width n")
    parser.add_argument("--rank", type=int, default=16, help="also time the rank-r factored branch (0: no)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2,
                        help="worker pairs, run in alternating order (one CPU first, then all CPUs first, ...)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parse_counts(args.rows, "--rows")
    if args.width < 1 or args.rank < 0 or args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--width, --steps and --repeats must be >= 1 and --rank >= 0, got {args.width}, "
                         f"{args.steps}, {args.repeats}, {args.rank}")
    if args.worker:
        _worker(args)
        return None
    if args.out is None:
        parser.error("--out is required")
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("pinning to one CPU needs os.sched_setaffinity (Linux)")

    from experiments.common import markdown_table, write_json

    shared = ["--rows", args.rows, "--width", str(args.width), "--rank", str(args.rank), "--steps", str(args.steps)]
    # interleaved: pairs of workers in alternating order, so a slow phase of a shared machine
    # does not land on one setting only; each setting's time is the median over its runs
    runs = {True: [], False: []}
    for repeat in range(args.repeats):
        for one_cpu in ((True, False) if repeat % 2 == 0 else (False, True)):
            runs[one_cpu].append(_run_worker(shared, one_cpu=one_cpu))
    every = runs[False][0]
    records = []
    for k, shape in enumerate(every["results"]):
        one_ms = [run["results"][k]["ms"] for run in runs[True]]
        all_ms = [run["results"][k]["ms"] for run in runs[False]]
        a, b = float(np.median(one_ms)), float(np.median(all_ms))
        records.append({"rows": shape["rows"], "width": shape["width"], "rank": shape["rank"],
                        "ms_one_cpu": round(a, 6), "ms_all_cpus": round(b, 6),
                        "speedup": round(a / b, 3), "cpus": every["cpus"],
                        "ms_one_cpu_runs": [round(t, 6) for t in one_ms], "ms_all_cpus_runs": [round(t, 6) for t in all_ms]})
    header = ["rows", "width", "rank", "1 CPU ms", f"{every['cpus']} CPUs ms", "speed-up"]
    table = [[r["rows"], r["width"], r["rank"] or "full", f"{r['ms_one_cpu']:.3f}", f"{r['ms_all_cpus']:.3f}",
              f"{r['speedup']:.2f}x"]
             for r in records]
    print(markdown_table(header, table))
    write_json(f"{args.out}/benchmark_products.json", records)
    return records


if __name__ == "__main__":
    main()
