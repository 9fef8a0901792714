"""The ranking page in headless Chromium (the Debian package, driven by playwright): two prompts
ranked with the keyboard (a tie, a comment), a reload keeps the progress, and rankings.jsonl
holds exactly those two rankings."""

from __future__ import annotations

import json
import shutil

import pytest

from hanlm.label.ranking import RANKINGS_FILE

LABEL_KEY = "label-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (dev extra)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium: scripts/setup.sh installs it (apt-get install chromium)"
)


def _progress(page) -> str:
    return page.locator("#progress").inner_text()


def test_rank_two_prompts_with_the_keyboard_reload_and_keep_progress(label_app, tmp_path):
    served, out, items, _ = label_app
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(served.url + "/")
            page.fill("#api-key", LABEL_KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#labeller", "小王")
            page.dispatch_event("#labeller", "change")
            page.wait_for_function("document.getElementById('progress').textContent == '0 / 3'")
            assert page.locator("#prompt").inner_text() == items[0]["prompt"]
            assert page.locator(".answer").count() == 3
            page.locator("#prompt").click()  # focus off the inputs: keys now rank

            # prompt 1: answer 2 best, then 3 tied with 1
            for key in ["2", "3", "=", "1"]:
                page.keyboard.press(key)
            assert json.loads(page.get_attribute("#ranking", "data-ranking")) == [[1], [2, 0]]
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('progress').textContent == '1 / 3'")
            assert page.locator("#prompt").inner_text() == items[1]["prompt"]

            # prompt 2: a wrong key undone, a full order, a comment, all bad ticked
            for key in ["1", "Backspace", "3", "1", "2"]:
                page.keyboard.press(key)
            page.fill("#comment", "都不太好，3 稍好")
            page.locator("#prompt").click()
            page.keyboard.press("0")
            assert page.is_checked("#all-bad")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('progress').textContent == '2 / 3'")
            page.screenshot(path=str(tmp_path / "label.png"), full_page=True)

            # a reload (name and key come back from localStorage) resumes at the third prompt
            page.reload()
            page.wait_for_function("document.getElementById('progress').textContent == '2 / 3'")
            assert page.locator("#prompt").inner_text() == items[2]["prompt"]
            assert page.locator("#msg.error").count() == 0

            # drag and drop (not submitted): answer 1 to the ranking, answer 3 onto its group
            page.drag_and_drop(".answer[data-index='0']", "#ranking")
            page.drag_and_drop(".answer[data-index='2']", ".group[data-group='0']")
            assert json.loads(page.get_attribute("#ranking", "data-ranking")) == [[0, 2]]
        finally:
            browser.close()

    rows = [json.loads(x) for x in (out / RANKINGS_FILE).read_text("utf-8").splitlines()]
    assert [(r["id"], r["ranking"], r["labeller"]) for r in rows] == [
        (0, [1, [2, 0]], "小王"),
        (1, [2, 0, 1], "小王"),
    ]
    assert rows[1]["all_bad"] is True and rows[1]["comment"] == "都不太好，3 稍好"
    assert not rows[0]["all_bad"] and rows[0]["models"] == items[0]["models"]
