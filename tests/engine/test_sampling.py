"""Sampling: exactly the recorded settings, nothing inherited from the model's own generation defaults."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from conftest import tiny_llama
from personavec.engine.sampling import SamplingConfig, chat, sample_batch
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
    want = sample_batch(clean, prompts, cfg, seed=3)
    assert sample_batch(polluted, prompts, cfg, seed=3) == want
    assert chat(polluted, "Why?", max_new_tokens=8) == chat(clean, "Why?", max_new_tokens=8)
    assert polluted.model.generation_config.repetition_penalty == 50.0  # the model itself is left as it was
