"""Steering edits: exact deltas at the intended positions (left padding, KV cache), ablation, composition."""

from __future__ import annotations

import contextlib

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.model.edits import Edit, ablate, add_vector, steer
from personavec.model.layers import backbone, decoder_layers


def _batch(tokenizer):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("Why?", "How should I treat people who are weaker than me?")]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    return enc


def _record(model, layer, fn_ctx, enc, new_tokens=4):
    """Run generate inside fn_ctx and record (before-edit, after-edit) block outputs for every forward pass."""
    block = decoder_layers(model)[layer - 1]
    before, after = [], []
    with fn_ctx():
        # registered inside the context with prepend=True: runs before the edit hook
        h1 = block.register_forward_hook(lambda m, a, o: before.append(o.clone()), prepend=True)
        h2 = block.register_forward_hook(lambda m, a, o: after.append(o.clone()))
        try:
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 min_new_tokens=new_tokens)
        finally:
            h1.remove()
            h2.remove()
    return before, after, out


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "response_and_last_prompt"])
def test_add_is_exact_at_intended_positions_with_left_padding_and_kv_cache(lm, tokenizer, positions):
    torch.manual_seed(0)
    v = torch.randn(32)
    enc = _batch(tokenizer)
    T = enc["input_ids"].shape[1]
    before, after, _ = _record(lm.model, 2, lambda: add_vector(lm, v, 2, 1.5, positions=positions), enc)
    assert [b.shape[1] for b in before] == [T, 1, 1, 1]  # prefill, then one token per step (KV cache)
    for step, (b, a) in enumerate(zip(before, after)):
        cols = torch.arange(b.shape[1]) + (0 if step == 0 else T + step - 1)
        want = {"all": torch.ones_like(cols, dtype=torch.bool), "prompt": cols < T, "response": cols >= T,
                "response_and_last_prompt": cols >= T - 1}[positions]
        delta = a - b
        for c in range(b.shape[1]):
            expect = 1.5 * v if want[c] else torch.zeros(32)
            torch.testing.assert_close(delta[:, c], expect.expand(2, 32), rtol=1e-5, atol=1e-5)


def test_add_changes_hidden_states_l_by_exactly_alpha_v(lm):
    ids = torch.randint(3, 100, (2, 7))
    v = torch.randn(32)
    with torch.no_grad():
        base = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        with steer(lm, Edit(1, v, 0.7, positions="prompt"), prompt_len=4):
            new = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(new[0], base[0])
    diff = new[1] - base[1]
    torch.testing.assert_close(diff[:, :4], (0.7 * v).expand(2, 4, 32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff[:, 4:], torch.zeros(2, 3, 32))


def test_ablation_leaves_no_component_and_edits_compose(lm, tokenizer):
    torch.manual_seed(1)
    v, w = torch.randn(32), torch.randn(32)
    enc = _batch(tokenizer)
    _, after, _ = _record(lm.model, 2, lambda: ablate(lm, v, 2), enc)
    u = v / v.norm()
    for a in after:
        assert (a @ u).abs().max() < 1e-4
    b1, a1, _ = _record(lm.model, 1, lambda: steer(lm, [Edit(1, v, 0.5), Edit(1, w, -2.0)]), enc)
    for b, a in zip(b1, a1):
        torch.testing.assert_close(a - b, (0.5 * v - 2.0 * w).expand_as(a), rtol=1e-4, atol=1e-4)


def test_edits_at_several_layers_and_removal(lm, tokenizer):
    enc = _batch(tokenizer)
    v = torch.randn(32)
    with torch.no_grad():
        ref = lm.model(**enc).logits
        with steer(lm, [Edit(0, v, 1.0), Edit(2, v, -1.0)]):
            changed = lm.model(**enc).logits
        assert not torch.allclose(ref, changed)
        with pytest.raises(RuntimeError), steer(lm, Edit(1, v, 3.0)):
            raise RuntimeError("boom")
        torch.testing.assert_close(lm.model(**enc).logits, ref)
    blocks = decoder_layers(lm.model)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    assert not backbone(lm.model)._forward_pre_hooks


def test_steering_moves_logits_in_the_predicted_direction(lm):
    """Adding the unembedding row of a token at the last layer raises that token's logit."""
    ids = torch.randint(3, 100, (1, 5))
    target = 42
    direction = lm.model.lm_head.weight[target].detach()
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits[0, -1].log_softmax(-1)[target]
        with add_vector(lm, direction, 2, 2.0):
            steered = lm.model(input_ids=ids).logits[0, -1].log_softmax(-1)[target]
    assert steered > base


def test_bad_edits_are_clear_errors(lm):
    with pytest.raises(PersonavecError, match="positions must be"):
        Edit(1, torch.randn(32), positions="middle")
    with pytest.raises(PersonavecError, match="out of range"), steer(lm, Edit(9, torch.randn(32))):
        pass
    with pytest.raises(PersonavecError, match="one \\[d\\] row"):
        Edit(1, torch.randn(2, 32))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_edits_at_one_layer_compose_in_list_order(lm, layer):
    """Add then ablate leaves nothing along v̂; ablate then add leaves exactly coef·v (also across nested contexts)."""
    from personavec.model.layers import capture

    torch.manual_seed(3)
    ids = torch.randint(3, 100, (2, 6))
    v = torch.randn(32)
    u = v / v.norm()

    def along_v(*edits_per_context):
        seen = []
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for edits in edits_per_context:
                stack.enter_context(steer(lm, edits))
            with capture(lm.model, [layer], lambda _l, h: seen.append(h @ u), stop_early=False):
                lm.model(input_ids=ids)
        return seen[0]

    assert along_v([Edit(layer, v, 3.0), Edit(layer, v, kind="ablate")]).abs().max() < 1e-4
    three = torch.full((2, 6), 3.0 * float(v.norm()))
    torch.testing.assert_close(along_v([Edit(layer, v, kind="ablate"), Edit(layer, v, 3.0)]), three,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(along_v([Edit(layer, v, kind="ablate")], [Edit(layer, v, 3.0)]), three,
                               rtol=1e-4, atol=1e-4)  # nested: the outer context's edit acts first
    assert along_v().abs().max() > 1e-2  # every edit is gone after its context
