"""The chat page in a real browser: sending, streaming, rendering, stop, regenerate, retry."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.chat import (
    STREAMING,
    answers,
    conversation,
    expect_answer,
    last_answer,
    new_chat,
    open_chat,
    send,
    wait_final,
    words,
)
from tests.model_server import Script

pytestmark = pytest.mark.e2e


def test_page_is_served_with_a_strict_csp_and_no_secrets(page, settings):
    response = page.goto("/")
    assert response is not None and response.ok
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    html = response.text()
    assert "<script>" not in html  # no inline script: the app is an ES module from static/
    models = page.context.request.get("/api/models").text()
    for secret in (settings["OPENAI_API_KEY"], settings["SECRET_KEY"]):
        assert secret not in html
        assert secret not in models
    # The app ran (no CSP violation, no uncaught error: the `problems` fixture checks).
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")
    expect(page.locator("#input")).to_be_focused()
    expect(page.locator("#send")).to_be_disabled()
    # The model picker lists the backend's models, the configured default marked and chosen.
    picker = page.locator("#model-picker")
    expect(picker).to_have_value("gpt-4o-mini")
    expect(picker.locator("option", has_text="gpt-4o-mini (default)")).to_have_count(1)
    # The backend is not named unless the operator names it (TIDECHAT_BACKEND_LABEL).
    expect(page.locator("#backend-line")).to_be_hidden()
    assert "127.0.0.1" not in models


def test_send_streams_the_answer_and_shows_what_is_stored(page, context, model_server):
    chunks = words(24)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    expect(page.locator("#empty")).to_be_visible()

    box = page.locator("#input")
    box.fill("first line")
    box.press("Shift+Enter")  # a new line, not a send
    box.press_sequentially("second line")
    expect(box).to_have_value("first line\nsecond line")
    box.press("Enter")
    expect(box).to_have_value("")

    user = page.locator("#messages .message.user")
    expect(user.locator(".bubble")).to_have_text("first line\nsecond line")
    answer = last_answer(page)
    # Live: the answer streams into a polite live region, with Stop instead of Send.
    expect(answer).to_have_class("message assistant streaming")
    expect(answer.locator(".markdown")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    expect(answer.locator(".markdown")).to_contain_text("w3")

    expect_answer(answer, full)
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(answer.locator(".usage")).to_have_text("7 prompt · 3 completion tokens")
    expect(answer.locator(".model-name")).to_have_text(model)
    expect(answer.get_by_role("button", name="Regenerate")).to_be_visible()
    expect(answer.get_by_role("button", name="Copy answer")).to_be_visible()

    stored = wait_final(context, cid)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "first line\nsecond line"
    assert stored[1]["content"] == full
    assert answer.locator(".markdown").inner_text() == stored[1]["content"]

    # The sidebar lists the chat under its title (the first words of the message).
    link = page.locator(f'[data-conversation-id="{cid}"] a')
    expect(link).to_have_text("first line second line")
    expect(link).to_have_attribute("aria-current", "page")
    expect(page.locator("#chat-title")).to_have_text("first line second line")


def test_new_chat_from_the_empty_page_and_sidebar_is_newest_first(page, context, model_server):
    model = model_server.script(chunks=["Answer one."])
    older = new_chat(context, model)
    api_send = context.request.post(
        f"/api/conversations/{older}/messages", data={"content": "older chat", "model": model}
    )
    assert api_send.status == 202
    wait_final(context, older)

    page.goto("/")
    expect(page.locator(f'[data-conversation-id="{older}"]')).to_be_visible()
    send(page, "Hello from the empty page")
    expect(page).to_have_url(re.compile(r"#/c/[\w-]+$"))
    cid = page.url.rsplit("/", 1)[1]
    # Newest first: the chat just started is above the older one.
    items = page.locator("#conversation-list [data-conversation-id]")
    expect(items.first).to_have_attribute("data-conversation-id", cid)
    expect(items.nth(1)).to_have_attribute("data-conversation-id", older)
    expect(last_answer(page)).not_to_have_class(STREAMING)
    conv = conversation(context, cid)
    assert conv["title"] == "Hello from the empty page"
    assert conv["messages"][0]["content"] == "Hello from the empty page"

    page.locator("#new-chat").click()
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#chat-title")).to_have_text("New chat")


def test_model_output_is_inert_and_code_is_highlighted(page, context, model_server):
    chunks = [
        "Look: <img src=x onerror=\"window.__pwned='img'\"> and ",
        "<script>window.__pwned='script'</script>\n\n",
        "[click](javascript:window.__pwned='link') ",
        "**bold** text\n\n",
        "```python\ndef add(a, b):\n    return a + b\n```\n",
    ]
    model = model_server.script(chunks=chunks, delay=0.05)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    hostile_user = "<b>me</b><img src=y onerror=\"window.__pwned='user'\">"
    send(page, hostile_user)

    answer = last_answer(page)
    expect(answer).not_to_have_class(STREAMING)
    body = answer.locator(".markdown")
    expect(body.locator("strong")).to_have_text("bold")
    # Raw HTML from the model shows as text; nothing of it is live markup.
    expect(body).to_contain_text("<img src=x onerror=")
    expect(body).to_contain_text("<script>window.__pwned='script'</script>")
    assert page.locator("#messages img, #messages script, #messages [onerror]").count() == 0
    link = body.locator("a", has_text="click")
    expect(link).to_have_count(1)
    assert not (link.get_attribute("href") or "").strip().lower().startswith("javascript:")
    # The user's text is shown exactly as typed.
    expect(page.locator("#messages .message.user .bubble")).to_have_text(hostile_user)

    code = body.locator("pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b.*\blanguage-python\b"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code).to_have_text("def add(a, b):\n    return a + b")
    expect(body.locator(".code-language")).to_have_text("python")
    expect(body.get_by_role("button", name="Copy code")).to_be_visible()

    link.click()  # even clicked, it runs nothing
    assert page.evaluate("window.__pwned") is None

    stored = wait_final(context, cid)["messages"][-1]
    assert stored["content"] == "".join(chunks)


def test_single_newlines_in_an_answer_are_line_breaks(page, context, model_server):
    # Markdown joins lines by default, which ran a poem's lines together into one.
    poem = "Waves fold on the shore,\nsalt wind through the dark sails,\nstill water at dusk."
    model = model_server.script(chunks=[poem])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "A haiku, please")
    answer = last_answer(page)
    expect(answer).not_to_have_class(STREAMING)
    expect(answer.locator(".markdown p br")).to_have_count(2)
    assert answer.locator(".markdown").inner_text() == poem


def test_stop_ends_the_answer_where_it_is(page, context, model_server):
    model = model_server.script(chunks=words(200), delay=0.1)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Count slowly")
    answer = last_answer(page)
    expect(answer.locator(".markdown")).to_contain_text("w2")
    page.locator("#stop").click()

    expect(answer).not_to_have_class(STREAMING)
    expect(answer.locator(".notice")).to_have_text("Stopped.")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    stored = wait_final(context, cid)["messages"][-1]
    assert stored["status"] == "cancelled"
    assert stored["content"].startswith("w0 w1 w2")
    assert len(stored["content"]) < len("".join(words(200)))
    expect(answer.locator(".markdown")).to_have_text(stored["content"])
    assert answer.locator(".markdown").inner_text() == stored["content"]


def test_regenerate_replaces_the_last_answer(page, context, model_server):
    model = model_server.script(chunks=["The first answer."])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Say something")
    expect_answer(last_answer(page), "The first answer.")
    first_id = last_answer(page).get_attribute("data-message-id")

    model_server.scripts[model] = Script(chunks=words(10, "again"), delay=0.05)
    last_answer(page).get_by_role("button", name="Regenerate").click()
    expect(answers(page)).to_have_count(1)
    expect_answer(last_answer(page), "".join(words(10, "again")))
    assert last_answer(page).get_attribute("data-message-id") != first_id
    stored = wait_final(context, cid)["messages"]
    assert [m["content"] for m in stored] == ["Say something", "".join(words(10, "again"))]
    assert len(model_server.requests_for(model)) == 2


def test_failed_answer_shows_an_error_and_retry_works(page, context, model_server, output_dir):
    model = model_server.script(chunks=["Partial"], error_event={"message": "model overloaded"})
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Try this")
    answer = last_answer(page)
    error = answer.locator(".error-box")
    expect(error).to_be_visible()
    expect(error).to_contain_text("failed in the middle of the answer")
    expect(error).not_to_contain_text("model overloaded")  # the model server's words: logged
    expect(error).to_have_attribute("role", "alert")
    assert wait_final(context, cid)["messages"][-1]["status"] == "error"
    page.screenshot(path=output_dir / "error-desktop-light.png", animations="disabled")

    model_server.scripts[model] = Script(chunks=["Recovered", " fine."])
    answer.get_by_role("button", name="Retry").click()
    expect(answers(page)).to_have_count(1)
    expect_answer(last_answer(page), "Recovered fine.")
    expect(last_answer(page).locator(".error-box")).to_be_hidden()
    assert wait_final(context, cid)["messages"][-1]["content"] == "Recovered fine."


def test_http_error_from_the_model_is_shown(page, context, model_server):
    model = model_server.script(status=500)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Anyone there?")
    answer = last_answer(page)
    expect(answer.locator(".error-box")).to_contain_text("500")
    expect(answer.get_by_role("button", name="Retry")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()


def test_copy_buttons_copy_the_answer_and_the_code(page, context, model_server):
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    chunks = ["Run this:\n\n", "```sh\necho 'hi there'\n```\n"]
    model = model_server.script(chunks=chunks)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "How do I greet?")
    answer = last_answer(page)
    expect(answer).not_to_have_class(STREAMING)

    code_copy = answer.locator(".code-header button")
    expect(code_copy).to_have_accessible_name("Copy code")
    code_copy.click()
    expect(code_copy).to_have_class(re.compile(r"\bcopied\b"))
    expect(code_copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "echo 'hi there'"

    answer.get_by_role("button", name="Copy answer").click()
    assert page.evaluate("navigator.clipboard.readText()") == "".join(chunks)  # the Markdown
    page.locator("#messages .message.user").get_by_role("button", name="Copy message").click()
    assert page.evaluate("navigator.clipboard.readText()") == "How do I greet?"
    # The copy button comes back after a moment, for the next copy.
    expect(code_copy).to_have_text("Copy code")


def test_every_control_has_an_accessible_name(page, context, model_server):
    model = model_server.script(chunks=["Named."])
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Names, please")
    expect(last_answer(page)).not_to_have_class(STREAMING)
    page.locator("#settings-toggle").click()
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll("button, a[href], input, select, textarea")]
            .filter((e) => e.checkVisibility())
            .filter((e) => {
              const label = e.getAttribute("aria-label") || e.textContent.trim()
                || (e.labels && [...e.labels].map((l) => l.textContent.trim()).join(""));
              return !label;
            })
            .map((e) => e.outerHTML.slice(0, 120))"""
    )
    assert unnamed == []
    # The streaming answer's region is polite-live; the page has a status announcer.
    expect(page.locator("#announcer")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#messages")).to_have_attribute("aria-label", "Messages")
