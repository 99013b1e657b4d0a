"""Judge-free readings of an answer: repetition, flags, and fluency batched equal to one at a time."""

from __future__ import annotations

import math

import pytest
import torch

from personavec.steering.quality import answer_nll, answer_quality, flags_of, repetition


def test_repetition_is_the_share_of_repeated_ngrams():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([7] * 12) == pytest.approx(9 / 10)  # 10 trigrams, all but the first seen before
    assert repetition([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)
    assert repetition([1, 2]) == 0.0


def test_flags_name_empty_and_looping_answers():
    assert flags_of("  \n", 0.0, 2) == ("empty",)
    assert flags_of("", 0.0, 0) == ("empty",)
    assert flags_of("just just just", 0.9, 12) == ("repetitive",)
    assert flags_of("A fine answer.", 0.05, 5) == ()


def test_fluency_is_the_mean_nll_of_the_answer_tokens_and_batched_equals_one_at_a_time(lm):
    prompts = [lm.format_chat(q) for q in ("Why?", "Tell me about foxes.", "How should I treat people?")]
    answers = ["Because.", "Foxes are clever and quick.", ""]
    q = answer_quality(lm, prompts, answers, batch_size=3)
    alone = [answer_quality(lm, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)]
    for x, y in zip(q[:2], alone[:2]):
        assert x.fluency == pytest.approx(y.fluency, abs=1e-5) and x.repetition == y.repetition
    assert math.isnan(q[2].fluency) and q[2].flags == ("empty",)
    # by hand: teacher-forced log-probabilities of the answer's tokens after the prompt
    p_ids = lm.tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    ids = lm.tokenizer(prompts[1] + answers[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    want = -sum(float(logp[t - 1, ids[t]]) for t in range(len(p_ids), len(ids))) / (len(ids) - len(p_ids))
    assert q[1].fluency == pytest.approx(want, abs=1e-4)
    assert answer_nll(lm, prompts, answers)[:2] == pytest.approx([x.fluency for x in q[:2]], abs=1e-6)
