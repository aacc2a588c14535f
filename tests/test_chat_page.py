"""The web chat page (inference/chat_page.html at GET /chat): served self-contained under a strict
Content-Security-Policy, and driven in a real headless Chromium (selenium): a streamed reply that grows token by
token, a follow-up sent with the history, stop, regenerate, and user text that is never run as HTML.

Needs Debian's chromium and chromium-driver and the selenium package (requirements-dev.txt); without them the
browser tests are skipped with that reason (.ci/run installs them where it can)."""
from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from tests.test_api_service import LiveServer, checkpoint, settings_for  # noqa: F401 (fixture)



def test_the_page_is_self_contained_and_loads_without_the_api_key(checkpoint):  # noqa: F811
    with LiveServer(settings_for(checkpoint, api_key="s3cret")) as live:
        page = httpx.get(live.url + "/chat")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
        assert not re.search(r"https?://", page.text)  # no CDN, no other host
        assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text
        root = httpx.get(live.url + "/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/chat"
        assert httpx.post(live.url + "/v1/chat/completions", json={"messages": []}).status_code == 401


def browser():
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install -r requirements-dev.txt): browser test not run")
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium / chromium-driver are not installed (Debian: apt-get install chromium "
                    "chromium-driver): browser test not run")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=420,900"):
        options.add_argument(flag)  # a phone-wide window; root needs --no-sandbox
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def page(checkpoint):  # noqa: F811
    driver = browser()
    with LiveServer(settings_for(checkpoint, max_new_tokens=400)) as live:
        try:
            driver.set_script_timeout(30)
            driver.get(live.url + "/chat")
            yield driver
        finally:
            driver.quit()


def wait_for(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def send(driver, text: str, max_tokens: int, temperature: float = 0.0) -> None:
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('max_tokens').value = arguments[0];"
                          "document.getElementById('temperature').value = arguments[1];", max_tokens, temperature)
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def replies(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('.assistant')].map(n => n.textContent)")


def idle(driver) -> bool:
    return driver.execute_script("return window.chat.controller === null")


@pytest.mark.slow
def test_a_reply_streams_in_and_a_follow_up_carries_the_history(page, tmp_path):
    send(page, "A", max_tokens=300)
    lengths = []
    wait_for(lambda: lengths.append(len((replies(page) or [""])[-1])) or (len(set(lengths) - {0}) >= 3),
             what="the reply to grow")  # seen at three lengths: it arrives piece by piece, not at once
    wait_for(lambda: idle(page), what="the reply to finish")
    first = replies(page)[-1]
    assert first and page.execute_script("return window.chat.messages.length") == 2
    send(page, "and then?", max_tokens=8)
    wait_for(lambda: idle(page) and len(replies(page)) == 2, what="the second reply")
    sent = page.execute_script("return window.chat.lastRequest.messages")
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[1]["content"] == first
    assert page.save_screenshot(str(tmp_path / "chat.png")) and (tmp_path / "chat.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_stop_ends_a_long_reply_and_regenerate_asks_again(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "reset").click()  # a new chat: the same long greedy reply as the first test's
    send(page, "A", max_tokens=390)
    wait_for(lambda: len((replies(page) or [""])[-1]) > 0 and not idle(page), what="a reply to start")

    page.find_element(By.ID, "stop").click()
    wait_for(lambda: idle(page), timeout=10, what="the stop")
    notes = page.execute_script("return [...document.querySelectorAll('.note')].map(n => n.textContent)")
    assert "stopped" in notes and page.find_element(By.ID, "send").is_enabled()
    before = page.execute_script("return window.chat.messages.length")
    page.find_element(By.ID, "regenerate").click()
    wait_for(lambda: not idle(page), timeout=10, what="the regenerated reply to start")
    page.find_element(By.ID, "stop").click()
    wait_for(lambda: idle(page), timeout=10, what="the second stop")
    assert page.execute_script("return window.chat.messages.length") == before  # replaced, not added


@pytest.mark.slow
def test_user_text_is_shown_literally_and_never_run(page):
    hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'
    send(page, hostile, max_tokens=4)
    wait_for(lambda: idle(page), what="the reply")
    shown = page.execute_script("return [...document.querySelectorAll('.user')].map(n => n.textContent)")
    assert hostile in shown and page.execute_script("return window.__pwned") is None
    assert page.execute_script("return document.querySelectorAll('#log img, #log script').length") == 0


def test_a_tool_call_and_its_result_show_as_a_chip_and_the_history_keeps_the_trace(page):
    trace = "<|tool_call|>42+8<|/tool_call|><|tool_result|>50<|/tool_result|>50"
    shown = page.execute_script(
        "const node = document.createElement('div'); showReply(node, arguments[0]);"
        "return [node.textContent, [...node.querySelectorAll('.tool')].map(n => n.textContent), node.children.length]",
        trace)
    assert shown == ["\U0001F9EE 42+8 → 5050", ["\U0001F9EE 42+8 → 50"], 1]  # the chip, then the answer as text
    streaming = page.execute_script("const node = document.createElement('div'); showReply(node, arguments[0]);"
                                    "return node.textContent", "<|tool_call|>42+")
    assert streaming == "\U0001F9EE 42+ …"
    hostile = "<|tool_call|><img src=x onerror=window.__pwned=1><|/tool_call|>"
    page.execute_script("const node = document.createElement('div'); showReply(node, arguments[0]);"
                        "document.body.appendChild(node)", hostile)
    assert page.execute_script("return window.__pwned") is None and "<img" in page.execute_script(
        "return document.body.lastChild.textContent")
