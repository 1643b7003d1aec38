"""Accounts in the page, end to end in Chromium: sign-up and sign-in, a chat followed on a
second device while it streams, wrong passwords, signing out (here and everywhere), an
admin disabling an account, an invitation link, and a guest who signs up keeping their chats.

Most tests run against a stack of their own with ``TIDECHAT_AUTH_MODE=open`` (a web
process and a worker on their own queue and database); the invitation test against a web
process in ``invite`` mode; the guest test on the session's stack (guest mode, the default).
Screenshots go to tests/output/ (git-ignored).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.browser.chat import (
    RECORD_ANSWER_TEXTS,
    STREAMING,
    assert_no_duplicates,
    expect_answer,
    last_answer,
    new_chat,
    open_chat,
    send,
    wait_final,
    words,
)
from tests.browser.conftest import PHONE
from tests.stack import WebProc, free_port, start_web, start_worker
from tidechat import db

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
ADMIN = "admin@accounts.test"
SIGNED_OUT = "You were signed out. Sign in again to go on."


@pytest.fixture(scope="module")
def open_stack(process_env, workdir) -> Iterator[WebProc]:
    """Sign-in required: a web process and a worker of their own (own queue, own database,
    so the first account and the admin are this module's)."""
    database_url = f"sqlite:///{workdir / 'accounts-open.db'}"
    db.upgrade(database_url)
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "TIDECHAT_AUTH_MODE": "open",
        "TIDECHAT_ADMIN_EMAILS": ADMIN,
        "TIDECHAT_CELERY_QUEUE": process_env["TIDECHAT_CELERY_QUEUE"] + "-accounts",
    }
    worker = start_worker(env, workdir, name="worker-accounts")
    try:
        web = start_web(env, workdir, name="web-accounts")
    except BaseException:
        worker.stop()
        raise
    yield web
    web.stop()
    worker.stop()


@pytest.fixture(scope="module")
def invite_stack(process_env, workdir) -> Iterator[WebProc]:
    """Sign-up by invitation, with single sign-on configured (a provider nobody runs: the
    page only links to it). No worker: nothing here asks the model."""
    database_url = f"sqlite:///{workdir / 'accounts-invite.db'}"
    db.upgrade(database_url)
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "TIDECHAT_AUTH_MODE": "invite",
        "TIDECHAT_ADMIN_EMAILS": ADMIN,
        "TIDECHAT_OIDC_ISSUER": f"http://127.0.0.1:{free_port()}/idp",
        "TIDECHAT_OIDC_CLIENT_ID": "tidechat-test",
        "TIDECHAT_OIDC_CLIENT_SECRET": "not-a-secret",
        "TIDECHAT_OIDC_LABEL": "Example SSO",
        "TIDECHAT_CELERY_QUEUE": process_env["TIDECHAT_CELERY_QUEUE"] + "-invites",
    }
    web = start_web(env, workdir, name="web-invites")
    yield web
    web.stop()


@pytest.fixture
def open_page(new_context, open_stack, problems):
    """A new browser (its own cookies) on the open stack, its page watched for problems."""

    def make(**options) -> tuple[BrowserContext, Page]:
        context = new_context(base_url=open_stack.url, **options)
        return context, problems.watch(context.new_page())

    return make


def email(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@accounts.test"


def sign_up_api(base_url: str, address: str, password: str = PASSWORD) -> None:
    """An account made outside the browser (a person who signed up on another day)."""
    response = httpx.post(
        base_url + "/api/auth/signup", json={"email": address, "password": password}
    )
    assert response.status_code == 201, response.text


def watch_api(page: Page) -> list[tuple[str, int]]:
    """Every /api response the page gets: (path, status)."""
    seen: list[tuple[str, int]] = []

    def record(response) -> None:
        path = "/" + response.url.split("/", 3)[3]
        if path.startswith("/api/"):
            seen.append((path, response.status))

    page.on("response", record)
    return seen


def expect_sign_in_screen(page: Page, message: str | None = None) -> None:
    """The sign-in screen and nothing of the chat."""
    expect(page.locator("#auth-screen")).to_be_visible()
    expect(page.locator("#auth-heading")).to_have_text("Sign in")
    expect(page.get_by_label("Email")).to_be_visible()
    expect(page.get_by_label("Password")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    expect(page.locator("#input")).to_be_hidden()
    expect(page.locator("#conversation-list")).to_be_hidden()
    if message is not None:
        expect(page.locator("#auth-error")).to_have_text(message)


def fill_and_submit(page: Page, address: str, password: str) -> None:
    form = page.locator("#auth-form")
    form.get_by_label("Email").fill(address)
    form.get_by_label("Password").fill(password)
    form.locator("#auth-submit").click()


def sign_in(page: Page, address: str, password: str = PASSWORD) -> None:
    """Sign in on the sign-in screen; the chat then loads as that account."""
    page.goto("/")
    expect_sign_in_screen(page)
    fill_and_submit(page, address, password)
    expect_signed_in(page, address)


def expect_signed_in(page: Page, address: str) -> None:
    expect(page.locator("#auth-screen")).to_be_hidden()
    expect(page.locator("#input")).to_be_visible()
    expect(page.locator("#account-email")).to_have_text(address)
    expect(page.get_by_role("button", name="Sign out", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Sign out everywhere")).to_be_visible()


def test_sign_up_chat_and_follow_a_streaming_answer_on_a_second_device(
    open_page, model_server, output_dir
):
    address = email("ada")
    context_a, page_a = open_page()
    api_calls = watch_api(page_a)
    page_a.goto("/")
    expect_sign_in_screen(page_a)
    page_a.screenshot(path=output_dir / "sign-in-desktop-light.png", animations="disabled")
    # Before anyone signs in, the page asks only who is signed in: nothing that answers 401.
    assert {path for path, _ in api_calls} == {"/api/auth/me"}
    assert all(status == 200 for _, status in api_calls)

    page_a.get_by_role("button", name="Create an account").click()
    expect(page_a.locator("#auth-heading")).to_have_text("Sign up")
    expect(page_a.get_by_label("Password")).to_have_attribute("autocomplete", "new-password")
    fill_and_submit(page_a, address, PASSWORD)
    expect_signed_in(page_a, address)
    expect(page_a.get_by_role("button", name="Admin", exact=True)).to_be_hidden()  # not an admin
    expect(page_a.locator("#backend-line")).to_be_hidden()  # no backend label configured
    assert not [call for call in api_calls if call[1] == 401]

    model = model_server.script(chunks=words(8, "hi"), delay=0.02)
    first = new_chat(context_a, model)
    open_chat(page_a, first, model)
    send(page_a, "Hello from device A")
    expect_answer(last_answer(page_a), "".join(words(8, "hi")))

    # Device B: the same account sees the same chat.
    context_b, page_b = open_page()
    page_b.add_init_script(RECORD_ANSWER_TEXTS)
    sign_in(page_b, address)
    expect(page_b.locator(f'[data-conversation-id="{first}"] a')).to_have_text(
        "Hello from device A"
    )

    # A slow answer starts on A; B opens that chat mid-stream and gets all of it, exactly.
    chunks = words(40)
    full = "".join(chunks)
    slow = model_server.script(chunks=chunks, delay=0.1)
    second = new_chat(context_a, slow)
    open_chat(page_a, second, slow)
    send(page_a, "Count slowly for me")
    expect(last_answer(page_a).locator(".markdown")).to_contain_text("w3")

    page_b.reload()  # B's sidebar lists what A just started
    page_b.locator(f'[data-conversation-id="{second}"] a').click()
    answer_b = last_answer(page_b)
    expect(answer_b).to_have_class(STREAMING)  # joined while it streams
    expect(page_b.locator("#messages .message.user .bubble")).to_have_text("Count slowly for me")
    expect_answer(answer_b, full)
    assert_no_duplicates(page_b, full)
    expect_answer(last_answer(page_a), full)
    assert wait_final(context_b, second)["messages"][-1]["content"] == full


def test_wrong_password_shows_the_error_and_no_chat(open_page, open_stack, output_dir):
    address = email("bob")
    sign_up_api(open_stack.url, address)
    _, page = open_page(viewport=PHONE, color_scheme="dark")
    page.goto("/")
    expect_sign_in_screen(page)
    fill_and_submit(page, address, "not the password at all")
    expect_sign_in_screen(page, "Wrong email or password.")
    expect(page.get_by_label("Password")).to_be_focused()
    page.screenshot(path=output_dir / "sign-in-error-phone-dark.png", animations="disabled")
    # An unknown address reads the same (no telling which accounts exist).
    fill_and_submit(page, email("nobody"), PASSWORD)
    expect_sign_in_screen(page, "Wrong email or password.")
    page.reload()
    expect_sign_in_screen(page)


def test_sign_out_and_sign_out_everywhere(open_page, open_stack):
    address = email("cy")
    sign_up_api(open_stack.url, address)
    _, page_a = open_page()
    _, page_b = open_page()
    sign_in(page_a, address)
    sign_in(page_b, address)

    page_a.get_by_role("button", name="Sign out", exact=True).click()
    expect_sign_in_screen(page_a)
    page_a.reload()
    expect_sign_in_screen(page_a)
    expect(page_b.locator("#input")).to_be_visible()  # B's own sign-in goes on

    sign_in(page_a, address)
    page_b.get_by_role("button", name="Sign out everywhere").click()
    expect_sign_in_screen(page_b)
    # A finds out on its next request: sending a message brings the sign-in screen back.
    box = page_a.locator("#input")
    box.fill("Am I still signed in?")
    box.press("Enter")
    expect_sign_in_screen(page_a, SIGNED_OUT)
    page_a.reload()
    expect_sign_in_screen(page_a)


def test_admin_disables_a_user_who_is_then_signed_out(open_page, open_stack, output_dir):
    user = email("dee")
    sign_up_api(open_stack.url, user)
    sign_up_api(open_stack.url, ADMIN)  # an admin by TIDECHAT_ADMIN_EMAILS
    _, user_page = open_page()
    sign_in(user_page, user)
    _, admin_page = open_page()
    sign_in(admin_page, ADMIN)

    admin_page.get_by_role("button", name="Admin", exact=True).click()
    panel = admin_page.locator("#admin-dialog")
    expect(panel).to_be_visible()
    row = panel.locator("tbody tr", has_text=user)
    expect(row.locator("td")).to_have_text(["User", "0", "0", "Active", "Disable"])
    own = panel.locator("tbody tr", has_text=ADMIN)
    expect(own.locator("td").first).to_have_text("Admin")
    expect(own.get_by_role("button")).to_have_count(0)  # no disabling oneself
    row.get_by_role("button", name=f"Disable {user}").click()
    expect(row.locator("td").nth(3)).to_have_text("Disabled")
    expect(row.get_by_role("button", name=f"Enable {user}")).to_be_visible()

    panel.get_by_role("button", name="Create invitation").click()
    expect(panel.get_by_label("Invitation link")).to_have_value(
        re.compile(re.escape(open_stack.url) + r"/\?invite=[\w-]{16,}$")
    )
    admin_page.screenshot(path=output_dir / "admin-desktop-light.png", animations="disabled")

    # The disabled user's page is signed out on its next load, and cannot sign in again.
    user_page.reload()
    expect_sign_in_screen(user_page)
    fill_and_submit(user_page, user, PASSWORD)
    expect_sign_in_screen(user_page, "This account is disabled.")

    row.get_by_role("button", name=f"Enable {user}").click()
    expect(row.locator("td").nth(3)).to_have_text("Active")
    fill_and_submit(user_page, user, PASSWORD)
    expect_signed_in(user_page, user)


def test_guest_signs_up_and_keeps_the_chat(page, context, model_server, output_dir):
    """Guest mode (the session's stack): chat first, sign up from the sidebar, keep it."""
    model = model_server.script(chunks=["Kept", " for", " you."])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Remember this chat")
    expect_answer(last_answer(page), "Kept for you.")
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()

    page.get_by_role("button", name="Sign up", exact=True).click()
    dialog = page.locator("#auth-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#auth-heading")).to_have_text("Sign up")
    page.screenshot(path=output_dir / "sign-up-dialog-desktop-light.png", animations="disabled")
    address = email("guest")
    fill_and_submit(page, address, PASSWORD)

    expect(dialog).to_be_hidden()
    expect(page.locator("#account-email")).to_have_text(address)
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_have_count(0)
    link = page.locator(f'[data-conversation-id="{cid}"] a')
    expect(link).to_have_text("Remember this chat")
    expect_answer(last_answer(page), "Kept for you.")  # the open chat is still there
    page.screenshot(path=output_dir / "signed-in-desktop-light.png", animations="disabled")

    # Signed out, the browser is a new guest without it; signing in brings it back.
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(link).to_have_count(0)
    page.get_by_role("button", name="Sign in", exact=True).click()
    fill_and_submit(page, address, PASSWORD)
    expect(page.locator("#account-email")).to_have_text(address)
    expect(link).to_have_text("Remember this chat")


def test_invitation_link_opens_sign_up_with_its_code(
    new_context, invite_stack, problems, output_dir
):
    """Invite mode: the admin's invitation link opens sign-up with the code filled in (the
    single sign-on link carries it too); the code works once."""
    sign_up_api(invite_stack.url, ADMIN)  # the admin needs no invitation

    def browser(**options) -> Page:
        return problems.watch(new_context(base_url=invite_stack.url, **options).new_page())

    admin = browser()
    sign_in(admin, ADMIN)
    admin.get_by_role("button", name="Admin", exact=True).click()
    admin.get_by_role("button", name="Create invitation").click()
    link = admin.get_by_label("Invitation link")
    expect(link).to_have_value(re.compile(r"\?invite=[\w-]{16,}$"))
    url = link.input_value()
    code = url.rsplit("=", 1)[1]

    guest = browser(color_scheme="dark")
    guest.goto(url)
    expect(guest.locator("#auth-screen")).to_be_visible()
    expect(guest.locator("#auth-heading")).to_have_text("Sign up")
    expect(guest.locator("#app")).to_be_hidden()
    expect(guest.get_by_label("Invitation code")).to_have_value(code)
    sso = guest.get_by_role("link", name="Continue with Example SSO")
    expect(sso).to_have_attribute("href", f"/auth/oidc/login?invite={code}")
    guest.screenshot(path=output_dir / "sign-up-invite-desktop-dark.png", animations="disabled")
    address = email("invited")
    fill_and_submit(guest, address, PASSWORD)
    expect_signed_in(guest, address)
    assert "invite=" not in guest.url  # used up: not left in the address bar

    again = browser()
    again.goto(url)
    fill_and_submit(again, email("late"), PASSWORD)
    expect(again.locator("#auth-error")).to_have_text("Sign-up here needs a valid invitation code.")
    expect(again.locator("#app")).to_be_hidden()

    # Single sign-on that came back with an error says so on the sign-in screen, once.
    again.goto("/?auth_error=sso_failed")
    expect_sign_in_screen(again, "Single sign-on did not work. Try again.")
    assert "auth_error" not in again.url
    again.reload()
    expect(again.locator("#auth-error")).to_be_hidden()
