"""A deploy in the page: an answer interrupted by a worker's shutdown (on a backend that
cannot continue it) keeps its text, says why, and Continue finishes it in place."""

from __future__ import annotations

import os
import signal

import pytest
from playwright.sync_api import expect

from tests.browser.chat import (
    RECORD_ANSWER_TEXTS,
    answers,
    assert_no_duplicates,
    expect_answer,
    last_answer,
    new_chat,
    open_chat,
    send,
    wait_final,
    words,
)
from tests.stack import start_web, start_worker


@pytest.fixture
def deploy_stack(process_env, workdir):
    """A web process and a worker of their own (their own queue), so the test can stop the
    worker without touching the session's."""
    env = {
        **process_env,
        "TIDECHAT_CELERY_QUEUE": process_env["TIDECHAT_CELERY_QUEUE"] + "-page-deploy",
        "TIDECHAT_DRAIN_SECONDS": "1",
        "TIDECHAT_CONTINUATION": "none",
    }
    procs = {"worker": start_worker(env, workdir, name="worker-page-deploy")}
    procs["web"] = start_web(env, workdir, name="web-page-deploy")
    procs["env"] = env
    yield procs
    for proc in procs.values():
        if hasattr(proc, "stop"):
            proc.stop()


def test_interrupted_answer_keeps_its_text_and_continue_finishes_it(
    new_context, problems, model_server, deploy_stack, workdir
):
    web = deploy_stack["web"]
    context = new_context(base_url=web.url)
    page = problems.watch(context.new_page())
    page.add_init_script(RECORD_ANSWER_TEXTS)
    chunks = words(60)
    full = "".join(chunks)
    model = model_server.script(chunks=chunks, delay=0.1)
    cid = new_chat(context, model)
    open_chat(page, cid, model)
    send(page, "Count slowly")
    answer = last_answer(page)
    expect(answer.locator(".markdown")).to_contain_text("w3")

    os.kill(deploy_stack["worker"].popen.pid, signal.SIGTERM)  # a deploy begins
    expect(answer.locator(".notice")).to_contain_text("Interrupted")
    expect(answer.locator(".error-box")).to_be_hidden()  # not "stopped unexpectedly"
    stored = wait_final(context, cid)["messages"][-1]
    assert stored["status"] == "interrupted"
    assert full.startswith(stored["content"]) and len(stored["content"]) < len(full)
    assert answer.locator(".markdown").inner_text() == stored["content"]

    deploy_stack["replacement"] = start_worker(
        deploy_stack["env"], workdir, name="worker-page-deploy-2"
    )
    answer.get_by_role("button", name="Continue").click()
    expect(answers(page)).to_have_count(1)
    expect_answer(last_answer(page), full)
    assert_no_duplicates(page, full)
    assert wait_final(context, cid)["messages"][-1]["content"] == full
    page.reload()
    expect_answer(last_answer(page), full)
    expect(last_answer(page).get_by_role("button", name="Continue")).to_have_count(0)
