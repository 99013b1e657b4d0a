"""A persistent SQLite cache of judge scores, and a judge wrapper that only asks for what it has not seen."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

from ..cache import KeyValueCache, digest
from .base import Judge, check_prompts


def cache_key(judge_name: str, prompt: str) -> str:
    """The key of one score: the judge's name and the full prompt."""
    return digest(judge_name, prompt)


class JudgeCache:
    """Scores by (judge name, prompt) in an SQLite file (:class:`~personavec.cache.KeyValueCache`).

    A stored None is a cached *missing* score (the judge refused), distinct from a prompt never scored. Several
    processes may use the same file; writes are committed at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.store = KeyValueCache(path, "judge_scores_v2", what="judge cache")
        self.path = self.store.path

    def get_many(self, judge_name: str, prompts: Sequence[str]) -> dict[int, float | None]:
        """The cached scores of ``prompts``, by index; prompts not in the cache are left out."""
        keys = [cache_key(judge_name, p) for p in prompts]
        found = self.store.get_many(keys)
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def put_many(self, judge_name: str, prompts: Sequence[str], scores: Sequence[float | None]) -> None:
        """Store (or overwrite) one score per prompt; None stores a missing score."""
        prompts, scores = list(prompts), list(scores)
        if len(prompts) != len(scores):
            raise ValueError(f"{len(prompts)} prompts but {len(scores)} scores")
        self.store.put_many({cache_key(judge_name, p): None if s is None else float(s)
                             for p, s in zip(prompts, scores)})

    def __len__(self) -> int:
        return len(self.store)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"


def _accepts_on_result(judge: Judge) -> bool:
    try:
        params = inspect.signature(judge.score).parameters
    except (TypeError, ValueError):
        return False
    return "on_result" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class CachedJudge:
    """Wrap a judge with a :class:`JudgeCache`: only prompts not cached yet are sent, each distinct one once.

    Scores are written to the cache as they arrive (in chunks of ``chunk_size``), so an interrupted run keeps
    what it paid for. Judges whose ``score`` takes an ``on_result`` callback stream their results; others are
    called ``chunk_size`` prompts at a time. ``calls`` counts the prompts actually sent to the inner judge.
    """

    def __init__(self, inner: Judge, cache: JudgeCache, chunk_size: int = 16) -> None:
        self.inner = inner
        self.cache = cache
        self.chunk_size = max(1, int(chunk_size))
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def score(self, prompts: Sequence[str], progress: bool | str = False) -> list[float | None]:
        prompts = check_prompts(prompts)
        name = self.name
        results: list[float | None] = [None] * len(prompts)
        cached = self.cache.get_many(name, prompts)
        for i, s in cached.items():
            results[i] = s
        where: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            if i not in cached:
                where.setdefault(p, []).append(i)
        todo = list(where)
        if not todo:
            return results

        buffer: list[tuple[str, float | None]] = []

        def flush() -> None:
            if buffer:
                self.cache.put_many(name, [p for p, _ in buffer], [s for _, s in buffer])
                buffer.clear()

        reported: set[int] = set()

        def on_result(j: int, s: float | None) -> None:
            if j in reported:
                return
            reported.add(j)
            for i in where[todo[j]]:
                results[i] = s
            buffer.append((todo[j], s))
            if len(buffer) >= self.chunk_size:
                flush()

        try:
            if _accepts_on_result(self.inner):
                self.calls += len(todo)
                scores = self.inner.score(todo, progress=progress, on_result=on_result)
                for j, s in enumerate(scores):  # in case the judge took the callback but did not call it
                    on_result(j, s)
            else:
                from tqdm.auto import tqdm

                desc = progress if isinstance(progress, str) else "judging"
                with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
                    for start in range(0, len(todo), self.chunk_size):
                        chunk = todo[start:start + self.chunk_size]
                        self.calls += len(chunk)
                        scores = self.inner.score(chunk, progress=False)
                        for j, s in enumerate(scores, start):
                            on_result(j, s)
                        bar.update(len(chunk))
        finally:
            flush()
        return results

    def __repr__(self) -> str:
        return f"CachedJudge({self.inner!r}, {self.cache!r})"
