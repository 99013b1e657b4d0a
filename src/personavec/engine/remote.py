"""Unsteered sampling on an OpenAI-compatible server that serves the same weights (vLLM, SGLang, the llama.cpp
server): the official code's fast path for the contrastive answers.

:class:`EndpointSampler` answers :class:`~personavec.engine.decoder.Request` objects like the local engine does
(same ``generate`` interface, answers yielded as they finish, at most ``concurrency`` requests in flight), from
each request's chat ``messages``. Steering cannot travel to a stock server: a request with edits is refused.
Activations are always computed locally from the returned text. :meth:`EndpointSampler.check_same_model` asks
the server for a greedy answer to a fixed probe and compares it with the local model's, so a server serving
another model is refused before any answer is sampled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tqdm.auto import tqdm

from ..endpoint import ChatClient, EndpointConfig
from ..errors import PersonavecError
from ..model.loading import LoadedModel
from .decoder import Request, Result

PROBE = "Count from one to ten in words, separated by commas."
PROBE_TOKENS = 24


def parse_sampler(spec: str) -> str | None:
    """The served model's name of an ``openai:MODEL`` spec; None for ``local``."""
    kind, _, model = spec.partition(":")
    if kind == "local" and not model:
        return None
    if kind != "openai" or not model:
        raise PersonavecError(f"unknown sampler {spec!r}; use local or openai:MODEL (with --sampler-base-url)")
    return model


class EndpointSampler:
    def __init__(self, model: str, base_url: str | None = None, concurrency: int = 16) -> None:
        self.client = ChatClient(EndpointConfig.from_env(model=model, base_url=base_url), label="sampler endpoint",
                                 hint="--sampler-base-url or OPENAI_BASE_URL")
        self.concurrency = max(1, int(concurrency))

    @property
    def name(self) -> str:
        return f"openai:{self.client.config.model}@{self.client.config.base_url}"

    def complete(self, request: Request) -> Result:
        if request.edits:
            raise PersonavecError("a steered request cannot be sampled on an endpoint; steered stages run locally")
        if not request.messages:
            raise PersonavecError("endpoint sampling needs each request's chat messages")
        params: dict[str, Any] = {"max_tokens": request.max_new_tokens, "temperature": request.temperature,
                                  "seed": request.seed}
        if request.temperature > 0:
            params["top_p"] = request.top_p
        data = self.client.chat([dict(m) for m in request.messages], **params)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise PersonavecError(f"{self.client.where} returned no choices[0].message; check that it is an "
                                  "OpenAI-compatible chat-completions API") from None
        n = int((data.get("usage") or {}).get("completion_tokens") or 0)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Result(request.key, request, [], text.strip(), finish, n_generated=n)

    def generate(self, requests: Iterable[Request], progress: bool | str = False, total: int | None = None,
                 initial: int = 0) -> Iterator[Result]:
        """Answers in the order they finish; the first error stops the stream once the requests in flight end."""
        todo = list(requests)
        desc = progress if isinstance(progress, str) else "sampling (endpoint)"
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="personavec-sampler") as pool, \
                tqdm(total=total or len(todo), initial=initial, desc=desc, unit="answer", disable=not progress) as bar:
            pending: set[Future] = set()
            queue = iter(todo)
            error: BaseException | None = None
            while True:
                while error is None and len(pending) < self.concurrency:
                    req = next(queue, None)
                    if req is None:
                        break
                    pending.add(pool.submit(self.complete, req))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        error = error or fut.exception()
                        continue
                    bar.update(1)
                    yield fut.result()
            if error is not None:
                raise error

    def check_same_model(self, lm: LoadedModel) -> None:
        """Refuse a server whose greedy answer to a fixed probe differs from the local model's."""
        from .sampling import chat

        probe = Request("", PROBE_TOKENS, messages=({"role": "user", "content": PROBE},), key="probe")
        served = self.complete(probe).text
        local = chat(lm, PROBE, max_new_tokens=PROBE_TOKENS)
        if served != local:
            raise PersonavecError(
                f"{self.client.where} does not serve {lm.model_id}: its greedy answer to a probe differs from the "
                f"local model's ({served[:40]!r} vs {local[:40]!r}); serve the same weights (and chat template), "
                "or sample locally (--sampler local); --no-sampler-check skips this check (for a server that runs the "
                "same weights at another precision)")
