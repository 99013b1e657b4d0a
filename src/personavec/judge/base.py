"""The judge interface and the logprob-weighted score that LLM judges report."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from ..errors import PersonavecError, shown

MIN_MASS = 0.25
_INT = re.compile(r"[0-9]{1,3}")

#: ``on_result(index, score)``: told each score as soon as it is known (index into the prompts passed to score).
ResultCallback = Callable[[int, "float | None"], None]


def token_value(token: str) -> int | None:
    """The integer 0..100 a judge token stands for ("85", " 85", "7\\n"), or None ("1.5", "-3", "101", "REF")."""
    s = token.strip()
    if not _INT.fullmatch(s):
        return None
    k = int(s)
    return k if k <= 100 else None


def aggregate_score(top_logprobs: Mapping[str, float] | Sequence[tuple[str, float]],
                    min_mass: float = MIN_MASS) -> float | None:
    """Expected integer score from one token's top logprobs: ``Σ p(k)·k / Σ p(k)`` over tokens that are 0..100.

    ``top_logprobs`` maps tokens to natural-log probabilities (a mapping or ``(token, logprob)`` pairs). Tokens
    that are not integers in 0..100 after stripping whitespace are ignored; tokens that stand for the same
    integer ("85", " 85") add up. When the integer tokens hold less than ``min_mass`` of the probability, the
    judge mostly said something else (typically a refusal) and the score is missing: None.
    """
    items = top_logprobs.items() if isinstance(top_logprobs, Mapping) else top_logprobs
    mass = 0.0
    weighted = 0.0
    for token, logprob in items:
        k = token_value(str(token))
        if k is None or logprob is None:
            continue
        p = math.exp(float(logprob))
        if not math.isfinite(p):
            continue
        mass += p
        weighted += p * k
    if mass <= 0.0 or mass < min_mass:
        return None
    return weighted / mass


@runtime_checkable
class Judge(Protocol):
    """Scores complete judge prompts (rubrics already filled with question and answer) on 0..100.

    ``name`` identifies the judge (model and endpoint) in cache keys, e.g. ``"openai:gpt-4.1-mini@https://..."``.
    ``score`` returns one expected score per prompt, in order, or None where the judge gave no usable number.
    Judges may also accept a keyword ``on_result(index, score)`` callback (see :class:`CachedJudge`).
    """

    name: str

    def score(self, prompts: Sequence[str], progress: bool | str = False) -> list[float | None]: ...


def check_prompts(prompts: Sequence[str], what: str = "judge prompt") -> list[str]:
    """``prompts`` as a list of strings, refused unless it is a list (or a table column, an array, any iterable) of
    strings — not one string — naming the first position that is not one, before anything is sent or cached."""
    if isinstance(prompts, (str, bytes, Mapping)) or not hasattr(prompts, "__iter__"):
        raise PersonavecError(f"score takes a list of {what}s, not {shown(prompts)}"
                              + ("; wrap one prompt in a list" if isinstance(prompts, str) else ""))
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise PersonavecError(f"{what} {i} is {shown(p)}, not a string; a judge scores text")
    return [str(p) for p in out]  # plain strings (a NumPy array holds numpy.str_)
