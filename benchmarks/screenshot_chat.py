"""The web chat page's screenshot in the docs: a server on a trained SFT model, headless Chromium at phone width,
the user turns of the first held-out dialogue of data/sft/chat_test.json (each later question depends on the
earlier answers), then docs/chat_page.png.

    python -m benchmarks.screenshot_chat --model_path models/sft/sft_best.pth

Greedy, max tokens 8 (so the whole history fits the 64-token model). Needs chromium, chromium-driver, a CJK font
(Debian: fonts-noto-cjk) and selenium (as tests/test_chat_page.py). Prints one JSON line: the turns sent,
the replies shown, the reference answers and the file written.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import cli
from benchmarks.cli_options import benchmark_parser

ROOT = Path(__file__).resolve().parent.parent
DIALOGUE = json.loads((ROOT / "data" / "sft" / "chat_test.json").read_text(encoding="utf-8"))[0]["messages"]
TURNS = [m["content"] for m in DIALOGUE if m["role"] == "user"]
REFERENCES = [m["content"] for m in DIALOGUE if m["role"] == "assistant"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def driver():
    """Headless Chromium at 420 px wide (a phone), or a one-line error naming what is missing."""
    try:
        from selenium import webdriver
    except ImportError:
        raise cli.UsageError("selenium is not installed: pip install -r requirements-dev.txt") from None
    binary, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not chromedriver:
        raise cli.UsageError("chromium / chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=420,640"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)


def wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise cli.UsageError("the page did not answer in time")
        time.sleep(0.05)


def converse(browser, url: str) -> list[str]:
    from selenium.webdriver.common.by import By

    browser.get(url + "/chat")
    browser.execute_script("document.getElementById('temperature').value = 0;"  # greedy, short answers: the
                           "document.getElementById('max_tokens').value = 8")  # history keeps the context
    for n, text in enumerate(TURNS, start=1):
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait(lambda: browser.execute_script("return window.chat.controller === null && window.chat.messages.length")
             == 2 * n)
    return browser.execute_script("return [...document.querySelectorAll('.assistant')].map(n => n.textContent)")


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.screenshot_chat", __doc__)
    parser.add_argument("--model_path", type=Path, default=ROOT / "models" / "sft" / "sft_best.pth",
                        help="the SFT checkpoint to serve")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "chat_page.png", help="the PNG to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The script; a bad flag or a missing browser gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model_path.is_file():
        raise cli.UsageError(f"--model_path {args.model_path}: no such checkpoint (python finetune.py --mode sft)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "inference.api_service", "--model_path", str(args.model_path),
                               "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"], cwd=ROOT)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: _ready(url))
        browser = driver()
        replies = converse(browser, url)
        browser.save_screenshot(str(args.output))
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"turns": TURNS, "replies": replies, "references": REFERENCES, "output": str(args.output)},
                     ensure_ascii=False))
    return 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
