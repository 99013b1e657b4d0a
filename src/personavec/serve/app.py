"""The ASGI app (Starlette): OpenAI-compatible chat completions with a ``persona`` extension.

* ``GET /`` — a self-contained chat page (docs/serve.md): every answer keeps its own meter per vector (before-edit
  readings from a zero line, an axis in the reading's unit, the guard's threshold and running mean), its text
  coloured by reading; steering, cap and guard controls with calibrated defaults; temperature and length; side by
  side unsteered/steered answers; clear chat;
* ``GET /v1/models`` — the one served model;
* ``GET /v1/persona/vectors`` — the loaded vectors (name, trait, layer, hidden size, norm, source file);
* ``GET /v1/persona/status`` — requests in flight, answers dropped by callers that went away, batch limits;
* ``POST /v1/chat/completions`` — ``messages``, ``max_tokens``/``max_completion_tokens`` (default 256),
  ``temperature``, ``top_p``, ``seed``, ``stop`` (the answer ends before the first, finish ``stop``; a streamed
  answer holds back text that may begin one), ``stream``, ``stream_options.include_usage`` (a last chunk with the
  usage, as OpenAI sends it), ``n`` = 1, and ``persona``: ``steer`` / ``cap`` entries (edits of this request
  only) and ``monitor`` (vector names, or true for all, or ``{vector, where}`` objects): the projection on v̂ at
  the vector's layer of the position that produced each generated token, before this request's own edits at that
  layer (``where: "before"``, the default: what the model itself carries) or after them (``"after"``), returned in
  a top-level ``persona`` object keyed by the vector's name for a before-edit reading and ``NAME@after`` for an
  after-edit one (``{key: {vector, layer, where, unit, tokens, mean, max, guard_triggered}}``) and, when
  streaming, in every chunk as ``{key: {tokens}}`` for the tokens it delivers (the last chunk adds each reading's
  summary). ``guard`` stops (or steers) where the answer's running mean reading from its 16th token
  (``over: "answer"``, the default; ``"token"``: each token's reading), before-edit unless ``where`` says after,
  first exceeds its threshold, by default the vector's calibrated one.

Errors are OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 naming the field, 401
for a wrong key, 415 for a body not sent as ``application/json`` (so that a page of another site cannot make a
keyless server on a laptop work for it), 500 when the model failed on the request's batch, 503 when too many
requests are in flight (``Retry-After``: when a slot is likely to free, from how long requests stay, see
:class:`Pace`). A field this server does not know, or an OpenAI field it does not implement set to anything but its
no-op value, is a 400 naming it. A caller that goes away (streaming or not) frees its slot at the engine's next step.
Readings that are not finite (an overflow in half precision) are ``null``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.decoder import guard_crossing
from ..model.loading import LoadedModel
from ..run.format import number
from ..vectors.calibration import UNIT
from .policy import BadRequest, ChatCall, Reading, ServedVector, parse_chat
from .worker import Worker

PAGE = Path(__file__).with_name("static") / "chat.html"  # the chat page: plain HTML and JS, nothing fetched elsewhere
MAX_BODY = 4 << 20  # bytes of a request body: far more than any context holds
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # the Host a server bound to loopback answers to


def error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 500: "server_error", 503: "server_busy"}.get(status, "invalid_request_error")
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    # a message may quote the caller's text, which JSON allows to hold lone surrogates that UTF-8 cannot
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=headers)


class Pace:
    """How long requests stay in this server, for a busy server's ``Retry-After``: with N requests in flight that
    each stay T seconds (the mean of the last ones to leave, answered, stopped or gone), one leaves every T / N
    seconds (Little's law), so that is when a slot frees."""

    def __init__(self, keep: int = 32, clock: Callable[[], float] = time.monotonic) -> None:
        self.stays: deque[float] = deque(maxlen=keep)
        self.since: dict[Any, float] = {}
        self.clock = clock

    def start(self, key: Any) -> None:
        self.since[key] = self.clock()

    def end(self, key: Any) -> None:
        t0 = self.since.pop(key, None)
        if t0 is not None:
            self.stays.append(self.clock() - t0)

    def retry_after(self, in_flight: int) -> int:
        """Whole seconds until a slot is likely to free (at least 1, at most an hour). Before any request has left,
        the oldest one in flight has stayed at least as long as it has been there."""
        stay = sum(self.stays) / len(self.stays) if self.stays else \
            self.clock() - min(self.since.values()) if self.since else 1.0
        return max(1, min(3600, math.ceil(stay / max(1, in_flight))))


def allowed_hosts(bind: str, extra: list[str]) -> tuple[str, ...] | None:
    """The Host names a server bound to ``bind`` answers to: bound to loopback, the loopback names, the bind
    address and ``extra`` (``--allow-host``); bound elsewhere, any (None)."""
    try:
        address = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        address = None
    if bind != "localhost" and (address is None or not address.is_loopback):
        return None
    own = f"[{address.compressed}]" if address is not None and address.version == 6 else bind.lower()
    return tuple(dict.fromkeys([*LOOPBACK_NAMES, own, *(x.lower() for x in extra)]))


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``127.0.0.1:8000`` → ``127.0.0.1``, ``[::1]:80`` → ``[::1]``."""
    header = header.strip().lower()
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() and not header.endswith("]") else header


def make_app(lm: LoadedModel, vectors: dict[str, ServedVector], model_name: str | None = None,
             api_key: str | None = None, max_batch: int | None = None, max_waiting: int = 256,
             policy: dict[str, Any] | None = None, hosts: tuple[str, ...] | None = None) -> Starlette:
    """``policy``: the server-wide default persona (``cap``, ``guard``) for requests that do not set their own.
    ``hosts``: the only names a request's Host header may give (None: any). A server bound to loopback answers to
    its loopback names only, so that a site whose name an attacker rebinds to 127.0.0.1 cannot use it."""
    name = model_name or lm.model_id
    state: dict[str, Worker] = {}
    pace = Pace()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["worker"] = Worker(lm, max_batch=max_batch, max_waiting=max_waiting)
        try:
            yield
        finally:
            state.pop("worker").close()
            parser.shutdown(wait=False)

    page_html = PAGE.read_text(encoding="utf-8")  # read once
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-parse")

    def hosted(handler: Callable[[HttpRequest], Awaitable[Response]]) -> Callable[[HttpRequest], Awaitable[Response]]:
        """``handler`` for requests to one of ``hosts``."""
        async def checked(request: HttpRequest) -> Response:
            asked = host_name(request.headers.get("host", ""))
            if hosts is not None and asked and asked not in hosts:  # no Host at all: not a browser, no rebinding
                return error(400, f"this server answers to the host names {', '.join(hosts)} only, not "
                                  f"{request.headers.get('host', '(none)')[:80]!r}", "Host")
            return await handler(request)
        return checked

    def keyed(handler: Callable[[HttpRequest], Awaitable[Response]]) -> Callable[[HttpRequest], Awaitable[Response]]:
        """``handler`` behind the host check and the API key (when the server has one)."""
        async def checked(request: HttpRequest) -> Response:
            given = request.headers.get("authorization", "").encode("utf-8", "replace")
            if api_key is not None and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                return error(401, "a wrong or missing API key (Authorization: Bearer KEY)")
            return await handler(request)
        return hosted(checked)

    async def page(request: HttpRequest) -> Response:
        return HTMLResponse(page_html)

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                           "owned_by": "personavec"}]})

    async def persona_vectors(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [v.describe() for v in vectors.values()]})

    async def status(request: HttpRequest) -> Response:
        return JSONResponse(state["worker"].status())

    async def chat(request: HttpRequest) -> Response:
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return error(415, "send the body as JSON, with the header Content-Type: application/json")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                return error(413, f"the request body is larger than {MAX_BODY >> 20} MiB")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer of thousands of digits, deep nesting
            return error(400, "the request body is not JSON that can be read")
        worker = state["worker"]
        try:  # the chat template and the tokenizer run off the event loop (one at a time: a fast tokenizer may
            # refuse concurrent calls), so streams go on meanwhile
            call = await asyncio.get_running_loop().run_in_executor(
                parser, partial(parse_chat, body, lm, vectors, worker.next_key(), defaults=policy))
            # an answer with stop strings is watched token by token, streamed or not
            queue = worker.submit(call.request, stream=call.stream or bool(call.stop))
        except BadRequest as e:
            in_flight = worker.status()["in_flight"]
            busy = e.status == 503 and in_flight >= worker.max_waiting
            return error(e.status, e.message, e.param, retry_after=pace.retry_after(in_flight) if busy else None)
        pace.start(call.request.key)
        cid = f"chatcmpl-{call.request.key}"
        if call.stream:
            return StreamingResponse(_stream(lm, call, queue, cid, name, worker, pace), media_type="text/event-stream")
        event = None
        watch = _Stops(lm, call, worker)
        try:
            event = await _answer(request, queue, watch.add)
        finally:
            pace.end(call.request.key)
            if event is None:  # the caller went away (or the server is stopping this handler)
                worker.cancel(call.request.key)
        if event is None:
            return Response(status_code=499)  # nobody reads it
        if event[0] == "error":
            return error(500, event[1])
        result, text = watch.result(event[1])
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": result.finish}],
            "usage": usage(call, result),
            "persona": _persona_summary(call, result)})

    return Starlette(routes=[Route("/", hosted(page)), Route("/v1/models", keyed(models)),
                             Route("/v1/persona/vectors", keyed(persona_vectors)),
                             Route("/v1/persona/status", keyed(status)),
                             Route("/v1/chat/completions", keyed(chat), methods=["POST"])], lifespan=lifespan)


def _decode(lm: LoadedModel, tokens: list[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


async def _answer(request: HttpRequest, queue: asyncio.Queue, on_token: Callable[[int], Any]) -> tuple | None:
    """The call's last event (``done`` or ``error``), or None when the caller disconnects first; ``on_token`` gets
    each token of a call submitted with its tokens."""
    async def gone() -> None:  # the body is read: what the connection says next can only be its end
        while (await request.receive())["type"] != "http.disconnect":
            pass

    left = asyncio.ensure_future(gone())
    event: asyncio.Future | None = None
    try:
        while True:
            event = asyncio.ensure_future(queue.get())
            await asyncio.wait({event, left}, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                return None
            if event.result()[0] != "token":
                return event.result()
            on_token(event.result()[1])
    finally:
        left.cancel()
        if event is not None:
            event.cancel()


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where an answer ends: the start of the first stop string in ``text`` (None: none is in it)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (held back until the next
    tokens say whether it is one)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class _Stops:
    """An answer's text as its tokens arrive, cut at the first of the request's stop strings: the answer is ended
    there (the engine stops generating it at its next step) and its result is that of the tokens up to the one
    that completed the stop string, with finish "stop"."""

    def __init__(self, lm: LoadedModel, call: ChatCall, worker: Worker) -> None:
        self.lm, self.call, self.worker = lm, call, worker
        self.tokens: list[int] = []
        self.at: int | None = None  # tokens up to the stop string
        self.text = ""  # the answer so far, up to any stop string

    def add(self, token: int) -> bool:
        """Take the next token; True when the answer ends at a stop string (tokens after that are ignored)."""
        if self.at is None and self._take(token):
            self.worker.end(self.call.request.key)
        return self.at is not None

    def _take(self, token: int) -> bool:
        """The next token into the text; True when it completes a stop string (``at`` is then the tokens so far)."""
        self.tokens.append(token)
        self.text = _decode(self.lm, self.tokens)
        cut = stop_at(self.text, self.call.stop)
        if cut is not None:
            self.at, self.text = len(self.tokens), self.text[:cut]
        return cut is not None

    def result(self, result: Any) -> tuple[Any, str]:
        """The engine's ``result`` as the caller gets it, and its text."""
        if self.at is None and self.call.stop:  # the tokens this watch was not given, taken the same way
            for token in result.token_ids[len(self.tokens):]:
                if self._take(token):
                    break
        if self.at is None:
            return result, _decode(self.lm, result.token_ids)
        n, guard = self.at, self.call.request.guard
        readings = [values[:n] for values in result.readings]
        # the guard counts only where its own statistic (a token's reading, or the running mean) crossed within the
        # answer's tokens
        triggered = bool(guard is not None and result.guard_triggered
                         and guard_crossing(guard, readings[guard.read]) is not None)
        return dataclasses.replace(result, token_ids=result.token_ids[:n], readings=readings, finish="stop",
                                   guard_triggered=triggered), self.text


def _readings(values: list[float]) -> list[float | None]:
    """Readings for JSON, which has no NaN or infinity: those are null."""
    return [number(x) for x in values]


def _keys(call: ChatCall) -> list[str]:
    """The ``persona`` key of each reading, in the order of the request's reads."""
    return [Reading(*r).key for r in call.monitor]


def _persona_summary(call: ChatCall, result: Any) -> dict[str, Any]:
    out = {}
    for r, values in zip(call.monitor, result.readings):
        r = Reading(*r)
        tokens = _readings(values)
        finite = [x for x in tokens if x is not None]
        out[r.key] = {"vector": r.vector, "layer": r.layer, "where": r.where, "unit": UNIT, "tokens": tokens,
                      "mean": sum(finite) / len(finite) if finite else None, "max": max(finite) if finite else None,
                      "guard_triggered": bool(result.guard_triggered and r.key == call.guarded)}
    return out


async def _stream(lm: LoadedModel, call: ChatCall, queue: Any, cid: str, model: str,
                  worker: Worker, pace: Pace) -> AsyncIterator[str]:
    done = False
    try:
        async for part in _chunks(lm, call, queue, cid, model, _Stops(lm, call, worker)):
            yield part
        done = True
    finally:
        pace.end(call.request.key)
        if not done:  # the client went away mid-answer: its slot frees at the engine's next step
            worker.cancel(call.request.key)


def usage(call: ChatCall, result: Any) -> dict[str, int]:
    return {"prompt_tokens": call.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": call.prompt_tokens + len(result.token_ids)}


async def _chunks(lm: LoadedModel, call: ChatCall, queue: Any, cid: str, model: str,
                  watch: _Stops) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, persona: dict | None = None,
              counts: dict | None = None) -> str:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
        if call.usage:  # as OpenAI sends it: null in every chunk but the last, which has no choices
            body["usage"] = counts
        if persona is not None:
            body["persona"] = persona
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    pending: list[list[float]] = []  # readings of tokens whose text is not out yet
    while True:
        event = await queue.get()
        if event[0] == "error":
            yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
            return
        if event[0] == "done":
            break
        stopped = watch.at is not None
        if watch.add(event[1]):  # at a stop string: the rest comes with the last chunk; later tokens are not sent
            if not stopped:
                pending.append(event[2])
            continue
        pending.append(event[2])
        text = watch.text
        # a character split over tokens, or an end that may begin a stop string: wait for the next tokens
        if text.endswith("\ufffd") or held(text, call.stop):
            continue
        persona = {key: {"tokens": _readings([r[k] for r in pending])} for k, key in enumerate(_keys(call))}
        yield chunk({"content": text[len(sent):]}, persona=persona if call.monitor else None)
        sent, pending = text, []
    result, text = watch.result(event[1])
    # the last chunk: the readings of tokens not yet delivered, and each vector's summary over the whole answer
    summary = _persona_summary(call, result)
    for k, key in enumerate(_keys(call)):
        summary[key]["tokens"] = _readings([r[k] for r in pending])
    yield chunk({"content": text[len(sent):]} if text != sent else {}, finish=result.finish,
                persona=summary if call.monitor else None)
    if call.usage:
        yield chunk(None, counts=usage(call, result))
    yield "data: [DONE]\n\n"
