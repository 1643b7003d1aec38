"""The operator's view in the page, end to end in Chromium: an admin opens the admin
panel's "Answers" tab while a user's slow answer streams, sees it (owner, model, status,
worker, an age that grows), the queue, the workers and a failed answer under the errors,
stops the answer from there (the user's page shows it stopped), and the view stops asking
the server once the panel is closed.

The stack is this module's own (sign-in required, one admin by TIDECHAT_ADMIN_EMAILS, its
own database and queue, a real worker on both), with ``TIDECHAT_OPS_ALLOW`` empty so that
being on the loopback address does not make a browser the operator: only the admin's
account opens the view. Screenshots go to tests/output/ (git-ignored).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browser.chat import (
    STREAMING,
    api,
    last_answer,
    new_chat,
    open_chat,
    send,
    wait_final,
    words,
)
from tests.browser.conftest import DESKTOP, PHONE, TIMEOUT_MS
from tests.stack import WebProc, start_web, start_worker
from tidechat import db

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
ADMIN = "admin@operations.test"
REFRESH_S = 3  # operations.js refreshes the view this often


@pytest.fixture(scope="module")
def ops_stack(process_env, workdir) -> Iterator[tuple[WebProc, object]]:
    """Sign-in required; a web process and a worker on their own database and queue."""
    database_url = f"sqlite:///{workdir / 'operations.db'}"
    db.upgrade(database_url)
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "TIDECHAT_AUTH_MODE": "open",
        "TIDECHAT_ADMIN_EMAILS": ADMIN,
        "TIDECHAT_OPS_ALLOW": "",  # the loopback address is no operator here
        "TIDECHAT_HEARTBEAT_INTERVAL": "1",
        "TIDECHAT_OPENAI_MAX_RETRIES": "0",  # the failing model fails at once
        "TIDECHAT_CELERY_QUEUE": process_env["TIDECHAT_CELERY_QUEUE"] + "-operations",
    }
    worker = start_worker(env, workdir, name="worker-operations")
    try:
        web = start_web(env, workdir, name="web-operations")
    except BaseException:
        worker.stop()
        raise
    yield web, worker
    web.stop()
    worker.stop()


@pytest.fixture
def ops_browser(browser: Browser, ops_stack, problems):
    """A new browser (own cookies) on this module's stack, its pages watched for problems."""
    web, _ = ops_stack
    made: list[BrowserContext] = []

    def make(**options) -> tuple[BrowserContext, Page]:
        options.setdefault("viewport", DESKTOP)
        context = browser.new_context(base_url=web.url, **options)
        context.set_default_timeout(TIMEOUT_MS)
        made.append(context)
        return context, problems.watch(context.new_page())

    yield make
    for context in made:
        context.close()


def sign_up(context: BrowserContext, address: str) -> None:
    """An account, signed in in ``context`` (the cookie is the context's)."""
    response = context.request.post(
        "/api/auth/signup", data={"email": address, "password": PASSWORD}
    )
    assert response.status == 201, response.text()


def seconds(age: str) -> int:
    found = re.fullmatch(r"(\d+) s", age)
    assert found, f"not an age in seconds: {age!r}"
    return int(found[1])


def test_admin_sees_a_streaming_answer_and_stops_it(
    ops_browser, ops_stack, model_server, output_dir
):
    _, worker = ops_stack
    user = f"user-{uuid.uuid4().hex[:8]}@operations.test"
    admin_context, admin = ops_browser()
    sign_up(admin_context, ADMIN)
    user_context, user_page = ops_browser()
    sign_up(user_context, user)
    # Not for users (nor for the loopback address here): not even advertised.
    assert user_context.request.get("/api/admin/answers").status == 404

    # One answer fails (the model answers 500), then a slow one streams on the user's page.
    broken = model_server.script(status=500)
    failed = new_chat(user_context, broken)
    api(user_context, "POST", f"/api/conversations/{failed}/messages", {"content": "Fail"})
    slow = model_server.script(chunks=words(200), delay=0.2)  # 40 s unless stopped
    cid = new_chat(user_context, slow)
    open_chat(user_page, cid, slow)
    send(user_page, "Count slowly")
    answer = last_answer(user_page)
    expect(answer).to_have_class(STREAMING)
    expect(answer.locator(".markdown")).to_contain_text("w1")
    ended = wait_final(user_context, failed)["messages"][-1]
    assert ended["status"] == "error" and ended["error"]["code"] == "upstream_error", ended

    # The admin opens the view; it asks the server again every few seconds.
    asked: list[float] = []
    admin.on(
        "request",
        lambda r: asked.append(time.monotonic()) if r.url.endswith("/api/admin/answers") else None,
    )
    admin.goto("/")
    admin.get_by_role("button", name="Admin", exact=True).click()
    panel = admin.locator("#admin-dialog")
    expect(panel).to_be_visible()
    tab = panel.get_by_role("tab", name="Answers")
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(panel.get_by_role("tabpanel", name="Answers")).to_be_visible()
    expect(panel.locator("#admin-users-panel")).to_be_hidden()

    row = panel.locator("#ops-answers tr", has_text=user)
    expect(row.locator("th, td")).to_have_text(
        [
            user,
            slow,
            "running",
            re.compile(r"^\d+ s$"),
            re.compile(rf":{worker.popen.pid}$"),
            "Stop",
        ]
    )
    expect(panel.locator("#ops-queue-depth")).to_have_text("0")
    expect(panel.locator("#ops-running-count")).to_have_text("1")
    errors = panel.locator("#ops-errors tr", has_text="upstream_error")
    expect(errors.locator("th, td")).to_have_text(["upstream_error", "1"])
    ours = re.compile(rf":{worker.popen.pid}$")  # host:pid
    mine = panel.locator("#ops-workers tr").filter(has=admin.locator("th", has_text=ours))
    expect(mine.locator("th, td")).to_have_text([ours, "1", "Healthy"])

    # The age grows from one refresh to the next.
    age = row.locator(".ops-age")
    before = seconds(age.inner_text())
    expect(age).not_to_have_text(f"{before} s", timeout=(REFRESH_S + 5) * 1000)
    assert seconds(age.inner_text()) > before
    admin.screenshot(path=output_dir / "admin-answers-desktop-light.png", animations="disabled")

    # Refreshed every few seconds, no more often.
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert len(asked) >= 2, asked
    assert all(REFRESH_S - 0.5 < gap < REFRESH_S + 7 for gap in gaps), gaps

    # On a phone, in the dark, the view fits the screen.
    admin.set_viewport_size(PHONE)
    admin.emulate_media(color_scheme="dark")
    box = panel.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    admin.screenshot(path=output_dir / "admin-answers-phone-dark.png", animations="disabled")
    admin.set_viewport_size(DESKTOP)

    # The admin stops it: the user's page shows it stopped, and the row goes away.
    stop = row.get_by_role("button", name=f"Stop the answer of {user} ({slow})")
    stop.click()
    expect(answer).not_to_have_class(STREAMING)
    expect(answer.locator(".notice")).to_have_text("Stopped.")
    stored = wait_final(user_context, cid)["messages"][-1]
    assert stored["status"] == "cancelled"
    assert model_server.wait_for_hangup(slow, 15) is not None  # the model was let go
    expect(row).to_have_count(0)
    expect(panel.locator("#ops-answers")).to_have_text("No answers are running or waiting.")
    expect(panel.locator("#ops-running-count")).to_have_text("0")

    # Closed, the view stops asking; reopened, it starts again on the same tab.
    panel.get_by_role("button", name="Close").click()
    expect(panel).to_be_hidden()
    count = len(asked)
    admin.wait_for_timeout((REFRESH_S + 1) * 1000)
    assert len(asked) == count, "the closed view went on refreshing"
    admin.get_by_role("button", name="Admin", exact=True).click()
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(panel.locator("#ops-answers")).to_have_text("No answers are running or waiting.")
    assert len(asked) > count

    # The tabs work from the keyboard too (arrows move between them).
    tab.focus()
    admin.keyboard.press("ArrowLeft")
    users_tab = panel.get_by_role("tab", name="Users")
    expect(users_tab).to_be_focused()
    expect(users_tab).to_have_attribute("aria-selected", "true")
    expect(panel.locator("#admin-users-panel tbody tr", has_text=user)).to_be_visible()
    expect(panel.get_by_role("tabpanel", name="Answers")).to_be_hidden()
