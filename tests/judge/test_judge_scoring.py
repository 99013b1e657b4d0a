"""Judging a table: trait and coherence per row, and no time spent on a judge that cannot score."""

from __future__ import annotations

import math

import pandas as pd

from personavec.judge.scoring import judge_rows


class CountingJudge:
    """Scores ``value`` for every prompt (None: a judge that never gives a usable number) and counts prompts."""

    name = "counting"

    def __init__(self, value: float | None) -> None:
        self.value, self.prompts = value, []

    def score(self, prompts, progress=False):
        self.prompts += list(prompts)
        return [self.value] * len(prompts)


class HalfJudge(CountingJudge):
    """Scores the coherence rubric but never the trait one: no answer gets the pair of scores the filter needs."""

    def score(self, prompts, progress=False):
        self.prompts += list(prompts)
        return [50.0 if p.startswith("COHERENCE") else None for p in prompts]


def table(n: int) -> pd.DataFrame:
    return pd.DataFrame({"question": [f"q{i}" for i in range(n)], "answer": [f"a{i}" for i in range(n)]})


def test_a_judge_that_scores_nothing_is_not_asked_about_the_rest():
    judge = CountingJudge(None)
    out = judge_rows(judge, "Rate {question} / {answer}.", table(100), progress=False)
    assert len(judge.prompts) == 2 * 40  # trait + coherence of the first 40 answers only
    assert out["trait"].isna().all() and out["coherence"].isna().all()
    assert "first 40 answers" in out.attrs["judge_note"] and "other 60" in out.attrs["judge_note"]


def test_a_judge_that_scores_is_asked_about_everything_in_order():
    judge = CountingJudge(70.0)
    out = judge_rows(judge, "Rate {question} / {answer}.", table(100), progress=False)
    assert len(judge.prompts) == 200 and "judge_note" not in out.attrs
    assert (out["trait"] == 70.0).all() and (out["coherence"] == 70.0).all()
    assert judge.prompts[0] == "Rate q0 / a0." and "a0" in judge.prompts[40] and "a39" in judge.prompts[79]
    assert "q40 / a40" in judge.prompts[80]
    small = judge_rows(CountingJudge(None), "{question}{answer}", table(10), progress=False)
    assert "judge_note" not in small.attrs and small["trait"].isna().all()  # nothing left to skip
    assert math.isnan(judge_rows(None, "{question}{answer}", table(3))["trait"].iloc[0])


def test_an_answer_needs_both_scores_to_count_as_judged(monkeypatch):
    import personavec.judge.scoring as scoring

    monkeypatch.setattr(scoring, "coherence_prompt", lambda q, a: f"COHERENCE {q} {a}")
    judge = HalfJudge(None)
    out = judge_rows(judge, "Rate {question} / {answer}.", table(100), progress=False)
    assert len(judge.prompts) == 2 * 40 and "first 40 answers" in out.attrs["judge_note"]
    assert out["trait"].isna().all() and (out["coherence"].iloc[:40] == 50.0).all()


def test_questions_and_answers_that_are_not_text_are_refused_naming_the_row():
    """An empty cell (NaN) was judged as the text "nan"; a list as its repr."""
    import pytest

    from personavec.errors import PersonavecError

    class Never:
        name = "never"

        def score(self, prompts, progress=False):
            raise AssertionError("nothing may be sent")

    rubric = "Q: {question} A: {answer}"
    for df, message in ((pd.DataFrame({"question": ["a", "b"], "answer": ["x", math.nan]}),
                         "row 1's answer is nan, not text; a judge scores text answers"),
                        (pd.DataFrame({"question": [3, "b"], "answer": ["x", "y"]}),
                         "row 0's question is 3, not text"),
                        (pd.DataFrame({"question": ["a"], "answer": [["x"]]}), "row 0's answer is a list")):
        with pytest.raises(PersonavecError, match=message):
            judge_rows(Never(), rubric, df, progress=False)
