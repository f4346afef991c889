"""Small helpers shared by the study entry scripts: CLI arguments, summaries, result files."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from ace_jax.engine import FitResult, NonFiniteError, strict_json

SEGNN_PARAMETERIZATIONS = ("fan_in", "normal")
"""``models.segnn.PARAMETERIZATIONS`` (default first) for the studies' ``--parameterization``
options, kept here so that runs of other models never import e3nn-jax."""


class Diverged(NamedTuple):
    """A run that stopped on a non-finite loss, gradient or update (:class:`ace_jax.NonFiniteError`).

    A study records it and goes on with its other runs (one diverged seed of a multi-hour study
    should not lose the rest): the run's metrics enter :func:`summarize` as NaN, so the
    method's mean and std are written as null rather than as a mean over the surviving seeds;
    its entry lists ``"diverged": [{"seed", "error"}]`` and the script exits with status 1
    (:func:`report_diverged`). The
    run's folder keeps its last good checkpoint and log.
    """

    seed: int
    error: str


def fit_seed(fit_call: Callable[[], FitResult], seed: int) -> FitResult | Diverged:
    """``fit_call()``, or :class:`Diverged` (announced on stdout) if it raises NonFiniteError."""
    try:
        return fit_call()
    except NonFiniteError as err:
        print(f"seed {seed} diverged: {err}", flush=True)
        return Diverged(int(seed), str(err))


def diverged_list(results: Sequence[Any]) -> list[dict]:
    """``[{"seed", "error"}]`` of the :class:`Diverged` entries of ``results``."""
    return [{"seed": r.seed, "error": r.error} for r in results if isinstance(r, Diverged)]


def diverged_runs(results: Any, where: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every ``(keys, {"seed", "error"})`` listed under a ``"diverged"`` key anywhere in a
    study's results, ``keys`` leading to it (e.g. ``("methods", "ace")``)."""
    if isinstance(results, Mapping):
        found = []
        for key, value in results.items():
            if key == "diverged" and isinstance(value, list):
                found += [(where, run) for run in value]
            else:
                found += diverged_runs(value, where + (str(key),))
        return found
    if isinstance(results, (list, tuple)):
        return [hit for value in results for hit in diverged_runs(value, where)]
    return []


def report_diverged(results: Any) -> int:
    """Print each diverged run of a study's results; the script's exit status (1 if any, else 0)."""
    runs = diverged_runs(results)
    for keys, run in runs:
        print(f"{' / '.join(keys)}, seed {run['seed']}: DIVERGED ({run['error']})", flush=True)
    return 1 if runs else 0


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std"}`` over seeds: the sample standard deviation (n − 1 in the denominator,
    the usual "mean ± std over seeds"). One seed has no sample std: its ``std`` is NaN, which
    :func:`write_json` writes as null beside a finite mean. A non-finite value (a diverged seed)
    makes both NaN (null): no mean is reported rather than one over the surviving seeds; the
    per-seed lists keep every value."""
    arr = np.asarray(list(values), np.float64)
    if arr.size == 0:
        raise ValueError("summarize: no values")
    std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
    return {"mean": float(arr.mean()), "std": std}


def preset_run_settings(preset: Any, **extra: Any) -> dict:
    """A study's preset dataclass as ``TrainConfig.run_settings`` (what else a checkpoint
    depends on): every field except the seed count and method list, which do not shape one
    run, and ``epochs`` / ``eval_batch_size``, which the engine's own fingerprint handles
    (a longer ``epochs`` may extend a finished run where that equals an uninterrupted one), plus
    ``extra`` (the data source, the task, …). Rerunning a study into the same folder then
    resumes its finished runs and refuses a checkpoint trained under another preset."""
    skip = ("seeds", "methods", "epochs", "eval_batch_size")
    fields = {k: v for k, v in dataclasses.asdict(preset).items() if k not in skip}
    return {**fields, **extra}


def array_digest(arrays: Any) -> str:
    """A short SHA-256 of a pytree of arrays (dtype, shape and bytes of every leaf, in a fixed
    order): what a run's ``run_settings`` records of its data, so that a rerun into the same
    folder never resumes a checkpoint trained on other data that merely has the same name."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            arr = np.ascontiguousarray(np.asarray(value))
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            digest.update(arr.data if arr.ndim else arr.tobytes())  # the buffer itself: no copy of a large array

    add(arrays)
    return digest.hexdigest()[:16]


def parse_list(text: str | None, known: Sequence[str], what: str) -> list[str]:
    """Split ``"a,b"`` and check every entry is known and named once (clear error otherwise);
    None or "" gives all of ``known``."""
    if not text:
        return list(known)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"no {what} given in {text!r}; choose from {', '.join(known)}")
    unknown = [t for t in items if t not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise SystemExit(f"{what} named more than once: {', '.join(repeated)}")
    return items


def _int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (argparse reports anything else)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # how argparse names the type in its message
    return parse


def add_study_args(parser: argparse.ArgumentParser, presets: Mapping[str, Any]) -> argparse.ArgumentParser:
    """The options every study shares: --preset, --out, --methods, --seeds, --epochs, --seed, --no-progress."""
    parser.add_argument("--preset", choices=sorted(presets), default="quick", help="budget preset")
    parser.add_argument("--out", required=True, help="output folder (results.json, plots, logs)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the preset's)")
    parser.add_argument("--seeds", type=_int_at_least(1), default=None, help="number of seeds (default: the preset's)")
    parser.add_argument("--epochs", type=_int_at_least(1), default=None, help="override the preset's epochs")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="first seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON (numpy scalars converted, NaN and ±inf → null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def fmt(mean_std: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """``"3.81e-03 ± 6.0e-05"`` style cell (scale multiplies both); see :func:`mean_std_cell`."""
    return mean_std_cell(mean_std, scale, f".{digits}g", ".2g")


def mean_std_cell(mean_std: Mapping[str, Any], scale: float = 1.0, mean_spec: str = ".3g",
                  std_spec: str = ".2g") -> str:
    """A table cell for a :func:`summarize` entry (read back from JSON or not): ``"m ± s"``,
    ``"m (one seed)"`` when there is no sample std, ``"no mean (diverged)"`` when a seed diverged."""
    mean, std = mean_std.get("mean"), mean_std.get("std")
    if mean is None or not math.isfinite(mean):
        return "no mean (diverged)"
    if std is None or not math.isfinite(std):
        return f"{mean * scale:{mean_spec}} (one seed)"
    return f"{mean * scale:{mean_spec}} ± {std * scale:{std_spec}}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
