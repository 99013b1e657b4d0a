"""Scoring a table of answers with a judge: the trait rubric and the coherence rubric for every row."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..errors import PersonavecError, shown
from .rubrics import coherence_prompt

#: a judge that gives no answer among the first this many both a trait and a coherence score is not asked about
#: the rest
GIVE_UP_AFTER = 40


def judge_rows(judge: Any | None, rubric: str, df: pd.DataFrame, progress: bool = True, desc: str = "judging",
               give_up_after: int | None = GIVE_UP_AFTER) -> pd.DataFrame:
    """``df`` (with ``question`` and ``answer``) plus the judge's ``trait`` (``rubric`` filled with both) and
    ``coherence`` scores; NaN where the judge gives no score, everywhere when there is no judge.

    The first ``give_up_after`` answers are judged first; when none of them gets both scores (a weak local judge
    puts too little probability on numbers), the rest are not sent and ``table.attrs["judge_note"]`` says so.
    """
    if judge is None:
        return df.assign(trait=math.nan, coherence=math.nan)
    df = df.copy()
    questions, answers = df["question"].tolist(), df["answer"].tolist()
    for name, values in (("question", questions), ("answer", answers)):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:  # an empty cell (NaN) or a list would be judged as the text "nan" or "[...]"
            raise PersonavecError(f"row {bad}'s {name} is {shown(values[bad])}, not text; a judge scores text "
                                  f"{name}s (fill or drop that row)")
    n = len(df)
    trait: list[float | None] = [None] * n
    coherence: list[float | None] = [None] * n
    first = n if give_up_after is None else min(n, give_up_after)
    for part in ((range(first), range(first, n)) if first < n else (range(n),)):
        idx = list(part)
        prompts = [rubric.format(question=questions[i], answer=answers[i]) for i in idx]
        prompts += [coherence_prompt(questions[i], answers[i]) for i in idx]
        scores = judge.score(prompts, progress=desc if progress else False)
        for j, i in enumerate(idx):
            trait[i], coherence[i] = scores[j], scores[len(idx) + j]
        if part.start == 0 and 0 < first < n and all(trait[i] is None or coherence[i] is None for i in idx):
            df.attrs["judge_note"] = (f"the judge scored none of the first {first} answers on both trait and "
                                      f"coherence (what the filter and the selection need), so the other "
                                      f"{n - first} were not sent to it")
            break
    df["trait"] = [math.nan if s is None else s for s in trait]
    df["coherence"] = [math.nan if s is None else s for s in coherence]
    return df
