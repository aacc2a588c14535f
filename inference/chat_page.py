"""The web chat page (GET /chat): inference/chat_page.html read once, served with a Content-Security-Policy that
allows its own inline script and style (by their sha256) and requests to this server only."""
from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi.responses import HTMLResponse, RedirectResponse

PAGE = Path(__file__).with_name("chat_page.html")


def _digest(block: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode("utf-8")).digest()).decode() + "'"


@lru_cache(maxsize=1)
def page_and_policy() -> tuple[str, str]:
    """The page's HTML and its policy: nothing but its one script and one style runs; fetch goes to this origin."""
    html = PAGE.read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S)[1]
    style = re.search(r"<style>(.*?)</style>", html, re.S)[1]
    policy = (f"default-src 'none'; script-src {_digest(script)}; style-src {_digest(style)}; connect-src 'self'; "
              "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


async def chat_page() -> HTMLResponse:
    html, policy = page_and_policy()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


async def to_chat_page() -> RedirectResponse:
    return RedirectResponse("/chat", status_code=307)
