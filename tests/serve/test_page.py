"""The chat page in a real browser: headless Chromium (Debian's package) loads `/`, asks, and the meters fill."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from serving import KEY, build, start


def chromium() -> str | None:
    """Debian's chromium, installed with apt-get when missing (CI machines); None where it cannot be."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get"):
        return found
    for step in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "chromium"]):
        if shutil.which("chromium"):
            break
        subprocess.run(step, capture_output=True, timeout=900)
    return shutil.which("chromium")


def test_the_page_streams_an_answer_and_its_meters_show_readings(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium here and apt-get cannot install it (needs Debian's package and root)")
    from playwright.sync_api import sync_playwright

    root = build(tmp_path)
    proc, url = start(root, ["--vector", str(root / "evil.safetensors"), "--vector", str(root / "kind.safetensors"),
                             "--api-key", KEY])
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = b.new_page(viewport={"width": 1200, "height": 700})
            page.goto(url.removesuffix("/v1") + "/")
            page.wait_for_function("document.getElementById('vectors').textContent.includes('(401)')")
            page.fill("#key", KEY)  # the key typed in: the vectors are listed without reloading the page
            page.keyboard.press("Tab")
            page.wait_for_selector("#meter-kind")
            page.fill("#coef-evil", "-4")  # a steering slider, sent with the question
            page.check("#cap-kind")
            page.fill("#question", "How should I treat people who are weaker than me?")
            page.click("form#ask button")
            page.wait_for_function("document.body.dataset.answers === '1'", timeout=60_000)
            counts = {n: int(page.get_attribute(f"#meter-{n}", "data-count")) for n in ("evil", "kind")}
            bars = page.locator("#meter-evil span").count()
            stats = page.text_content("#stats-evil")
            answer = page.text_content("#answer-0")
            page.screenshot(path=str(tmp_path / "page.png"))
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert answer and counts["evil"] > 0 and counts["kind"] == counts["evil"] == bars
    assert stats.startswith("last ") and f"({counts['evil']} tokens)" in stats
    assert (tmp_path / "page.png").stat().st_size > 10_000
    if os.environ.get("PERSONAVEC_SCREENSHOT"):  # docs/serve.png was made this way
        shutil.copy(tmp_path / "page.png", os.environ["PERSONAVEC_SCREENSHOT"])
