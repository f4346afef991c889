"""Plots of training histories (the engine's per-epoch records): γ/λ/u trajectories, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def single_point_marker(x: Sequence) -> str | None:
    """A marker where a series has one point (a line through one point draws nothing)."""
    return "o" if len(x) == 1 else None


MAX_LEGEND_ENTRIES = 8


def plot_trajectories(history: Sequence[Mapping], path: str | Path, title: str = "") -> None:
    """Three panels: every γ_i, λ_i and u_i against the epoch (empty panels say 'none').

    Up to :data:`MAX_LEGEND_ENTRIES` branches get a legend; more (VN-DGCNN has 15) are coloured
    from dark to light in the log's branch order, which the panel states, first and last named."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("gamma", "multiplier", "slack"), ("γ", "λ", "u")):
        names = list(history[0].get(key, {})) if history else []
        many = len(names) > MAX_LEGEND_ENTRIES
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(names))) if many else [None] * len(names)
        for name, colour in zip(names, colours):
            ax.plot(epochs, [r[key][name] for r in history], label=name, lw=1.2, marker=single_point_marker(epochs),
                    color=colour)
        if not names:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.axhline(0.0, color="k", lw=0.5)
        if many:
            ax.text(0.01, 0.99, f"{len(names)} branches, dark → light:\n{names[0]} … {names[-1]}", fontsize=5,
                    ha="left", va="top", transform=ax.transAxes)
        elif names:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    histories: Mapping[str, Sequence[Mapping]],
    path: str | Path,
    metric: str | None = None,
    title: str = "",
    logy: bool = True,
) -> None:
    """Validation metric (projection solid, full model dashed) per method against the epoch."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, history) in enumerate(histories.items()):
        evals = [r for r in history if "val" in r]
        if not evals:
            continue
        key = metric or next(iter(evals[0]["val"]["projection"]))
        color = f"C{i % 10}"
        x = [r["epoch"] for r in evals]
        ax.plot(x, [r["val"]["projection"][key] for r in evals], color=color, label=f"{name} (projection)",
                marker=single_point_marker(x))
        ax.plot(x, [r["val"]["full"][key] for r in evals], color=color, ls="--", lw=0.9, label=f"{name} (full)",
                marker=single_point_marker(x))
        ax.set_ylabel(f"validation {key}")
    ax.set_xlabel("epoch")
    if logy:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every run diverged
        ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
