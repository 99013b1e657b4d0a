"""Automatic layer and coefficient choice from a steering table (pure function)."""

from __future__ import annotations

import math

import pandas as pd

from personavec.steering.grid import cells, default_grid
from personavec.steering.selection import choose


def table(rows, fluency=2.0, degenerate=0.0):
    """A steering table whose cells all read as text unless told otherwise."""
    t = pd.DataFrame(rows, columns=["layer", "coef", "trait_mean", "coherence_mean", "projection_mean"])
    t["fluency_mean"], t["degenerate_share"] = fluency, degenerate
    return t


def test_choose_largest_coherent_trait_increase():
    t = table([
        (8, 0.0, 10, 90, 0.0), (8, -2.0, 5, 85, -1.0), (8, 2.0, 40, 80, 1.0), (8, 4.0, 90, 30, 2.0),
        (12, 0.0, 10, 90, 0.0), (12, -2.0, 2, 82, -1.0), (12, -4.0, 1, 60, -2.0), (12, 2.0, 60, 70, 1.0),
        (12, 4.0, 70, 55, 3.0),
    ])
    s = choose(t)
    # layer 8's +80 at coef 4 is incoherent (30 < 50); layer 12 reaches +60 with coherence 55
    assert s.chosen_layer == 12 and s.chosen_coef == 4.0 and s.criterion == "trait_mean"
    assert s.effects == {8: 30.0, 12: 60.0}
    assert s.suppress_coef == -2.0  # -4 drops coherence to 60 < 80
    assert choose(t, coherence_min=60).chosen_coef == 2.0


def test_choose_falls_back_to_projection_without_judge_scores():
    nan = math.nan
    t = table([(4, 0.0, nan, nan, 0.0), (4, 2.0, nan, nan, 0.5), (6, 0.0, nan, nan, 0.0), (6, 2.0, nan, nan, 1.5),
               (6, -2.0, nan, nan, -1.0)])
    s = choose(t)
    assert s.chosen_layer == 6 and s.criterion == "projection_mean" and "not checked" in s.reason
    assert s.suppress_coef == -2.0
    # in units of each layer's held-out pos-neg gap, layer 4's smaller move is the larger one
    g = choose(t, gaps={4: 0.5, 6: 5.0})
    assert g.chosen_layer == 4 and g.criterion == "projection_gap_units" and g.effects == {4: 1.0, 6: 0.3}


def test_nothing_coherent_gives_no_choice():
    s = choose(table([(4, 0.0, 10, 40, 0.0), (4, 2.0, 50, 20, 1.0)]))
    assert s.chosen_layer is None and "no positive coefficient" in s.reason


def test_default_grid_and_cells():
    g = default_grid(30, quick=True)
    assert g.layers == [8, 13, 17, 22] and 0.0 in g.coefs
    c = cells(g)
    assert c[0] == (-1, 0.0) and len(c) == 1 + 4 * 4


def test_nan_cells_and_layers_are_skipped_and_said():
    nan = math.nan
    # layer 8: every coherent positive cell has no trait score; layer 12 is fine
    t = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, nan, 80, 1.0), (8, 4.0, nan, 70, 2.0),
               (12, 0.0, 10, 90, 0.0), (12, 2.0, 30, 80, 1.0), (12, 4.0, nan, 70, 2.0), (12, -2.0, 5, 85, -1.0)])
    s = choose(t)
    assert s.chosen_layer == 12 and s.chosen_coef == 2.0 and s.effects == {12: 20.0}
    assert "layer 8" in s.reason and "no trait score" in s.reason and "nan" not in s.reason.lower()
    # an unsteered baseline without a trait score: no judged effect can be measured; the projection decides
    base_nan = table([(8, 0.0, nan, 90, 0.0), (8, 2.0, 40, 80, 1.0), (12, 0.0, nan, 90, 0.0), (12, 2.0, 60, 80, 3.0)])
    s = choose(base_nan)
    assert s.chosen_layer == 12 and s.criterion == "projection_mean"
    assert all(math.isfinite(e) for e in s.effects.values())
    assert "baseline" in s.reason and "nan" not in s.reason.lower()


def test_unreadable_cells_are_left_out_with_or_without_a_judge():
    nan = math.nan
    for scores in ((10, 30, 90), (nan, nan, nan)):
        t = table([(8, 0.0, scores[0], 90, 0.0), (8, 2.0, scores[1], 80, 1.0), (8, 4.0, scores[2], 80, 5.0)])
        t.loc[t["coef"] == 4.0, "degenerate_share"] = 0.5  # half its answers loop
        s = choose(t)
        assert s.chosen_coef == 2.0 and s.unreadable == [[8, 4.0]] and s.defensible
        t.loc[t["coef"] == 4.0, ["degenerate_share", "fluency_mean"]] = (0.0, 3.1)  # 1.1 nats less likely
        assert choose(t).chosen_coef == 2.0 and choose(t, fluency_margin=1.2).chosen_coef == 4.0
        t.loc[t["coef"] == 4.0, ["degenerate_share", "fluency_mean"]] = (0.15, 2.0)  # 15 % of its answers loop
        assert choose(t).chosen_coef == 2.0 and choose(t, degenerate_max=0.2).chosen_coef == 4.0
        # the margins are relative to the unsteered answers: a baseline that is itself unusual moves them
        t.loc[t["coef"] == 4.0, "fluency_mean"] = 3.1
        t.loc[t["coef"] == 0.0, ["fluency_mean", "degenerate_share"]] = (2.5, 0.1)
        assert choose(t).chosen_coef == 4.0


def test_no_defensible_choice_when_every_steered_cell_is_broken_or_nothing_moves():
    broken = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 60, 80, 1.0), (12, 0.0, 10, 90, 0.0), (12, 4.0, 90, 70, 2.0)])
    broken.loc[broken["coef"] != 0.0, "degenerate_share"] = 0.9
    s = choose(broken)
    assert s.chosen_layer is None and not s.defensible
    assert s.reason.startswith("no defensible choice: every steered cell (2) reads as broken text")
    # readable, but the best effect's interval reaches zero: the grid cannot tell it from no steering
    flat = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 12, 80, 0.1)])
    flat["trait_effect_lo"] = [0.0, -3.0]
    s = choose(flat)
    assert s.chosen_layer is None and not s.defensible and "no defensible choice" in s.reason
    assert "interval" in s.reason
    flat["trait_effect_lo"] = [0.0, 0.5]
    assert choose(flat).chosen_coef == 2.0
    # a table without fluency readings (never measured): nothing steered counts as readable
    bare = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 60, 80, 1.0)]).drop(columns=["fluency_mean"])
    assert choose(bare).chosen_layer is None


def test_a_layer_whose_effect_is_measurable_is_chosen_over_a_larger_one_whose_interval_reaches_zero():
    """The layer is chosen among measurable effects: a noisy layer with a larger point estimate does not hide a
    smaller effect that the grid can tell from no steering (nor make the result "nothing measurably moves")."""
    t = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 50, 80, 1.0), (12, 0.0, 10, 90, 0.0), (12, 2.0, 30, 80, 1.0),
               (12, 4.0, 35, 75, 2.0)])
    t["trait_effect_lo"] = [0.0, -5.0, 0.0, 8.0, -1.0]  # layer 8's +40 and layer 12's +25 reach zero
    s = choose(t)
    assert s.defensible and (s.chosen_layer, s.chosen_coef) == (12, 2.0)
    t["trait_effect_lo"] = [0.0, -5.0, 0.0, -2.0, -1.0]  # nothing measurable anywhere
    s = choose(t)
    assert s.chosen_layer is None and "nothing measurably moves" in s.reason and "layer 8, +40.00" in s.reason


def test_a_broken_cell_the_judge_could_not_score_does_not_turn_the_judge_off():
    """Whether the judge's scores decide is read on the cells that take part: an unreadable cell without scores
    (answers the judge gave no number for) leaves the judged criterion and the coherence check in place."""
    nan = math.nan
    t = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 40, 80, 1.0), (8, 4.0, nan, nan, 5.0)])
    t.loc[t["coef"] == 4.0, "degenerate_share"] = 1.0  # every answer empty or looping
    s = choose(t)
    assert s.unreadable == [[8, 4.0]] and s.criterion == "trait_mean" and "not checked" not in s.reason
    assert (s.chosen_layer, s.chosen_coef) == (8, 2.0)


def test_the_default_grids_coefficients_are_in_its_units():
    """A raw grid asked for without coefficients steers as a raw grid (x the vector: -4..4), not with the norm
    grid's -0.2..0.2 read as multiples of the vector, which barely move the residual."""
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    assert default_grid(30).coefs == [-0.2, -0.1, 0.0, 0.1, 0.2] and default_grid(30).units == "norm"
    raw = default_grid(30, units="raw")
    assert raw.coefs == [-4.0, -2.0, 0.0, 2.0, 4.0] and raw.units == "raw"
    assert default_grid(30, quick=False, units="raw").coefs[-1] == 2.5
    g = Run(RunConfig(trait="evil", quick=True, steer_units="raw")).grid(30)
    assert (g.units, g.coefs) == ("raw", [-4.0, -2.0, 0.0, 2.0, 4.0])
    g = Run(RunConfig(trait="evil", quick=True, steer_units="raw", steer_coefs=[1.0])).grid(30)
    assert (g.units, g.coefs) == ("raw", [0.0, 1.0])


def test_an_unmeasurable_effect_is_said_as_it_is():
    """A best cell that lowers the trait reads "-5.00", not "+-5.00"; one without an interval (too few questions
    to resample) is not said to have an interval that reaches 0."""
    t = table([(8, 0.0, 10, 90, 0.0), (8, 2.0, 5, 80, 1.0)])
    t["trait_effect_lo"] = [0.0, -9.0]
    assert "(layer 8, -5.00) has a 95% interval that reaches 0" in choose(t).reason
    t["trait_effect_lo"] = [math.nan, math.nan]
    assert "(layer 8, -5.00) has no 95% interval (too few questions to resample)" in choose(t).reason


def test_without_a_judge_the_reason_does_not_claim_a_coherence_check():
    nan = math.nan
    t = table([(8, 0.0, nan, nan, 0.0), (8, 2.0, nan, nan, 1.0), (8, -2.0, nan, nan, -1.0)])
    t.loc[t["coef"] == 2.0, "degenerate_share"] = 1.0  # the only positive cell is broken text
    s = choose(t)
    assert s.chosen_layer is None and "coherence >=" not in s.reason.split("(cells kept")[0]
    assert "no readable positive coefficient has a projection" in s.reason
