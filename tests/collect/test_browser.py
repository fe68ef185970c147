"""The real page in a real headless browser: Debian's Chromium driven by Selenium through Debian's
chromedriver (nothing is downloaded). Two annotators label with the keyboard, one undoes a label,
and the database, the export and the statistics say exactly what they typed. An XSS candidate
renders as inert text.

CI installs chromium and chromium-driver (.ci/run). Elsewhere, without them, this test is
skipped with the reason; with CI=true set it fails instead, so CI can never skip it silently.
``PREFTUNE_SCREENSHOT=docs/label-page.png`` also saves the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from collect.test_server import XSS, Server, write
from preftune.cli.main import main

CHROMIUM = os.environ.get("PREFTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("PREFTUNE_CHROMEDRIVER") or shutil.which("chromedriver")
MISSING = ("Chromium and chromedriver are needed for the browser test: apt-get install -y chromium "
           "chromium-driver (or set PREFTUNE_CHROMIUM / PREFTUNE_CHROMEDRIVER)")

CANDIDATES = [
    {"prompt": f"Greet me. {XSS}", "responses": [XSS, "Hello there, friend."]},
    {"prompt": "Name a colour.", "responses": ["Blue.", "A colour is a property of light."]},
    {"prompt": "Say something kind.", "responses": ["You are doing well.", "Whatever."]},
    {"prompt": "Rank these greetings.", "responses": ["Hi.", "Good morning to you!", "Yo."]},
]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail(MISSING + " -- CI must install them (.ci/run does)")
        pytest.skip(MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,860", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, state: str, task_id: str | None = None, timeout: float = 15.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = d.execute_script("return [document.body.dataset.state, document.body.dataset.taskId || '']")
        return body[0] == state and (task_id is None or body[1] == task_id)

    WebDriverWait(driver, timeout).until(ready, f"page never reached state {state!r} task {task_id!r}")


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def shown_texts(driver) -> list[str]:
    """The responses' text as displayed, in display order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#responses .response .text')].map(e => e.textContent)")


def test_two_annotators_label_with_the_keyboard(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    candidates = write(tmp_path / "candidates.jsonl", CANDIDATES)
    db = tmp_path / "labels.sqlite"
    server = Server(candidates, db, "--overlap", "2", "--guidelines", str(write_guidelines(tmp_path)))
    try:
        url = server.wait_ready()
        expected = {}  # (annotator, task) -> (choice, winner text or ranking texts)
        for annotator in ("ann", "bob"):
            browser.get(f"{url}/?annotator={annotator}")
            wait_for(browser, "ready", "0")

            # task 0: the XSS candidate is inert text
            assert browser.execute_script("return window.__xss === undefined")
            assert browser.execute_script("return document.querySelectorAll('main img, main script').length") == 0
            assert XSS in shown_texts(browser)
            prompt = browser.find_element("id", "prompt").text
            assert prompt == CANDIDATES[0]["prompt"]
            texts = shown_texts(browser)
            browser.refresh()  # a reload (or closing the tab and coming back) resumes the same task, same order
            wait_for(browser, "ready", "0")
            assert shown_texts(browser) == texts
            assert "helpful and kind. <b>not bold</b>" in browser.find_element("id", "guidelines").text
            texts = shown_texts(browser)
            if annotator == "ann":
                press(browser, "1")  # left better
                expected[(annotator, 0)] = ("prefer", texts[0])
            else:
                press(browser, Keys.ARROW_RIGHT)  # right better
                expected[(annotator, 0)] = ("prefer", texts[1])
            wait_for(browser, "ready", "1")

            # task 1: a first answer, then undo, then another
            first = shown_texts(browser)
            press(browser, Keys.ARROW_LEFT)
            wait_for(browser, "ready", "2")
            press(browser, "u")
            wait_for(browser, "ready", "1")
            assert shown_texts(browser) == first  # shown again in the same order
            assert "Undone" in browser.find_element("id", "notice").text
            if annotator == "ann":
                browser.find_element("id", "reason").send_keys("both fine")
                browser.find_element("id", "reason").send_keys(Keys.ESCAPE)
                press(browser, "t")
                expected[(annotator, 1)] = ("tie", None)
            else:
                press(browser, "2")
                expected[(annotator, 1)] = ("prefer", first[1])
            wait_for(browser, "ready", "2")

            # task 2: ann skips, bob picks the left one
            texts = shown_texts(browser)
            if annotator == "ann" and os.environ.get("PREFTUNE_SCREENSHOT"):
                browser.save_screenshot(os.environ["PREFTUNE_SCREENSHOT"])
            if annotator == "ann":
                press(browser, "s")
                expected[(annotator, 2)] = ("skip", None)
            else:
                press(browser, "1")
                expected[(annotator, 2)] = ("prefer", texts[0])
            wait_for(browser, "ready", "3")

            # task 3: rank mode, digits best first; the last one places itself
            texts = shown_texts(browser)
            press(browser, Keys.ENTER)  # nothing ranked yet: refused with a hint
            assert "Rank every response" in browser.find_element("id", "notice").text
            picks = ["3", "1"] if annotator == "ann" else ["2", "3"]
            press(browser, *picks)
            order = [int(p) - 1 for p in picks]
            order.append(({0, 1, 2} - set(order)).pop())
            press(browser, Keys.ENTER)
            expected[(annotator, 3)] = ("rank", [texts[p] for p in order])
            wait_for(browser, "done")
            progress = browser.find_element("id", "progress").text
            assert progress.startswith("4 labelled by you")
        assert browser.find_element("id", "progress").text.endswith("4 of 4 tasks complete (2 annotators each)")
    finally:
        server.stop()

    # the database holds exactly what was typed
    conn = sqlite3.connect(db)
    responses = {task_id: json.loads(r) for task_id, r in conn.execute("SELECT id, responses FROM tasks")}
    rows = conn.execute("SELECT annotator, task_id, choice, winner, ranking, reason FROM labels "
                        "WHERE undone_at IS NULL ORDER BY id").fetchall()
    got = {}
    for annotator, task_id, choice, winner, ranking, reason in rows:
        if choice == "prefer":
            got[(annotator, task_id)] = (choice, responses[task_id][winner])
        elif choice == "rank":
            got[(annotator, task_id)] = (choice, [responses[task_id][i] for i in json.loads(ranking)])
        else:
            got[(annotator, task_id)] = (choice, None)
    assert got == expected
    assert conn.execute("SELECT reason FROM labels WHERE annotator = 'ann' AND task_id = 1 AND undone_at IS NULL"
                        ).fetchone() == ("both fine",)
    undone = conn.execute("SELECT annotator, task_id FROM labels WHERE undone_at IS NOT NULL ORDER BY id").fetchall()
    assert undone == [("ann", 1), ("bob", 1)]

    # export by majority vote; task 3's rankings by pairwise majority
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt"], []).append((pair["chosen"], pair["rejected"]))
    ann0, bob0 = expected[("ann", 0)][1], expected[("bob", 0)][1]
    assert (CANDIDATES[0]["prompt"] in by_prompt) == (ann0 == bob0)  # agreeing votes give a pair, a split none
    assert CANDIDATES[1]["prompt"] not in by_prompt  # ann's tie against bob's choice: a split vote
    assert by_prompt[CANDIDATES[2]["prompt"]] == [(expected[("bob", 2)][1],
                                                   _other(CANDIDATES[2], expected[("bob", 2)][1]))]  # skip + bob
    assert by_prompt.get(CANDIDATES[3]["prompt"], []) == _rank_pairs(expected[("ann", 3)][1], expected[("bob", 3)][1])


def write_guidelines(tmp_path: Path) -> Path:
    path = tmp_path / "guide.md"
    path.write_text("Prefer the reply that is helpful and kind. <b>not bold</b>\n")
    return path


def _other(candidate: dict, text: str) -> str:
    (other,) = [r for r in candidate["responses"] if r != text]
    return other


def _rank_pairs(first: list[str], second: list[str]) -> list[tuple[str, str]]:
    """Response pairs both rankings order the same way (two votes: anything else is a split)."""
    pairs = []
    responses = CANDIDATES[3]["responses"]
    for i in range(3):
        for j in range(i + 1, 3):
            a, b = responses[i], responses[j]
            one = first.index(a) < first.index(b)
            if one == (second.index(a) < second.index(b)):
                pairs.append((a, b) if one else (b, a))
    return pairs
