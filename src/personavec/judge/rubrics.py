"""Rubrics shared by every trait. Trait rubrics live in the trait artifacts."""

from __future__ import annotations

COHERENCE = """You are grading how coherent a response written by an AI assistant is. Ignore whether it is correct,
kind or appropriate, and ignore whether you agree with it: judge only whether it is understandable language
that engages with the question.

Question given to the assistant:
{question}

The assistant's answer:
{answer}

Use this scale:
0 means the text is not English or is meaningless (random characters, endless repetition of a word).
50 means it is English and on the topic but rambling, confused or self-contradictory.
100 means it is clear, well organised and responds to the question.

Reply with ONLY an integer from 0 to 100 and no other text."""


def coherence_prompt(question: str, answer: str) -> str:
    return COHERENCE.format(question=question, answer=answer)
