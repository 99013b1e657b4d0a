"""Sampling: exactly the recorded settings, seeded per job, and a resumed log that answers every job once."""

from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig

from conftest import tiny_llama
from personavec.engine.sampling import SamplingConfig, chat, generate, run_sampling
from personavec.model.loading import wrap_model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_models_generation_defaults_are_not_inherited(tokenizer, temperature):
    """Qwen2.5-Instruct ships repetition_penalty 1.05 (and others top_k, min_new_tokens, ...): none may apply."""
    clean = wrap_model(tiny_llama(len(tokenizer)), tokenizer)
    polluted = wrap_model(tiny_llama(len(tokenizer)), tokenizer)
    polluted.model.generation_config = GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1, top_k=3,
                                                        min_new_tokens=12, temperature=0.2, do_sample=True)
    prompts = [clean.format_chat(q) for q in ("Why?", "How should I treat people who are weaker than me?")]
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=12)
    want = generate(clean, prompts, cfg)
    assert generate(polluted, prompts, cfg) == want
    assert chat(polluted, "Why?", max_new_tokens=8) == chat(clean, "Why?", max_new_tokens=8)
    assert polluted.model.generation_config.repetition_penalty == 50.0  # the model itself is left as it was


def test_a_killed_log_resumes_to_the_uninterrupted_answers_each_job_once(lm, tmp_path):
    jobs = [{"prompt": lm.format_chat(q), "question_id": i}
            for i, q in enumerate(["Why?", "Hi", "Tell me about foxes.", "What now?", "Be kind.", "Go on."] * 3)]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10, batch_size=4, seed=3)
    full = run_sampling(lm, jobs, cfg, tmp_path / "full.jsonl", progress=False)
    assert [r["job"] for r in full] == list(range(len(jobs)))
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    # a run killed after 7 answers, in the middle of writing the 8th, with one answer logged twice
    (tmp_path / "cut.jsonl").write_text("".join(lines[:7]) + lines[2] + lines[7][:20])
    resumed = run_sampling(lm, jobs, SamplingConfig(temperature=1.0, max_new_tokens=10, batch_size=2, seed=3),
                           tmp_path / "cut.jsonl", progress=False)
    assert resumed == full  # per-job seeds: the same answers whatever the batching or the interruption
    logged = [json.loads(x)["job"] for x in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert sorted(logged) == list(range(len(jobs)))
