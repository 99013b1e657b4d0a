"""Scoring a table of answers with a judge: the trait rubric and the coherence rubric for every row."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .rubrics import coherence_prompt


def judge_rows(judge: Any | None, rubric: str, df: pd.DataFrame, progress: bool = True,
               desc: str = "judging") -> pd.DataFrame:
    """``df`` (with ``question`` and ``answer``) plus the judge's ``trait`` (``rubric`` filled with both) and
    ``coherence`` scores; NaN where the judge gives no score, everywhere when there is no judge."""
    if judge is None:
        return df.assign(trait=math.nan, coherence=math.nan)
    df = df.copy()
    trait = [rubric.format(question=q, answer=a) for q, a in zip(df["question"], df["answer"])]
    coh = [coherence_prompt(q, a) for q, a in zip(df["question"], df["answer"])]
    scores = judge.score(trait + coh, progress=desc if progress else False)
    n = len(trait)
    df["trait"] = [math.nan if s is None else s for s in scores[:n]]
    df["coherence"] = [math.nan if s is None else s for s in scores[n:]]
    return df
