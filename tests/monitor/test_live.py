"""The live monitor reads before the edits at its layer (default) or after them."""

from __future__ import annotations

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.model.edits import Edit, steer
from personavec.monitor.live import LiveMonitor


def _ids(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How should I treat people?"}],
                                           tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _greedy(lm, ids, monitor, edits=(), n=6):
    with monitor.attach(lm), steer(lm, list(edits)):
        out = lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist(), torch.stack(monitor.history)[:, 0]


@pytest.mark.parametrize("positions", ["all", "response_and_last_prompt"])
def test_steering_at_the_monitors_layer_moves_only_the_after_edit_reading(lm, tokenizer, positions):
    """A steer context at the monitor's layer (entered inside attach, so its hook is added after the monitor's):
    at step 0 the before-edit reading equals the unsteered one exactly and the after-edit one moves by coef·‖v‖."""
    torch.manual_seed(3)
    v = torch.randn(32) * 2
    ids = _ids(tokenizer)
    edit = Edit(1, v, 3.0, positions=positions)
    _, plain = _greedy(lm, ids, LiveMonitor(v, layer=1))
    _, before = _greedy(lm, ids, LiveMonitor(v, layer=1), [edit])
    _, after = _greedy(lm, ids, LiveMonitor(v, layer=1, where="after"), [edit])
    assert float(before[0]) == float(plain[0])
    assert float(after[0] - plain[0]) == pytest.approx(3.0 * float(v.norm()), abs=1e-4)


@pytest.mark.parametrize("edit_layer", [1, 2])
def test_before_edit_readings_on_the_same_tokens_ignore_edits_at_the_layer_or_later(lm, tokenizer, edit_layer):
    """The steered answer's tokens fed to the unsteered model: the before-edit readings of the steered generation
    equal the unsteered projections at every position (edits at the monitor's layer or later)."""
    torch.manual_seed(4)
    v, w = torch.randn(32) * 2, torch.randn(32) * 3
    ids = _ids(tokenizer)
    tokens, got = _greedy(lm, ids, LiveMonitor(v, layer=1), [Edit(edit_layer, w, 4.0), Edit(edit_layer, v, 2.0)])
    with torch.no_grad():
        hs = lm.model(input_ids=torch.cat([ids, torch.tensor([tokens[:-1]])], 1), output_hidden_states=True)
    n = ids.shape[1]
    want = hs.hidden_states[1][0, n - 1:] @ (v / v.norm())
    assert torch.allclose(got, want, atol=1e-4)


def test_an_unknown_where_is_refused_naming_the_field():
    with pytest.raises(PersonavecError, match=r"where must be 'before' or 'after'.*not during"):
        LiveMonitor(torch.ones(32), layer=1, where="during")


def test_an_unknown_action_or_judge_shows_the_value_as_given_not_a_python_repr():
    from personavec.judge.spec import make_judge

    with pytest.raises(PersonavecError, match=r'^LiveMonitor action must be stop, steer or none, not "halt"$'):
        LiveMonitor(torch.ones(32), layer=1, action="halt")
    with pytest.raises(PersonavecError, match=r'^unknown judge "bogus"; use local, local:MODEL'):
        make_judge("bogus")
