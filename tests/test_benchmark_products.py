import json
import os

import pytest

from experiments import benchmark_products


def test_parse_counts_accepts_lists_and_names_bad_input():
    assert benchmark_products.parse_counts("500, 2000", "--rows") == [500, 2000]
    with pytest.raises(ValueError, match="--rows"):
        benchmark_products.parse_counts("500,x", "--rows")
    with pytest.raises(ValueError, match="--rows"):
        benchmark_products.parse_counts("0", "--rows")


def test_time_products_times_full_and_factored_branches():
    assert benchmark_products.time_products(8, 4, None, steps=3) > 0
    assert benchmark_products.time_products(8, 4, 2, steps=3) > 0
    with pytest.raises(ValueError, match="steps"):
        benchmark_products.time_products(8, 4, None, steps=0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning to one CPU needs Linux")
def test_cli_writes_one_record_per_shape_with_both_timings(tmp_path):
    records = benchmark_products.main(
        ["--out", str(tmp_path), "--rows", "8,16", "--width", "4", "--rank", "2", "--steps", "3", "--repeats", "2"])
    written = json.loads((tmp_path / "benchmark_products.json").read_text())
    assert written == records
    assert [(r["rows"], r["rank"]) for r in written] == [(8, None), (8, 2), (16, None), (16, 2)]
    for r in written:
        assert r["ms_one_cpu"] > 0 and r["ms_all_cpus"] > 0 and r["cpus"] >= 1
        assert r["speedup"] == pytest.approx(r["ms_one_cpu"] / r["ms_all_cpus"], rel=1e-2)
        assert len(r["ms_one_cpu_runs"]) == len(r["ms_all_cpus_runs"]) == 2  # one per process
        assert r["ms_one_cpu"] == pytest.approx(sum(r["ms_one_cpu_runs"]) / 2, rel=1e-4)  # median of two


def test_cli_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="--width"):
        benchmark_products.main(["--out", str(tmp_path), "--width", "0"])


def test_worker_pairs_alternate_their_order(tmp_path, monkeypatch):
    order = []

    def fake_worker(argv, one_cpu):
        order.append(one_cpu)
        ms = 2.0 if one_cpu else 1.0
        return {"cpus": 2, "results": [{"rows": 8, "width": 4, "rank": None, "ms": ms + 0.1 * len(order)}]}

    monkeypatch.setattr(benchmark_products, "_run_worker", fake_worker)
    monkeypatch.setattr(benchmark_products.os, "sched_setaffinity", lambda *a: None, raising=False)
    records = benchmark_products.main(["--out", str(tmp_path), "--rows", "8", "--width", "4", "--rank", "0",
                                       "--repeats", "3"])
    assert order == [True, False, False, True, True, False]  # one CPU first, then all CPUs first, ...
    (record,) = records
    assert record["ms_one_cpu_runs"] == [2.1, 2.4, 2.5] and record["ms_one_cpu"] == 2.4  # median per setting
    assert record["ms_all_cpus_runs"] == [1.2, 1.3, 1.6] and record["ms_all_cpus"] == 1.3
