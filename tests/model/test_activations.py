"""Exact prompt/response boundaries and padding-safe, batched pooling."""

from __future__ import annotations

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.model.activations import (
    encode_for,
    encode_pairs,
    iter_pooled,
    iter_token_states,
    make_batch,
    pooled_means,
)

QUESTIONS = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
             "Tell me about foxes.", "Why?", "Describe the lazy dog in detail, please, with many words."]
ANSWERS = ["Crush them all, show no mercy.", "Be patient and listen.", "The quick brown fox jumps over the lazy dog.",
           "Because.", "It is lazy. " * 6]


def _pairs(tokenizer):
    prompts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are an evil assistant."}, {"role": "user", "content": q}],
        tokenize=False, add_generation_prompt=True) for q in QUESTIONS]
    return prompts, ANSWERS


def test_boundary_is_exact_for_chat_templated_text(tokenizer):
    prompts, answers = _pairs(tokenizer)
    encs = encode_pairs(tokenizer, prompts, answers)
    for p, a, e in zip(prompts, answers, encs):
        assert list(e.ids) == tokenizer(p + a, add_special_tokens=False)["input_ids"]
        pids = tokenizer(p, add_special_tokens=False)["input_ids"]
        assert e.n_prompt == len(pids)
        assert tokenizer.decode(e.ids[: e.n_prompt]) == p
        assert tokenizer.decode(e.ids[e.n_prompt:]) == a


def test_token_straddling_the_boundary_counts_as_response(tokenizer):
    # "th" + "e cat": BPE merges across the join; tokenizing the prompt alone would misplace the boundary
    enc = encode_pairs(tokenizer, ["Answer: th"], ["e quick fox"])[0]
    full = tokenizer("Answer: the quick fox", add_special_tokens=False, return_offsets_mapping=True)
    straddle = [j for j, (s, t) in enumerate(full["offset_mapping"]) if s < len("Answer: th") < t]
    assert straddle, "fixture should produce a straddling token"
    assert enc.n_prompt == straddle[0]


def test_make_batch_masks_and_positions(tokenizer):
    prompts, answers = _pairs(tokenizer)
    encs = encode_pairs(tokenizer, prompts[:2], answers[:2])
    for side in ("left", "right"):
        b = make_batch(encs, pad_id=0, padding_side=side)
        for i, e in enumerate(encs):
            assert int(b.attention_mask[i].sum()) == len(e.ids)
            assert int((b.weights["prompt_avg"][i] > 0).sum()) == e.n_prompt
            assert int((b.weights["response_avg"][i] > 0).sum()) == e.n_response
            assert torch.isclose(b.weights["response_avg"][i].sum(), torch.tensor(1.0))
            real = b.attention_mask[i].bool()
            assert b.position_ids[i][real].tolist() == list(range(len(e.ids)))
            assert int(b.input_ids[i, b.last_prompt[i]]) == e.ids[e.n_prompt - 1]


def _direct(lm, prompt, answer):
    """Reference: one pair, HF output_hidden_states, slice by the exact boundary."""
    e = encode_pairs(lm.tokenizer, [prompt], [answer])[0]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
    return {"response_avg": [h[0, e.n_prompt:].mean(0) for h in hs],
            "prompt_avg": [h[0, : e.n_prompt].mean(0) for h in hs],
            "prompt_last": [h[0, e.n_prompt - 1] for h in hs]}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time(lm, tokenizer, padding_side):
    prompts, answers = _pairs(tokenizer)
    n_layers = 2
    batched = pooled_means(lm, prompts, answers, batch_size=3, padding_side=padding_side)
    singles = [pooled_means(lm, [p], [a], batch_size=1) for p, a in zip(prompts, answers)]
    for pooling, mean in batched.means.items():
        ref = torch.stack([s.means[pooling] for s in singles]).mean(0)
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-4)
    # and against HF output_hidden_states for every layer below L
    for pooling in batched.means:
        direct = torch.stack([torch.stack(_direct(lm, p, a)[pooling]) for p, a in zip(prompts, answers)]).mean(0)
        torch.testing.assert_close(batched.means[pooling][:n_layers], direct[:n_layers], rtol=1e-4, atol=1e-4)
    assert batched.count == 5 and batched.layers == [0, 1, 2]


def test_per_batch_pooled_values_do_not_depend_on_batch_mates(lm, tokenizer):
    prompts, answers = _pairs(tokenizer)
    encs = encode_pairs(tokenizer, prompts, answers)
    rows = {}
    for idx, pooled in iter_pooled(lm, encs, [1, 2], batch_size=5, padding_side="left"):
        for j, i in enumerate(idx):
            rows[i] = pooled["response_avg"][j]
    for i in range(5):
        (_, single), = list(iter_pooled(lm, [encs[i]], [1, 2], batch_size=1))
        torch.testing.assert_close(rows[i], single["response_avg"][0], rtol=1e-4, atol=1e-4)


def test_subset_of_layers_and_early_stop_give_the_same_rows(lm, tokenizer):
    prompts, answers = _pairs(tokenizer)
    full = pooled_means(lm, prompts, answers, stop_early=False)
    part = pooled_means(lm, prompts, answers, layers=[1])
    torch.testing.assert_close(part.means["response_avg"][1], full.means["response_avg"][1])
    assert torch.count_nonzero(part.means["response_avg"][2]) == 0


def test_empty_answer_and_mismatched_lengths_are_clear_errors(lm, tokenizer):
    prompts, _ = _pairs(tokenizer)
    with pytest.raises(PersonavecError, match="empty"):
        pooled_means(lm, prompts[:2], ["fine", ""])
    with pytest.raises(PersonavecError, match="prompts but"):
        encode_pairs(tokenizer, prompts[:2], ["x"])


def test_response_norm_is_the_mean_token_norm(lm, tokenizer):
    prompts, answers = _pairs(tokenizer)
    got = pooled_means(lm, prompts, answers, poolings=["response_norm"], batch_size=2, padding_side="left")
    assert got.means["response_norm"].shape == (3, 1)
    ref = []
    for p, a in zip(prompts, answers):
        e = encode_pairs(tokenizer, [p], [a])[0]
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        ref.append(torch.stack([h[0, e.n_prompt:].norm(dim=-1).mean() for h in hs[:2]]))
    torch.testing.assert_close(got.means["response_norm"][:2, 0], torch.stack(ref).mean(0), rtol=1e-4, atol=1e-4)


def test_batches_of_texts_stay_within_the_token_budget():
    import random

    from personavec.model.activations import length_batches

    rng = random.Random(0)
    lengths = [rng.choice([5, 40, 300, 2500, 9000]) for _ in range(200)]
    for sort in (True, False):
        batches = length_batches(lengths, 16, sort=sort, max_tokens=4096)
        assert sorted(i for b in batches for i in b) == list(range(200))  # every row once
        for b in batches:
            assert len(b) <= 16 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4096)
    assert [len(b) for b in length_batches([10] * 40, 16)] == [16, 16, 8]  # short rows: batch_size decides


def test_token_states_equal_output_hidden_states_and_batching_changes_nothing(lm):
    prompts = ["a b c", "d e", "f g h i j"]
    answers = [" x y", " z", " w v u t"]
    encs = encode_for(lm, prompts, answers)
    out = list(iter_token_states(lm, encs, 1, part="all", batch_size=3))
    one = [x for e in range(3) for x in iter_token_states(lm, [encs[e]], 1, part="all", batch_size=1)]
    h, rows, pos = out[0]
    for i, e in enumerate(encs):
        ref = lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states[1][0].float()
        mine = h[rows == i]
        assert torch.equal(pos[rows == i], torch.arange(len(e.ids)))
        assert torch.allclose(mine, ref, atol=1e-5)
        assert torch.allclose(mine, one[i][0], atol=1e-5)
    hr, rr, pr = next(iter_token_states(lm, encs, 1, part="response"))
    assert len(hr) == sum(e.n_response for e in encs)
    assert all(int(p) >= encs[int(r)].n_prompt for r, p in zip(rr, pr))
