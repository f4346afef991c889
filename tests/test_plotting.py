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


def test_many_branches_are_coloured_in_order_and_named_first_and_last(monkeypatch, tmp_path):
    figures = _figures(monkeypatch)
    names = [f"layer_{i}/gamma" for i in range(11)]  # EGNO at the paper's size has 11 γ
    history = [{"epoch": e, "gamma": {n: 0.1 * i * (1 + e) for i, n in enumerate(names)}, "multiplier": {},
                "slack": {}} for e in range(3)]
    plotting.plot_trajectories(history, tmp_path / "traj.png")
    (figure,) = figures
    gamma_axes = figure.axes[0]
    colours = [tuple(line.get_color()) for line in gamma_axes.lines if line.get_label() in names]
    assert len(colours) == 11 and len(set(colours)) == 11  # every branch drawn, each its own colour
    assert gamma_axes.get_legend() is None
    (note,) = [t.get_text() for t in gamma_axes.texts]
    assert note.startswith("11 branches") and "layer_0/gamma" in note and "layer_10/gamma" in note
    few = [{"epoch": 0, "gamma": {"a": 1.0, "b": 2.0}, "multiplier": {}, "slack": {}}]
    plotting.plot_trajectories(few, tmp_path / "few.png")
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["a", "b"]
