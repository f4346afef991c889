"""The history plots: a one-epoch run is drawn (a marker, not an invisible one-point line)."""

import numpy as np

from experiments import plotting


def _figures(monkeypatch):
    kept = []
    monkeypatch.setattr(plotting.plt, "close", kept.append)  # keep each figure instead of closing it
    return kept


def test_one_epoch_histories_are_drawn_with_markers(monkeypatch, tmp_path):
    figures = _figures(monkeypatch)
    record = {"epoch": 0, "gamma": {"g": 0.5}, "multiplier": {"g": 0.1}, "slack": {},
              "val": {"projection": {"mse": 0.2}, "full": {"mse": 0.1}}}
    plotting.plot_curves({"ace": [record]}, tmp_path / "curves.png", "mse")
    plotting.plot_trajectories([record], tmp_path / "traj.png")
    curves, trajectories = figures
    lines = curves.axes[0].lines
    assert [line.get_marker() for line in lines] == ["o", "o"]
    assert [float(line.get_ydata()[0]) for line in lines] == [0.2, 0.1]
    gamma_line = trajectories.axes[0].lines[0]
    assert gamma_line.get_marker() == "o" and float(gamma_line.get_ydata()[0]) == 0.5
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "traj.png").stat().st_size > 0


def test_long_histories_are_plain_lines(monkeypatch, tmp_path):
    figures = _figures(monkeypatch)
    history = [{"epoch": e, "val": {"projection": {"mse": 1.0 / (e + 1)}, "full": {"mse": 0.5 / (e + 1)}}}
               for e in range(5)]
    plotting.plot_curves({"ace": history}, tmp_path / "curves.png", "mse")
    line = figures[0].axes[0].lines[0]
    assert line.get_marker() in ("None", None, "") and np.allclose(line.get_ydata(), [1, 0.5, 1 / 3, 0.25, 0.2])
