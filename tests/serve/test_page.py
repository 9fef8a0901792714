"""The chat page at `/` in headless Chromium (the Debian package, driven by playwright): a
Chinese question streams back the taught answer, a second turn carries the history, the stop
button ends an answer, and a screenshot is kept beside the test's tmp files."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager

import pytest

ANSWER = "你好！我是小龙，喜欢写诗。"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium: scripts/setup.sh installs it (apt-get install chromium)"
)


def _set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
        value,
    )


@contextmanager
def _page(url: str, **page_kw):
    """A page at `url` in headless Chromium, and the bodies of the chat requests it sends."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page(**page_kw)
            bodies = []
            page.on(
                "request",
                lambda r: (
                    bodies.append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions")
                    else None
                ),
            )
            page.goto(url)
            yield page, bodies
        finally:
            browser.close()


def _answers(page):
    return page.locator(".msg.assistant")


def test_chat_page_streams_answers_in_chromium(live, tmp_path):
    with _page(live.url + "/", viewport={"width": 1100, "height": 760}) as (page, bodies):
        assert "tiny" in page.title()
        page.fill("#api-key", live.key)
        page.dispatch_event("#api-key", "change")
        _set_range(page, "#temperature", 0)

        page.fill("#input", "你好")
        page.press("#input", "Enter")
        first = _answers(page).nth(0)
        page.wait_for_selector(".msg.assistant[data-done]", timeout=30_000)
        assert first.locator(".content").inner_text() == ANSWER
        assert int(first.get_attribute("data-chunks")) > 1  # arrived as several events
        assert page.locator(".msg.error").count() == 0

        page.fill("#system", "你是助手")
        page.fill("#input", "第二个问题")
        page.click("#send")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant[data-done]').length == 2",
            timeout=30_000,
        )
        second = _answers(page).nth(1).locator(".content").inner_text()
        assert second and "\ufffd" not in second
        assert [m["role"] for m in bodies[1]["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
        ]
        assert bodies[1]["messages"][2]["content"] == ANSWER
        assert bodies[1]["temperature"] == 0 and bodies[1]["stream"] is True
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        assert (tmp_path / "chat.png").stat().st_size > 5000

        # the stop button ends a long answer, and the page is ready for the next question
        # (each forward pass slowed to 20 ms, so the answer is still streaming when clicked)
        slow = live.model.register_forward_hook(lambda *_: time.sleep(0.02))
        try:
            _set_range(page, "#temperature", 1)
            page.fill("#max-tokens", "400")
            page.fill("#input", "写一首很长的诗")
            page.click("#send")
            page.wait_for_function(  # the third answer has begun and is still streaming
                "(() => { const a = document.querySelectorAll('.msg.assistant');"
                " return a.length == 3 && a[2].dataset.chunks && a[2].dataset.streaming; })()",
                timeout=10_000,
            )
            page.click("#stop")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant[data-done]').length == 3",
                timeout=10_000,
            )
        finally:
            slow.remove()
        assert page.locator(".msg.error").count() == 0
        assert page.is_enabled("#send")


def test_page_without_a_key_shows_the_error(live):
    with _page(live.url + "/") as (page, _):
        page.evaluate("localStorage.clear()")
        page.fill("#api-key", "")
        page.fill("#input", "你好")
        page.click("#send")
        page.wait_for_selector(".msg.error", timeout=10_000)
        assert "API key" in page.locator(".msg.error .content").inner_text()


def test_page_answer_cut_inside_a_character_has_no_replacement_char(live):
    """max_tokens ending after a character's first byte token: the page shows the answer up to
    the last whole character."""
    ids = live.tok.encode(ANSWER, add_special_tokens=False)
    k, want = next(
        (k, live.tok.decode(ids[:k]).rstrip("\ufffd"))
        for k in range(3, len(ids))
        if live.tok.decode(ids[:k]).endswith("\ufffd")
    )
    with _page(live.url + "/") as (page, _):
        page.fill("#api-key", live.key)
        page.dispatch_event("#api-key", "change")
        _set_range(page, "#temperature", 0)
        page.fill("#max-tokens", str(k))
        page.fill("#input", "你好")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done]", timeout=30_000)
        assert _answers(page).nth(0).locator(".content").inner_text() == want


def test_page_shows_tool_calls_their_results_and_the_answer(tmp_path):
    """`demo_tools=true`: the page declares the embedded demo tools; with tool_choice required a
    random tiny model must call one (the call is constrained to the tools' schemas), the page
    shows the call, runs it through the server, shows the result and sends it back, and the
    model then answers."""
    from hanlm.datagen.demo_tools import NAMES
    from hanlm.serve.api import create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp, tiny_model_dir

    cfg = ServeConfig()
    cfg.model.path = str(tiny_model_dir(tmp_path / "model", seed=7, max_positions=4096))
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=4)
    served = ServedApp(create_app(engine, model_name="tiny", demo_tools=True))
    try:
        with _page(served.url + "/", viewport={"width": 1100, "height": 760}) as (page, bodies):
            page.wait_for_selector("#tools-box:not([hidden])", timeout=10_000)
            _set_range(page, "#temperature", 0)
            page.fill("#max-tokens", "160")
            page.select_option("#tool-choice", "required")
            page.fill("#input", "李白是哪个朝代的？")
            page.click("#send")
            page.wait_for_function("!document.querySelector('#send').disabled", timeout=180_000)
            page.wait_for_selector(".msg.tool", timeout=5_000)
            call = page.locator(".msg.tool-call .content").first.inner_text()
            assert call.split("(", 1)[0] in NAMES
            result = json.loads(page.locator(".msg.tool .content").first.inner_text())
            assert isinstance(result, dict)
            assert page.locator(".msg.error").count() == 0
            # the second request carried the call and its result, and asked freely
            assert bodies[0]["tool_choice"] == "required" and len(bodies[0]["tools"]) == 4
            roles = [m["role"] for m in bodies[1]["messages"]]
            assert roles == ["user", "assistant", "tool"] and bodies[1]["tool_choice"] == "auto"
            assert bodies[1]["messages"][1]["tool_calls"][0]["function"]["name"] in NAMES
            page.screenshot(path=str(tmp_path / "tools.png"), full_page=True)
    finally:
        served.close()
        engine.close()
