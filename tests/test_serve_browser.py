"""The chat page at / in a real headless browser (Debian's chromium via selenium): type, send, see the
reply stream in; a screenshot is saved in the test's tmp dir. Skipped without chromium/chromedriver."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from test_serve import live_server, make_checkpoint

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                                reason="chromium / chromedriver not installed")


@pytest.fixture()
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,700",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(cond, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_page_streams_a_reply(tmp_path, browser):
    from selenium.webdriver.common.by import By

    # context 128 and replies of 60 tokens: the third turn no longer fits
    ckpt = make_checkpoint(tmp_path / "model", chat=True, context=128)
    with live_server(ckpt) as (base, _):
        browser.get(base + "/")
        _wait(lambda: "context 128" in browser.find_element(By.ID, "model").text, what="the page to read /health")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("60")
        browser.find_element(By.ID, "input").send_keys("Hello, who are you?")
        # record the reply's length at every change of the page: a streamed reply grows in steps
        browser.execute_script(
            "window.lens = []; new MutationObserver(() => { const m = document.querySelectorAll('.msg.assistant');"
            " if (m.length) window.lens.push(m[m.length - 1].textContent.length); })"
            ".observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});")
        browser.find_element(By.ID, "send").click()

        def reply() -> str:
            found = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return found[-1].text if found else ""

        _wait(lambda: len(reply()) > 0, what="streamed text")
        first = reply()
        _wait(lambda: browser.find_element(By.ID, "send").is_enabled(), what="the reply to finish")
        final = reply()
        assert final and final != "(no reply)" and final.startswith(first)
        lens = [n for n in browser.execute_script("return window.lens") if n]
        assert len(set(lens)) >= 3 and lens == sorted(lens), lens  # it grew piece by piece
        users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
        assert [u.text for u in users] == ["Hello, who are you?"]
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        shot = tmp_path / "chat_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 5000
        print(f"screenshot: {shot}")
        # the page's request went through the real API: the engine decoded it
        assert httpx.get(base + "/health").json()["decode_steps"] > 0

        # a conversation longer than the context: the page drops its oldest turns and says so
        for text in ("second message", "third message"):
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            n_users = len(users)
            _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1 + n_users and  # noqa: B023
                  browser.find_element(By.ID, "send").is_enabled(), what=f"the reply to {text!r}")
            users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
        notes = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".note")]
        assert any("dropped" in n for n in notes), notes
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        assert reply() and reply() != "(no reply)"
        browser.save_screenshot(str(tmp_path / "chat_page_long.png"))
