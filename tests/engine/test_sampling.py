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


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": "1"}, 'temperature must be a number, not "1"'),
    ({"temperature": -0.5}, "temperature must be at least 0 \\(0: greedy\\), not -0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number, not nan"),
    ({"top_p": 0}, "top_p must be above 0 and at most 1, not 0"),
    ({"top_p": None}, "top_p must be a number, not None"),
    ({"n_samples": 2.0}, "n_samples must be a whole number \\(int\\), not 2.0"),
    ({"n_samples": 0}, "n_samples must be at least 1, not 0"),
    ({"max_new_tokens": "64"}, 'max_new_tokens must be a whole number \\(int\\), not "64"'),
    ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
    ({"seed": -1}, "seed must be between 0 and 9223372036854775807, not -1"),
    ({"seed": True}, "seed must be a whole number \\(int\\), not True"),
    ({"engine": 3}, "engine must be a string"),
])
def test_every_sampling_field_is_checked_at_construction(kwargs, message):
    from personavec.errors import PersonavecError

    with pytest.raises(PersonavecError, match=message):
        SamplingConfig(**kwargs)


def test_sampling_numbers_from_numpy_become_python_numbers():
    import numpy as np

    cfg = SamplingConfig(n_samples=np.int64(2), temperature=np.float32(0.5), seed=np.int32(3))
    assert (type(cfg.n_samples), type(cfg.temperature), type(cfg.seed)) == (int, float, int)
    json.dumps(cfg.to_dict())  # what run.json records


@pytest.mark.parametrize("user, message", [
    (None, "chat's user must be a string \\(one question\\), not None"),
    ([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]],
     "chat's user must be a string \\(one question\\), not a list; for several chats, call chat once per question"),
    (b"Why?", "chat's user must be a string \\(one question\\), not a bytes"),
])
def test_chat_refuses_what_is_not_one_question(lm, user, message):
    from personavec.errors import PersonavecError

    with pytest.raises(PersonavecError, match=message):
        chat(lm, user)
    with pytest.raises(PersonavecError, match="chat's system must be a string \\(one system prompt\\), not 3"):
        chat(lm, "Why?", system=3)


def test_chat_refuses_a_prompt_that_leaves_no_room_in_the_context(lm):
    """The tiny model takes 256 positions: a prompt that does not fit with its answer is one line, not garbage."""
    from personavec.errors import PersonavecError

    long = "fox " * 300
    with pytest.raises(PersonavecError, match=r"the prompt has \d+ tokens and max_new_tokens is 8: together more "
                                              r"than the model's context of 256 tokens; shorten the question$"):
        chat(lm, long, max_new_tokens=8)
    short = "Tell me about foxes."
    n = len(lm.tokenizer(lm.format_chat(short), add_special_tokens=False)["input_ids"])
    with pytest.raises(PersonavecError, match=f"the prompt has {n} tokens and max_new_tokens is {257 - n}.*shorten "
                                              "the question or lower max_new_tokens"):
        chat(lm, short, max_new_tokens=257 - n)
    assert isinstance(chat(lm, short, max_new_tokens=4), str)


def test_an_engine_request_with_an_edit_for_another_model_is_refused_before_generation(lm):
    import torch

    from personavec.errors import PersonavecError
    from personavec.model.edits import Edit

    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PersonavecError, match="Edit direction at layer 1 has 100 dims but the model's hidden "
                                                  "size is 32"):
            generate(lm, [lm.format_chat("Why?")] * 2, SamplingConfig(max_new_tokens=4),
                     edits=[[], [Edit(1, torch.randn(100), 2.0)]])
        with pytest.raises(PersonavecError, match=r"Edit layer 7 is out of range: this model has layers 0\.\.2"):
            generate(lm, [lm.format_chat("Why?")], SamplingConfig(max_new_tokens=4), edits=[[Edit(7, torch.randn(32))]])
    finally:
        handle.remove()
    assert calls == []
