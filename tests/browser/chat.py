"""Steps the browser tests share: make a chat through the API, drive the page, read it."""

from __future__ import annotations

import re
import time
from typing import Any

from playwright.sync_api import BrowserContext, Locator, Page, expect

STREAMING = re.compile(r"\bstreaming\b")

# Records every distinct text the newest answer shows, from the first paint of each load,
# so a test can check that no intermediate state ever showed duplicated text.
RECORD_ANSWER_TEXTS = """
window.__answerTexts = [];
new MutationObserver(() => {
  const bodies = document.querySelectorAll("#messages .message.assistant .markdown");
  const last = bodies[bodies.length - 1];
  if (!last) return;
  const text = last.textContent.trimEnd(); // marked ends blocks with a newline
  if (window.__answerTexts[window.__answerTexts.length - 1] !== text) {
    window.__answerTexts.push(text);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def words(n: int, stem: str = "w") -> list[str]:
    """Chunks "w0", " w1", ... : plain text whose rendering is the text itself."""
    return [f"{stem}0", *(f" {stem}{i}" for i in range(1, n))]


def api(context: BrowserContext, method: str, url: str, body: Any = None) -> Any:
    """Call the JSON API with the context's own cookie (so as the page's owner)."""
    response = context.request.fetch(url, method=method, data=body)
    assert response.ok, f"{method} {url}: {response.status} {response.text()}"
    return response.json() if response.status != 204 else None


def new_chat(context: BrowserContext, model: str, **settings: Any) -> str:
    cid = api(context, "POST", "/api/conversations")["id"]
    api(context, "PATCH", f"/api/conversations/{cid}", {"model": model, **settings})
    return cid


def conversation(context: BrowserContext, cid: str, base: str = "") -> dict:
    return api(context, "GET", f"{base}/api/conversations/{cid}")


def wait_final(context: BrowserContext, cid: str, timeout: float = 20, base: str = "") -> dict:
    """The conversation once its last answer has ended (as stored by the server).

    ``base``: the server's URL when the context's own base URL is not usable (the cookie
    is per host, so it goes along either way).
    """
    deadline = time.monotonic() + timeout
    while True:
        conv = conversation(context, cid, base)
        last = conv["messages"][-1] if conv["messages"] else None
        if (
            last
            and last["role"] == "assistant"
            and last["status"] in ("done", "error", "cancelled", "interrupted")
        ):
            return conv
        assert time.monotonic() < deadline, f"the answer in {cid} did not end: {last}"
        time.sleep(0.05)


def open_chat(page: Page, cid: str, model: str | None = None) -> None:
    page.goto(f"/#/c/{cid}")
    if model:
        expect(page.locator("#model-picker")).to_have_value(model)


def send(page: Page, text: str) -> None:
    box = page.locator("#input")
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")


def answers(page: Page) -> Locator:
    return page.locator("#messages .message.assistant")


def last_answer(page: Page) -> Locator:
    return answers(page).last


def expect_answer(answer: Locator, text: str, timeout: float | None = None) -> None:
    """The answer has ended (within ``timeout`` ms, else Playwright's default) and shows
    exactly ``text`` (a one-paragraph plain answer)."""
    expect(answer).not_to_have_class(STREAMING, timeout=timeout)
    expect(answer.locator(".markdown")).to_have_text(text)
    assert answer.locator(".markdown").inner_text() == text


def answer_texts(page: Page) -> list[str]:
    return page.evaluate("window.__answerTexts || []")


def assert_no_duplicates(page: Page, full: str) -> None:
    """Every text the answer ever showed (since this load) was a prefix of the full text."""
    shown = answer_texts(page)
    assert shown, "no answer text was recorded"
    for text in shown:
        assert full.startswith(text), f"showed text that is not a prefix: {text!r}"
    assert shown[-1] == full


def poll(check, timeout: float = 15) -> None:
    """Wait until ``check()`` is true (for server-side state the page cannot show)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
