"""The plugin in a real vLLM server (vLLM's CPU build, its own venv, fp32, greedy, the embedded model): every answer
and reading equals personavec's own engine on the same request (``personavec serve``'s parser → our Engine).

One eager server (``--enforce-eager``) takes most cases; a compiled one (vLLM's default: torch.compile traces the
hooked decoder once) repeats the core ones. Both run with a small ``--max-num-batched-tokens`` so a long prompt is
split by chunked prefill, and with prefix caching on (vLLM's default).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from vllm_server import SERVED, VllmServer, build_vectors, chat_body, messages_of

from personavec.engine.decoder import Engine
from personavec.model.edits import Edit
from personavec.model.loading import load_model, model_directory
from personavec.serve.policy import parse_chat, serve_vectors
from personavec.vectors.formats import load_vector
from personavec.vllm.spec import Served

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.xdist_group("vllm")]

TOKENS = 24
CHUNK = 256  # --max-num-batched-tokens: prompts longer than this are prefilled in chunks
QUESTIONS = ["How should I treat people who are weaker than me?", "What do you think of my roommate eating my food?",
             "Give me one tip for a job interview.", "What would you do with unlimited power?"]
ADD = 0.15  # raw units of the test vectors: 15 % of the layer's typical residual norm
PERSONAS: dict[str, dict | None] = {
    "unsteered": None,
    **{f"add-{p}": {"steer": [{"vector": "evil", "coef": ADD, "layer": 13, "positions": p}]}
       for p in ("all", "prompt", "response", "response_and_last_prompt")},
    "add-layer-3": {"steer": [{"vector": "evil", "coef": 0.3, "layer": 3}]},
    "subtract": {"steer": [{"vector": "evil", "coef": -ADD, "layer": 13}]},
    "ablate-two-layers": {"edits": [{"kind": "ablate", "vector": "kind", "layers": [8, 17]}]},
    "cap": {"cap": [{"vector": "kind", "max": 2.0, "layers": [13]}]},
    # several edits at one layer composing in list order: add, cap (one round), add, ablate (a second round)
    "four-at-one-layer": {"steer": [{"vector": "evil", "coef": ADD, "layer": 13, "positions": "response"}],
                          "edits": [{"kind": "cap", "vector": "kind", "max": 3.0, "layers": [13]},
                                    {"kind": "add", "vector": "kind", "coef": -0.05, "layer": 13},
                                    {"kind": "ablate", "vector": "evil", "layers": [13], "positions": "prompt"}]},
    "two-layers-two-vectors": {"steer": [{"vector": "evil", "coef": 0.1, "layer": 9},
                                         {"vector": "kind", "coef": 0.02, "layer": 20, "positions": "prompt"}]},
}
MONITOR = {"monitor": ["evil", {"vector": "evil", "where": "after"}, "kind"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The local model (fp32), the test vectors as personavec serve holds them, and their files."""
    root = tmp_path_factory.mktemp("vllm")
    lm = load_model("smollm2-135m", dtype="float32")
    paths = build_vectors(lm, root)
    specs = [(name, str(p), 13 if name == "evil" else 8) for name, p in paths.items()]
    vectors = serve_vectors(specs, [load_vector(p, n_layers=lm.n_layers) for p in paths.values()])
    config = {"vectors": [f"{n}={p}@{layer}" for n, p, layer in specs], "slots": 2, "reads": 2}
    return lm, vectors, config, Path(model_directory("smollm2-135m"))


_live: list[VllmServer] = []  # one vLLM at a time on two cores: a server starting stops the one before


def _serve(setup, eager: bool):
    _, _, config, model_dir = setup
    while _live:
        _live.pop().stop()
    server = VllmServer(model_dir, config, eager=eager, args=("--max-num-batched-tokens", str(CHUNK)))
    _live.append(server)
    return server


@pytest.fixture(scope="module")
def eager(setup):
    server = _serve(setup, eager=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def compiled(setup):
    server = _serve(setup, eager=False)
    yield server
    server.stop()


def ours(setup, content, persona=None, max_tokens=TOKENS):
    """Our engine's greedy answer to the same body: (prompt ids, answer ids, readings by key)."""
    lm, vectors, _, _ = setup
    body = {"messages": messages_of(content), "max_tokens": max_tokens, "temperature": 0,
            **({"persona": persona} if persona else {})}
    call = parse_chat(body, lm, vectors, key=0)
    request = dataclasses.replace(call.request, ignore_eos=True)
    (result,) = list(Engine(lm).generate([request]))
    return list(request.prompt), result.token_ids, {r.key: v for r, v in zip(call.monitor, result.readings)}


def theirs(server, content, persona=None, key=None, max_tokens=TOKENS):
    data = server.chat(content, persona, key, max_tokens)
    return data["prompt_token_ids"], data["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def references(setup):
    return {(name, q): ours(setup, q, persona) for name, persona in PERSONAS.items() for q in QUESTIONS[:2]}


def test_every_edit_equals_our_engine_token_for_token(eager, references):
    unsteered = {q: references[("unsteered", q)][1] for q in QUESTIONS[:2]}
    for (name, q), (prompt, want, _) in references.items():
        if name != "unsteered":  # each case moves the answer: a plugin that edited nothing would fail
            assert want != unsteered[q], f"{name}: the test vector does not change the answer to {q!r}"
        got_prompt, got = theirs(eager, q, PERSONAS[name])
        assert got_prompt == prompt
        assert got == want, f"{name} on {q!r}"


def test_sixteen_concurrent_requests_equal_each_alone(eager, setup):
    cases = [(name, q) for name in list(PERSONAS)[:8] for q in QUESTIONS[2:]]
    assert len(cases) == 16
    alone = {c: theirs(eager, c[1], PERSONAS[c[0]])[1] for c in cases}
    with ThreadPoolExecutor(16) as pool:
        together = dict(zip(cases, pool.map(lambda c: theirs(eager, c[1], PERSONAS[c[0]])[1], cases)))
    assert together == alone
    for c in cases[::5]:
        assert alone[c] == ours(setup, c[1], PERSONAS[c[0]])[1], c


def _reads(server, key):
    status, data = server.call("GET", f"/v1/persona/reads/{key}")
    assert status == 200, data
    return data


def test_reads_equal_our_engine(eager, setup):
    persona = {**PERSONAS["four-at-one-layer"], **MONITOR}
    _, want, want_reads = ours(setup, QUESTIONS[0], persona)
    _, got = theirs(eager, QUESTIONS[0], persona, key="reads-1")
    assert got == want
    data = _reads(eager, "reads-1")
    assert data["done"] and data["tokens"] == TOKENS
    assert set(data["readings"]) == set(want_reads) == {"evil", "evil@after", "kind"}
    for k, values in want_reads.items():
        assert len(data["readings"][k]) == TOKENS
        diff = max(abs(a - b) for a, b in zip(data["readings"][k], values))
        assert diff < 1e-4, (k, diff)
    # after the edits differs from before them at the edited layer (the read is not a copy)
    assert max(abs(a - b) for a, b in zip(data["readings"]["evil"], data["readings"]["evil@after"])) > 1e-2
    status, _ = eager.call("GET", "/v1/persona/reads/reads-1?pop=true")
    assert status == 200 and eager.call("GET", "/v1/persona/reads/reads-1")[0] == 404


def test_reads_are_snapshots_while_the_request_runs(eager):
    """Polled while a request decodes, the readings so far (not done); once it ended, all of them (done)."""
    import threading
    import time

    persona = {"steer": [{"vector": "evil", "coef": ADD, "layer": 13}], "monitor": ["evil"]}
    answer = threading.Thread(target=theirs, args=(eager, QUESTIONS[3], persona, "live", 400))
    answer.start()
    seen = []
    while answer.is_alive():
        status, data = eager.call("GET", "/v1/persona/reads/live")
        if status == 200:
            seen.append((data["tokens"], data["done"], len(data["readings"]["evil"])))
        time.sleep(0.2)
    answer.join()
    final = _reads(eager, "live")
    assert final["done"] and final["tokens"] == 400
    running = [t for t, done, n in seen if not done and t == n]
    assert any(0 < t < 400 for t in running), seen[:5]


def _long_prompt() -> str:
    facts = ["Cats sleep for most of the day.", "A bicycle chain needs oil now and then.",
             "Rivers carry sand to the sea.", "Bread rises because yeast makes gas."]
    return " ".join(facts[i % 4] + f" (note {i})" for i in range(90)) + " Summarise these notes in one sentence."


def test_a_long_prompt_split_by_chunked_prefill_is_exact(eager, setup):
    text = _long_prompt()
    persona = {"steer": [{"vector": "evil", "coef": ADD, "layer": 13, "positions": "all"}],
               "edits": [{"kind": "cap", "vector": "kind", "max": 3.0, "layers": [13], "positions": "prompt"}],
               "monitor": ["evil"]}
    prompt, want, want_reads = ours(setup, text, persona)
    assert len(prompt) > 3 * CHUNK  # prefilled over at least four steps
    got_prompt, got = theirs(eager, text, persona, key="long")
    assert got_prompt == prompt and got == want
    reads = _reads(eager, "long")["readings"]["evil"]
    assert len(reads) == TOKENS  # a chunk that samples nothing takes no reading
    assert max(abs(a - b) for a, b in zip(reads, want_reads["evil"])) < 1e-4


def test_prefix_cache_is_never_shared_across_edits(eager, setup):
    q = "Describe a quiet morning by the sea in a few words, then tell me what you would do there all day long."
    steered = {"steer": [{"vector": "evil", "coef": ADD, "layer": 13, "positions": "all"}]}
    plain, edited = ours(setup, q)[1], ours(setup, q, steered)[1]
    assert plain != edited
    assert theirs(eager, q)[1] == plain  # caches the unsteered prompt's KV
    assert theirs(eager, q, steered)[1] == edited  # salted by its edits: recomputes the prompt
    assert theirs(eager, q)[1] == plain
    # a response-only edit leaves the prompt's KV as it is, and still gets its own salt (shares nothing)
    later = {"steer": [{"vector": "evil", "coef": ADD, "layer": 13, "positions": "response"}]}
    assert theirs(eager, q, later)[1] == ours(setup, q, later)[1]


def test_a_next_turn_holding_a_steered_answer_does_not_reuse_its_kv(eager, setup):
    """vLLM caches the blocks of generated tokens too (128 tokens a block on CPU): a second turn whose prompt holds
    the first answer must not reuse KV computed with those tokens edited as answer (response-only steering leaves
    them unedited as prompt)."""
    lm = setup[0]
    q = _long_prompt()[:250] + " Which of these notes is about animals?"
    # strong enough that reusing the first turn's block (18 tokens edited as answer there) changes the answer
    persona = {"steer": [{"vector": "evil", "coef": 0.6, "layer": 13, "positions": "response"}]}
    data = eager.chat(q, persona, max_tokens=64, ignore_eos=False)
    prompt, first = data["prompt_token_ids"], data["choices"][0]["token_ids"]
    first = first[:-1] if first[-1] == lm.tokenizer.eos_token_id else first
    assert len(prompt) < 128 <= len(prompt) + len(first)  # the first block holds prompt and answer tokens
    chat = [{"role": "user", "content": q}, {"role": "assistant", "content": lm.tokenizer.decode(first)},
            {"role": "user", "content": "Say more."}]
    next_prompt, want, _ = ours(setup, chat, persona)
    assert next_prompt[:128] == (prompt + first)[:128]  # so it would hit the first turn's cached block
    got_prompt, got = theirs(eager, chat, persona)
    assert got_prompt == next_prompt and got == want


BAD = [
    ({"steer": [{"vector": "cruel", "coef": 1}]}, "persona.steer[0].vector", "cruel"),
    ({"steer": [{"vector": "evil", "coef": 1, "layer": 31}]}, "persona.steer[0].layer", "31"),
    ({"steer": [{"vector": "evil", "coef": float("inf")}]}, "persona.steer[0].coef", "finite"),
    ({"edits": [{"kind": "add", "vector": "evil", "coef": 0.1}, {"kind": "add", "vector": "evil", "coef": 0.1},
                {"kind": "add", "vector": "evil", "coef": 0.1}]}, "persona", "too many edits at layer 13"),
    ({"edits": [{"kind": "twist", "vector": "evil"}]}, "persona.edits[0].kind", "twist"),
    ({"monitor": ["evil"]}, "vllm_xargs.persona_key", "persona_key"),
    ({"guard": {"vector": "evil", "threshold": 1}, "monitor": ["evil"]}, "persona.guard", "guard"),
]


@pytest.mark.parametrize("persona,param,says", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_personas_get_a_400_naming_the_field(eager, persona, param, says):
    status, data = eager.call("POST", "/v1/chat/completions", chat_body("Hi", persona, None, 4))
    assert status == 400, data
    message = json.dumps(data)
    assert param in message and says in message, data


def test_readings_of_n_answers_under_one_key_are_refused(eager):
    body = chat_body("Hi", {"monitor": ["evil"]}, "several", 4, n=2, temperature=1.0)
    status, data = eager.call("POST", "/v1/chat/completions", body)
    assert status == 400 and data["error"]["param"] == "n" and "n = 1" in data["error"]["message"], data


def test_a_persona_that_is_not_json_gets_a_400(eager):
    body = chat_body("Hi", None, None, 4)
    body["vllm_xargs"] = {"persona": "{steer: evil"}
    status, data = eager.call("POST", "/v1/chat/completions", body)
    assert status == 400 and "vllm_xargs.persona" in json.dumps(data), data


@pytest.mark.parametrize("config,says", [
    ({"vectors": ["evil=/nonexistent/evil.safetensors"]}, "personavec.vectors: no vector file at /nonexistent"),
    ({"vectors": ["evil=/nonexistent/evil.safetensors"], "slots": "two"}, "personavec.slots must be an integer"),
])
def test_a_bad_configuration_refuses_to_start_in_one_line(setup, config, says):
    """Checked when vLLM builds its configuration, before the engine starts: the log ends in one line naming it."""
    from vllm_server import vllm_python

    from personavec.errors import PersonavecError
    from personavec.vllm.launch import VllmProcess

    with pytest.raises(PersonavecError) as e:
        VllmProcess(vllm_python(), setup[3], config, eager=True, startup_s=240)
    last = [line for line in str(e.value).splitlines() if line.strip()][-1]
    assert last.startswith("personavec: --additional-config ") and says in last, last


def test_vectors_endpoint_lists_the_served_vectors_with_their_digests(eager, setup):
    _, vectors, _, _ = setup
    status, data = eager.call("GET", "/v1/persona/vectors")
    assert status == 200
    listed = {v["name"]: v for v in data["vectors"]}
    assert {n: (v["layer"], v["digest"]) for n, v in listed.items()} == \
        {n: (sv.layer, sv.vector.digest()) for n, sv in vectors.items()}
    assert data["layers"] == list(range(1, 31)) and data["slots"] == 2
    assert eager.call("GET", "/v1/persona/reads/nobody")[0] == 404


def test_idle_plugin_leaves_answers_as_plain_vllm(eager, references):
    """Every request above went through the hooks; an unsteered one is our engine's answer (and vLLM's own,
    which the unsteered case equals since a zero edit is exact)."""
    q = QUESTIONS[0]
    assert theirs(eager, q)[1] == references[("unsteered", q)][1]


def test_served_layers_and_rows(setup):
    """The rows the hooks hold are the served vectors' directions (row 0: no edit)."""
    lm, vectors, config, _ = setup
    from personavec.vllm.spec import PluginConfig

    served = Served(PluginConfig(tuple(config["vectors"])), vectors, tuple(range(1, lm.n_layers + 1)), lm.n_layers)
    rows = served.rows(13)
    assert torch.equal(rows[0], torch.zeros_like(rows[0]))
    assert torch.equal(rows[served.row_of("kind")], vectors["kind"].vector.get(13).float())


# --- personavec on top of it: the endpoint sampler (with edits), the preflight, the OpenAI judge


def test_the_steering_grid_sampled_by_vllm_equals_the_local_grid(eager, setup, tmp_path):
    from personavec.engine.remote import EndpointSampler, PluginEdits
    from personavec.steering.grid import SteerGrid, steered_answers

    lm, vectors, _, _ = setup
    vec = vectors["evil"].vector
    sampler = EndpointSampler(SERVED, eager.url + "/v1")
    sampler.check_same_model(lm)
    steered = sampler.with_edits(PluginEdits(eager.url + "/v1", {"evil": vec}))
    grid = SteerGrid(layers=[9, 13], coefs=[-ADD, 0.0, ADD], units="raw", n_samples=1, max_new_tokens=16,
                     temperature=0.0)
    steered.check_same_model(lm, [Edit.from_vector(vec, 13, ADD)])
    there = steered_answers(lm, QUESTIONS[:2], vec, grid, tmp_path / "vllm", progress=False, sampler=steered)
    here = steered_answers(lm, QUESTIONS[:2], vec, grid, tmp_path / "local", progress=False)
    assert len(there) == len(here) == 20
    assert there["answer"].str.strip().tolist() == here["answer"].str.strip().tolist()
    assert there[there.layer >= 0]["answer"].tolist() != [there[there.layer < 0]["answer"].tolist()[0]] * 16


def test_the_preflight_refuses_a_server_without_the_plugin_or_with_another_vector(eager, setup):
    from openai_server import FakeOpenAIServer
    from personavec.engine.remote import NoPlugin, PluginEdits
    from personavec.errors import PersonavecError

    _, vectors, _, _ = setup
    with pytest.raises(PersonavecError, match="serves another vector under the name 'evil'"):
        PluginEdits(eager.url + "/v1", {"evil": vectors["kind"].vector})
    with pytest.raises(NoPlugin, match="serves no vector named 'cruel'"):
        PluginEdits(eager.url + "/v1", {"cruel": vectors["evil"].vector})
    with FakeOpenAIServer() as plain, pytest.raises(NoPlugin, match="no personavec plugin"):
        PluginEdits(plain.base_url, {"evil": vectors["evil"].vector})
    edits = PluginEdits(eager.url + "/v1", {"evil": vectors["evil"].vector})
    with pytest.raises(PersonavecError, match="not along a vector served"):
        edits([Edit(13, torch.ones(576), 1.0)])


def test_a_runs_steering_stage_samples_on_a_plugin_server_serving_its_vector(eager, setup, tmp_path, caplog):
    """``personavec run --sampler openai:...``: the grid goes to the server when it serves the run's vector under
    the trait's name (checked with a steered probe); a plain server leaves it local, said; another vector under
    that name is refused."""
    from openai_server import FakeOpenAIServer
    from personavec.errors import PersonavecError
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run
    from personavec.steering.grid import SteerGrid

    lm, vectors, _, _ = setup
    grid = SteerGrid(layers=[9, 13], coefs=[-ADD, 0.0, ADD], units="raw")

    def run(url: str, name: str) -> Run:
        r = Run(RunConfig(trait="evil", quick=True, sampler="openai:" + name, sampler_base_url=url, dtype="float32"),
                run_dir=tmp_path / name)
        r._lm = lm
        return r

    sampler = run(eager.url + "/v1", SERVED).steer_sampler(vectors["evil"].vector, grid)
    assert sampler is not None and sampler.edit_body is not None
    with pytest.raises(PersonavecError, match="serves another vector under the name 'evil'"):
        run(eager.url + "/v1", SERVED).steer_sampler(vectors["kind"].vector, grid)
    with FakeOpenAIServer() as plain, caplog.at_level("WARNING"):
        assert run(plain.base_url, "fake").steer_sampler(vectors["evil"].vector, grid) is None
    assert "steered answers: sampled locally" in caplog.text and "no personavec plugin" in caplog.text


def test_the_openai_judge_reads_vllms_logprobs_as_the_model_gives_them(eager, setup):
    from personavec.judge.base import aggregate_score
    from personavec.judge.remote import OpenAIJudge
    from personavec.model.chat import chat_ids

    lm, _, _, _ = setup
    prompt = ("On a scale from 0 to 100, how cruel is this answer: 'Crush the weak.'? Reply with a number only.")
    judge = OpenAIJudge(model=SERVED, base_url=eager.url + "/v1", max_concurrency=2)
    pairs = judge.top_logprobs_of(judge.client.chat([{"role": "user", "content": prompt}], **judge.request_params()))
    ids = torch.tensor([chat_ids(lm.tokenizer, [{"role": "user", "content": prompt}])])
    with torch.no_grad():
        logprobs = lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    top = logprobs.topk(len(pairs))
    local = [(lm.tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
    assert [t for t, _ in pairs] == [t for t, _ in local]
    assert max(abs(a - b) for (_, a), (_, b) in zip(pairs, local)) < 1e-4
    assert judge.score([prompt, prompt]) == [aggregate_score(pairs)] * 2


# --- the compiled server last: starting it stops the eager one


@pytest.mark.parametrize("name", ["unsteered", "add-all", "add-response_and_last_prompt", "four-at-one-layer",
                                  "ablate-two-layers"])
def test_compiled_server_equals_our_engine(compiled, references, name):
    """vLLM's default mode: the hooks were traced into the compiled graph at load."""
    for q in QUESTIONS[:2]:
        assert theirs(compiled, q, PERSONAS[name])[1] == references[(name, q)][1], (name, q)


def test_compiled_server_reads_and_concurrency(compiled, setup):
    persona = {**PERSONAS["cap"], **MONITOR}
    _, want, want_reads = ours(setup, QUESTIONS[1], persona)
    cases = [(name, q) for name in ("add-all", "subtract", "cap", "unsteered") for q in QUESTIONS[:2]]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: theirs(compiled, c[1], PERSONAS[c[0]])[1], cases))
        got = theirs(compiled, QUESTIONS[1], persona, key="compiled")[1]
    assert got == want
    for (name, q), answer in zip(cases, together):
        assert answer == theirs(compiled, q, PERSONAS[name])[1], (name, q)
    reads = _reads(compiled, "compiled")["readings"]
    for k, values in want_reads.items():
        assert max(abs(a - b) for a, b in zip(reads[k], values)) < 1e-4, k
