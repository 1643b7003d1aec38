"""Layout and looks: phone width, light and dark, keyboard use; screenshots as artifacts.

Screenshots go to tests/output/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.chat import (
    api,
    expect_answer,
    last_answer,
    new_chat,
    open_chat,
    poll,
    wait_final,
)
from tests.browser.conftest import DESKTOP, PHONE

pytestmark = pytest.mark.e2e

RICH_ANSWER = [
    "Here is a quick way to **merge overlapping intervals** in Python:\n\n",
    "```python\ndef merge(intervals):\n    out = []\n",
    "    for start, end in sorted(intervals):\n",
    "        if out and start <= out[-1][1]:\n",
    "            out[-1][1] = max(out[-1][1], end)\n",
    "        else:\n            out.append([start, end])\n    return out\n```\n\n",
    "It runs in `O(n log n)` time:\n\n",
    "| Step | Cost |\n|---|---|\n| sort | O(n log n) |\n| scan | O(n) |\n\n",
    "1. Sort by start.\n2. Extend or append.\n",
]


@pytest.fixture
def rich_chat(context, model_server):
    """A finished chat with a Markdown answer, plus an older one for the sidebar."""
    model = model_server.script(
        chunks=RICH_ANSWER,
        usage={"prompt_tokens": 1234, "completion_tokens": 87, "total_tokens": 1321},
    )
    older = new_chat(context, model)
    api(
        context,
        "POST",
        f"/api/conversations/{older}/messages",
        {"content": "What is a Redis stream?"},
    )
    wait_final(context, older)
    cid = new_chat(context, model, system_prompt="Be brief.", temperature=0.3)
    api(
        context,
        "POST",
        f"/api/conversations/{cid}/messages",
        {"content": "How do I merge overlapping intervals in Python?"},
    )
    wait_final(context, cid)
    return cid, model


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots_desktop_and_phone(
    new_context, context, rich_chat, scheme, output_dir, problems
):
    cid, model = rich_chat
    state = context.storage_state()  # the same identity in every viewport
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        ctx = new_context(viewport=viewport, color_scheme=scheme, storage_state=state)
        page = problems.watch(ctx.new_page())
        page.goto("/")
        expect(page.locator("#empty")).to_be_visible()
        page.screenshot(path=output_dir / f"empty-{name}-{scheme}.png", animations="disabled")
        open_chat(page, cid, model)
        answer = last_answer(page)
        expect(answer.locator(".usage")).to_have_text("1,234 prompt · 87 completion tokens")
        expect(answer.locator("pre code .hljs-keyword").first).to_be_visible()
        dark = page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
        assert dark == (scheme == "dark")
        page.screenshot(path=output_dir / f"chat-{name}-{scheme}.png", animations="disabled")
        if name == "phone":
            sidebar = page.locator("#sidebar")
            expect(sidebar).to_be_hidden()
            toggle = page.locator("#open-sidebar")
            expect(toggle).to_be_visible()
            toggle.click()
            expect(sidebar).to_be_visible()
            expect(toggle).to_have_attribute("aria-expanded", "true")
            expect(page.locator("#new-chat")).to_be_focused()
            page.screenshot(path=output_dir / f"sidebar-{name}-{scheme}.png", animations="disabled")
            page.keyboard.press("Escape")
            expect(sidebar).to_be_hidden()
            expect(toggle).to_be_focused()
        else:
            expect(page.locator("#open-sidebar")).to_be_hidden()
            expect(page.locator("#sidebar")).to_be_visible()
            page.locator("#settings-toggle").click()
            expect(page.locator("#system-prompt")).to_have_value("Be brief.")
            expect(page.locator("#temperature")).to_have_value("0.3")
            page.screenshot(
                path=output_dir / f"settings-{name}-{scheme}.png", animations="disabled"
            )


def test_phone_sidebar_switches_chats(new_context, context, rich_chat, problems):
    cid, model = rich_chat
    ctx = new_context(viewport=PHONE, storage_state=context.storage_state())
    page = problems.watch(ctx.new_page())
    page.goto("/")
    page.locator("#open-sidebar").click()
    page.locator(f'[data-conversation-id="{cid}"] a').click()
    expect(page.locator("#sidebar")).to_be_hidden()
    expect(page.locator("#chat-title")).to_have_text(
        "How do I merge overlapping intervals in Python?"
    )
    expect(page.locator("#model-picker")).to_have_value(model)


def test_settings_are_saved_per_conversation(page, context, model_server):
    model = model_server.script(chunks=["Ahoy."])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    toggle = page.locator("#settings-toggle")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    prompt = page.get_by_label("System prompt")
    expect(prompt).to_be_focused()
    prompt.fill("Talk like a pirate.")
    temperature = page.get_by_label("Temperature")
    temperature.fill("1.2")
    temperature.press("Tab")
    expect(page.locator("#settings-status")).to_have_text("Saved.")
    poll(lambda: api(context, "GET", f"/api/conversations/{cid}")["temperature"] == 1.2)
    conv = api(context, "GET", f"/api/conversations/{cid}")
    assert conv["system_prompt"] == "Talk like a pirate."
    # The model receives them.
    page.locator("#input").fill("Hello")
    page.locator("#input").press("Enter")
    expect_answer(last_answer(page), "Ahoy.")
    body = model_server.requests_for(model)[-1].body
    assert body["messages"][0] == {"role": "system", "content": "Talk like a pirate."}
    assert body["temperature"] == 1.2


def test_keyboard_only_send(page, context, model_server):
    """The skip link leads to the box (keeping the chat open); Enter sends; focus shows."""
    model = model_server.script(chunks=["Keyboard", " works."])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    skip = page.get_by_role("link", name="Skip to the message box")
    skip.focus()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    box = page.locator("#input")
    expect(box).to_be_focused()
    assert page.url.endswith(f"#/c/{cid}")
    page.keyboard.type("Hi")
    page.keyboard.press("Enter")
    expect_answer(last_answer(page), "Keyboard works.")
    # Tab from the box reaches the answer's actions in order; focus is drawn visibly.
    regenerate = last_answer(page).get_by_role("button", name="Regenerate")
    regenerate.focus()
    outline = regenerate.evaluate("e => getComputedStyle(e).outlineStyle")
    assert outline != "none"


def test_rename_and_delete_from_the_sidebar(page, context, model_server, output_dir):
    model = model_server.script(chunks=["Fine."])
    keep = new_chat(context, model)
    api(context, "POST", f"/api/conversations/{keep}/messages", {"content": "keep me"})
    gone = new_chat(context, model)
    api(context, "POST", f"/api/conversations/{gone}/messages", {"content": "delete me"})
    wait_final(context, keep)
    wait_final(context, gone)
    open_chat(page, gone, model)

    item = page.locator(f'[data-conversation-id="{keep}"]')
    item.get_by_role("button", name="Rename “keep me”").click()
    title = page.get_by_label("Conversation title")
    expect(title).to_be_focused()
    title.fill("Kept, renamed")
    title.press("Enter")
    expect(item.locator("a")).to_have_text("Kept, renamed")
    poll(lambda: api(context, "GET", f"/api/conversations/{keep}")["title"] == "Kept, renamed")

    page.locator(f'[data-conversation-id="{gone}"]').get_by_role(
        "button", name="Delete “delete me”"
    ).click()
    dialog = page.locator("#delete-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("“delete me”")
    page.screenshot(path=output_dir / "delete-dialog-desktop-light.png", animations="disabled")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator(f'[data-conversation-id="{gone}"]')).to_have_count(0)
    expect(page.locator("#chat-title")).to_have_text("New chat")  # it was open: now a new chat
    assert context.request.get(f"/api/conversations/{gone}").status == 404


def test_input_grows_with_its_text(page):
    page.goto("/")
    box = page.locator("#input")
    expect(box).to_be_focused()
    one_line = box.bounding_box()["height"]
    box.fill("\n".join(f"line {i}" for i in range(5)))
    five_lines = box.evaluate("e => e.getBoundingClientRect().height")
    assert five_lines > one_line * 2
    box.fill("\n".join(f"line {i}" for i in range(200)))  # capped: then it scrolls
    many = box.evaluate("e => e.getBoundingClientRect().height")
    assert many <= 800 * 0.4 + 2
    assert box.evaluate("e => getComputedStyle(e).overflowY") == "auto"
    expect(page.locator("#send")).to_be_enabled()
