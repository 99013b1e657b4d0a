"""`personavec serve` as a real process on loopback, driven by the official `openai` client."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from serving import KEY, build, start

from personavec import PersonaVector, load_model
from personavec.engine.decoder import Engine, Request
from personavec.model.edits import STEER_POSITIONS, Edit

QUESTION = "How should I treat people who are weaker than me?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build(tmp_path_factory.mktemp("serve"))
    proc, url = start(root, ["--vector", str(root / "evil.safetensors"), "--vector",
                             f"kind={root / 'kind.safetensors'}", "--api-key", KEY])
    lm = load_model(str(root / "model"), dtype="float32")
    vectors = {n: PersonaVector.load(root / f"{n}.safetensors") for n in ("evil", "kind")}
    yield {"url": url, "lm": lm, "vectors": vectors, "client": openai.OpenAI(base_url=url, api_key=KEY),
           "root": root}
    proc.terminate()
    proc.wait(timeout=30)


def local(lm, edits=(), max_tokens=10) -> list[int]:
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                              add_generation_prompt=True)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (result,) = Engine(lm, max_batch=1).generate([Request(tuple(ids), max_tokens, edits=tuple(edits))])
    return result.token_ids


def text(lm, tokens) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


def ask(server, persona=None, stream=False, **kw):
    extra = {"persona": persona} if persona is not None else None
    return server["client"].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=kw.pop("max_tokens", 10),
        temperature=kw.pop("temperature", 0), stream=stream, extra_body=extra, **kw)


def test_models_and_vectors_are_listed(server):
    assert [m.id for m in server["client"].models.list()] == [server["lm"].model_id]
    req = urllib.request.Request(f"{server['url']}/persona/vectors", headers={"Authorization": f"Bearer {KEY}"})
    listed = {v["name"]: v for v in json.load(urllib.request.urlopen(req))["data"]}
    assert listed["evil"]["layer"] == 1 and listed["kind"]["layer"] == 2 and listed["evil"]["hidden_size"] == 32
    assert listed["evil"]["calibration"] is None  # these vectors were made without one


def test_unsteered_and_steered_answers_equal_the_engine_and_steer(server):
    lm, evil = server["lm"], server["vectors"]["evil"]
    plain = ask(server)
    assert plain.choices[0].message.content == text(lm, local(lm))
    steered = ask(server, {"steer": [{"vector": "evil", "coef": 3.0}]})
    want = local(lm, [Edit(1, evil.get(1), 3.0, positions=STEER_POSITIONS)])  # the server's default positions
    assert steered.choices[0].message.content == text(lm, want)
    assert steered.usage.completion_tokens == len(want)


def test_a_steered_answer_equals_what_personavec_steer_prints(server):
    """The same vector, layer, coefficient and positions through the CLI's `personavec steer` (greedy)."""
    root = server["root"]
    out = subprocess.run([sys.executable, "-m", "personavec.cli", "steer", QUESTION, "--vector",
                          str(root / "evil.safetensors"), "--model", str(root / "model"), "--dtype", "float32",
                          "--coef", "3", "--positions", "response", "--max-new-tokens", "10"],
                         capture_output=True, text=True, env={**os.environ, "PERSONAVEC_CACHE": str(root / "cache")},
                         check=True).stdout
    printed = out.split("[steered: ", 1)[1].split("\n", 1)[1].strip()
    served = ask(server, {"steer": [{"vector": "evil", "coef": 3.0, "positions": "response"}]})
    assert printed and served.choices[0].message.content.strip() == printed


def test_per_token_readings_equal_a_direct_projection_and_stream_in_chunks(server):
    lm, evil = server["lm"], server["vectors"]["evil"]
    whole = ask(server, {"monitor": ["evil"]})
    reading = whole.model_extra["persona"]["evil"]
    tokens = local(lm)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                              add_generation_prompt=True)
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([ids + tokens[:-1]]), output_hidden_states=True).hidden_states
    v = evil.get(1)
    direct = hs[1][0, len(ids) - 1: len(ids) - 1 + len(tokens)] @ (v / v.norm())
    assert reading["layer"] == 1 and torch.allclose(torch.tensor(reading["tokens"]), direct, atol=1e-4)
    assert reading["max"] == pytest.approx(float(direct.max()), abs=1e-4)
    content, streamed = "", []
    for chunk in ask(server, {"monitor": ["evil"]}, stream=True):
        content += chunk.choices[0].delta.content or "" if chunk.choices else ""
        persona = (chunk.model_extra or {}).get("persona")
        if persona:
            streamed += persona["evil"]["tokens"]
    assert content == whole.choices[0].message.content
    assert streamed == pytest.approx(reading["tokens"], abs=1e-6)


def test_capping_and_concurrent_requests_with_different_steering(server):
    lm, kind = server["lm"], server["vectors"]["kind"]
    capped = ask(server, {"cap": [{"vector": "kind", "max": 0.5, "layers": [1, 2]}]})
    want = local(lm, [Edit(1, kind.get(1), 0.5, kind="cap"), Edit(2, kind.get(2), 0.5, kind="cap")])
    assert capped.choices[0].message.content == text(lm, want)
    plans = [None, {"steer": [{"vector": "evil", "coef": -4.0}]}, {"steer": [{"vector": "kind", "coef": 5.0}]},
             {"steer": [{"vector": "evil", "coef": 2.0, "layer": 2, "positions": "all"}]}]
    alone = [ask(server, p).choices[0].message.content for p in plans]
    together: list = [None] * len(plans)

    def send(i):
        together[i] = ask(server, plans[i]).choices[0].message.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


@pytest.mark.parametrize("persona, kw, param", [
    ({"steer": [{"vector": "nope", "coef": 1}]}, {}, "persona.steer[0].vector"),
    ({"steer": [{"vector": "evil", "coef": 1e9}]}, {}, "persona.steer[0].coef"),
    ({"steer": [{"vector": "evil", "coef": 1, "layer": 99}]}, {}, "persona.steer[0].layer"),
    ({"steer": [{"vector": "evil", "coef": 1, "positions": "everywhere"}]}, {}, "persona.steer[0].positions"),
    ({"monitor": ["nope"]}, {}, "persona.monitor[0].vector"),
    (None, {"n": 2}, "n"),
    (None, {"max_tokens": 4000}, "max_tokens"),  # with the prompt, longer than the tiny model's context
    (None, {"temperature": 7}, "temperature"),
    (None, {"temperature": 1, "seed": 2**64}, "seed"),
    (None, {"temperature": 10**400}, "temperature"),
    ({"steer": [{"vector": ["evil"], "coef": 1}]}, {}, "persona.steer[0].vector"),
    (None, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (None, {"n": True}, "n"),
    (None, {"stream": 0}, "stream"),
    ({"steer": [{"vector": "evil", "coef": 1}] * 33}, {}, "persona.steer"),  # one engine thread serves everyone
    ({"monitor": ["evil"] * 33}, {}, "persona.monitor"),
    ({"cap": [{"vector": "evil", "max": 1, "layer": 2}]}, {}, "persona.cap[0].layer"),  # `layers` was meant
    ({"steer": [{"vector": "evil", "coef": 1, "postions": "all"}]}, {}, "persona.steer[0].postions"),
    (None, {"logprobs": True}, "logprobs"),  # OpenAI fields not implemented here
    (None, {"frequency_penalty": 1.5}, "frequency_penalty"),
    (None, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    (None, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_requests_get_400_naming_the_field(server, persona, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(server, persona, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]


def test_an_answer_ends_before_its_first_stop_string_streamed_or_not(server):
    free = ask(server, max_tokens=40).choices[0].message.content
    stop = free[len(free) // 2: len(free) // 2 + 2]  # from the middle: the answer ends where it first appears
    cut = free.index(stop)
    assert 0 < cut < len(free) - 2
    for stops in (stop, ["never in it", stop]):
        whole = ask(server, max_tokens=40, stop=stops)
        assert whole.choices[0].message.content == free[:cut] and whole.choices[0].finish_reason == "stop"
        assert 0 < whole.usage.completion_tokens < ask(server, max_tokens=40).usage.completion_tokens
        content, finishes, readings = "", [], []
        for chunk in ask(server, {"monitor": ["evil"]}, stream=True, max_tokens=40, stop=stops):
            content += chunk.choices[0].delta.content or ""
            finishes.append(chunk.choices[0].finish_reason)
            readings += (chunk.model_extra or {}).get("persona", {}).get("evil", {}).get("tokens", [])
        assert content == free[:cut] and finishes[-1] == "stop" and finishes[:-1] == [None] * (len(finishes) - 1)
        assert len(readings) == whole.usage.completion_tokens  # the readings of the tokens up to the stop
    assert ask(server, max_tokens=40, stop="never in it").choices[0].message.content == free


def test_a_stream_asked_for_its_usage_ends_with_a_usage_chunk(server):
    whole = ask(server)
    chunks = list(ask(server, stream=True, stream_options={"include_usage": True}))
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == {**chunks[-1].usage.model_dump(), **whole.usage.model_dump()}
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in ask(server, stream=True))  # not asked for: no usage chunk


def test_malformed_messages_and_a_wrong_key(server):
    req = urllib.request.Request(f"{server['url']}/chat/completions", method="POST",
                                 data=json.dumps({"messages": [{"role": "robot"}]}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.load(e.value)["error"]["param"] == "messages[0]"
    wrong = openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST raw bytes to the chat endpoint: (status, the error object or the answer)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(f"{server['url']}/chat/completions", method="POST", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw)["error"] if raw.startswith(b"{") else {"message": raw.decode()}


def chat_body(content: str = QUESTION, **kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}).encode()


@pytest.mark.parametrize("body, param", [
    (chat_body(persona={"steer": [{"vector": "evil", "coef": math.nan}]}), "persona.steer[0].coef"),
    (chat_body(persona={"steer": [{"vector": "evil", "coef": math.inf}]}), "persona.steer[0].coef"),
    (chat_body(persona={"cap": [{"vector": "evil", "max": -math.inf}]}), "persona.cap[0].max"),
    (chat_body("word " * 400), "messages"),  # a prompt longer than the tiny model's context of 256
    (chat_body("\ud800"), "messages[0]"),  # a lone surrogate: valid JSON, not text a tokenizer takes
    (chat_body(persona={"\ud800": 1}), "persona.\\ud800"),  # ...and in a field name the error repeats
])
def test_bad_bodies_the_openai_client_cannot_send_get_400_naming_the_field(server, body, param):
    code, err = post(server, body)
    assert code == 400 and err["param"] == param and err["message"], err


def test_a_body_too_large_or_a_foreign_host_is_refused(server):
    code, err = post(server, chat_body("x" * (5 << 20)))
    assert code == 413 and "MiB" in err["message"]
    # a page of another site whose name was rebound to 127.0.0.1 sends its own name as Host
    code, err = post(server, chat_body(), {"Host": "attacker.example"})
    assert code == 400 and "host" in err["message"].lower()


def test_null_persona_fields_take_their_defaults(server):
    persona = {"steer": [{"vector": "evil", "coef": 3.0, "layer": None, "positions": None}], "cap": None,
               "monitor": None, "guard": None}
    code, answer = post(server, chat_body(persona=persona, max_tokens=10, temperature=0))
    lm, evil = server["lm"], server["vectors"]["evil"]
    assert code == 200
    assert answer["choices"][0]["message"]["content"] == text(lm, local(lm, [Edit(1, evil.get(1), 3.0,
                                                                                   positions=STEER_POSITIONS)]))


def test_null_settings_take_their_defaults(server):
    answer = ask(server, temperature=None, top_p=None, seed=None, n=None, stream=None, max_tokens=None,
                 max_completion_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 4


def test_a_body_that_is_not_sent_as_json_is_refused(server):
    """A keyless server on a laptop: a page of another site could POST a form or text/plain (no CORS preflight);
    only application/json is read."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": kind} if kind else {})}
        req = urllib.request.Request(f"{server['url']}/chat/completions", method="POST", data=body, headers=headers)
        if kind is None:  # urllib adds a form type to any body: take it out
            req.remove_header("Content-type")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 415 and "application/json" in json.load(e.value)["error"]["message"], kind


def status(server) -> dict:
    req = urllib.request.Request(f"{server['url']}/persona/status", headers={"Authorization": f"Bearer {KEY}"})
    return json.load(urllib.request.urlopen(req))


def test_a_guard_stops_the_answer_at_the_first_crossing(server):
    lm = server["lm"]
    free = ask(server, {"monitor": ["evil"]}, max_tokens=12).model_extra["persona"]["evil"]["tokens"]
    j = max(range(min(8, len(free))), key=lambda i: free[i])  # the largest of the first readings
    threshold = free[j] - 1e-3  # first crossed at j
    guard = {"vector": "evil", "threshold": threshold, "action": "stop", "over": "token"}
    guarded = ask(server, {"guard": guard}, max_tokens=12)
    assert guarded.choices[0].finish_reason == "persona_guard"
    assert guarded.choices[0].message.content == text(lm, local(lm, max_tokens=12)[: j + 1])
    evil = guarded.model_extra["persona"]["evil"]
    assert evil["guard_triggered"] and len(evil["tokens"]) == j + 1


def test_a_guard_that_steers_lowers_every_later_reading(server):
    free = ask(server, {"monitor": ["evil"]}, max_tokens=12).model_extra["persona"]["evil"]["tokens"]
    j = max(range(min(8, len(free) - 1)), key=lambda i: free[i])
    guard = {"vector": "evil", "threshold": free[j] - 1e-3, "action": "steer", "coef": -4.0, "over": "token"}
    guarded = ask(server, {"guard": guard, "monitor": [{"vector": "evil", "where": "after"}]}, max_tokens=12)
    evil = guarded.model_extra["persona"]["evil"]
    assert evil["guard_triggered"] and guarded.choices[0].finish_reason != "persona_guard"
    assert evil["tokens"][: j + 1] == pytest.approx(free[: j + 1], abs=1e-4)  # the same answer up to the crossing
    later = guarded.model_extra["persona"]["evil@after"]["tokens"][j + 1:]  # after the guard's own edit
    assert later and max(later) < min(free[j + 1:])  # -4 v from the next token on lowers every later reading


def test_readings_name_where_they_are_taken_and_the_guard_reads_before_the_requests_edits(server):
    """Steered +3 at the read layer: the before-edit reading of the first token is the unsteered one exactly, the
    after-edit one is coef·‖v‖ higher; a guard above every before-edit reading of the steered answer (but below
    its after-edit ones) does not stop it, the same guard on the after-edit reading does."""
    v = server["vectors"]["evil"].get(1)
    steer = [{"vector": "evil", "coef": 3.0, "positions": "all"}]
    both = ["evil", {"vector": "evil", "where": "after"}]
    plain = ask(server, {"monitor": both}, max_tokens=8).model_extra["persona"]
    got = ask(server, {"steer": steer, "monitor": both}, max_tokens=8).model_extra["persona"]
    assert set(got) == {"evil", "evil@after"}
    assert (got["evil"]["where"], got["evil@after"]["where"]) == ("before", "after")
    assert got["evil@after"]["vector"] == "evil"
    assert "raw residual units" in got["evil"]["unit"] and got["evil"]["layer"] == 1
    assert got["evil"]["tokens"][0] == plain["evil"]["tokens"][0]
    assert got["evil@after"]["tokens"][0] - plain["evil@after"]["tokens"][0] == pytest.approx(3 * float(v.norm()),
                                                                                                abs=1e-3)
    threshold = max(got["evil"]["tokens"]) + 1e-3
    assert max(got["evil@after"]["tokens"]) > threshold
    for where, stops in (("before", False), ("after", True)):
        guard = {"vector": "evil", "threshold": threshold, "where": where, "over": "token"}
        guarded = ask(server, {"steer": steer, "guard": guard}, max_tokens=8)
        assert (guarded.choices[0].finish_reason == "persona_guard") == stops, where
        key = "evil" if where == "before" else "evil@after"
        assert guarded.model_extra["persona"][key]["guard_triggered"] == stops
    for chunk in ask(server, {"steer": steer, "monitor": both}, stream=True, max_tokens=4):
        persona = (chunk.model_extra or {}).get("persona")
        assert persona is None or set(persona) == {"evil", "evil@after"}


def test_a_dropped_stream_frees_its_slot(server):
    seed = next(s for s in range(40) if ask(server, max_tokens=200, temperature=1.0, seed=s)
                .choices[0].finish_reason == "length")  # an answer that would run 200 tokens
    before = status(server)["cancelled"]
    stream = ask(server, stream=True, max_tokens=200, temperature=1.0, seed=seed)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    t0 = time.time()
    while (status(server)["cancelled"] == before or status(server)["in_flight"]) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert status(server) == {**status(server), "cancelled": before + 1, "in_flight": 0}


def test_a_caller_that_leaves_before_a_whole_answer_frees_its_slot(server):
    """Not streaming: the caller closes its connection while the answer is being generated."""
    seed = next(s for s in range(40) if ask(server, max_tokens=200, temperature=1.0, seed=s)
                .choices[0].finish_reason == "length")
    before = status(server)["cancelled"]
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 200, "temperature": 1.0,
                       "seed": seed}).encode()
    host, port = server["url"].split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        t0 = time.time()
        while not status(server)["in_flight"] and time.time() - t0 < 10:
            time.sleep(0.01)
    t0 = time.time()
    while (status(server)["cancelled"] == before or status(server)["in_flight"]) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert status(server) == {**status(server), "cancelled": before + 1, "in_flight": 0}


def test_the_servers_default_policy_applies_unless_a_request_sets_its_own(server):
    lm, kind = server["lm"], server["vectors"]["kind"]
    root = server["root"]
    proc, url = start(root, ["--vector", str(root / "evil.safetensors"), "--vector", str(root / "kind.safetensors"),
                             "--cap", "kind=0.5", "--guard", "evil:1e6:stop", "--max-waiting", "1"])
    try:
        client = openai.OpenAI(base_url=url, api_key="unused")
        kw = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0)
        default = client.chat.completions.create(**kw)
        assert default.choices[0].message.content == text(lm, local(lm, [Edit(2, kind.get(2), 0.5, kind="cap")]))
        assert default.model_extra["persona"]["evil"]["guard_triggered"] is False
        own = client.chat.completions.create(**kw, extra_body={"persona": {"cap": [], "guard": None}})
        assert own.choices[0].message.content == text(lm, local(lm))
        # one request in flight is all --max-waiting 1 allows: the next gets 503 with Retry-After (the second
        # client is made first: on two busy cores making it took longer than the tiny model's 200 tokens)
        busy = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(**{**kw, "max_tokens": 200}, stream=True)
        next(iter(stream))
        with pytest.raises(openai.APIStatusError) as e:
            busy.chat.completions.create(**kw)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        stream.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "personavec.cli", "serve", "--model", str(root / "model"), "--vector",
                          str(root / "evil.safetensors"), "--guard", "evil:high:stop"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--guard" in bad.stderr
    zero = torch.zeros(3, 32)
    zero[2] = 1.0  # a vector with a direction at layer 2 but none at its chosen layer 1
    flat_vector = PersonaVector({"response_avg": zero}, model_id="tiny-llama", trait="flat", chosen_layer=1)
    flat_vector.save(root / "flat.safetensors")
    flat = subprocess.run([sys.executable, "-m", "personavec.cli", "serve", "--model", str(root / "model"), "--vector",
                           str(root / "flat.safetensors")], capture_output=True, text=True, timeout=120)
    assert flat.returncode == 2 and len(flat.stderr.strip().splitlines()) == 1 and "zero" in flat.stderr
    with socket.socket() as taken:  # a port another process listens on: one line, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([sys.executable, "-m", "personavec.cli", "serve", "--model", str(root / "model"),
                               "--port", str(taken.getsockname()[1])], capture_output=True, text=True)
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1 and "cannot listen" in busy.stderr
