"""Real-browser fixtures: Debian's Chromium driven by Playwright (sync API).

The page talks to the real stack from tests/conftest.py (gunicorn+gevent, a Celery worker,
Redis) and the scripted model server. Playwright never downloads a browser here: the tests
use /usr/bin/chromium, and skip with the reason when it (or Playwright) is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TIDECHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = Path(__file__).resolve().parent.parent / "output"  # git-ignored artifacts
TIMEOUT_MS = 15_000  # generous: the machine may be loaded

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - reported by the skip below
    sync_playwright = None
else:
    expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.skip("Playwright for Python is not installed (pip install -e .[dev])")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (bin/test does, as root)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_context(browser: Browser, web):
    """Make browser contexts (each its own cookie jar, so its own identity) on the stack."""
    made: list[BrowserContext] = []

    def make(**options) -> BrowserContext:
        options.setdefault("viewport", DESKTOP)
        options.setdefault("base_url", web.url)
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


@pytest.fixture
def context(new_context) -> BrowserContext:
    return new_context()


class PageProblems:
    """Uncaught exceptions and Content-Security-Policy violations seen by the pages."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def watch(self, page: Page) -> Page:
        page.on("pageerror", lambda exc: self.items.append(f"uncaught: {exc}"))
        page.on(
            "console",
            lambda msg: (
                self.items.append(f"console: {msg.text}")
                if msg.type == "error" and "Content Security Policy" in msg.text
                else None
            ),
        )
        return page


@pytest.fixture
def problems() -> Iterator[PageProblems]:
    found = PageProblems()
    yield found
    assert not found.items, "the page reported problems:\n" + "\n".join(found.items)


@pytest.fixture
def page(context: BrowserContext, problems: PageProblems) -> Page:
    return problems.watch(context.new_page())


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT
