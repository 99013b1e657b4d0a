"""A judge served by any OpenAI-compatible chat-completions endpoint that returns logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ..endpoint import ChatClient, EndpointConfig
from ..errors import PersonavecError
from .base import MIN_MASS, ResultCallback, aggregate_score, check_prompts

TOP_LOGPROBS = 20


class OpenAIJudge:
    """Score prompts with one 1-token, temperature-0 request each, reading the top-20 logprobs of that token.

    Pass an :class:`EndpointConfig` (or ``model``/``base_url``/``api_key``, which fall back to the environment,
    see :meth:`EndpointConfig.from_env`), or a ready :class:`ChatClient`. Up to ``max_concurrency`` requests
    are in flight at once; results come back in input order.
    """

    def __init__(self, config: EndpointConfig | None = None, *, model: str | None = None,
                 base_url: str | None = None, api_key: str | None = None, client: ChatClient | None = None,
                 max_concurrency: int = 8, min_mass: float = MIN_MASS, top_logprobs: int = TOP_LOGPROBS) -> None:
        if client is None:
            if config is None:
                config = EndpointConfig.from_env(model=model, base_url=base_url, api_key=api_key)
            client = ChatClient(config)
        if max_concurrency < 1:
            raise PersonavecError(f"judge concurrency must be at least 1, got {max_concurrency}")
        self.client = client
        self.max_concurrency = int(max_concurrency)
        self.min_mass = float(min_mass)
        self.top_logprobs = int(top_logprobs)

    @property
    def config(self) -> EndpointConfig:
        return self.client.config

    @property
    def name(self) -> str:
        return f"openai:{self.config.model}@{self.config.base_url}"

    def request_params(self) -> dict[str, Any]:
        return {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs, "seed": 0}

    def top_logprobs_of(self, response: dict) -> list[tuple[str, float]] | None:
        """The ``(token, logprob)`` pairs of the first generated token; None when nothing was generated."""
        try:
            choice = response["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise PersonavecError(f"judge endpoint {self.config.base_url} returned no choices; "
                                  "check that it is an OpenAI-compatible chat-completions API") from None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if content is None:
            raise PersonavecError(
                f"judge endpoint {self.config.base_url} returned no logprobs for model {self.config.model!r}; "
                "the judge needs an endpoint and model that support logprobs/top_logprobs "
                "(e.g. vLLM, llama.cpp server, OpenAI non-reasoning models)")
        if not content:
            return None
        first = content[0] or {}
        pairs = []
        for entry in first.get("top_logprobs") or []:
            if isinstance(entry, dict) and "token" in entry and entry.get("logprob") is not None:
                pairs.append((str(entry["token"]), float(entry["logprob"])))
        if not pairs and first.get("token") is not None and first.get("logprob") is not None:
            pairs.append((str(first["token"]), float(first["logprob"])))
        return pairs

    def score_one(self, prompt: str) -> float | None:
        response = self.client.chat([{"role": "user", "content": prompt}], **self.request_params())
        pairs = self.top_logprobs_of(response)
        return None if pairs is None else aggregate_score(pairs, self.min_mass)

    def score(self, prompts: Sequence[str], progress: bool | str = False,
              on_result: ResultCallback | None = None) -> list[float | None]:
        """Scores in input order. ``on_result(index, score)`` is called in the calling thread as each arrives.

        The first error (a :class:`PersonavecError` after retries) cancels the requests not yet started and is
        raised once the running ones finish; scores already passed to ``on_result`` are not lost.
        """
        prompts = check_prompts(prompts)
        results: list[float | None] = [None] * len(prompts)
        if not prompts:
            return results
        from tqdm.auto import tqdm

        desc = progress if isinstance(progress, str) else "judging"
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)),
                                  thread_name_prefix="personavec-judge")
        try:
            pending: dict[Future, int] = {pool.submit(self.score_one, p): i for i, p in enumerate(prompts)}
            error: BaseException | None = None

            def collect(done) -> BaseException | None:
                first = None
                for fut in sorted(done, key=pending.__getitem__):
                    i = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is not None:
                        first = first or exc
                        continue
                    results[i] = fut.result()
                    if on_result is not None:
                        on_result(i, results[i])
                    bar.update(1)
                return first

            while pending and error is None:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                error = collect(done)
            if error is not None:
                # keep what the requests already running deliver, drop the rest, then report the error
                for fut in pending:
                    fut.cancel()
                collect(wait(pending).done)
                raise error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.name!r}, max_concurrency={self.max_concurrency})"
