"""A real OpenAI-compatible chat-completions HTTP server for tests (127.0.0.1, random port, background thread).

``POST /v1/chat/completions`` answers with one generated token and its top logprobs, taken from
``responder(prompt_text) -> [(token, logprob), ...]`` (``prompt_text`` is the last user message), or, with
``completer(body) -> (content, finish_reason, n_tokens)``, with a whole answer (a server that generates). Fault
injection: ``fail_next(500, 429, retry_after=...)`` makes the next requests return those statuses. Every request
is recorded (path, headers, JSON body), and the maximum number of requests in flight at once is tracked
(``delay`` holds each request open that long, so concurrency is observable). A responder that raises makes
that request fail with HTTP 500.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Responder = Callable[[str], list[tuple[str, float]]]


def default_responder(prompt: str) -> list[tuple[str, float]]:
    """Confident "REF" when the prompt says REFUSE, else a fixed distribution around 50."""
    if "REFUSE" in prompt:
        return [("REF", -0.05), ("I", -3.5), ("50", -6.0)]
    return [("50", -0.5), ("60", -1.5), ("40", -2.0), ("Sure", -4.0)]


@dataclass
class Fault:
    status: int
    retry_after: str | None = None
    body: str | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer(...) as srv:``; point clients at ``srv.base_url``."""

    def __init__(self, responder: Responder | None = None, *, delay: float = 0.0, logprobs: bool = True,
                 model: str = "fake-judge", completer: Callable[[dict], tuple[str, str, int]] | None = None) -> None:
        self.responder = responder or default_responder
        self.completer = completer  # body -> (content, finish_reason, completion tokens): a whole answer
        self.delay = delay
        self.logprobs = logprobs  # False: behave like a server that ignores logprobs requests
        self.model = model
        self.requests: list[RecordedRequest] = []
        self.faults: deque[Fault] = deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- configuration -------------------------------------------------------------------------------------
    def fail_next(self, *statuses: int, retry_after: float | str | None = None, body: str | None = None) -> None:
        """Answer the next ``len(statuses)`` requests with these HTTP statuses (optionally with Retry-After)."""
        with self._lock:
            for status in statuses:
                self.faults.append(Fault(status, None if retry_after is None else str(retry_after), body))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.max_in_flight = 0

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # --- lifecycle -----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- request handling (called from handler threads) ----------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(RecordedRequest(method, handler.path, dict(handler.headers.items()), body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.popleft() if self.faults else None
        reply: tuple[int, str, dict[str, str]] = (500, json.dumps({"error": {"message": "no reply"}}), {})
        try:
            if self.delay:
                time.sleep(self.delay)
            if fault is not None:
                err = fault.body or json.dumps({"error": {"message": f"injected HTTP {fault.status}",
                                                          "type": "injected", "code": fault.status}})
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                reply = (fault.status, err, headers)
            elif method == "POST" and handler.path.rstrip("/") == "/v1/chat/completions" and isinstance(body, dict):
                try:
                    completion = self._completion(body)
                except Exception as exc:  # a responder that raises makes the server fail this request with 500
                    reply = (500, json.dumps({"error": {"message": f"responder failed: {exc}"}}), {})
                else:
                    reply = (200, json.dumps(completion), {})
            elif method == "GET" and handler.path.rstrip("/") == "/v1/models":
                reply = (200, json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]}), {})
            elif method == "POST" and handler.path.rstrip("/") == "/v1/chat/completions":
                reply = (400, json.dumps({"error": {"message": "request body is not a JSON object"}}), {})
            else:
                reply = (404, json.dumps({"error": {"message": f"no route {method} {handler.path}"}}), {})
        finally:
            # out of flight before the reply is written: a client that sends its next request the moment it reads
            # this one must not find it still counted (that made max_in_flight exceed a bound the client kept)
            with self._lock:
                self.in_flight -= 1
        self._send(handler, *reply)

    def _completion(self, body: dict) -> dict:
        if self.completer is not None:
            content, finish, n = self.completer(body)
            return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", self.model),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
        messages = body.get("messages") or []
        prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        ranked = sorted(self.responder(prompt), key=lambda tl: -tl[1])
        top_n = int(body.get("top_logprobs") or 0)
        token, logprob = ranked[0]
        logprobs = None
        if self.logprobs and body.get("logprobs"):
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in ranked[:top_n]]
            logprobs = {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                                     "top_logprobs": top}]}
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": token}, "logprobs": logprobs,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 1,
                      "total_tokens": len(prompt.split()) + 1},
        }

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode("utf-8")
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client was killed before it read
            handler.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeOpenAIServer

    def do_POST(self) -> None:
        self.server_state._handle(self, "POST")

    def do_GET(self) -> None:
        self.server_state._handle(self, "GET")

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass
