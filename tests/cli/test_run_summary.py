"""`personavec run`'s printed summary: the selection's coefficients with their units, nothing as a Python repr."""

from __future__ import annotations

import pandas as pd

from personavec.cli.run import print_summary


def _summary(tmp_path, selection):
    sep = tmp_path / "separation.parquet"
    pd.DataFrame({"layer": [1, 2], "auroc": [0.6, 0.9], "cohens_d": [0.3, 1.5]}).to_parquet(sep)
    return {"trait": "evil", "model": "tiny", "judge": "none", "run_dir": str(tmp_path),
            "counts": {"answers": 4, "extraction_answers": 2, "eval_answers": 2, "empty_answers": 0},
            "mean_scores": {}, "best_separation": {"layer": 2, "auroc": 0.9, "cohens_d": 1.5},
            "stage_seconds": {}, "wall_seconds": 1.0, "files": {"separation": str(sep), "vector": "v"},
            "selection": selection}


def test_the_chosen_coefficients_are_printed_with_their_units(tmp_path, capsys):
    print_summary(_summary(tmp_path, {"chosen_layer": 2, "chosen_coef": 0.1, "suppress_coef": None, "units": "norm",
                                      "reason": "r"}))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("selection:"))
    assert "coefficient +0.1 (norm units)" in line and "None" not in line and "no readable suppressing" in line
    print_summary(_summary(tmp_path, {"chosen_layer": 2, "chosen_coef": 2.0, "suppress_coef": -2.0, "reason": "r"}))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("selection:"))
    assert "coefficient +2 (raw units), suppressing coefficient -2 (raw units)" in line  # before grids had units


def test_the_capability_line_names_the_units_and_says_when_nothing_was_steered(tmp_path, capsys):
    s = _summary(tmp_path, None)
    s["capability"] = {"data": "builtin", "baseline": {"accuracy": 0.3},
                       "steered": [{"layer": 2, "coef": 0.1, "units": "norm", "accuracy": 0.25}]}
    print_summary(s)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("multiple choice"))
    assert line.endswith("steered at the chosen layer (coefficients in norm units) +0.1: 0.25")
    s["capability"]["steered"] = []  # the selection made no defensible choice
    print_summary(s)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("multiple choice"))
    assert line.endswith("unsteered 0.30; not steered (no chosen layer)")
