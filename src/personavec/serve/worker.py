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
from ..errors import PersonavecError
from ..model.loading import LoadedModel
from .policy import BadRequest

log = logging.getLogger(__name__)

FAILURES_IN_A_ROW = 3  # model steps failing one after another with no answer between: the model is broken, stop


class Worker:
    def __init__(self, lm: LoadedModel, max_batch: int | None = None, max_waiting: int = 256) -> None:
        self.engine = Engine(lm, max_batch=max_batch)
        self.max_waiting = max_waiting
        self.feed = Feed()
        self._calls: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}  # loop, queue, stream
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.cancelled = 0  # answers dropped because their caller went away
        self._ended: set = set()  # answers the server ended itself (a stop string): not counted as cancelled
        self.failures = 0  # model steps that raised (their requests got an error)
        self._failing = 0  # failures since the last answer
        self._why = "the server is shutting down"  # what new calls are told once the loop has ended
        self._stopped = False  # set once the engine loop has ended: new calls get 503
        self._thread = threading.Thread(target=self._run, name="personavec-engine", daemon=True)
        self._thread.start()

    def next_key(self) -> int:
        return next(self._ids)

    def submit(self, request: Request, stream: bool = True) -> asyncio.Queue:
        """Queue ``request``; its ``("done", Result)`` event (or one ``("error", why)`` when the model fails on its
        batch) arrives on the queue, after a ``("token", id, readings)`` event per token when ``stream``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the same lock as a failure's clean-up: a call is either told of it or not yet queued
            if self._stopped:
                raise BadRequest(None, self._why, status=503)
            if len(self._calls) >= self.max_waiting:
                raise BadRequest(None, f"the server is busy ({self.max_waiting} requests in flight); retry shortly",
                                 status=503)
            try:
                self.feed.put(request)
            except PersonavecError as e:  # the engine's own check of a request
                raise BadRequest(None, str(e)) from None
            self._calls[request.key] = (loop, queue, stream)
        return queue

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": len(self._calls), "cancelled": self.cancelled, "failures": self.failures,
                    "max_batch": self.engine.max_batch, "max_waiting": self.max_waiting}

    def cancel(self, key: Any) -> None:
        """Stop generating for a caller that went away (its slot frees at the engine's next step)."""
        self.feed.cancel(key)

    def end(self, key: Any) -> None:
        """Stop generating an answer the server has ended (at a stop string); its slot frees at the next step."""
        with self._lock:
            if key in self._calls:
                self._ended.add(key)
        self.feed.cancel(key)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
        self.feed.close()
        self._thread.join(timeout=60)

    def _post(self, key: Any, event: tuple, last: bool = False) -> None:
        with self._lock:
            target = self._calls.pop(key, None) if last else self._calls.get(key)
            if last:
                self._ended.discard(key)
        if target is None or (event[0] == "token" and not target[2]):
            return
        try:
            target[0].call_soon_threadsafe(target[1].put_nowait, event)
        except RuntimeError:  # the caller's event loop has ended: nobody is waiting
            self.cancel(key)

    def _run(self) -> None:
        """The engine loop. A failed model step (CUDA out of memory, say) costs the requests it was decoding: each
        gets an error; those still waiting stay in line and the loop starts again. After ``FAILURES_IN_A_ROW``
        failures with no answer between, the model is taken to be broken: every call gets an error, new ones 503."""
        while True:
            try:
                for result in self.engine.generate(
                        self.feed, on_token=lambda req, tok, read: self._post(req.key, ("token", tok, read))):
                    ended = result.key in self._ended  # cut at a stop string: the model answered
                    self.cancelled += result.finish == "cancelled" and not ended
                    if result.finish != "cancelled" or ended:  # the model answered: it works
                        self._failing = 0
                    self._post(result.key, ("done", result), last=True)
                self._stop("the server is shutting down")  # the feed was closed
                return
            except Exception as e:
                log.exception("a model step failed: the requests it was decoding get an error; serving goes on")
                self.failures += 1
                self._failing += 1
                why = f"the model failed on this batch ({type(e).__name__}: {str(e)[:300]})"
                if self.feed.closed:
                    self._stop("the server is shutting down")
                    return
                if self._failing >= FAILURES_IN_A_ROW:  # stop first: nobody is told to retry a stopping server
                    self._stop(f"{why}, {self._failing} times in a row: restart the server (see its log)")
                    return
                waiting = self.feed.drop_started()
                with self._lock:  # every call whose request is not in line again was in the failed step
                    failed = [key for key in self._calls if key not in waiting]
                for key in failed:
                    self._post(key, ("error", why + "; retry"), last=True)
            except BaseException:
                self._stop("the server is shutting down")
                raise

    def _stop(self, why: str) -> None:
        """Take no new calls, and tell every call in flight ``why``."""
        with self._lock:
            self._stopped, self._why = True, why
            keys = list(self._calls)
        self.feed.close()
        for key in keys:
            self._post(key, ("error", why), last=True)
