"""The report's plots: what their axes say."""

from __future__ import annotations

import pandas as pd
import pytest

from personavec.run import plots


@pytest.mark.parametrize("selection, unit", [({"units": "norm", "grid": {"units": "norm"}}, "norm units"),
                                             ({"grid": {"units": "norm"}}, "norm units"),
                                             ({"chosen_coef": 2.0}, "raw units")])  # made before grids had units
def test_the_steering_plots_coefficient_axis_names_the_grids_units(tmp_path, monkeypatch, selection, unit):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=None: figures.append(fig))
    steer = pd.DataFrame([{"layer": 3, "coef": c, "trait_mean": 10.0 + c, "coherence_mean": 80.0,
                           "projection_mean": c} for c in (-0.1, 0.0, 0.1)])
    plots.plot_steering(steer, selection, tmp_path / "steering.png", "t")
    labels = {ax.get_xlabel() for ax in figures[0].axes if ax.get_xlabel()}
    assert labels and all(unit in label for label in labels), labels


@pytest.mark.parametrize("row, unit", [({"units": "norm"}, "norm units"), ({}, "raw units")])
def test_the_capability_plots_coefficient_axis_names_the_units(tmp_path, monkeypatch, row, unit):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=None: figures.append(fig))
    cap = {"baseline": {"accuracy": 0.5, "n": 40},
           "steered": [{"layer": 3, "coef": c, "accuracy": 0.4, **row} for c in (-0.1, 0.1)]}
    plots.plot_capability(cap, tmp_path / "capability.png", "t")
    assert unit in figures[0].axes[0].get_xlabel()
