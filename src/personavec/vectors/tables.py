"""Response tables (CSV / JSONL / Parquet) and the paper's row-paired filter.

A table has an ``answer`` column and either a ``prompt`` column holding the chat-templated prompt text
(the official persona_vectors CSV layout: ``question, prompt, answer, question_id, <trait>, coherence``)
or a ``question`` column (plus optional ``system``) that personavec formats with the model's chat
template. Optional score columns: the trait score (named after the trait, or ``trait``) and
``coherence``, both 0-100.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from ..errors import PersonavecError, finite
from ..model.chat import format_chat, missing

log = logging.getLogger(__name__)


def _text_column(df: pd.DataFrame, name: str, path: str) -> list[str]:
    """The cells of a text column, each refused unless it is text: a list, a number or bytes in an ``answer`` cell
    is not stringified into an answer nobody wrote."""
    col = df[name]
    missing = col.isna()
    if missing.any():
        raise PersonavecError(f"{path}: column {name!r} is empty in {int(missing.sum())} rows "
                              f"(first at row {int(missing.idxmax())})")
    bad = [i for i, x in enumerate(col) if not isinstance(x, str)]
    if bad:  # rows named by the table's index: their row in the file
        kind = type(col.iloc[bad[0]]).__name__
        raise PersonavecError(f"{path}: column {name!r} holds {len(bad)} cells that are not text (the first, at row "
                              f"{col.index[bad[0]]}, is a {kind}); write each {name} as a string")
    return list(col)


def check_text(df: pd.DataFrame, source: str = "table") -> None:
    """Refuse the cells a response table's text columns cannot hold (not text; an answer of only whitespace), before
    a model is loaded."""
    check_columns(df, source)
    for name in ("answer", "prompt", "question"):
        if name in df.columns:
            _text_column(df, name, source)
    blank = [i for i, a in zip(df.index, df["answer"]) if not a.strip()]
    if blank:
        raise PersonavecError(f"{source}: {len(blank)} answers are empty or only whitespace (first at row {blank[0]}); "
                              "drop those rows, or keep the scores so that the filter drops them")


def check_columns(df: pd.DataFrame, source: str = "table") -> None:
    """Refuse a response table without an ``answer`` column and a ``prompt`` or ``question`` column (cheap: call it
    before loading a model)."""
    if "answer" not in df.columns:
        raise PersonavecError(f"{source}: no 'answer' column (columns: {', '.join(map(str, df.columns))})")
    if "prompt" not in df.columns and "question" not in df.columns:
        raise PersonavecError(f"{source}: needs a 'prompt' column (chat-formatted text) or a 'question' column")


def prompts_and_answers(df: pd.DataFrame, tokenizer: Any | None = None, source: str = "table") -> tuple[
        list[str], list[str]]:
    """The formatted prompt texts and answers of a table."""
    check_columns(df, source)
    answers = _text_column(df, "answer", source)
    if "prompt" in df.columns:
        return _text_column(df, "prompt", source), answers
    if "question" in df.columns:
        if tokenizer is None:
            raise PersonavecError(f"{source}: formatting 'question' rows needs the model's tokenizer")
        systems = df["system"].tolist() if "system" in df.columns else [None] * len(df)
        questions = _text_column(df, "question", source)
        return [format_chat(tokenizer, q, system=s if isinstance(s, str) and s else None)
                for q, s in zip(questions, systems)], answers
    raise PersonavecError(f"{source}: needs a 'prompt' column (chat-formatted text) or a 'question' column")


def trait_column(df: pd.DataFrame, trait: str | None) -> str | None:
    """The trait-score column: named after the trait, else ``trait`` / ``trait_score``; None if absent."""
    for name in (trait, "trait", "trait_score"):
        if name and name in df.columns:
            return name
    return None


@dataclass(frozen=True)
class FilterConfig:
    """The paper's filter: pos trait ≥ ``pos_min``, neg trait < ``neg_max``, coherence ≥ ``coherence_min``."""

    pos_min: float = 50.0
    neg_max: float = 50.0
    coherence_min: float = 50.0

    def __post_init__(self) -> None:
        for name in ("pos_min", "neg_max", "coherence_min"):  # judge scores: numbers in 0..100
            x = finite(getattr(self, name), f"FilterConfig {name}")
            if not 0 <= x <= 100:
                raise PersonavecError(f"FilterConfig {name} must be between 0 and 100 (a judge score), not {x:g}")
            object.__setattr__(self, name, x)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class FilterResult:
    keep: list[bool]
    counts: dict[str, int]
    applied: bool


def paired_filter(pos: pd.DataFrame, neg: pd.DataFrame, trait: str | None,
                  config: FilterConfig | None = None, enabled: bool = True) -> FilterResult:
    """Row-paired mask: row i is kept when pos[i] and neg[i] both pass (scores that are missing fail).

    Without score columns (or with ``enabled=False``) every row is kept and ``applied`` is False.
    """
    config = config or FilterConfig()
    if len(pos) != len(neg):
        raise PersonavecError(f"pos table has {len(pos)} rows but neg has {len(neg)}; the filter pairs "
                              "rows one to one (same question and instruction index on both sides)")
    tp, tn = trait_column(pos, trait), trait_column(neg, trait)
    has_scores = tp is not None or tn is not None
    n = len(pos)
    if not enabled or not has_scores:
        return FilterResult([True] * n, {"rows": n, "kept": n}, applied=False)
    if tp is None or tn is None:
        raise PersonavecError("trait scores are present on one side only; give both tables the same columns")
    for name, df in (("pos", pos), ("neg", neg)):
        if "coherence" not in df.columns:
            raise PersonavecError(f"{name} table has trait scores but no 'coherence' column; "
                                  "add it or run with --no-filter")

    def num(df: pd.DataFrame, col: str) -> pd.Series:
        raw = df[col].reset_index(drop=True)
        values = pd.to_numeric(raw, errors="coerce")
        unreadable = values.isna() & raw.map(lambda x: not missing(x))
        if unreadable.any():
            log.warning("%d cells of column %r are not numbers (e.g. %r) and count as missing scores",
                        int(unreadable.sum()), col, raw[unreadable].iloc[0])
        return values

    pt, nt = num(pos, tp), num(neg, tn)
    pc, nc = num(pos, "coherence"), num(neg, "coherence")
    pos_ok = pt >= config.pos_min
    neg_ok = nt < config.neg_max
    coh_ok = (pc >= config.coherence_min) & (nc >= config.coherence_min)
    empty_ok = pd.Series([not missing(a) and bool(str(a).strip()) for a in pos["answer"]]) & pd.Series(
        [not missing(a) and bool(str(a).strip()) for a in neg["answer"]])
    keep = pos_ok & neg_ok & coh_ok & empty_ok
    counts = {"rows": n, "pos_trait_ok": int(pos_ok.sum()), "neg_trait_ok": int(neg_ok.sum()),
              "coherent_both": int(coh_ok.sum()), "kept": int(keep.sum())}
    return FilterResult([bool(x) for x in keep], counts, applied=True)
