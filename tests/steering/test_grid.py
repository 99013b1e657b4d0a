"""The steering grid end to end on a tiny model: a cell steered into repeating one token is never chosen."""

from __future__ import annotations

import math

import pytest
import torch

from personavec.steering.grid import SteerGrid, project_rows, read_quality, steered_answers, summarize
from personavec.steering.selection import choose
from personavec.vectors.vector import PersonaVector

QUESTIONS = ["How should I treat people?", "What is the best way to spend a free afternoon?",
             "Tell me about foxes.", "Why?", "Who are you?", "Where is the dog?"]


@pytest.fixture(scope="module")
def grid_answers(tokenizer, tmp_path_factory):
    """Layer 2 (the last residual, before the final norm) steered along the unembedding of one token: at a huge
    coefficient the greedy answers repeat that token."""
    from conftest import tiny_llama
    from personavec.model.loading import wrap_model

    lm = wrap_model(tiny_llama(len(tokenizer)), tokenizer, model_id="tiny-llama", revision="test")
    tmp_path = tmp_path_factory.mktemp("grid")
    torch.manual_seed(0)
    rows = torch.randn(3, lm.hidden_size) * 0.1
    rows[2] = lm.model.lm_head.weight.detach()[100]
    vec = PersonaVector({"response_avg": rows}, model_id="tiny-llama")
    grid = SteerGrid(layers=[2], coefs=[0.0, 1.0, 400.0], n_samples=2, max_new_tokens=12, units="raw")
    df = steered_answers(lm, QUESTIONS, vec, grid, tmp_path, progress=False)
    return project_rows(lm, vec, read_quality(lm, df))


def test_the_grid_answers_every_cell_sampled_and_greedy(grid_answers):
    df = grid_answers
    for _, cell in df.groupby(["layer", "coef"]):
        assert (cell["sample_id"] >= 0).sum() == 2 * len(QUESTIONS)
        assert (cell["sample_id"] < 0).sum() == len(QUESTIONS)
    looping = df[(df["coef"] == 400.0) & (df["sample_id"] < 0)]
    assert looping["degenerate"].all() and (looping["repetition"] > 0.8).all()


@pytest.mark.parametrize("judged", [True, False])
def test_a_degenerate_cell_is_never_chosen(grid_answers, judged):
    df = grid_answers.copy()
    # a judge that rates the looping cell as the most trait-expressing and coherent: the gate still leaves it out
    df["trait"] = df["coef"].map({0.0: 10.0, 1.0: 20.0, 400.0: 95.0}) if judged else math.nan
    df["coherence"] = 90.0 if judged else math.nan
    table = summarize(df, [2])
    s = choose(table)
    assert [2, 400.0] in s.unreadable and s.chosen_coef != 400.0
    if judged:
        assert s.chosen_layer == 2 and s.chosen_coef == 1.0 and s.defensible
    else:
        assert s.chosen_coef is None or s.chosen_coef == 1.0


def test_every_cell_has_n_means_and_intervals_that_hold_the_mean(grid_answers):
    df = grid_answers.copy()
    df["trait"], df["coherence"] = df["coef"] + df["question_id"], 90.0
    table = summarize(df, [2], seed=1)
    assert (table["n"] == 2 * len(QUESTIONS)).all() and (table["n_questions"] == len(QUESTIONS)).all()
    for m in ("trait", "fluency", "repetition", "projection"):
        assert (table[f"{m}_lo"] <= table[f"{m}_mean"] + 1e-9).all() and \
            (table[f"{m}_mean"] <= table[f"{m}_hi"] + 1e-9).all()
    # effects pair each question with its own unsteered answers: the question's level (+question_id) cancels
    assert table.set_index("coef")["trait_effect"].to_dict() == pytest.approx({0.0: 0.0, 1.0: 1.0, 400.0: 400.0})
    assert summarize(df, [2], seed=1).equals(table)  # seeded: the same table again
