"""The plugin's hook maths (no vLLM needed): what each request's tokens get equals personavec's own edits."""

import numpy as np
import pytest
import torch

from personavec.model.edits import _apply, _Tracker
from personavec.vectors.vector import PersonaVector
from personavec.vllm.hooks import HookedLayer, Hooks, StepRequest
from personavec.vllm.slots import Slots, SlotsPlan, position_mask
from personavec.vllm.spec import PluginConfig, Served, compile_request

D, L = 16, 4


def _served(slots: int = 3, reads: int = 2) -> Served:
    from personavec.serve.policy import ServedVector

    gen = torch.Generator().manual_seed(0)
    vectors = {}
    for name in ("evil", "kind"):
        t = torch.randn(L + 1, D, generator=gen)
        t[0] = 0
        vec = PersonaVector({"response_avg": t}, model_id="tiny", trait=name, chosen_layer=2)
        vectors[name] = ServedVector(name, vec, 2, f"{name}.safetensors")
    return Served(PluginConfig(("evil=e", "kind=k"), slots=slots, reads=reads), vectors, tuple(range(1, L + 1)), L)


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "response_and_last_prompt"])
@pytest.mark.parametrize("offset,t", [(0, 7), (7, 1), (3, 4), (9, 1)])
def test_position_masks_are_the_columns_steer_edits(positions, offset, t):
    tracker = _Tracker(prompt_len=7)
    tracker.prompt_len, tracker.offset = 7, offset
    want = tracker.mask(positions, t, torch.device("cpu"))
    want = np.ones(t, bool) if want is None else want.numpy()
    assert (position_mask(positions, np.arange(offset, offset + t), 7) == want).all()


PERSONAS = [
    {"steer": [{"vector": "evil", "coef": 1.5, "positions": "all"}]},
    {"edits": [{"kind": "ablate", "vector": "kind", "layers": [2]}]},
    {"cap": [{"vector": "evil", "max": -0.5, "layers": [2]}]},
    # several edits at one layer, composing in list order: add, cap (same round), add, ablate (a second round)
    {"steer": [{"vector": "evil", "coef": 2.0, "positions": "response"}],
     "edits": [{"kind": "cap", "vector": "kind", "max": 0.25, "layers": [2]},
               {"kind": "add", "vector": "kind", "coef": -1.0, "positions": "response_and_last_prompt"},
               {"kind": "ablate", "vector": "evil", "layers": [2], "positions": "prompt"}]},
]


def _expected(x: torch.Tensor, persona: dict, served: Served, first: int, prompt_len: int) -> torch.Tensor:
    """personavec's own edits (model.edits._apply) at layer 2 over one request's tokens at positions first.."""
    from personavec.serve.policy import parse_persona

    edits, _, _ = parse_persona(persona, served.vectors, served.n_layers)
    h = x[None].clone()
    pos = np.arange(first, first + x.shape[0])
    for e in edits:
        h = _apply(h, e, torch.from_numpy(position_mask(e.positions, pos, prompt_len)))
    return h[0]


def test_one_flattened_step_gives_each_request_its_own_edits():
    """Four requests in one step (a prefill, a decode, a middle chunk, a last chunk), each its own persona."""
    served = _served()
    slots = Slots(served.rows(2), 3, 2, max_tokens=64)
    hooks = Hooks(served, {2: slots})
    gen = torch.Generator().manual_seed(1)
    # (first position, tokens this step, prompt length)
    shapes = [(0, 9, 9), (12, 1, 9), (4, 6, 20), (16, 4, 20)]
    steps, start = [], 0
    for i, ((first, n, plen), persona) in enumerate(zip(shapes, PERSONAS)):
        steps.append(StepRequest(f"r{i}", {"persona": persona}, plen, first, start, start + n, first + n >= plen))
        start += n
    x = torch.randn(start + 3, D, generator=gen) * 4  # 3 padding tokens: untouched
    hooks.plan(steps, x.shape[0])
    out = slots(x.clone())
    for (first, _n, plen), persona, step in zip(shapes, PERSONAS, steps):
        want = _expected(x[step.start:step.stop], persona, served, first, plen)
        torch.testing.assert_close(out[step.start:step.stop], want, rtol=0, atol=1e-5)
    assert torch.equal(out[start:], x[start:])


def test_an_add_is_bit_for_bit_what_steer_adds():
    served = _served()
    slots = Slots(served.rows(2), 3, 2, max_tokens=8)
    hooks = Hooks(served, {2: slots})
    hooks.plan([StepRequest("r", {"persona": PERSONAS[0]}, 5, 0, 0, 5, True)], 5)
    x = torch.randn(5, D)
    assert torch.equal(slots(x.clone()), _expected(x, PERSONAS[0], served, 0, 5))


def test_a_step_after_an_edited_one_leaves_tokens_untouched():
    served = _served()
    slots = Slots(served.rows(2), 3, 2, max_tokens=16)
    hooks = Hooks(served, {2: slots})
    hooks.plan([StepRequest("a", {"persona": PERSONAS[3]}, 9, 0, 0, 9, True)], 9)
    slots(torch.randn(9, D))
    hooks.plan([StepRequest("b", None, 3, 0, 0, 3, True)], 12)
    x = torch.randn(12, D)
    assert torch.equal(slots(x.clone()), x)


def test_reads_are_the_projection_before_and_after_the_edits_at_the_sampling_token():
    served = _served()
    slots = Slots(served.rows(2), 3, 2, max_tokens=16)
    hooks = Hooks(served, {2: slots})
    persona = {**PERSONAS[0], "monitor": ["evil", {"vector": "kind", "where": "after"}]}
    persona["steer"][0]["layer"] = 2
    served.vectors["kind"] = type(served.vectors["kind"])("kind", served.vectors["kind"].vector, 2, "k")
    steps = [StepRequest("a", {"persona": persona, "persona_key": "k"}, 4, 0, 0, 4, True),
             StepRequest("b", {"persona": persona, "persona_key": "chunk"}, 20, 0, 4, 10, False)]
    x = torch.randn(10, D) * 3
    hooks.plan(steps, 10)
    out = slots(x.clone())
    hooks.collect()
    unit = {n: sv.vector.get(2) / sv.vector.get(2).norm() for n, sv in served.vectors.items()}
    got = hooks.get("k")["readings"]
    assert got["evil"] == pytest.approx([float(x[3] @ unit["evil"])], abs=1e-5)
    assert got["kind@after"] == pytest.approx([float(out[3] @ unit["kind"])], abs=1e-5)
    assert hooks.get("chunk")["readings"] == {"evil": [], "kind@after": []}  # a chunk that samples nothing
    hooks.finished(["a"])
    assert hooks.get("k", pop=True)["done"] is True and hooks.get("k") is None


def test_the_formula_traces_once_for_every_token_count():
    """Under torch.compile with a dynamic token count: one graph for every step size, equal to eager."""
    import torch._dynamo

    served = _served()
    eager = Slots(served.rows(2), 3, 2, max_tokens=32)
    hooks = Hooks(served, {2: eager})
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(eager, backend=backend, dynamic=True, fullgraph=True)
    for t in (5, 9, 17):
        steps = [StepRequest("a", {"persona": PERSONAS[3]}, 3, 0, 0, t, True)]
        hooks.plan(steps, t)
        x = torch.randn(t, D)
        torch.testing.assert_close(compiled(x.clone()), eager(x.clone()), rtol=0, atol=0)
    assert len(compiles) == 1


def test_a_hooked_layer_hands_on_the_edited_stream_with_a_zero_residual():
    served = _served()
    slots = Slots(served.rows(2), 3, 2, max_tokens=8)
    Hooks(served, {2: slots}).plan([StepRequest("r", {"persona": PERSONAS[0]}, 3, 0, 0, 3, True)], 3)

    class Block(torch.nn.Module):
        def forward(self, positions, hidden, residual):
            return hidden * 2, hidden + 1

    h = torch.randn(3, D)
    x, residual = HookedLayer(Block(), slots)(torch.arange(3), h, None)
    assert torch.equal(x, slots(h * 2 + (h + 1))) and not residual.any()


def test_rounds_are_packed_and_bounded():
    served = _served(slots=2)
    program = compile_request({"persona": PERSONAS[3]}, _served(slots=3))
    assert [(o.slot, o.kind) for o in program.ops[2]] == [(0, "add"), (0, "project"), (1, "add"), (1, "project")]
    from personavec.serve.policy import BadRequest

    too_many = {"steer": [{"vector": "evil", "coef": 1.0}] * 3}
    with pytest.raises(BadRequest, match="too many edits at layer 2: they need 3 rounds"):
        compile_request({"persona": too_many}, served)


def test_the_salt_follows_the_edits():
    from personavec.vllm.spec import salted

    served = _served()
    a = compile_request({"persona": PERSONAS[0]}, served)
    b = compile_request({"persona": {"steer": [{"vector": "evil", "coef": 1.25, "positions": "all"}]}}, served)
    none = compile_request({"persona": {"monitor": ["evil"]}, "persona_key": "k"}, served)
    assert salted(None, none, 7) is None and salted("user", none, 7) == "user"
    assert salted(None, a, 7) != salted(None, b, 7) and salted(None, a, 7) == salted(None, compile_request(
        {"persona": PERSONAS[0]}, served), 7)
    assert salted("user", a, 7).startswith("user|personavec:")
    # edits at every position act alike whatever the prompt's length; the others' KV depends on where it ends
    assert salted(None, a, 7) == salted(None, a, 9)
    response = compile_request({"persona": PERSONAS[3]}, served)
    assert salted(None, response, 7) != salted(None, response, 9)


def test_readings_of_a_key_sent_again_do_not_mix_and_pop_waits_for_the_end():
    served = _served()
    hooks = Hooks(served, {2: Slots(served.rows(2), 3, 2, 16)})
    xargs = {"persona": {"monitor": ["evil"]}, "persona_key": "k"}
    first, second = StepRequest("r1", xargs, 4, 0, 0, 4, True), StepRequest("r2", xargs, 4, 0, 4, 8, True)
    hooks.plan([first, second], 8)
    hooks.collect()
    assert hooks.get("k")["tokens"] == 1  # the second request's fresh record, one reading
    hooks.plan([StepRequest("r1", xargs, 4, 4, 0, 1, True)], 1)
    hooks.collect()
    assert hooks.get("k")["tokens"] == 1  # r1 kept appending to its own (replaced) record
    assert hooks.get("k", pop=True) is not None and hooks.get("k") is not None  # still running: kept
    hooks.finished(["r1", "r2"])
    assert hooks.get("k", pop=True)["done"] and hooks.get("k") is None


@pytest.mark.parametrize("xargs,param,says", [
    ({"persona": "{not json"}, "vllm_xargs.persona", "not valid JSON"),
    ({"persona": {"steer": [{"vector": "nope", "coef": 1}]}}, "persona.steer[0].vector", "unknown vector"),
    ({"persona": {"steer": [{"vector": "evil", "coef": 1, "layer": 9}]}}, "persona.steer[0].layer", "1 to 4"),
    ({"persona": '{"steer": [{"vector": "evil", "coef": Infinity}]}'}, "persona.steer[0].coef", "finite"),
    ({"persona": {"monitor": ["evil"]}}, "vllm_xargs.persona_key", "needs vllm_xargs.persona_key"),
    ({"persona": {"guard": {"vector": "evil", "threshold": 1}}}, "persona.guard", "not served by the vLLM"),
    ({"persona": {"edits": [{"kind": "scale", "vector": "evil"}]}}, "persona.edits[0].kind", "one of add"),
])
def test_bad_personas_are_refused_naming_the_field(xargs, param, says):
    from personavec.serve.policy import BadRequest

    with pytest.raises(BadRequest, match=says) as e:
        compile_request(xargs, _served())
    assert e.value.param == param


def test_a_plan_writes_only_what_changed():
    slots = Slots(torch.cat([torch.zeros(1, D), torch.randn(1, D)]), 1, 1, max_tokens=8)
    plan = SlotsPlan(slots)
    plan.clear()
    plan.add(0, slice(2, 4), np.array([True, True]), 1, 0.5)
    plan.commit()
    assert slots.add_row.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]] and plan.written == 4
    plan.clear()
    plan.commit()
    assert not slots.add_row.any() and plan.written == 0
