"""Judges from their specs (``local[:MODEL]``, ``openai:MODEL``, ``none``): built, cached and checked in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import PersonavecError, shown
from ..model.loading import DEFAULT_MODEL, LoadedModel, cache_root, load_model, model_shape

PREFLIGHT_PROMPT = "Reply with the number 0."
SPECS = "local, local:MODEL, openai:MODEL or none"


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, argument) of a judge spec; unknown kinds are refused."""
    if not isinstance(spec, str):
        raise PersonavecError(f"a judge spec is a string ({SPECS}), not {shown(spec)}")
    kind, _, rest = spec.partition(":")
    if kind not in ("local", "openai", "none"):
        raise PersonavecError(f"unknown judge {shown(spec)}; use {SPECS}")
    return kind, rest


def preflight_judge(spec: str, base_url: str | None = None) -> None:
    """Fail at once, before any work, when an endpoint judge is unreachable or returns no logprobs (one 1-token
    request), or a local judge's model does not exist (read from its config, no weights loaded)."""
    kind, rest = parse_spec(spec)
    if kind == "local":
        try:
            model_shape(rest or DEFAULT_MODEL)
        except PersonavecError as e:
            raise PersonavecError(f"judge {spec}: {e}") from None
    if kind != "openai":
        return
    from ..endpoint import ChatClient, EndpointConfig

    cfg = EndpointConfig.from_env(model=rest or None, base_url=base_url, max_retries=1, timeout=30.0)
    reply = ChatClient(cfg).chat([{"role": "user", "content": PREFLIGHT_PROMPT}], max_tokens=1, temperature=0,
                                 logprobs=True, top_logprobs=1)
    choice = (reply.get("choices") or [{}])[0]
    if not (choice.get("logprobs") or {}).get("content"):
        raise PersonavecError(f"judge endpoint {cfg.base_url} returned no logprobs; the judge needs an endpoint that "
                              "supports them (OpenAI, vLLM, llama.cpp server)")


def make_judge(spec: str, base_url: str | None = None, *, concurrency: int = 8, preflight: bool = True,
               load: Callable[[str], LoadedModel] | None = None, cache: bool = True) -> Any | None:
    """The judge for ``spec`` (None for ``none``), scores cached on disk, an endpoint checked first.

    ``local`` judges with the embedded model, ``local:MODEL`` with any model :func:`load_model` takes (``load``
    gives the model for a spec, so a caller can reuse one it has loaded); ``openai:MODEL`` asks an
    OpenAI-compatible endpoint (``base_url``, else ``OPENAI_BASE_URL``; key from ``OPENAI_API_KEY``) with at
    most ``concurrency`` requests in flight. Every score is committed to ``<cache>/judge-cache.sqlite`` as it
    arrives, so a killed run loses at most the requests in flight.
    """
    kind, rest = parse_spec(spec)
    if kind == "none":
        return None
    if kind == "local":
        from .local import LocalJudge

        inner: Any = LocalJudge((load or load_model)(rest or DEFAULT_MODEL))
    else:
        from ..endpoint import EndpointConfig
        from .remote import OpenAIJudge

        if preflight:
            preflight_judge(spec, base_url)
        inner = OpenAIJudge(EndpointConfig.from_env(model=rest or None, base_url=base_url),
                            max_concurrency=concurrency)
    if not cache:
        return inner
    from .cache import CachedJudge, JudgeCache

    return CachedJudge(inner, JudgeCache(cache_root() / "judge-cache.sqlite"), chunk_size=1)
