"""Rank every prompt of a `hanlm label` page in headless Chromium, with the keyboard, by a fixed
rule standing in for a person: more distinct Chinese characters = better (equal = tie). It is
how the README's walk-through drives the page without a labeller; its rankings say nothing
about quality, only that the loop (page -> rankings.jsonl -> hanlm reward) works and that a
reward model learns a rule it is shown.

    python examples/rank_by_rule.py http://127.0.0.1:8100/ LABELLER_NAME [SCREENSHOT.png]

Needs playwright (the dev extra) and Debian's chromium.
"""

import re
import shutil
import sys

from playwright.sync_api import sync_playwright

url, name = sys.argv[1], sys.argv[2]
shot = sys.argv[3] if len(sys.argv) > 3 else ""
chromium = shutil.which("chromium") or shutil.which("chromium-browser")


def score(text):
    return len(set(re.findall(r"[\u4e00-\u9fff]", text)))


with sync_playwright() as p:
    b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
    page = b.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url)
    page.fill("#labeller", name)
    page.dispatch_event("#labeller", "change")
    page.wait_for_function("document.getElementById('progress').textContent.includes('/')")
    page.wait_for_timeout(500)
    page.locator("#prompt").click()
    n = 0
    while page.locator("#finished").is_hidden():
        answers = [a.inner_text()[1:].strip() for a in page.locator(".answer").all()]
        s = [score(a) for a in answers]
        order = sorted(range(len(s)), key=lambda i: -s[i])
        prev = None
        for i in order:
            if prev is not None and s[i] == prev:
                page.keyboard.press("=")
            page.keyboard.press(str(i + 1))
            prev = s[i]
        before = page.locator("#progress").inner_text()
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.getElementById('progress').textContent != '{before}'")
        n += 1
        if n == 2 and shot:
            page.screenshot(path=shot, full_page=True)
    print(f"ranked {n} prompts; progress {page.locator('#progress').inner_text()}")
    b.close()
