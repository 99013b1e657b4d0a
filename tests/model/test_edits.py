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
    with pytest.raises(PersonavecError, match="one non-empty row"):
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


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "12"}, 'Edit layer must be a whole number \\(int\\), not "12"'),
    ({"layer": 12.0}, "Edit layer must be a whole number \\(int\\), not 12.0"),
    ({"layer": True}, "Edit layer must be a whole number \\(int\\), not True"),
    ({"layer": -1}, "Edit layer must be at least 0, not -1"),
    ({"coef": "2"}, 'Edit coef must be a number, not "2"'),
    ({"coef": float("nan")}, "Edit coef must be a finite number, not nan"),
    ({"coef": float("inf")}, "Edit coef must be a finite number, not inf"),
    ({"kind": "steer"}, 'Edit kind must be one of add, ablate, cap, not "steer"'),
    ({"positions": None}, "Edit positions must be one of all, prompt, response, response_and_last_prompt, not None"),
    ({"direction": "abc"}, 'Edit direction must be a 1-D torch tensor .*not "abc"'),
    ({"direction": [[1.0, 2.0]]}, "Edit direction must be one non-empty row .*shape \\[1, 2\\]"),
    ({"direction": torch.full((32,), float("nan"))}, "Edit direction at layer 1 holds NaN or infinite values"),
    ({"direction": torch.zeros(32)}, "Edit direction at layer 1 is zero: add along it would change nothing"),
    ({"direction": torch.zeros(32), "kind": "ablate"}, "Edit direction at layer 1 is zero: ablate along it"),
    ({"direction": torch.zeros(32), "kind": "cap", "coef": 0.0}, "Edit direction at layer 1 is zero: cap along it"),
])
def test_every_field_of_an_edit_is_checked_at_construction(kwargs, message):
    """A bad edit is one PersonavecError naming the field, with the value as typed — never a TypeError later."""
    fields = {"layer": 1, "direction": torch.randn(32), "coef": 2.0, **kwargs}
    with pytest.raises(PersonavecError, match=message):
        Edit(**fields)


def test_an_edit_takes_lists_and_numpy_rows_and_a_zero_add_with_coef_zero():
    import numpy as np

    v = torch.randn(32)
    for given in (v.tolist(), v.numpy(), np.float64(1.0) * v.numpy()):
        e = Edit(np.int64(1), given, 2)
        assert isinstance(e.direction, torch.Tensor) and e.direction.shape == (32,) and type(e.layer) is int
        torch.testing.assert_close(e.direction.float(), v, rtol=0, atol=1e-6)
    assert Edit(1, torch.zeros(32), 0.0).coef == 0.0  # a baseline in a grid of coefficients: nothing to refuse


def test_steer_refuses_another_hidden_size_and_non_edits_before_any_forward(lm):
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PersonavecError, match="Edit direction at layer 1 has 100 dims but the model's hidden "
                                                  "size is 32"), steer(lm, Edit(1, torch.randn(100), 2.0)):
            lm.model(input_ids=torch.tensor([[3, 4]]))
        with pytest.raises(PersonavecError, match="edits must be an Edit or a list of Edits, not a torch tensor"), \
                steer(lm, torch.randn(32)):
            pass
        with pytest.raises(PersonavecError, match='edits must be an Edit or a list of Edits, not "x"'), \
                steer(lm, [Edit(1, torch.randn(32)), "x"]):
            pass
    finally:
        handle.remove()
    assert calls == []


def test_from_vector_refuses_a_layer_where_the_vector_has_no_direction():
    from personavec.vectors.vector import PersonaVector

    t = torch.randn(5, 32)
    t[0] = 0  # the embeddings: zero in every extracted vector
    t[3] = 0  # a layer that was not extracted
    vec = PersonaVector(tensors={"response_avg": t}, model_id="m", trait="evil", chosen_layer=3)
    for layer in (None, 0, 3):
        with pytest.raises(PersonavecError, match=r"the evil vector has no direction at layer [03] \(its row there "
                                                  r"is zero\); it has one at layers 1-2, 4"):
            Edit.from_vector(vec, layer=layer, coef=4.0)
    with pytest.raises(PersonavecError, match="no direction at layer 0"):
        Edit.from_vector(vec, layer=0, kind="ablate")
    with pytest.raises(PersonavecError, match='layer must be a whole number \\(int\\), not "2"'):
        Edit.from_vector(vec, layer="2")
    assert Edit.from_vector(vec, layer=0, coef=0.0).coef == 0.0
    assert Edit.from_vector(vec, layer=2, coef=1.0).layer == 2
