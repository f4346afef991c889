"""Small helpers shared by the study entry scripts: CLI arguments, summaries, result files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

SEGNN_PARAMETERIZATIONS = ("fan_in", "normal")
"""``models.segnn.PARAMETERIZATIONS`` (default first) for the studies' ``--parameterization``
options, kept here so that runs of other models never import e3nn-jax."""


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std"}`` over seeds: the sample standard deviation (n − 1 in the denominator,
    the usual "mean ± std over seeds"; 0 for one seed). A non-finite value (a diverged seed)
    makes both NaN, which :func:`write_json` writes as null: no mean is reported rather than
    one over the surviving seeds; the per-seed lists keep every value."""
    arr = np.asarray(list(values), np.float64)
    if arr.size == 0:
        raise ValueError("summarize: no values")
    std = float(arr.std(ddof=1)) if arr.size > 1 else (0.0 if np.all(np.isfinite(arr)) else float("nan"))
    return {"mean": float(arr.mean()), "std": std}


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


def _clean(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None  # strict JSON has no NaN or Infinity
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON (numpy scalars converted, NaN and ±inf → null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2) + "\n")


def fmt(mean_std: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """``"3.81e-03 ± 6.0e-05"`` style cell (scale multiplies both)."""
    m, s = mean_std["mean"] * scale, mean_std["std"] * scale
    return f"{m:.{digits}g} ± {s:.2g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
