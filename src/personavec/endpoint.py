"""OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, SGLang, the llama.cpp server),
through the official ``openai`` SDK.

The SDK sends the requests and retries what is worth retrying (timeouts, connection errors, HTTP 408, 409, 429
and 5xx) with exponential backoff and jitter, honouring the server's ``Retry-After``. This module adds what
personavec needs on top: the configuration from flags and the environment, the endpoint's role in every message
("judge endpoint" or "generator endpoint", with the flag that points elsewhere), and one-line errors that say what
to do. Bounded concurrency lives with the callers (the judge keeps at most ``--judge-concurrency`` requests in
flight).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import PersonavecError

_URL = re.compile(r"(?i)(https?)://(\[[0-9a-f:.]+\]|[^\s/:?#\[\]@]+)(?::(\d{1,5}))?(?:[/?#]\S*)?")


def split_url(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) URL (the port defaults to the scheme's), or None if it is not one."""
    m = _URL.fullmatch(url.strip()) if isinstance(url, str) else None
    if m is None:
        return None
    scheme = m.group(1).lower()
    return scheme, m.group(2).strip("[]"), int(m.group(3) or (443 if scheme == "https" else 80))


DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_JUDGE_MODEL = "gpt-4.1-mini"
NO_KEY = "EMPTY"


@dataclass
class EndpointConfig:
    """Where and how to reach an OpenAI-compatible endpoint; ``max_retries`` counts retries after the first try."""

    base_url: str
    api_key: str | None
    model: str
    timeout: float = 60.0
    max_retries: int = 6

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


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(error: Any) -> str:
    """The human part of an API error: ``error.message`` of an OpenAI-style body, else the raw text."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return _one_line(inner["message"])
        if isinstance(inner, str):
            return _one_line(inner)
        if body.get("detail"):
            return _one_line(body["detail"])
    if isinstance(body, str) and body.strip():
        return _one_line(body)
    response = getattr(error, "response", None)
    text = getattr(response, "text", "") if response is not None else ""
    return _one_line(text) if text else ""


class ChatClient:
    """Chat completions from one endpoint, with retries and one-line errors. Thread-safe.

    ``label`` names the endpoint in error messages and ``hint`` is how the user points at another server.
    """

    def __init__(self, config: EndpointConfig | None = None, *, label: str = "judge endpoint",
                 hint: str = "--judge-base-url or OPENAI_BASE_URL") -> None:
        import openai

        self.config = config if config is not None else EndpointConfig.from_env()
        self.label = label
        self.hint = hint
        if split_url(self.config.base_url) is None:
            raise PersonavecError(f"{label} URL {self.config.base_url!r} is not valid (it must start with http:// or "
                                  f"https://); pass a URL like http://127.0.0.1:8000/v1 via {hint}")
        # a server without keys gets the placeholder vLLM's documentation uses; the SDK refuses an empty key
        self._client = openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key or NO_KEY,
                                     max_retries=max(0, int(self.config.max_retries)), timeout=self.config.timeout)

    @property
    def where(self) -> str:
        return f"{self.label} {self.config.base_url}"

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """Send one chat-completions request and return the response as plain JSON data.

        ``params`` are the SDK's request fields (``max_tokens``, ``temperature``, ``logprobs``, ``extra_body``, ...).
        """
        import openai

        tries = max(0, int(self.config.max_retries)) + 1
        try:
            reply = self._client.chat.completions.create(model=params.pop("model", self.config.model),
                                                         messages=messages, **params)
        except openai.APITimeoutError:
            raise PersonavecError(f"{self.where} unreachable after {tries} tries (timed out); start the server, "
                                  f"raise the timeout, or pass {self.hint}") from None
        except openai.APIConnectionError as e:
            reason = _one_line(getattr(e, "__cause__", None) or e)
            raise PersonavecError(f"{self.where} unreachable after {tries} tries ({reason}); start the server or "
                                  f"pass {self.hint}") from None
        except openai.APIStatusError as e:
            raise self._status_error(e, tries) from None
        except (openai.APIResponseValidationError, ValueError) as e:
            raise PersonavecError(f"{self.where} did not return chat-completions JSON ({_one_line(e, 80)}); check "
                                  f"that the URL points at an OpenAI-compatible /v1 API ({self.hint})") from None
        data = reply if isinstance(reply, dict) else getattr(reply, "model_dump", lambda: None)()
        if not isinstance(data, dict):
            raise PersonavecError(f"{self.where} did not return chat-completions JSON; check that the URL points "
                                  f"at an OpenAI-compatible /v1 API ({self.hint})")
        return data

    def _status_error(self, e: Any, tries: int) -> PersonavecError:
        status = int(getattr(e, "status_code", 0) or 0)
        message = _server_message(e)
        detail = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        if status in (408, 409, 429) or status >= 500:
            return PersonavecError(f"{self.where} kept failing after {tries} tries ({detail}); the server is "
                                   "overloaded or down: retry later or lower the concurrency")
        if status in (401, 403):
            todo = "check the API key (OPENAI_API_KEY)"
        elif status == 404:
            todo = f"check the base URL (usually ending in /v1) and the model name {self.config.model!r}"
        else:
            todo = f"check the model name {self.config.model!r} and that the server supports these parameters"
        return PersonavecError(f"{self.where} rejected the request ({detail}); {todo}")

    def chat_text(self, messages: list[dict], **params: Any) -> str:
        """Like :meth:`chat` but return ``choices[0].message.content``."""
        data = self.chat(messages, **params)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise PersonavecError(f"{self.where} returned no choices[0].message; check that it is an "
                                  "OpenAI-compatible chat-completions API") from None
        return content if content is not None else ""
