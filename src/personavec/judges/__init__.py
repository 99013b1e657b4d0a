"""LLM judges that score answers 0..100 from the logprobs of a single output token, with an on-disk cache."""

from __future__ import annotations

from .base import MIN_MASS, Judge, ResultCallback, aggregate_score, token_value
from .cache import CachedJudge, JudgeCache
from .openai_judge import OpenAIJudge

__all__ = ["MIN_MASS", "CachedJudge", "Judge", "JudgeCache", "OpenAIJudge", "ResultCallback", "aggregate_score",
           "token_value"]
