"""The one engine loop that owns the model: a thread running :meth:`Engine.generate` over a live feed.

Requests from any number of concurrent HTTP calls join the running batch as slots free (continuous batching);
each call receives its tokens (with its readings) and its final result through its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any

from ..engine.decoder import Engine, Feed, Request
from ..model.loading import LoadedModel
from .policy import BadRequest

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, lm: LoadedModel, max_batch: int | None = None, max_waiting: int = 256) -> None:
        self.engine = Engine(lm, max_batch=max_batch)
        self.max_waiting = max_waiting
        self.feed = Feed()
        self._calls: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.cancelled = 0  # answers dropped because their caller went away
        self.failures = 0  # model steps that raised (their requests got an error)
        self._stopped = False  # set once the engine loop has ended: new calls get 503
        self._thread = threading.Thread(target=self._run, name="personavec-engine", daemon=True)
        self._thread.start()

    def next_key(self) -> int:
        return next(self._ids)

    def submit(self, request: Request) -> asyncio.Queue:
        """Queue ``request``; its ``("token", id, readings)`` and ``("done", Result)`` events arrive on the queue
        (or one ``("error", why)`` when the model fails)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the same lock as a failure's clean-up: a call is either told of it or not yet queued
            if self._stopped:
                raise BadRequest(None, "the server is shutting down", status=503)
            if len(self._calls) >= self.max_waiting:
                raise BadRequest(None, f"the server is busy ({self.max_waiting} requests in flight); retry shortly",
                                 status=503)
            self.feed.put(request)
            self._calls[request.key] = (loop, queue)
        return queue

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": len(self._calls), "cancelled": self.cancelled, "failures": self.failures,
                    "max_batch": self.engine.max_batch, "max_waiting": self.max_waiting}

    def cancel(self, key: Any) -> None:
        """Stop generating for a caller that went away (its slot frees at the engine's next step)."""
        self.feed.cancel(key)

    def close(self) -> None:
        self.feed.close()
        self._thread.join(timeout=60)

    def _post(self, key: Any, event: tuple, last: bool = False) -> None:
        with self._lock:
            target = self._calls.pop(key, None) if last else self._calls.get(key)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def _run(self) -> None:
        """The engine loop. A failed model step (CUDA out of memory, say) costs the requests in flight then: each
        gets an error, and the loop starts again for the next ones."""
        while True:
            try:
                for result in self.engine.generate(
                        self.feed, on_token=lambda req, tok, read: self._post(req.key, ("token", tok, read))):
                    self.cancelled += result.finish == "cancelled"
                    self._post(result.key, ("done", result), last=True)
                self._fail("the server is shutting down", stop=True)  # the feed was closed
                return
            except Exception as e:
                log.exception("a model step failed: the requests in flight get an error; serving goes on")
                self.failures += 1
                self._fail(f"the model failed on this batch ({type(e).__name__}: {str(e)[:300]}); retry",
                           stop=self.feed.closed)
            except BaseException:
                self._fail("the server is shutting down", stop=True)
                raise

    def _fail(self, why: str, stop: bool) -> None:
        """Tell every call in flight ``why``; with ``stop``, take no new ones."""
        with self._lock:
            self._stopped = self._stopped or stop
            self.feed.clear()
            keys = list(self._calls)
        for key in keys:
            self._post(key, ("error", why), last=True)
