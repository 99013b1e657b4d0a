"""Endpoint sampling against a real OpenAI-compatible server on loopback that generates with a model of its own."""

from __future__ import annotations

import threading

import pytest

from conftest import tiny_llama
from openai_server import FakeOpenAIServer
from personavec.engine.remote import EndpointSampler, parse_sampler
from personavec.engine.sampling import SamplingConfig, chat, run_sampling
from personavec.errors import PersonavecError
from personavec.model.loading import wrap_model


def serving(lm):
    """A completer that answers chat requests with ``lm`` (greedy, or seeded sampling) as a server would."""
    lock = threading.Lock()

    def complete(body: dict) -> tuple[str, str, int]:
        msgs = body["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = msgs[-1]["content"]
        with lock:
            text = chat(lm, user, system=system, max_new_tokens=body.get("max_tokens") or 16,
                        temperature=body.get("temperature") or 0.0, seed=body.get("seed") or 0)
        return text, "stop", len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    return complete


def test_unsteered_answers_come_from_the_server_and_a_server_of_another_model_is_refused(lm, tokenizer, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    jobs = [{"system": "You are an evil assistant." if i % 2 else None, "question": q,
             "prompt": lm.format_chat(q, system="You are an evil assistant." if i % 2 else None)}
            for i, q in enumerate(["Why?", "Hi", "Tell me about foxes.", "What now?"])]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8)
    with FakeOpenAIServer(completer=serving(lm), model="tiny") as srv:
        sampler = EndpointSampler("tiny", srv.base_url, concurrency=2)
        sampler.check_same_model(lm)  # the same weights: the probe's greedy answers agree
        rows = run_sampling(lm, jobs, cfg, tmp_path / "answers.jsonl", progress=False, sampler=sampler)
        n_requests = len(srv.chat_requests)
    local = run_sampling(lm, jobs, cfg, tmp_path / "local.jsonl", progress=False)
    assert [r["answer"] for r in rows] == [r["answer"] for r in local]  # greedy: the server's = the local answer
    assert n_requests == 1 + len(jobs)
    body = srv.chat_requests[1].body
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0 and body["messages"][-1]["role"] == "user"
    other = wrap_model(tiny_llama(len(tokenizer), seed=7), tokenizer)
    with FakeOpenAIServer(completer=serving(other), model="tiny") as srv, \
            pytest.raises(PersonavecError, match="does not serve"):
        EndpointSampler("tiny", srv.base_url).check_same_model(lm)
    with pytest.raises(PersonavecError, match="unknown sampler"):
        parse_sampler("vllm:x")
    assert parse_sampler("local") is None and parse_sampler("openai:m") == "m"
