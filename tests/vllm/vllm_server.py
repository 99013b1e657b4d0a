"""Helpers of the vLLM tests: test vectors for the embedded model, a real vLLM server (its own venv, CPU build) with
the plugin, and chat requests to it. Not named ``vllm.py``: that would shadow vLLM itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from personavec import PersonaVector
from personavec.errors import PersonavecError
from personavec.vllm.launch import VllmProcess

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smol"


def vllm_python() -> Path:
    venv = Path(os.environ.get("PERSONAVEC_VLLM_VENV", ROOT / ".venv-vllm"))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"vLLM's venv {venv} is missing: build it with `make vllm-venv` (make test does)", pytrace=False)
    return python


def build_vectors(lm: Any, root: Path) -> dict[str, Path]:
    """Two vectors for the embedded model that move its answers: ``evil``, a random direction per layer scaled to
    that layer's typical residual norm (so ``coef`` 0.15 adds 15 % of it), and ``kind``, the mean residual
    direction per layer (ablating or capping it changes the answer)."""
    from personavec.model.chat import format_chat

    text = [format_chat(lm.tokenizer, q) for q in ("Tell me about cats.", "How do I fix a bike?")]
    batch = lm.tokenizer(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = lm.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    gen = torch.Generator().manual_seed(7)
    evil, kind = torch.zeros(len(hs), lm.hidden_size), torch.zeros(len(hs), lm.hidden_size)
    for layer in range(1, len(hs)):
        h = hs[layer][mask][2:].float()  # the first tokens carry outsized norms
        norm = float(h.norm(dim=-1).median())
        d = torch.randn(lm.hidden_size, generator=gen)
        evil[layer] = d / d.norm() * norm
        kind[layer] = h.mean(0)
    paths = {}
    for name, t in (("evil", evil), ("kind", kind)):
        paths[name] = PersonaVector({"response_avg": t}, model_id=lm.model_id, trait=name,
                                    chosen_layer=13).save(root / f"{name}.safetensors")
    return paths


class VllmServer(VllmProcess):
    """vLLM on the embedded model with the plugin configured by ``config``, fp32, one OpenMP thread."""

    def __init__(self, model_dir: Path, config: dict | None, eager: bool = True, args: tuple[str, ...] = ()) -> None:
        try:
            super().__init__(vllm_python(), model_dir, config, served_name=SERVED, eager=eager,
                             args=("--max-model-len", "4096", *args), startup_s=420,
                             env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                                  "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "INFO"})
        except PersonavecError as e:
            pytest.fail(str(e), pytrace=False)

    def chat(self, content: str | list[dict], persona: dict | None = None, key: str | None = None,
             max_tokens: int = 24, **extra: Any) -> dict:
        """A greedy answer of exactly ``max_tokens`` tokens (``token_ids`` and the prompt's ids returned)."""
        status, data = self.call("POST", "/v1/chat/completions", chat_body(content, persona, key, max_tokens, **extra))
        assert status == 200, data
        return data


def messages_of(content: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": content}] if isinstance(content, str) else content


def chat_body(content: str | list[dict], persona: dict | None, key: str | None, max_tokens: int,
              **extra: Any) -> dict:
    xargs: dict[str, Any] = {}
    if persona is not None:
        xargs["persona"] = json.dumps(persona)  # not spec.vllm_xargs: the tests send non-finite numbers too
    if key is not None:
        xargs["persona_key"] = key
    return {"model": SERVED, "messages": messages_of(content), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **({"vllm_xargs": xargs} if xargs else {}), **extra}
