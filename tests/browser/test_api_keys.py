"""API keys in the page, end to end in Chromium on the session's stack (guest mode): a key
made in the page drives /v1 with the official ``openai`` Python SDK; the answer it started
in the background shows in the page's sidebar, and opening it resumes the stream to the
exact text; revoking the key in the page shuts the SDK out.

Screenshots go to tests/output/ (git-ignored).
"""

from __future__ import annotations

import re

import openai
import pytest
from playwright.sync_api import Page, expect

from tests.browser.chat import (
    RECORD_ANSWER_TEXTS,
    STREAMING,
    assert_no_duplicates,
    conversation,
    expect_answer,
    last_answer,
    words,
)
from tests.browser.conftest import PHONE

pytestmark = pytest.mark.e2e

QUESTION = "Tell me about the tide"
# 60 chunks, 0.15 s apart: 9 s, so the page opens the answer well before it ends.
ANSWER = words(60, "tide")
FULL = "".join(ANSWER)
SECRET = re.compile(r"^tc-[\w-]{20,}$")


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def open_keys(page: Page):
    page.get_by_role("button", name="API keys").click()
    dialog = page.get_by_role("dialog", name="API keys")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#keys-list")).not_to_have_attribute("aria-busy", "true")
    return dialog


def create_key(page: Page, name: str) -> str:
    """Create a key in the open dialog; the secret it shows (once)."""
    dialog = page.get_by_role("dialog", name="API keys")
    dialog.get_by_label("Name of a new key").fill(name)
    dialog.get_by_role("button", name="Create key").click()
    secret = dialog.get_by_label(f"Your new key “{name}”")
    expect(secret).to_be_visible()
    expect(secret).to_have_value(SECRET)
    expect(secret).to_be_focused()
    expect(secret).to_have_attribute("readonly", "")
    expect(dialog.locator("#key-secret-note")).to_contain_text("will not be shown again")
    return secret.input_value()


def key_row(page: Page, hint: str):
    return page.locator("#keys-list .key-item").filter(has_text=hint)


def test_a_key_made_in_the_page_drives_the_sdk_and_the_page_resumes_its_answer(
    page, context, web, model_server, output_dir
):
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    model = model_server.script(chunks=ANSWER, delay=0.15)
    page.add_init_script(RECORD_ANSWER_TEXTS)
    page.goto("/")
    expect(page.locator("#empty")).to_be_visible()

    # -- create a key in the page: its secret is shown once, with a Copy button
    dialog = open_keys(page)
    expect(dialog.locator("#keys-base-url")).to_have_value(web.url + "/v1")
    expect(dialog.locator("#keys-example")).to_contain_text(f'base_url="{web.url}/v1"')
    expect(dialog.locator(".keys-empty")).to_have_text("No keys yet.")
    key = create_key(page, "Laptop")
    hint = "…" + key[-4:]
    row = key_row(page, hint)
    expect(row).to_have_count(1)
    expect(row.locator(".key-name")).to_have_text("Laptop")
    expect(row.locator(".key-used")).to_have_text("Never used")
    expect(row.locator(".key-created time")).to_have_attribute("datetime", re.compile(r"^\d{4}-"))
    dialog.get_by_role("button", name="Copy the new key").click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    page.screenshot(path=output_dir / "api-keys-created.png", animations="disabled")

    # closed and opened again, the secret is gone: only its hint is left
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    # the dialog's "close" event (which forgets the secret) is dispatched as a task
    # after close(): wait for it rather than read the field at once
    expect(page.locator("#key-secret")).to_have_value("")
    open_keys(page)
    expect(page.locator("#key-secret-box")).to_be_hidden()
    expect(key_row(page, hint)).to_have_count(1)
    assert key not in page.content()
    page.get_by_role("dialog", name="API keys").get_by_role("button", name="Close").click()

    # -- the SDK starts a slow background answer, reads a little of it and hangs up
    client = sdk(web.url, key)
    stream = client.responses.create(model=model, input=QUESTION, background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if sum(e.type == "response.output_text.delta" for e in seen) >= 3:
            break
    stream.close()
    response_id = seen[0].response.id
    assert seen[0].response.background is True

    # -- the page: the conversation is in the sidebar; opening it follows the live answer
    page.reload()
    link = page.locator("#conversation-list a", has_text=QUESTION)
    expect(link).to_have_count(1)
    link.click()
    expect(page.locator("#chat-title")).to_have_text(QUESTION)
    expect(page.locator("#messages .message.user .bubble")).to_have_text(QUESTION)
    answer = last_answer(page)
    expect(answer).to_have_class(STREAMING)  # still being written: the page attached to it
    expect(page.locator("#stop")).to_be_visible()
    expect_answer(answer, FULL)
    assert_no_duplicates(page, FULL)
    shown = page.evaluate("window.__answerTexts")
    assert len(shown) > 1 and shown[0] != FULL  # it grew in the page, not all at once
    cid = re.search(r"#/c/([\w-]+)$", page.url).group(1)
    stored = conversation(context, cid)["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", QUESTION), ("assistant", FULL),
    ]  # fmt: skip
    assert client.responses.retrieve(response_id).output_text == FULL
    assert model_server.requests_for(model)[-1].hung_up is None  # the hang-up stopped nothing

    # -- revoke it in the page (after a confirmation): the SDK is shut out
    open_keys(page)
    row = key_row(page, hint)
    expect(row.locator(".key-used")).to_contain_text("Last used")
    row.get_by_role("button", name=f"Revoke Laptop ({hint})").click()
    confirm = page.get_by_role("dialog", name="Revoke this key?")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(f"“Laptop” ({hint})")
    page.screenshot(path=output_dir / "api-keys-revoke.png", animations="disabled")
    confirm.get_by_role("button", name="Cancel").click()  # first: changed my mind
    expect(confirm).to_be_hidden()
    assert client.models.list().data  # still works
    row.get_by_role("button", name=f"Revoke Laptop ({hint})").click()
    confirm.get_by_role("button", name="Revoke").click()
    expect(confirm).to_be_hidden()
    expect(key_row(page, hint)).to_have_count(0)
    expect(page.locator("#keys-list .keys-empty")).to_have_text("No keys yet.")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.responses.retrieve(response_id)
    # the chat it made is the guest's own, and stays
    expect(page.locator("#conversation-list a", has_text=QUESTION)).to_have_count(1)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_keys_dialog_on_a_phone(new_context, problems, scheme, output_dir):
    page = problems.watch(new_context(viewport=PHONE, color_scheme=scheme).new_page())
    page.goto("/")
    page.get_by_role("button", name="Open the sidebar").click()
    dialog = open_keys(page)
    key = create_key(page, "Phone")
    page.screenshot(path=output_dir / f"api-keys-phone-{scheme}.png", animations="disabled")
    # everything fits the phone's width: nothing to scroll sideways
    box = dialog.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    for control in ("#key-secret", "#keys-base-url"):
        field = page.locator(control).bounding_box()
        assert field is not None and field["x"] + field["width"] <= box["x"] + box["width"]
    assert page.evaluate(
        "(() => { const d = document.getElementById('keys-dialog');"
        " return d.scrollWidth <= d.clientWidth; })()"
    )
    # every control in it has an accessible name
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll(
                "#keys-dialog button, #keys-dialog input, #keys-dialog a[href]")]
            .filter((e) => e.checkVisibility())
            .filter((e) => {
              const label = e.getAttribute("aria-label") || e.textContent.trim()
                || (e.labels && [...e.labels].map((l) => l.textContent.trim()).join(""));
              return !label;
            })
            .map((e) => e.outerHTML.slice(0, 120))"""
    )
    assert unnamed == []
    # Escape closes it, and the secret with it
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert key not in page.content()
