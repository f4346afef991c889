"""Shared study helpers: strict JSON output and seed summaries."""

import argparse
import json
import math

import numpy as np

import pytest

from experiments.common import add_study_args, mean_std_cell, parse_list, summarize, write_json


def test_write_json_is_strict_json_for_nan_and_inf(tmp_path):
    path = tmp_path / "out" / "r.json"
    write_json(path, {"nan": float("nan"), "inf": np.float32(np.inf), "neg": -math.inf, "ok": np.float64(0.5),
                      "list": [np.int64(3), np.array([1.0, np.nan])]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict parse
    assert data == {"nan": None, "inf": None, "neg": None, "ok": 0.5, "list": [3, [1.0, None]]}


def test_summarize_reports_no_mean_when_a_seed_diverged():
    assert summarize([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0)}  # sample std (n - 1)
    one = summarize([0.004])  # one seed: a mean, no sample std (null in JSON, not 0)
    assert one["mean"] == 0.004 and math.isnan(one["std"])
    assert math.isnan(summarize([float("inf")])["std"])
    out = summarize([0.004, float("nan"), 0.005])
    assert math.isnan(out["mean"]) and math.isnan(out["std"])


def test_study_lists_and_counts_refuse_empty_repeated_and_negative_values():
    known = ("vanilla", "ace")
    assert parse_list(None, known, "methods") == ["vanilla", "ace"]
    assert parse_list(" ace ,vanilla", known, "methods") == ["ace", "vanilla"]
    with pytest.raises(SystemExit, match="no methods given"):
        parse_list(",", known, "methods")
    with pytest.raises(SystemExit, match="named more than once: ace"):
        parse_list("ace,ace", known, "methods")
    parser = add_study_args(argparse.ArgumentParser(), {"quick": {}})
    assert parser.parse_args(["--out", "x", "--seed", "0"]).seed == 0
    for flags in (["--seed", "-1"], ["--seeds", "0"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", *flags])


def test_table_cells_name_one_seed_and_diverged_runs_instead_of_printing_zero_or_nan():
    assert mean_std_cell({"mean": 0.0039, "std": 6e-5}) == "0.0039 ± 6e-05"
    assert mean_std_cell(summarize([0.004])) == "0.004 (one seed)"
    assert mean_std_cell({"mean": 0.004, "std": None}) == "0.004 (one seed)"  # as read back from JSON
    assert mean_std_cell(summarize([0.004, float("nan")])) == "no mean (diverged)"
    assert mean_std_cell({"mean": None, "std": None}) == "no mean (diverged)"
    assert mean_std_cell({"mean": 0.921, "std": 0.015}, 100, ".1f", ".1f") == "92.1 ± 1.5"
