"""The engine: continuous batching that gives every request exactly what it gets alone (tiny models, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from personavec.engine.decoder import Engine, Request
from personavec.model.edits import Edit, steer
from personavec.model.layers import decoder_layers
from personavec.model.loading import stop_token_ids

QUESTIONS = ["Why?", "How should I treat people who are weaker than me?", "Tell me about foxes.", "Hi",
             "What is the best way to spend a free afternoon?", "Answer kindly and honestly, please."]


def prompts(lm):
    return [lm.format_chat(q) for q in QUESTIONS]


def hf_greedy(lm, prompt: str, max_new_tokens: int) -> list[int]:
    """Hugging Face ``generate``, one prompt at a time, greedy, stopping at the engine's stop tokens."""
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                eos_token_id=stop_token_ids(lm))[0, ids.shape[1]:].tolist()
    stops = set(stop_token_ids(lm))
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


def run(lm, requests, max_batch):
    return {r.key: r for r in Engine(lm, max_batch=max_batch).generate(requests)}


def test_greedy_equals_generate_for_prompts_of_different_lengths(lm):
    ps = prompts(lm)
    lengths = [12, 3, 9, 12, 5, 7]  # answers finish at different steps: the free slots are refilled
    got = run(lm, [Request(p, n, key=i) for i, (p, n) in enumerate(zip(ps, lengths))], max_batch=3)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert got[i].token_ids == hf_greedy(lm, p, n), i
        assert got[i].finish == ("length" if len(got[i].token_ids) == n else "stop")


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "response_and_last_prompt"])
def test_per_request_edits_give_what_steer_gives_alone(lm, positions):
    torch.manual_seed(4)
    v, w = torch.randn(32), torch.randn(32)
    ps = prompts(lm)
    plan = [(), (Edit(1, v, 2.0, positions=positions),), (Edit(2, w, -3.0, positions=positions),),
            (Edit(1, v, 1.5, positions=positions), Edit(1, v, kind="ablate", positions=positions)), (),
            (Edit(2, w, 2.5, kind="cap", positions=positions),)]
    got = run(lm, [Request(p, 8, edits=e, key=i) for i, (p, e) in enumerate(zip(ps, plan))], max_batch=4)
    for i, (p, e) in enumerate(zip(ps, plan)):
        with steer(lm, list(e)):
            want = hf_greedy(lm, p, 8)
        assert got[i].token_ids == want, (i, positions)


def test_a_request_gets_the_same_answer_whatever_shares_its_batch(lm):
    torch.manual_seed(5)
    v = torch.randn(32)
    ps = prompts(lm)
    requests = [Request(p, 10, temperature=1.0, top_p=0.9 if i % 2 else 1.0, seed=100 + i,
                        edits=(Edit(1, v, 1.0 * i, positions="response"),) if i % 3 else (), key=i)
                for i, p in enumerate(ps)]
    alone = {i: run(lm, [r], max_batch=1)[i].token_ids for i, r in enumerate(requests)}
    for max_batch in (2, 6):
        together = run(lm, list(reversed(requests)), max_batch=max_batch)
        assert {i: r.token_ids for i, r in together.items()} == alone
    again = run(lm, [Request(ps[0], 10, temperature=1.0, seed=7, key=0)], 1)[0].token_ids
    other = run(lm, [Request(ps[0], 10, temperature=1.0, seed=8, key=0)], 1)[0].token_ids
    assert again == run(lm, [Request(ps[0], 10, temperature=1.0, seed=7, key=0)], 1)[0].token_ids and again != other


def test_residual_deltas_are_exact_at_the_intended_tokens_of_each_row(lm):
    """Add α·v, ablate and cap, each on its own rows and positions of one running batch; nothing elsewhere."""
    torch.manual_seed(6)
    v = torch.randn(32)
    u = v / v.norm()
    layer = 2
    plan = {0: Edit(layer, v, 1.7, positions="response"), 1: Edit(layer, v, -2.0, positions="prompt"),
            2: None, 3: Edit(layer, v, kind="ablate", positions="all"), 4: Edit(layer, v, 0.5, kind="cap"),
            5: Edit(layer, v, 3.0, positions="response_and_last_prompt")}
    ps = prompts(lm)
    engine = Engine(lm, max_batch=3)
    block = decoder_layers(lm.model)[layer - 1]
    records = []

    def before(_m, _a, out):  # runs before the engine's edit hook (registered in front of it below)
        records.append({"h": out[0].detach().clone() if isinstance(out, tuple) else out.detach().clone()})

    def after(_m, _a, out):
        rec = records[-1]
        rec["h2"] = out[0].detach().clone() if isinstance(out, tuple) else out.detach().clone()
        rec["keys"] = [r.request.key for r in engine._rows]
        rec["prefill"] = engine._prefill
        rec["widths"] = list(engine._widths)

    lengths = [2, 6, 6, 4, 6, 6]  # the first answer ends early: later requests join a running batch
    requests = [Request(p, n, edits=(plan[i],) if plan[i] else (), key=i) for i, (p, n) in enumerate(zip(ps, lengths))]
    gen = engine.generate(requests)
    first = next(gen)  # the engine's edit hook is in place once the stream has started: record around it
    h_before = block.register_forward_hook(before, prepend=True)
    h_after = block.register_forward_hook(after)
    rest = list(gen)
    h_before.remove()
    h_after.remove()
    assert len(rest) + 1 == len(ps) and first is not None
    seen = set()
    for rec in records:
        if "h2" not in rec:
            continue
        t = rec["h"].shape[1]
        for b, key in enumerate(rec["keys"]):
            e = plan[key]
            h, h2 = rec["h"][b], rec["h2"][b]
            if rec["prefill"]:
                cols = torch.arange(t) >= t - rec["widths"][b]
                want = {"all": cols, "prompt": cols, "response": torch.zeros(t, dtype=torch.bool),
                        "response_and_last_prompt": torch.arange(t) == t - 1}
            else:
                want = {"all": torch.ones(t, dtype=torch.bool), "prompt": torch.zeros(t, dtype=torch.bool),
                        "response": torch.ones(t, dtype=torch.bool),
                        "response_and_last_prompt": torch.ones(t, dtype=torch.bool)}
            where = want[e.positions] if e is not None else torch.zeros(t, dtype=torch.bool)
            delta = h2 - h
            torch.testing.assert_close(delta[~where], torch.zeros_like(delta[~where]))
            if not where.any():
                continue
            seen.add((e.kind, rec["prefill"]))
            if e.kind == "add":
                torch.testing.assert_close(delta[where], (e.coef * v).expand_as(delta[where]), rtol=1e-5, atol=1e-5)
            else:
                ortho = delta[where] - (delta[where] @ u)[:, None] * u  # only the component along v̂ changes
                torch.testing.assert_close(ortho, torch.zeros_like(ortho), atol=1e-4, rtol=0)
                after = h2[where] @ u
                if e.kind == "ablate":
                    assert after.abs().max() < 1e-4
                else:
                    before_p = h[where] @ u
                    torch.testing.assert_close(after, before_p.clamp(max=e.coef), atol=1e-4, rtol=0)
    assert {("add", False), ("ablate", False), ("cap", False), ("ablate", True)} <= seen


def test_a_sliding_window_model_is_served_in_waves_and_stays_exact(tokenizer):
    """A cache with sliding-window layers cannot take joining rows: the engine fills a batch, decodes it to its end,
    then starts the next, and each answer still equals ``generate``'s."""
    from transformers import MistralConfig, MistralForCausalLM

    from personavec.model.loading import wrap_model

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
                        pad_token_id=0)
    lm = wrap_model(MistralForCausalLM(cfg).eval(), tokenizer)
    from personavec.engine.decoder import _mergeable

    with torch.no_grad():
        assert not _mergeable(lm.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values)
    ps = prompts(lm)
    lengths = [10, 3, 7, 10, 4, 9]
    got = run(lm, [Request(p, n, key=i) for i, (p, n) in enumerate(zip(ps, lengths))], max_batch=2)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert got[i].token_ids == hf_greedy(lm, p, n), i


def test_the_cache_appends_in_place_and_holds_what_concatenation_holds():
    """Decode steps write one column into spare room (no copy of the whole cache per token); rows leaving or
    padding trimmed replace the tensors, and the next append adopts them: always equal to plain concatenation."""
    from transformers.cache_utils import DynamicLayer

    from personavec.engine.decoder import _roomy

    class Holder:
        def __init__(self) -> None:
            self.layers = [DynamicLayer()]

    g = torch.Generator().manual_seed(0)
    plain, roomy = DynamicLayer(), Holder()
    first = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    plain.update(*first)
    roomy.layers[0].update(*first)
    layer = _roomy(roomy).layers[0]
    pointers = set()
    for step in range(150):
        rows = 3 if step < 70 else 2
        k, v = torch.randn(rows, 2, 1, 4, generator=g), torch.randn(rows, 2, 1, 4, generator=g)
        if step == 70:  # a row leaves, then the leading column is trimmed (what the engine does)
            for x in (plain, layer):
                x.batch_select_indices(torch.tensor([0, 2]))
                x.keys, x.values = x.keys[:, :, 1:], x.values[:, :, 1:]
            assert layer._buffer is None  # the old buffer is freed at once, not kept beside the new tensors
        got, want = layer.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        pointers.add(got[0].data_ptr())
    assert len(pointers) <= 4  # a handful of buffers over 150 steps, not one per step


def test_a_live_feed_gives_what_a_list_gives(lm):
    """A live feed (what a server fills): requests put from another thread while the engine decodes join the
    running batch (one with an edit at a layer nobody edited before) and get the answers they get alone;
    ``on_token`` sees every generated token of every request, in order."""
    import threading

    from personavec.engine.decoder import Feed

    torch.manual_seed(6)
    v = torch.randn(32)
    ps = prompts(lm)
    plan = [Request(p, 10, edits=(Edit(2, v, 2.0, positions="response"),) if i == 4 else (), temperature=1.0 * (i % 2),
                    seed=i, key=i) for i, p in enumerate(ps)]
    alone = {i: run(lm, [r], max_batch=1)[i].token_ids for i, r in enumerate(plan)}
    feed, seen, started = Feed(), {}, threading.Event()
    for r in plan[:2]:
        feed.put(r)

    def on_token(request, token, readings):
        seen.setdefault(request.key, []).append(token)
        started.set()

    def late():
        started.wait(timeout=60)  # the engine is decoding the first two when the rest arrive
        for r in plan[2:]:
            feed.put(r)
        feed.close()

    thread = threading.Thread(target=late)
    thread.start()
    got = {r.key: r for r in Engine(lm, max_batch=4).generate(feed, on_token=on_token)}
    thread.join()
    assert {i: r.token_ids for i, r in got.items()} == alone
    assert seen == {i: r.token_ids for i, r in got.items() if r.token_ids}
    with pytest.raises(Exception, match="closed"):
        feed.put(plan[0])


@pytest.mark.parametrize("edited", [False, True])
def test_per_token_readings_equal_a_direct_projection_of_the_same_text(lm, edited):
    """A request's reads: per generated token, the projection (on the unit direction) of the residual at the
    position that produced it — equal to projecting the finished text in one forward pass (hidden_states[layer]),
    under the same steering (after the edits at the read layer)."""
    torch.manual_seed(7)
    v, w = torch.randn(32), torch.randn(32)
    edits = (Edit(1, w, 2.0, positions="all"),) if edited else ()
    ps = prompts(lm)[:4]
    reqs = [Request(p, 9, edits=edits, reads=((1, v, "after"), (0, w)), key=i, temperature=1.0, seed=i)
            for i, p in enumerate(ps)]
    streamed: dict[int, list[list[float]]] = {}
    got = {r.key: r for r in Engine(lm, max_batch=3).generate(
        reqs, on_token=lambda req, tok, read: streamed.setdefault(req.key, []).append(read))}
    for i, p in enumerate(ps):
        r = got[i]
        prompt_ids = lm.tokenizer(p, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + r.token_ids[:-1]])
        with torch.no_grad(), steer(lm, list(edits)):
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        n = len(prompt_ids)
        for k, (layer, d) in enumerate(((1, v), (0, w))):  # the tiny model has L = 2
            want = hs[layer][0, n - 1: n - 1 + len(r.token_ids)] @ (d / d.norm())
            assert torch.allclose(torch.tensor(r.readings[k]), want, atol=1e-4), (i, k)
        assert streamed[i] == [list(x) for x in zip(*r.readings)]


@pytest.mark.parametrize("action", ["stop", "steer"])
def test_a_guard_stops_at_the_first_crossing_or_steers_the_rest(lm, action):
    from personavec.engine.decoder import Guard

    torch.manual_seed(8)
    v = torch.randn(32) * 4
    prompt = prompts(lm)[1]
    free = run(lm, [Request(prompt, 12, reads=((1, v),), key=0, ignore_eos=True)], 1)[0]
    r = free.readings[0]
    j = max(range(8), key=lambda i: r[i])  # the largest reading among tokens 0..7
    threshold = r[j] - 1e-4  # first crossed at j
    edit = Edit(1, v, -4.0, positions="response") if action == "steer" else None
    got = run(lm, [Request(prompt, 12, reads=((1, v), (1, v, "after")), key=0, ignore_eos=True,
                           guard=Guard(0, threshold, action, edit))], 1)[0]
    assert got.guard_triggered and got.token_ids[: j + 1] == free.token_ids[: j + 1]
    if action == "stop":
        assert got.finish == "persona_guard" and len(got.token_ids) == j + 1
    else:
        assert len(got.token_ids) == 12 and got.readings[0][: j + 1] == pytest.approx(r[: j + 1], abs=1e-5)
        later, before = got.readings[1][j + 1:], r[j + 1:]  # after the guard's edit
        assert max(later) < min(before)  # -4 v at every later token lowers every later reading


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_are_untouched(lm):
    from personavec.engine.decoder import Feed

    ps = prompts(lm)
    long_one, short = Request(ps[0], 40, key="long", ignore_eos=True), Request(ps[1], 12, key="short")
    alone = run(lm, [short], 1)["short"].token_ids
    feed = Feed()
    feed.put(long_one)
    feed.put(short)
    feed.close()
    counts = {"long": 0}

    def on_token(request, token, readings):
        if request.key == "long":
            counts["long"] += 1
            if counts["long"] == 3:
                feed.cancel("long")

    got = {r.key: r for r in Engine(lm, max_batch=4).generate(feed, on_token=on_token)}
    assert got["long"].finish == "cancelled" and len(got["long"].token_ids) <= 4
    assert got["short"].token_ids == alone and not feed.cancelled()


def test_a_live_feed_outlives_a_moment_with_nothing_to_do(lm):
    """Every waiting request cancelled while the running ones finish: the engine waits for the feed, not ends."""
    import threading

    from personavec.engine.decoder import Feed

    ps = prompts(lm)
    feed, got, count = Feed(), {}, []

    def on_token(request, token, readings):
        count.append(request.key)
        if count.count("A") == 3:
            feed.cancel("B")  # B waits (one slot) and A has just produced its last token

    def consume():
        for r in Engine(lm, max_batch=1).generate(feed, on_token=on_token):
            got[r.key] = r

    feed.put(Request(ps[0], 3, key="A", ignore_eos=True))
    feed.put(Request(ps[1], 3, key="B", ignore_eos=True))
    thread = threading.Thread(target=consume)
    thread.start()
    for _ in range(200):
        if "A" in got:
            break
        thread.join(timeout=0.05)
    feed.put(Request(ps[2], 3, key="C", ignore_eos=True))
    feed.close()
    thread.join(timeout=60)
    assert got["B"].finish == "cancelled" and len(got["C"].token_ids) == 3


def test_a_seed_the_generator_cannot_take_is_refused():
    from personavec.engine.decoder import check_request

    for seed in (-1, 2**64):
        with pytest.raises(Exception, match="seed"):
            check_request(Request("x", 4, temperature=1.0, seed=seed))


def test_a_tiny_temperature_or_top_p_samples_the_greedy_token(lm):
    """Below 1e-5 a temperature is greedy (dividing by it would overflow the logits into NaN), and a top-p too
    small for float32 still keeps the most likely token."""
    p = prompts(lm)[1]
    greedy = run(lm, [Request(p, 8, key=0)], 1)[0].token_ids
    for kw in ({"temperature": 1e-40}, {"temperature": 1e-6}, {"temperature": 1.0, "top_p": 1e-46}):
        assert run(lm, [Request(p, 8, seed=3, key=0, **kw)], 1)[0].token_ids == greedy, kw


def test_a_cancel_that_comes_too_late_leaves_nothing_behind(lm):
    """A cancel at a request's last token, after its answer, or for a key never put: the feed keeps no trace."""
    from personavec.engine.decoder import Feed

    feed = Feed()
    feed.put(Request(prompts(lm)[0], 3, key="A", ignore_eos=True))
    feed.close()

    def on_token(request, token, readings):
        if len(readings) == 0 and on_token.n == 2:
            feed.cancel("A")  # while the last token is being sampled
        on_token.n += 1
    on_token.n = 0
    (result,) = Engine(lm, max_batch=2).generate(feed, on_token=on_token)
    feed.cancel("A")
    feed.cancel("never-put")
    assert len(result.token_ids) == 3 and not feed.cancelled()


def test_a_failed_step_gives_back_what_was_taken_and_not_started(lm):
    """One slot, A and B in a feed: the model fails on A's prefill. B, taken from the feed but not started, is in
    line again; A is forgotten (what a server then tells A's caller)."""
    from personavec.engine.decoder import Feed

    ps = prompts(lm)
    feed = Feed()
    a, b = Request(ps[0], 4, key="A"), Request(ps[1], 4, key="B")
    feed.put(a)
    feed.put(b)

    def out_of_memory(module, args):
        raise RuntimeError("CUDA out of memory")

    handle = decoder_layers(lm.model)[0].register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            list(Engine(lm, max_batch=1).generate(feed))
    finally:
        handle.remove()
    assert feed.drop_started() == {"B"}  # still waiting; A is no longer live
    assert feed.take(block=False) == [b]


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "response_and_last_prompt"])
def test_a_before_edit_reading_is_the_unsteered_one_and_an_after_edit_one_moves_by_coef_norm(lm, positions):
    """Steering at the read layer: at the first generated token (read at the last prompt token) the before-edit
    reading equals the unsteered request's exactly; the after-edit one differs by exactly coef·‖v‖ where the edit
    acts on that position (every mode but ``response``, which starts at the second answer token)."""
    torch.manual_seed(11)
    v = torch.randn(32) * 2
    coef = 3.0
    reads = ((1, v, "before"), (1, v, "after"))
    prompt = prompts(lm)[1]
    plain = run(lm, [Request(prompt, 6, reads=reads, key=0)], 1)[0]
    steered = run(lm, [Request(prompt, 6, reads=reads, key=0, edits=(Edit(1, v, coef, positions=positions),))],
                  1)[0]
    assert plain.readings[0][0] == plain.readings[1][0]  # unsteered, before and after are one reading
    assert steered.readings[0][0] == plain.readings[0][0]  # exactly, not within a tolerance
    moved = coef * float(v.norm()) if positions != "response" else 0.0
    assert steered.readings[1][0] - plain.readings[1][0] == pytest.approx(moved, abs=1e-4)


@pytest.mark.parametrize("edit_layer", [1, 2])
def test_before_edit_readings_on_the_same_tokens_do_not_see_edits_at_the_read_layer_or_later(lm, edit_layer):
    """On the same tokens (the steered answer fed to the unsteered model in one pass), a steered request's
    before-edit readings at layer 1 equal the unsteered projections at every position when its edits are at the
    read layer or later; an edit at an earlier layer (layer 0) does show."""
    torch.manual_seed(12)
    v, w = torch.randn(32) * 2, torch.randn(32) * 2
    prompt = prompts(lm)[2]
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)

    def unsteered_projection(tokens):
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([prompt_ids + tokens[:-1]]), output_hidden_states=True).hidden_states
        return hs[1][0, n - 1: n - 1 + len(tokens)] @ (v / v.norm())

    for layer, should_match in ((edit_layer, True), (0, False)):
        edits = (Edit(layer, w, 4.0, positions="all"), Edit(layer, v, 2.0, positions="all"))
        got = run(lm, [Request(prompt, 10, reads=((1, v),), edits=edits, key=0, ignore_eos=True, temperature=1.0,
                               seed=3)], 1)[0]
        same = torch.allclose(torch.tensor(got.readings[0]), unsteered_projection(got.token_ids), atol=1e-4)
        assert same == should_match, layer


def test_a_read_with_an_unknown_where_is_refused_naming_it(lm):
    from personavec.engine.decoder import check_request
    from personavec.errors import PersonavecError

    with pytest.raises(PersonavecError, match=r"reads\[0\]\.where must be 'before' or 'after'.*not during"):
        check_request(Request("x", reads=((1, torch.ones(32), "during"),)))



def test_a_read_for_another_model_is_refused_before_any_forward_pass(lm):
    """A read past the last layer, or along a direction of another hidden size, was a raw error from inside a hook
    once the forward pass ran; it is one line naming the read, before generation (as an edit's is)."""
    from personavec.errors import PersonavecError

    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = tuple(lm.tokenizer(lm.format_chat("Why?"), add_special_tokens=False)["input_ids"])
    try:
        for reads, says in ((((1, torch.ones(100)),), r"reads\[0\] has 100 dims but the model's hidden size is 32"),
                            (((1, torch.ones(32)), (7, torch.ones(32))), r"reads\[1\] is at layer 7, out of range: "
                                                                         r"this model has layers 0\.\.2")):
            with pytest.raises(PersonavecError, match=says):
                list(Engine(lm).generate([Request(ids, 3, reads=reads)]))
    finally:
        handle.remove()
    assert calls == []

def test_a_guard_over_the_answer_stops_where_its_running_mean_first_crosses_from_its_first_checked_token(lm):
    """``over="answer"``: the mean of the readings so far, checked from ``from_token`` on; the tokens before it
    never trigger it, however high they read."""
    from personavec.engine.decoder import Guard

    torch.manual_seed(8)
    v = torch.randn(32) * 4
    prompt = prompts(lm)[1]
    r = run(lm, [Request(prompt, 12, reads=((1, v),), key=0, ignore_eos=True)], 1)[0].readings[0]
    means = [sum(r[: t + 1]) / (t + 1) for t in range(len(r))]
    threshold = max(means[3:9]) - 1e-4
    j = next(t for t in range(3, len(r)) if means[t] > threshold)
    got = run(lm, [Request(prompt, 12, reads=((1, v),), key=0, ignore_eos=True,
                           guard=Guard(0, threshold, over="answer", from_token=4))], 1)[0]
    assert got.finish == "persona_guard" and len(got.token_ids) == j + 1
    low = min(means) - 1.0  # every mean is above it: the first checked token stops the answer
    early = run(lm, [Request(prompt, 12, reads=((1, v),), key=0, ignore_eos=True,
                             guard=Guard(0, low, over="answer", from_token=5))], 1)[0]
    assert len(early.token_ids) == 5


def _forward_sizes(lm):
    """(rows, columns) of every forward pass of ``lm.model`` while the context is open."""
    sizes: list[tuple[int, int]] = []
    hook = lm.model.register_forward_pre_hook(
        lambda _m, args, kwargs: sizes.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs
                                                     else args[0]).shape)), with_kwargs=True)
    return sizes, hook


def test_prefills_stay_within_the_token_budget_and_answers_do_not_change(lm):
    ps = prompts(lm)
    long = lm.format_chat(" ".join(QUESTIONS * 4))  # longer than the budget: prefilled alone, in chunks
    requests = [Request(p, 6, key=i) for i, p in enumerate([*ps, long])]
    n_long = len(lm.tokenizer(long, add_special_tokens=False)["input_ids"])
    budget = 48
    assert n_long > 2 * budget
    want = run(lm, requests, max_batch=8)
    sizes, hook = _forward_sizes(lm)
    try:
        got = {r.key: r for r in Engine(lm, max_batch=8, prefill_tokens=budget).generate(requests)}
    finally:
        hook.remove()
    prefills = [(b, t) for b, t in sizes if t > 1]
    assert prefills and max(b * t for b, t in prefills) <= budget
    assert sum(t for b, t in prefills if b == 1) >= n_long  # the long prompt went through in chunks
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "response_and_last_prompt"])
def test_a_prompt_prefilled_in_chunks_is_edited_and_read_as_in_one_pass(lm, positions):
    torch.manual_seed(9)
    v = torch.randn(32)
    unit = v / v.norm()
    long = lm.format_chat(" ".join(QUESTIONS * 3))
    req = Request(long, 8, edits=(Edit(1, v, 2.0, positions=positions), Edit(2, v, kind="ablate",
                                                                            positions=positions)),
                  reads=((1, unit, "before"), (2, unit, "after")), key=0)
    whole = next(iter(Engine(lm, max_batch=1).generate([req])))
    chunked = next(iter(Engine(lm, max_batch=1, prefill_tokens=16).generate([req])))
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(chunked.readings, whole.readings):
        assert a == pytest.approx(b, abs=1e-4)
    with steer(lm, list(req.edits)):
        assert whole.token_ids == hf_greedy(lm, long, 8)


def test_the_cache_budget_holds_back_what_does_not_fit_and_a_bad_budget_is_refused(lm):
    from personavec.errors import PersonavecError

    ps = prompts(lm)
    longest = max(len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ps) + 6
    sizes, hook = _forward_sizes(lm)
    try:
        got = {r.key: r for r in Engine(lm, max_batch=6, cache_tokens=2 * longest).generate(
            [Request(p, 6, key=i) for i, p in enumerate(ps)])}
    finally:
        hook.remove()
    assert max(b for b, _ in sizes) <= 2  # never more than two rows of the longest prompt plus answer
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in run(
        lm, [Request(p, 6, key=i) for i, p in enumerate(ps)], max_batch=6).items()}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PersonavecError, match="prefill_tokens must be a whole number"):
            Engine(lm, prefill_tokens=bad)


def test_a_request_larger_than_the_cache_budget_is_still_served_alone_and_unchanged(lm):
    """A prompt plus answer over ``cache_tokens`` is not refused or starved: it runs alone (nothing joins it, and it
    joins nothing), and the others are answered around it, every answer as in an unbudgeted engine."""
    ps = prompts(lm)
    big = lm.format_chat(" ".join(QUESTIONS * 2))
    n_big = len(lm.tokenizer(big, add_special_tokens=False)["input_ids"]) + 8
    budget = n_big - 4  # the big request alone is over it; two small ones fit
    requests = [Request(p, 8, key=i, ignore_eos=True) for i, p in enumerate([ps[0], big, ps[1], ps[3]])]
    sizes, hook = _forward_sizes(lm)
    try:
        got = {r.key: r for r in Engine(lm, max_batch=4, cache_tokens=budget).generate(requests)}
    finally:
        hook.remove()
    want = run(lm, requests, max_batch=4)
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}
    assert len(got[1].token_ids) == 8
    big_prefill = sizes.index((1, n_big - 8))
    assert all(b == 1 for b, _ in sizes[big_prefill:big_prefill + 8])  # its prefill and decode steps: alone


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": "8"}, 'max_batch must be a whole number of rows >= 1, not "8"'),
    ({"max_batch": 0}, "max_batch must be a whole number of rows >= 1, not 0"),
    ({"cache_tokens": "64"}, 'cache_tokens must be .* >= 1, not "64"')])
def test_an_engine_size_that_is_not_a_whole_number_is_one_line_naming_it(lm, kwargs, message):
    from personavec.errors import PersonavecError

    with pytest.raises(PersonavecError, match=message):
        Engine(lm, **kwargs)


def test_the_cuda_defaults_size_the_batch_and_the_cache_from_the_free_memory_and_the_kv_bytes_per_token(lm,
                                                                                                       monkeypatch):
    """On CUDA: a quarter of the free memory over the KV bytes per token (keys and values, every layer, the KV
    heads' share of the hidden size) — 2 048 tokens a row for the batch, the whole of it for the cache budget."""
    from types import SimpleNamespace

    from personavec.engine.decoder import default_budgets, default_max_batch

    cfg = lm.model.config  # 2 layers, hidden 32
    per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * cfg.num_key_value_heads // cfg.num_attention_heads * 2
    free = per_token * 2048 * 4 * 10  # room for 10 rows of 2 048 tokens in a quarter
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2 * free))
    fake = SimpleNamespace(device=torch.device("cuda"), model=lm.model, dtype=torch.bfloat16)
    assert default_max_batch(fake) == 10
    assert default_budgets(fake) == (32768, free // 4 // per_token)
