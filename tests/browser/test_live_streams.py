"""Streams that outlive the page: reload, a second tab, switching chats, a dropped network.

Each checks the exact text: the final answer equals what the server stored, and every text
the answer showed on the way was a prefix of it (nothing doubled, nothing skipped).
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.chat import (
    RECORD_ANSWER_TEXTS,
    STREAMING,
    answer_texts,
    api,
    assert_no_duplicates,
    expect_answer,
    last_answer,
    new_chat,
    open_chat,
    send,
    wait_final,
    words,
)
from tests.browser.proxy import DroppingProxy

pytestmark = pytest.mark.e2e


def test_reload_mid_stream_continues_without_duplicates(page, context, model_server):
    chunks = words(50)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    cid = new_chat(context, model)
    page.add_init_script(RECORD_ANSWER_TEXTS)
    open_chat(page, cid, model)
    send(page, "Stream for a while")
    expect(last_answer(page).locator(".markdown")).to_contain_text("w5")

    page.reload()
    answer = last_answer(page)
    expect(answer).to_have_class(STREAMING)  # re-attached to the live stream
    expect(page.locator("#stop")).to_be_visible()
    expect_answer(answer, full)
    assert_no_duplicates(page, full)
    assert wait_final(context, cid)["messages"][-1]["content"] == full
    assert len(model_server.requests_for(model)) == 1  # one generation, not restarted


def test_two_tabs_on_one_conversation_both_stream_it(page, context, problems, model_server):
    chunks = words(30)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    other = problems.watch(context.new_page())  # same context: same cookie, same owner
    open_chat(other, cid, model)
    expect(other.locator("#empty")).to_be_visible()

    send(page, "Both tabs watch this")
    # The other tab hears of the new message and follows the same stream, live.
    expect(other.locator("#messages .message.user .bubble")).to_have_text("Both tabs watch this")
    expect(last_answer(other)).to_have_class(STREAMING)
    expect(other.locator("#stop")).to_be_visible()
    for tab in (page, other):
        expect_answer(last_answer(tab), full)
    assert wait_final(context, cid)["messages"][-1]["content"] == full


def test_switching_away_keeps_the_answer_going(page, context, model_server):
    chunks = words(30)
    full = "".join(chunks)
    slow = model_server.script(chunks=chunks, delay=0.1)
    fast = model_server.script(chunks=["Quick answer."])
    other = new_chat(context, fast)
    api(context, "POST", f"/api/conversations/{other}/messages", {"content": "quick"})
    wait_final(context, other)

    cid = new_chat(context, slow)
    open_chat(page, cid, slow)
    send(page, "A long one")
    expect(last_answer(page).locator(".markdown")).to_contain_text("w3")

    page.locator(f'[data-conversation-id="{other}"] a').click()
    expect(page).to_have_url(f"{page.url.split('#')[0]}#/c/{other}")
    expect_answer(last_answer(page), "Quick answer.")
    expect(page.locator("#send")).to_be_visible()  # that chat is idle

    page.locator(f'[data-conversation-id="{cid}"] a').click()
    answer = last_answer(page)
    expect(page.locator("#messages .message.user .bubble")).to_have_text("A long one")
    expect_answer(answer, full)
    assert wait_final(context, cid)["messages"][-1]["content"] == full


@pytest.fixture
def proxy(web):
    from urllib.parse import urlsplit

    target = urlsplit(web.url)
    proxy = DroppingProxy(target.hostname, target.port)
    yield proxy
    proxy.close()


def streaming_through(proxy, new_context, problems, model: str):
    """A page, through the proxy, whose answer is streaming: (context, page, cid, answer)."""
    context = new_context(base_url=proxy.url)
    page = problems.watch(context.new_page())
    cid = new_chat(context, model)
    page.add_init_script(RECORD_ANSWER_TEXTS)
    open_chat(page, cid, model)
    send(page, "Keep going")
    answer = last_answer(page)
    expect(answer.locator(".markdown")).to_contain_text("w3")
    return context, page, cid, answer


@pytest.mark.parametrize("offline_until", ["mid-stream", "after-the-end"])
def test_dropped_connection_shows_reconnecting_then_recovers_exactly(
    new_context, problems, proxy, web, model_server, offline_until, output_dir
):
    """The network dies under the stream; back online, the answer completes exactly once,
    resumed from the last event id, whether it is still streaming or ended meanwhile."""
    chunks = words(40) if offline_until == "mid-stream" else words(12)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    context, page, cid, answer = streaming_through(proxy, new_context, problems, model)

    proxy.block()
    proxy.drop()
    notice = answer.locator(".notice")
    expect(notice).to_have_text("Reconnecting…")
    expect(answer).to_have_class(STREAMING)
    expect(answer).to_have_class(re.compile(r"\breconnecting\b"))
    page.screenshot(path=output_dir / f"reconnecting-{offline_until}.png", animations="disabled")
    if offline_until == "after-the-end":
        assert wait_final(context, cid, base=web.url)["messages"][-1]["content"] == full
    else:
        assert len(answer_texts(page)[-1]) < len(full)
    proxy.unblock()

    expect_answer(answer, full)
    expect(notice).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    assert_no_duplicates(page, full)
    assert wait_final(context, cid)["messages"][-1]["content"] == full
    assert len(model_server.requests_for(model)) == 1
    # The page came back through the stream's own resume: EventSource sent Last-Event-ID.
    events = proxy.requests_to("/events")
    assert len(events) >= 2
    assert "last-event-id:" in events[-1].lower()


def test_stalled_connection_shows_reconnecting_and_resumes_exactly(
    new_context, problems, proxy, web, model_server
):
    """A phone between networks: the connection stays open and no byte comes. EventSource
    itself would wait forever; the page's watchdog (no event, not even a ping, for 2.5
    ping intervals: 2.5 s here) reopens it from the last cursor."""
    chunks = words(40)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    context, page, cid, answer = streaming_through(proxy, new_context, problems, model)
    events_before = len(proxy.requests_to("/events"))

    proxy.stall()
    expect(answer.locator(".notice")).to_have_text("Reconnecting…")
    assert len(proxy.requests_to("/events")) == events_before  # nothing went through yet
    proxy.unstall()
    expect_answer(answer, full)
    assert_no_duplicates(page, full)
    reopened = proxy.requests_to("/events")[events_before:]
    assert reopened and all("after=" in head.split("\r\n", 1)[0] for head in reopened)
    assert wait_final(context, cid, base=web.url)["messages"][-1]["content"] == full
