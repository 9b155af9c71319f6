"""The web chat page in headless Chromium: type a message, watch the reply stream in, press stop.

With CI=true a missing browser fails the test (`.ci/run` installs Debian's chromium and
chromium-driver); on a developer machine without one it is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.server_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "headless Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_and_stops(browser, medium_gguf):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # The 100 MB model generates slowly enough to watch; the page's fetch is wrapped so the random
    # model never says <|im_end|> and the reply is long enough to stop.
    with running_server(medium_gguf, "--ctx", "8192", "--temperature", "0.8") as (base, _):
        browser.get(base + "/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == "Yi-Medium", what="model name")
        browser.execute_script(
            "window.fetch = ((orig) => (url, opts) => {"
            "  if (opts && opts.body) { const b = JSON.parse(opts.body); b.logit_bias = {'2': -100, '7': -100};"
            "    b.max_tokens = 6000; opts = Object.assign({}, opts, {body: JSON.stringify(b)}); }"
            "  return orig(url, opts); })(window.fetch);"
        )
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello Yi", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line 你好")
        assert box.get_attribute("value") == "Hello Yi\nsecond line 你好"  # Shift+Enter is a newline
        box.send_keys(Keys.ENTER)
        user = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.user"), what="user message")
        assert user[0].text == "Hello Yi\nsecond line 你好"
        reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
        first = wait_for(lambda: len(reply.text) > 0 and reply.text, what="first streamed text")
        wait_for(lambda: len(reply.text) > len(first), what="more streamed text")
        assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: reply.get_attribute("data-done") == "true", what="stop")
        stopped = reply.text
        time.sleep(0.5)
        assert reply.text == stopped and len(stopped) > 0  # kept what was written, nothing more arrives
        assert browser.find_element(By.ID, "send").get_attribute("disabled") is None
        assert "Error" not in stopped


def test_code_blocks_render_as_code(browser, chat_gguf):
    from selenium.webdriver.common.by import By

    with running_server(chat_gguf) as (base, _):
        browser.get(base + "/")
        html = browser.execute_script("return render('see `x` and\\n```python\\nprint(1 < 2)\\n```\\n')")
        assert '<code>x</code>' in html
        assert '<pre><code data-lang="python">print(1 &lt; 2)\n</code></pre>' in html
        assert browser.find_element(By.ID, "system").tag_name == "textarea"
