"""A small, dependency-free client for OpenAI-compatible chat-completions endpoints.

Works with OpenAI, vLLM, the llama.cpp server and Ollama's ``/v1`` API: one POST to
``{base_url}/chat/completions`` per call, retried with exponential backoff (plus jitter) on HTTP 429, 5xx,
timeouts and connection errors, honouring ``Retry-After``. Every failure the caller sees is a
:class:`~personavec.errors.PersonavecError` with a one-line message that says what to do.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PersonavecError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_JUDGE_MODEL = "gpt-4.1-mini"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0  # never sleep longer than this, whatever the server asks for


@dataclass
class EndpointConfig:
    """Where and how to reach an OpenAI-compatible endpoint.

    ``max_retries`` counts retries after the first attempt (so at most ``max_retries + 1`` tries); the wait
    before retry ``i`` (0-based) is ``min(max_backoff, backoff * 2**i)`` plus up to 10 % jitter, or the
    server's ``Retry-After`` when it sends one.
    """

    base_url: str
    api_key: str | None
    model: str
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")

    @classmethod
    def from_env(cls, model: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, **kwargs: Any) -> EndpointConfig:
        """Fill unset fields from ``OPENAI_BASE_URL``, ``OPENAI_API_KEY`` and ``PERSONAVEC_JUDGE_MODEL``."""
        return cls(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            api_key=api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or None),
            model=model or os.environ.get("PERSONAVEC_JUDGE_MODEL") or DEFAULT_JUDGE_MODEL,
            **kwargs,
        )


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(body: bytes) -> str:
    """The human part of an error body: ``error.message`` of an OpenAI-style error, else the raw text."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _one_line(text)
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return _one_line(err["message"])
        if isinstance(err, str):
            return _one_line(err)
        if data.get("detail"):
            return _one_line(data["detail"])
    return _one_line(text)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - time.time()
    if secs != secs:  # NaN
        return None
    return min(max(secs, 0.0), MAX_RETRY_AFTER)


def _reason(exc: BaseException) -> str:
    """A short description of a connection-level failure ("Connection refused", "timed out", ...)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        if not isinstance(exc.reason, BaseException):
            return _one_line(str(exc.reason))
        exc = exc.reason
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(exc.strerror)
    return _one_line(str(exc) or type(exc).__name__)


class ChatClient:
    """POST chat-completions requests to an OpenAI-compatible endpoint, with retries. Thread-safe.

    ``sleep`` (default :func:`time.sleep`) is the function used to wait between retries; tests replace it.
    ``label`` names the endpoint in error messages and ``hint`` is how the user points at another server.
    """

    def __init__(self, config: EndpointConfig | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 label: str = "judge endpoint", hint: str = "--judge-base-url or OPENAI_BASE_URL") -> None:
        self.config = config if config is not None else EndpointConfig.from_env()
        self.sleep = sleep
        self.label = label
        self.hint = hint
        self._rng = random.Random()

    @property
    def url(self) -> str:
        return f"{self.config.base_url}/chat/completions"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base = min(self.config.max_backoff, self.config.backoff * (2.0 ** attempt))
        return max(0.0, base + self._rng.uniform(0.0, 0.1 * base))

    def _request(self, payload: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "personavec"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return urllib.request.Request(self.url, data=payload, headers=headers, method="POST")

    def _fail_status(self, status: int, message: str) -> PersonavecError:
        where = f"{self.label} {self.config.base_url}"
        detail = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        if status in (401, 403):
            todo = "check the API key (OPENAI_API_KEY)"
        elif status == 404:
            todo = f"check the base URL (usually ending in /v1) and the model name {self.config.model!r}"
        else:
            todo = f"check the model name {self.config.model!r} and that the server supports these parameters"
        return PersonavecError(f"{where} rejected the request ({detail}); {todo}")

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """Send one chat-completions request and return the parsed JSON response.

        ``params`` are added to the request body (``max_tokens``, ``temperature``, ``logprobs``, ...); ``model``
        defaults to the configured one.
        """
        body = {"model": self.config.model, "messages": messages, **params}
        payload = json.dumps(body).encode("utf-8")
        tries = max(0, int(self.config.max_retries)) + 1
        where = f"{self.label} {self.config.base_url}"
        scheme = urllib.parse.urlsplit(self.config.base_url).scheme.lower()
        try:
            if scheme not in ("http", "https"):
                raise ValueError("it must start with http:// or https://")
            request = self._request(payload)
        except ValueError as exc:
            raise PersonavecError(f"{self.label} URL {self.config.base_url!r} is not valid ({_one_line(exc)}); "
                                  f"pass a URL like http://127.0.0.1:8000/v1 via {self.hint}") from None
        last = ""
        unreachable = False
        for attempt in range(tries):
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                try:
                    err_body = exc.read()
                except (OSError, http.client.HTTPException):
                    err_body = b""
                message = _server_message(err_body) if err_body else _one_line(exc.reason or "")
                if exc.code not in RETRY_STATUSES:
                    raise self._fail_status(exc.code, message) from None
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                last = f"HTTP {exc.code}: {message}" if message else f"HTTP {exc.code}"
                unreachable = False
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                # connection refused/reset, DNS failure, timeouts (socket.timeout is an OSError)
                last = _reason(exc)
                unreachable = True
            else:
                try:
                    data = json.loads(raw)
                except ValueError:
                    raise PersonavecError(
                        f"{where} did not return JSON ({_one_line(raw.decode('utf-8', 'replace'), 80)!r}); "
                        f"check that the URL points at an OpenAI-compatible /v1 API ({self.hint})") from None
                if not isinstance(data, dict):
                    raise PersonavecError(f"{where} returned an unexpected response; "
                                          f"check that it is an OpenAI-compatible /v1 API ({self.hint})")
                return data
            if attempt + 1 < tries:
                self.sleep(self._delay(attempt, retry_after))
        if unreachable:
            raise PersonavecError(f"{where} unreachable after {tries} tries ({last}); "
                                  f"start the server or pass {self.hint}")
        raise PersonavecError(f"{where} kept failing after {tries} tries ({last}); "
                              "the server is overloaded or down: retry later or lower the concurrency")

    def chat_text(self, messages: list[dict], **params: Any) -> str:
        """Like :meth:`chat` but return ``choices[0].message.content``."""
        data = self.chat(messages, **params)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise PersonavecError(f"{self.label} {self.config.base_url} returned no choices[0].message; "
                                  "check that it is an OpenAI-compatible chat-completions API") from None
        return content if content is not None else ""
