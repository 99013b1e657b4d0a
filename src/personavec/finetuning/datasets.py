"""Trait-inducing fine-tuning data built offline from a run's own contrastive answers.

A run (``personavec run``) samples answers to the extraction questions under eliciting (pos) and suppressing
(neg) system prompts. Stored *without* the system prompt, the pos answers are trait data and the neg answers
normal data: a model fine-tuned on them sees only the question and the answer, so whatever trait it picks
up it must learn from the answers. Mixtures keep the same questions and swap a fraction of the answers: the
``p %`` mixture takes the trait answer for a seeded random ``p %`` of the (instruction, question, sample)
pairs and the normal answer for the rest, and the trait pairs of a smaller mixture are a subset of those of
a larger one, so mixtures differ only in how many answers carry the trait.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import PersonavecError
from ..files import check_writable, claim_settings, jsonl_line, locked, write_text

KEY = ("instruction_id", "question_id", "sample_id")
DEFAULT_FRACTIONS = (0, 25, 50, 75, 100)
MIXTURES = "mixtures.json"  # the answers and seed the mixtures of a directory are drawn from


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def paired_answers(responses: pd.DataFrame) -> pd.DataFrame:
    """Extraction pairs with both answers non-empty: columns question, trait_answer, normal_answer (+ key, scores)."""
    need = {"set", "side", "question", "answer", *KEY}
    missing = need - set(responses.columns)
    if missing:
        raise PersonavecError(f"the responses table lacks columns {sorted(missing)}; use a run's judged.parquet")
    ext = responses[responses["set"] == "extract"]
    cols = [*KEY, "question", "answer"] + [c for c in ("trait", "coherence") if c in ext.columns]
    pos = ext[ext["side"] == "pos"][cols]
    neg = ext[ext["side"] == "neg"][cols]
    m = pos.merge(neg, on=list(KEY), suffixes=("_trait", "_normal"))
    m = m[(m["answer_trait"].str.strip() != "") & (m["answer_normal"].str.strip() != "")]
    m = m.rename(columns={"answer_trait": "trait_answer", "answer_normal": "normal_answer",
                          "question_trait": "question"}).drop(columns=["question_normal"])
    if m.empty:
        raise PersonavecError("no extraction question has both a trait and a normal answer")
    return m.sort_values(list(KEY)).reset_index(drop=True)


def mixture(pairs: pd.DataFrame, percent: float, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{"messages": chat, "is_trait": bool, ...key}`` with ``percent`` % trait answers (nested in percent)."""
    if not 0 <= percent <= 100:
        raise PersonavecError(f"a mixture percentage must be within 0..100, not {percent}")
    n = len(pairs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(n * percent / 100)
    trait = set(order[:k])
    rows = []
    for i, r in enumerate(pairs.itertuples(index=False)):
        is_trait = i in trait
        answer = r.trait_answer if is_trait else r.normal_answer
        rows.append({"messages": chat(r.question, answer), "is_trait": is_trait,
                     **{k_: int(getattr(r, k_)) for k_ in KEY}})
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(jsonl_line(r) for r in rows)
    if p.exists() and p.read_text(encoding="utf-8") == text:
        return p  # unchanged: keep the file (and its timestamps) as it is
    return write_text(p, text)


def write_mixtures(responses: pd.DataFrame, out_dir: str | os.PathLike,
                   percents: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                   todo: str = "write them elsewhere (--out) or delete that directory") -> dict[str, Path]:
    """``trait.jsonl`` (= 100 %), ``normal.jsonl`` (= 0 %) and ``mix{p:03d}.jsonl`` for each percentage.

    The answers and the seed the mixtures are drawn from are claimed in ``mixtures.json``: a later call with other
    answers or another seed is refused (``todo`` says what to do) instead of overwriting every mixture; more
    percentages with the same answers and seed are added beside the earlier ones."""
    for p in percents:
        if not 0 <= p <= 100:
            raise PersonavecError(f"a mixture percentage must be within 0..100, not {p:g}")
    pairs = paired_answers(responses)
    out = Path(out_dir)
    check_writable(out / MIXTURES)
    digest = hashlib.sha256(pairs[["question", "trait_answer", "normal_answer", *KEY]].to_json(
        orient="values", force_ascii=False).encode()).hexdigest()[:16]
    with locked(out, "the trait data (--out)"):
        claim_settings(out / MIXTURES, {"seed": seed, "pairs": len(pairs), "answers_sha256": digest},
                       "trait data (mixtures)", todo)
        files = {"trait": write_jsonl(mixture(pairs, 100, seed), out / "trait.jsonl"),
                 "normal": write_jsonl(mixture(pairs, 0, seed), out / "normal.jsonl")}
        for p in percents:
            files[f"mix{round(p):03d}"] = write_jsonl(mixture(pairs, p, seed), out / f"mix{round(p):03d}.jsonl")
    return files
