"""LLM judges: logprob aggregation, the OpenAI-compatible client and judge against a real local HTTP server,
retries, concurrency, and the on-disk score cache."""

from __future__ import annotations

import math
import socket
import time

import pytest

from openai_server import FakeOpenAIServer
from personavec.endpoint import ChatClient, EndpointConfig
from personavec.errors import PersonavecError
from personavec.judge.base import Judge, aggregate_score
from personavec.judge.cache import CachedJudge, JudgeCache
from personavec.judge.remote import OpenAIJudge

LN = math.log


def make_judge(base_url: str, *, api_key: str | None = None, max_retries: int = 3, timeout: float = 5.0,
               **kwargs) -> OpenAIJudge:
    cfg = EndpointConfig(base_url=base_url, api_key=api_key, model="fake-judge", timeout=timeout,
                         max_retries=max_retries)
    return OpenAIJudge(client=ChatClient(cfg), **kwargs)


def score_responder(prompt: str) -> list[tuple[str, float]]:
    """'score N' -> p(N)=0.6, p(' N+10')=0.3, p('Hmm')=0.1: expected (0.6·N + 0.3·(N+10)) / 0.9 = N + 10/3.
    'REFUSE' -> mostly a refusal token; the integer mass (0.1 + 0.05) is below 0.25."""
    if "REFUSE" in prompt:
        return [("REF", LN(0.8)), ("50", LN(0.1)), ("60", LN(0.05)), ("I", LN(0.05))]
    if "BOOM" in prompt:
        raise RuntimeError("boom")
    n = int(prompt.split()[-1])
    time.sleep(0.002 * (n % 5))  # completions arrive out of order
    return [(str(n), LN(0.6)), (f" {n + 10}", LN(0.3)), ("Hmm", LN(0.1))]


def expected(n: int) -> float:
    return n + 10 / 3


@pytest.fixture
def server():
    with FakeOpenAIServer(score_responder) as srv:
        yield srv


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


# --- aggregation -----------------------------------------------------------------------------------------------

def test_aggregate_hand_computed():
    # (0.5·90 + 0.3·80) / 0.8 = 69 / 0.8 = 86.25; "Hello" is ignored
    dist = {"90": LN(0.5), "80": LN(0.3), "Hello": LN(0.2)}
    assert aggregate_score(dist) == pytest.approx(86.25)
    assert aggregate_score(list(dist.items())) == pytest.approx(86.25)


def test_aggregate_ignores_non_integers_and_out_of_range():
    dist = [("1.5", LN(0.1)), ("-3", LN(0.1)), ("101", LN(0.1)), ("REF", LN(0.1)), ("1e2", LN(0.05)),
            (" 40", LN(0.3)), ("0", LN(0.1)), ("100\n", LN(0.1))]
    # integer tokens: 40 (0.3), 0 (0.1), 100 (0.1) -> (12 + 0 + 10) / 0.5 = 44
    assert aggregate_score(dist) == pytest.approx(44.0)


def test_aggregate_duplicates_add():
    # "85" and " 85" are the same number: (0.5·85 + 0.5·70) / 1.0 = 77.5
    assert aggregate_score([("85", LN(0.3)), (" 85", LN(0.2)), ("70", LN(0.5))]) == pytest.approx(77.5)


def test_aggregate_missing_when_integer_mass_is_small():
    refusal = {"REF": LN(0.8), "50": LN(0.1), "60": LN(0.05), "I": LN(0.05)}
    assert aggregate_score(refusal) is None
    assert aggregate_score(refusal, min_mass=0.1) == pytest.approx((5 + 3) / 0.15)
    assert aggregate_score({"30": LN(0.25), "No": LN(0.75)}) == pytest.approx(30.0)  # exactly at the threshold
    assert aggregate_score({}) is None
    assert aggregate_score({"Sure": 0.0}) is None


# --- the judge end to end ---------------------------------------------------------------------------------------

def test_openai_judge_scores_in_order(server):
    judge = make_judge(server.base_url, max_concurrency=4)
    assert isinstance(judge, Judge)
    assert judge.name == f"openai:fake-judge@{server.base_url}"
    ns = [10, 3, 77, 42, 0, 90, 55]
    prompts = [f"Rate this. score {n}" for n in ns] + ["Rate this. REFUSE"]
    scores = judge.score(prompts)
    assert scores[:-1] == pytest.approx([expected(n) for n in ns])
    assert scores[-1] is None
    reqs = server.chat_requests
    assert len(reqs) == len(prompts)
    body = reqs[0].body
    assert body["model"] == "fake-judge"
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["seed"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    assert sorted(r.body["messages"][0]["content"] for r in reqs) == sorted(prompts)


def test_on_result_callback_and_progress(server):
    judge = make_judge(server.base_url, max_concurrency=2)
    seen = {}
    scores = judge.score([f"score {n}" for n in range(5)], progress="test", on_result=seen.__setitem__)
    assert seen == dict(enumerate(scores))
    assert judge.score([]) == []


def test_chat_text_and_bearer_token(server):
    client = ChatClient(EndpointConfig(base_url=server.base_url + "/", api_key="sk-test-123", model="m"))
    assert client.chat_text([{"role": "user", "content": "score 7"}]) == "7"
    headers = {k.lower(): v for k, v in server.chat_requests[-1].headers.items()}
    assert headers["authorization"] == "Bearer sk-test-123"
    assert server.chat_requests[-1].path == "/v1/chat/completions"

    anon = ChatClient(EndpointConfig(base_url=server.base_url, api_key=None, model="m"))
    anon.chat([{"role": "user", "content": "score 7"}])  # no key: the placeholder that keyless servers ignore
    assert {k.lower(): v for k, v in server.chat_requests[-1].headers.items()}["authorization"] == "Bearer EMPTY"


def test_endpoint_config_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("PERSONAVEC_JUDGE_MODEL", "env-model")
    cfg = EndpointConfig.from_env()
    assert (cfg.base_url, cfg.api_key, cfg.model) == ("http://127.0.0.1:9/v1", "sk-env", "env-model")
    cfg = EndpointConfig.from_env(model="m", base_url="http://x/v1", api_key="k")
    assert (cfg.base_url, cfg.api_key, cfg.model) == ("http://x/v1", "k", "m")
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "PERSONAVEC_JUDGE_MODEL"):
        monkeypatch.delenv(var)
    cfg = EndpointConfig.from_env()
    assert (cfg.base_url, cfg.api_key, cfg.model) == ("https://api.openai.com/v1", None, "gpt-4.1-mini")


# --- retries and errors -----------------------------------------------------------------------------------------

def test_retries_after_500_and_429(server):
    judge = make_judge(server.base_url)
    server.fail_next(500)
    server.fail_next(429, retry_after=2)
    t0 = time.monotonic()
    assert judge.score(["score 20"]) == pytest.approx([expected(20)])
    assert len(server.chat_requests) == 3  # 500, 429, then the answer
    assert time.monotonic() - t0 >= 2.0  # Retry-After honoured
    retries = [{k.lower(): v for k, v in r.headers.items()}.get("x-stainless-retry-count")
               for r in server.chat_requests]
    assert retries == ["0", "1", "2"]  # the SDK's own retries


def test_retries_exhausted(server):
    judge = make_judge(server.base_url, max_retries=2)
    server.fail_next(503, 503, 503, 503)
    with pytest.raises(PersonavecError) as err:
        judge.score(["score 1"])
    msg = str(err.value)
    assert "\n" not in msg and "after 3 tries" in msg and "HTTP 503" in msg
    assert len(server.chat_requests) == 3


def test_non_retryable_400_fails_fast(server):
    judge = make_judge(server.base_url, max_retries=6)
    server.fail_next(400, body='{"error": {"message": "top_logprobs must be\\n<= 5"}}')
    t0 = time.monotonic()
    with pytest.raises(PersonavecError, match="HTTP 400") as err:
        judge.score(["score 1"])
    assert time.monotonic() - t0 < 2
    assert "\n" not in str(err.value) and "top_logprobs must be <= 5" in str(err.value)
    assert len(server.chat_requests) == 1


def test_unauthorized_mentions_api_key(server):
    server.fail_next(401)
    with pytest.raises(PersonavecError, match="OPENAI_API_KEY"):
        make_judge(server.base_url).score(["score 1"])


def test_unreachable_endpoint_one_line_error():
    url = closed_port_url()
    judge = make_judge(url, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(PersonavecError) as err:
        judge.score(["score 1"])
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg
    assert url in msg and "unreachable after 3 tries" in msg and "--judge-base-url" in msg


def test_timeout_is_retried_then_reported():
    with FakeOpenAIServer(score_responder, delay=0.5) as srv:
        judge = make_judge(srv.base_url, max_retries=1, timeout=0.1)
        with pytest.raises(PersonavecError, match="timed out") as err:
            judge.score(["score 1"])
        assert "\n" not in str(err.value)
        assert len(srv.chat_requests) == 2


def test_endpoint_without_logprobs_is_an_error():
    with FakeOpenAIServer(score_responder, logprobs=False) as srv, pytest.raises(PersonavecError, match="logprobs"):
        make_judge(srv.base_url).score(["score 1"])


def test_concurrency_is_bounded():
    with FakeOpenAIServer(score_responder, delay=0.08) as srv:
        judge = make_judge(srv.base_url, max_concurrency=3)
        scores = judge.score([f"score {n}" for n in range(12)])
        assert scores == pytest.approx([expected(n) for n in range(12)])
        assert 1 < srv.max_in_flight <= 3
        assert len(srv.chat_requests) == 12


# --- the cache --------------------------------------------------------------------------------------------------

def test_cached_judge_second_run_makes_no_requests(server, tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    prompts = ["score 5", "score 15", "Rate: REFUSE", "score 5", "score 25"]  # one duplicate, one refusal
    cached = CachedJudge(make_judge(server.base_url), JudgeCache(path))
    assert cached.name == cached.inner.name
    first = cached.score(prompts)
    assert first[:2] == pytest.approx([expected(5), expected(15)])
    assert first[2] is None and first[3] == first[0]
    assert cached.calls == 4 and len(server.chat_requests) == 4  # the duplicate is sent once

    n = len(server.chat_requests)
    assert cached.score(prompts) == first
    assert len(server.chat_requests) == n and cached.calls == 4

    cached.cache.close()
    reopened = CachedJudge(make_judge(server.base_url), JudgeCache(path))
    assert reopened.score(prompts) == first  # including the cached missing score
    assert len(server.chat_requests) == n and reopened.calls == 0
    assert len(reopened.cache) == 4

    # only the new prompt is sent
    mixed = reopened.score(["score 25", "score 35", "Rate: REFUSE"])
    assert mixed[0] == first[4] and mixed[1] == pytest.approx(expected(35)) and mixed[2] is None
    assert len(server.chat_requests) == n + 1 and reopened.calls == 1
    reopened.cache.close()


def test_cache_is_keyed_by_judge_name(tmp_path):
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        cache.put_many("judge-a", ["p1", "p2"], [12.5, None])
        assert cache.get_many("judge-a", ["p2", "p3", "p1"]) == {0: None, 2: 12.5}
        assert cache.get_many("judge-b", ["p1", "p2"]) == {}
        with pytest.raises(ValueError):
            cache.put_many("judge-a", ["p1"], [])


def test_cache_keeps_scores_of_an_interrupted_run(server, tmp_path):
    path = tmp_path / "c.sqlite"
    judge = make_judge(server.base_url, max_retries=0, max_concurrency=1)
    cached = CachedJudge(judge, JudgeCache(path), chunk_size=16)
    with pytest.raises(PersonavecError, match="HTTP 500"):
        cached.score(["score 1", "score 2", "BOOM", "score 4"])
    cached.cache.close()
    with JudgeCache(path) as cache:
        got = cache.get_many(judge.name, ["score 1", "score 2", "BOOM", "score 4"])
    # what was scored before the failure is kept (a request already running when it failed may be kept too)
    assert 2 not in got and {0, 1} <= set(got)
    assert [got[0], got[1]] == pytest.approx([expected(1), expected(2)])


class CountingJudge:
    """A judge without the on_result callback: CachedJudge sends it chunks."""

    name = "counting"

    def __init__(self):
        self.batches: list[list[str]] = []

    def score(self, prompts, progress=False):
        self.batches.append(list(prompts))
        return [None if "REFUSE" in p else float(len(p)) for p in prompts]


def test_cached_judge_with_plain_judge(tmp_path):
    inner = CountingJudge()
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        cached = CachedJudge(inner, cache, chunk_size=2)
        prompts = ["a", "bb", "REFUSE", "ccc", "a"]
        assert cached.score(prompts) == [1.0, 2.0, None, 3.0, 1.0]
        assert inner.batches == [["a", "bb"], ["REFUSE", "ccc"]]
        assert cached.score(prompts) == [1.0, 2.0, None, 3.0, 1.0]
        assert len(inner.batches) == 2 and cached.calls == 4


def test_invalid_base_url_is_reported_without_retrying():
    with pytest.raises(PersonavecError, match="http://") as err:
        make_judge("localhost:8000/v1")
    assert "\n" not in str(err.value)


def test_an_endpoint_judge_refuses_prompts_that_are_not_text_before_any_request():
    judge = make_judge("http://127.0.0.1:9/v1", max_retries=0, timeout=0.5)  # nothing listens: no request may go
    with pytest.raises(PersonavecError, match="judge prompt 2 is None, not a string"):
        judge.score(["a", "b", None])
