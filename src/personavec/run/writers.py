"""Text generators for trait artifacts: an OpenAI-compatible endpoint or a local chat model."""

from __future__ import annotations

from typing import Any

from ..endpoint import ChatClient, EndpointConfig
from ..errors import PersonavecError
from ..model.loading import LoadedModel


class EndpointGenerator:
    """Chat completions from an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama)."""

    def __init__(self, config: EndpointConfig, temperature: float = 0.7, max_tokens: int = 4000) -> None:
        self.client = ChatClient(config, label="generator endpoint", hint="--generator-base-url or OPENAI_BASE_URL")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"openai:{config.model}@{config.base_url}"

    def complete(self, messages: list[dict[str, str]]) -> str:
        return self.client.chat_text(messages, temperature=self.temperature, max_tokens=self.max_tokens)


class LocalGenerator:
    """Chat completions from a local Hugging Face chat model (greedy)."""

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 3000) -> None:
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.name = f"local:{lm.model_id}"

    def complete(self, messages: list[dict[str, str]]) -> str:
        from ..engine.sampling import SamplingConfig, generate

        text = self.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cfg = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        return generate(self.lm, [text], cfg)[0]["answer"]


def make_generator(spec: str, base_url: str | None = None, **kwargs: Any) -> Any:
    """``openai:MODEL`` (with ``--generator-base-url`` / ``OPENAI_BASE_URL``) or ``local:MODEL_SPEC``."""
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        return EndpointGenerator(EndpointConfig.from_env(model=rest or None, base_url=base_url))
    if kind == "local":
        from ..model.loading import load_model

        return LocalGenerator(load_model(rest or "smollm2-135m", **kwargs))
    raise PersonavecError(f"unknown generator {spec!r}; use openai:MODEL or local:MODEL")
