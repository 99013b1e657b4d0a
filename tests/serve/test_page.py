"""The chat page in a real browser: headless Chromium (Debian's package) loads `/`, asks, and each answer keeps its
meter (axis, zero line, threshold line), its tokens coloured by reading, side by side with the unsteered one."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import subprocess

import pytest
from serving import KEY, build, start

# the page's tests share one worker (make test runs --dist loadgroup): two workers installing chromium at once
# fought over dpkg's lock, and the loser skipped
pytestmark = pytest.mark.xdist_group("page")


def chromium() -> str | None:
    """Debian's chromium, installed with apt-get when missing (CI machines); None where it cannot be."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get"):
        return found
    with open("/tmp/personavec-apt.lock", "w") as lock:  # one installer at a time on this machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        for step in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "chromium"]):
            if shutil.which("chromium"):
                break
            subprocess.run(step, capture_output=True, timeout=900)
    return shutil.which("chromium")


UNIT = "projection on v̂ (the vector's unit direction at the layer), raw residual units"
CALIBRATION = {"unit": UNIT, "layer": 1, "where": "before", "pos": {"5": 1.5, "50": 6.0, "99": 9.0},
               "neg": {"5": -9.5, "50": -4.0, "99": 2.25}, "n_pos": 200, "n_neg": 180,
               "source": "held-out answers of the test", "guard_threshold": 2.25, "cap": 9.0,
               "guard_rule": "neg 99% quantile", "cap_rule": "pos 99% quantile", "guard_over": "answer",
               "guard_from_token": 4}
Q = "How should I treat people who are weaker than me?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model served with two vectors behind a key, and a headless Chromium."""
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium here and apt-get cannot install it (needs Debian's package and root)")
    from playwright.sync_api import sync_playwright

    root = build(tmp_path_factory.mktemp("page"))
    proc, url = start(root, ["--vector", str(root / "evil.safetensors"), "--vector", str(root / "kind.safetensors"),
                             "--api-key", KEY])
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-dev-shm-usage"])
            yield b, url.removesuffix("/v1") + "/"
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def open_page(served, calibrated: bool = True):
    """The page with the key typed in; ``evil`` listed with CALIBRATION (the contract of GET /v1/persona/vectors),
    ``kind`` with none. Returns the page and the chat requests it sends (their bodies, as sent)."""
    browser, url = served
    page = browser.new_page(viewport={"width": 1200, "height": 800})

    def listing(route):
        response = route.fetch()
        data = response.json()
        for v in data.get("data", []):  # none before the key is typed (401)
            v["calibration"] = dict(CALIBRATION) if calibrated and v["name"] == "evil" else None
        route.fulfill(response=response, json=data)

    page.route("**/v1/persona/vectors", listing)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(url)
    page.wait_for_function("document.getElementById('vectors').textContent.includes('(401)')")
    page.fill("#key", KEY)  # the key typed in: the vectors are listed without reloading the page
    page.keyboard.press("Tab")
    page.wait_for_selector("#vector-kind")
    return page, sent


def ask(page, question: str, answers: int) -> None:
    page.fill("#question", question)
    page.click("form#ask button")
    page.wait_for_function(f"document.body.dataset.answers === '{answers}'", timeout=90_000)


def meter(page, turn: int, vector: str, answer: int = 0) -> dict:
    """What the meter of one answer draws: its bars, lines (value and y), axis and the scale's mapping."""
    return page.evaluate("""([turn, vector, answer]) => {
        const fig = document.querySelectorAll(`.turn[data-turn="${turn}"] .answer`)[answer]
          .querySelector(`figure[data-vector="${vector}"]`);
        const svg = fig.querySelector("svg"), line = (cls) => {
          const l = svg.querySelector("line." + cls);
          return l && { value: Number(l.dataset.value), y: Number(l.getAttribute("y1")),
                        off: l.classList.contains("off") };
        };
        const label = svg.querySelector("line.threshold + text"), mean = svg.querySelector("polyline.mean");
        return { count: Number(fig.dataset.count), bars: svg.querySelectorAll("rect").length,
                 grey: svg.querySelectorAll("rect.null").length, zero: line("zero"), threshold: line("threshold"),
                 unit: svg.querySelector("text.unit").firstChild.textContent,
                 fullUnit: svg.querySelector("text.unit title").textContent,
                 ticks: [...svg.querySelectorAll("text.tick")].map((t) => t.textContent),
                 lo: Number(svg.dataset.lo), hi: Number(svg.dataset.hi), top: Number(svg.dataset.top),
                 height: Number(svg.dataset.height), stats: fig.querySelector(".stats").textContent,
                 guard: !!fig.querySelector(".guard"),
                 label: label && label.textContent,
                 mean: mean && { from: Number(mean.dataset.from), last: Number(mean.dataset.last),
                                 points: mean.points.length } };
    }""", [turn, vector, answer])


def y_of(m: dict, value: float) -> float:
    return m["top"] + (m["hi"] - value) / (m["hi"] - m["lo"]) * m["height"]


def tokens(page, turn: int, answer: int = 0) -> list[dict]:
    """The answer's text as the page shows it: each token's text, readings and background colour."""
    return page.evaluate("""([turn, answer]) => [...document
        .querySelectorAll(`.turn[data-turn="${turn}"] .answer`)[answer].querySelectorAll(".tok")]
        .map((s) => ({ text: s.textContent, readings: JSON.parse(s.dataset.readings),
                       background: getComputedStyle(s).backgroundColor }))""", [turn, answer])


def test_the_answer_has_its_meter_with_axis_zero_and_threshold_lines_and_tokens_coloured_by_reading(served):
    page, sent = open_page(served)
    # the guard's default threshold is the calibrated one, shown with its unit; a vector without one asks for one
    page.select_option("#guard-vector", "evil")
    assert page.input_value("#guard-threshold") == "2.25" and page.text_content("#guard-unit") == "raw residual units"
    assert page.get_attribute("#guard-unit", "title") == UNIT
    assert "calibrated threshold, neg 99% quantile" in page.text_content("#guard-source")
    assert "guard 2.25, cap 9.00" in page.text_content("#calibration-evil")
    assert page.get_attribute("#calibration-evil", "title") == "guard: neg 99% quantile; cap: pos 99% quantile"
    assert "not calibrated" in page.text_content("#calibration-kind")
    assert page.input_value("#capmax-evil") == "9" and page.input_value("#capmax-kind") == ""
    page.select_option("#guard-vector", "kind")
    assert page.input_value("#guard-threshold") == ""
    page.fill("#question", Q)
    page.click("form#ask button")
    assert "threshold" in page.text_content("#problem") and not sent  # nothing sent, the question kept
    assert page.input_value("#question") == Q
    page.select_option("#guard-vector", "evil")
    assert not page.is_visible("#guard-coef")  # a coefficient only for the action steer
    page.select_option("#guard-action", "steer")  # the answer goes on past a crossing
    assert page.is_visible("#guard-coef")
    page.fill("#temperature", "0.7")
    page.fill("#coef-evil", "-4")
    assert page.text_content("#coeftext-evil") == "-4 raw units"
    page.check("#cap-kind")
    page.fill("#capmax-kind", "30")
    page.click("form#ask button")
    page.wait_for_function("document.body.dataset.answers === '1'", timeout=90_000)
    (body,) = sent
    assert body["temperature"] == 0.7 and isinstance(body["seed"], int) and body["max_tokens"] == 128
    assert body["persona"]["steer"] == [{"vector": "evil", "coef": -4}]
    assert body["persona"]["cap"] == [{"vector": "kind", "max": 30}]
    # over the answer (the server's default): not sent, so a server that has no `over` takes it too
    assert body["persona"]["guard"] == {"vector": "evil", "threshold": 2.25, "action": "steer", "coef": -4}
    assert page.text_content(".turn[data-turn='0'] h3") == "steered: evil -4 raw units"

    evil, kind = meter(page, 0, "evil"), meter(page, 0, "kind")
    assert evil["count"] > 0 and evil["bars"] == evil["count"] == kind["count"] == kind["bars"]
    assert evil["zero"]["value"] == 0 and evil["zero"]["y"] == pytest.approx(y_of(evil, 0))
    assert evil["threshold"] == {"value": 2.25, "y": pytest.approx(y_of(evil, 2.25)), "off": False}
    assert kind["threshold"] is None  # kind has no calibration and no guard: no line is invented
    # the guard over the answer compares the running mean from the calibration's token 4 with the threshold
    assert evil["label"] == "guard 2.25 (running mean)"
    assert evil["mean"]["from"] == 4 and evil["mean"]["points"] == evil["count"] - 3
    mean = float(re.search(r"mean (-?[\d.]+)", evil["stats"]).group(1))
    assert evil["mean"]["last"] == pytest.approx(mean, abs=0.006)
    assert evil["lo"] <= 0 <= evil["hi"] and "0" in evil["ticks"] and evil["unit"] == "raw residual units"
    assert evil["fullUnit"] == UNIT
    assert evil["stats"].startswith("evil at layer 1, read before") and f"({evil['count']} tokens)" in evil["stats"]

    shown = tokens(page, 0)
    assert "".join(t["text"] for t in shown) == page.text_content(".turn[data-turn='0'] .text")
    assert shown and all(t["text"] for t in shown)
    for t in shown:  # blue below zero, red above, by the reading of the vector chosen to colour by (evil)
        rgb = tuple(int(c) for c in re.findall(r"\d+", t["background"])[:3])
        assert rgb == ((192, 57, 43) if t["readings"]["evil"] > 0 else (46, 134, 193))
    page.select_option("#highlight", "kind")  # colour by the other vector: the same tokens, kind's readings
    again = tokens(page, 0)
    assert [t["background"].startswith("rgba(192") for t in again] == [t["readings"]["kind"] > 0 for t in again]
    page.close()


def test_side_by_side_answers_share_a_seed_meters_stay_with_their_message_and_clear_empties_the_chat(served):
    page, sent = open_page(served)
    page.check("#side-by-side")
    page.fill("#coef-evil", "4")
    page.fill("#max-tokens", "24")  # two answers and two questions in the tiny model's context of 256
    ask(page, Q, 1)
    assert page.locator(".turn[data-turn='0'] .answer").count() == 2
    assert page.locator(".turn[data-turn='0'] h3").all_text_contents() == ["unsteered", "steered: evil +4 raw units"]
    plain, steered = sent
    assert plain["seed"] == steered["seed"] and plain["messages"] == steered["messages"]
    assert "steer" not in plain["persona"] and steered["persona"]["steer"] == [{"vector": "evil", "coef": 4}]
    first = [meter(page, 0, "evil", k)["count"] for k in (0, 1)]
    assert all(first)
    # no guard set: the calibrated threshold is still drawn, as a line that is not a guard's
    right = meter(page, 0, "evil", 1)
    assert right["threshold"] == {"value": 2.25, "y": pytest.approx(y_of(right, 2.25)), "off": True}
    steered_text = page.locator(".turn[data-turn='0'] .answer .text").nth(1).text_content()

    page.uncheck("#side-by-side")
    ask(page, "Tell me about foxes.", 2)  # the chat goes on from the steered answer; the first meters stay
    assert [m["role"] for m in sent[2]["messages"]] == ["user", "assistant", "user"]
    assert sent[2]["messages"][1]["content"] == steered_text
    assert [meter(page, 0, "evil", k)["count"] for k in (0, 1)] == first
    # the second answer has its own meter, one bar per reading (the tiny model may end the answer at once, as it
    # does in float32 here: then it has none)
    second = meter(page, 1, "evil")
    assert second["bars"] == second["count"] and page.locator(".turn").count() == 2

    page.click("#clear")
    assert page.locator("#log > *").count() == 0 and page.evaluate("state.history.length") == 0
    ask(page, Q, 1)
    assert len(sent[3]["messages"]) == 1  # a new chat: nothing of the cleared one is sent
    page.close()


def test_only_before_edit_readings_are_drawn_and_null_ones_are_grey(served):
    """Against a canned stream (the server's contract): `evil@after` is not drawn, a null reading is a grey bar
    and a grey token, a triggered guard is marked on its meter, and a usage chunk (no choices) is passed over."""
    page, sent = open_page(served, calibrated=False)

    def chunk(content, persona, finish=None):
        body = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}], "persona": persona}
        return f"data: {json.dumps(body)}\n\n"

    stream = "".join([
        chunk("Hello", {"evil": {"vector": "evil", "layer": 1, "where": "before edits", "unit": "raw",
                                 "tokens": [-2.0]},
                        "evil@after": {"vector": "evil", "where": "after edits", "tokens": [40.0]}}),
        chunk(" there", {"evil": {"tokens": [None]}, "evil@after": {"tokens": [None]}}),
        chunk("!", {"evil": {"tokens": [3.0], "guard_triggered": True}, "evil@after": {"tokens": [45.0]}},
              "persona_guard"),
        f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 9, 'completion_tokens': 3}})}\n\n",
        "data: [DONE]\n\n"])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=stream,
                                                                     content_type="text/event-stream"))
    page.select_option("#guard-vector", "evil")
    page.fill("#guard-threshold", "2.5")  # no calibration: the threshold is typed
    page.select_option("#guard-over", "token")
    ask(page, Q, 1)
    evil = meter(page, 0, "evil")
    assert evil["count"] == 3 and evil["grey"] == 1 and evil["hi"] < 40  # the after-edit readings are not drawn
    assert evil["threshold"]["value"] == 2.5 and evil["guard"] and evil["label"] == "guard 2.5 (each token)"
    assert evil["mean"] is None  # 3 tokens: no running mean before token 16 (the server's default without one listed)
    assert sent[0]["persona"]["guard"] == {"vector": "evil", "threshold": 2.5, "action": "stop", "over": "token"}
    assert page.locator("figure[data-vector='kind']").count() == 0
    shown = tokens(page, 0)
    assert [t["text"] for t in shown] == ["Hello", " there", "!"]
    assert shown[1]["readings"]["evil"] is None and shown[1]["background"] == "rgb(221, 221, 221)"
    assert "stopped by the guard" in page.text_content(".turn[data-turn='0']")
    page.close()


def test_a_bad_setting_sends_nothing_and_a_refused_request_is_one_line_that_leaves_the_chat_as_it_was(served):
    page, sent = open_page(served)
    page.fill("#temperature", "3")
    page.fill("#question", Q)
    page.click("form#ask button")
    assert page.text_content("#problem") == "temperature: type a number from 0 to 2" and not sent
    page.fill("#temperature", "1")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=400, json={"error": {
        "message": "persona.steer[0].coef must be a number, not the string \"2\"", "param": "persona.steer[0].coef"}}))
    page.click("form#ask button")
    page.wait_for_selector(".turn .note")
    assert page.text_content(".turn .note") == 'persona.steer[0].coef must be a number, not the string "2"'
    assert page.text_content("#problem") == "" and page.evaluate("state.history.length") == 0
    page.wait_for_function("!document.getElementById('send').disabled")
    assert page.input_value("#question") == Q  # back in the box, to correct and send again
    page.close()
