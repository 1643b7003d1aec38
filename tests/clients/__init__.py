"""Real EventSource clients, as shipped, following a Tidechat events URL for a test.

Three clients, each with its default options:
- ``polyfill``: the npm package event-source-polyfill, in Chromium (Playwright);
- ``native``: Chromium's own ``EventSource``;
- ``eventsource``: the npm package eventsource, in Node (``eventsource_follow.mjs``), given
  the one option it documents for this: a ``fetch`` that adds the identity cookie.

Each client is one identity (its own cookie): it creates the conversation it then follows,
so the events URL is its own. All of them report what they saw as the same ``Record`` list.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
NODE_MODULES = ROOT / "node_modules"
POLYFILL_JS = NODE_MODULES / "event-source-polyfill" / "src" / "eventsource.js"
EVENTSOURCE_PKG = NODE_MODULES / "eventsource" / "package.json"
FOLLOW_MJS = HERE / "eventsource_follow.mjs"
FOLLOW_PAGE_JS = HERE / "follow_page.js"
# A path on the app's origin that is no page of the app: a plain 404 document, so nothing
# of the chat page runs (it would open streams of its own) while the test's script does.
BLANK_PATH = "/__sse-client-harness"

BROWSER_CLIENTS = ("polyfill", "native")
CLIENTS = ("polyfill", "eventsource", "native")
NPM_CLIENTS = ("polyfill", "eventsource")  # the ones node_modules/ holds
CLOSED = 2  # EventSource.CLOSED, for all three


@dataclass(frozen=True)
class Record:
    """One thing a client saw: ``open``, an ``event``, an ``error`` (a failed or ended
    connection), ``end``/``timeout`` when the follower stopped watching, and (the Node
    client only) ``request`` for each request its ``fetch`` made."""

    t: float  # seconds since the epoch
    kind: str
    type: str | None = None  # the event's name
    id: str | None = None  # the event's lastEventId as the client reports it
    data: Any = None  # the event's data, parsed from JSON
    code: int | None = None  # the HTTP status a failed connection reported, if any
    message: str | None = None
    ready_state: int | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        data = raw.get("data")
        if raw.get("kind") == "event" and isinstance(data, str):
            data = json.loads(data)
        return cls(
            t=raw["t"] / 1000,
            kind=raw["kind"],
            type=raw.get("type"),
            id=raw.get("id"),
            data=data,
            code=raw.get("code"),
            message=raw.get("message"),
            ready_state=raw.get("readyState"),
        )


class Follow:
    """A client following one events URL; ``records()`` is what it has seen so far."""

    client: str

    def records(self) -> list[Record]:
        raise NotImplementedError

    def wait_until(
        self, check: Callable[[list[Record]], bool], timeout: float, what: str
    ) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if check(records):
                return records
            if any(r.kind in ("end", "timeout") for r in records):
                raise AssertionError(f"{self.client}: {what}, and it has stopped: {records}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.client}: {what} (not within {timeout}s): {records}")
            time.sleep(0.05)

    def wait_ended(self, timeout: float = 45) -> list[Record]:
        records = self.wait_until(
            lambda rs: any(r.kind in ("end", "timeout") for r in rs), timeout, "did not end"
        )
        assert records[-1].kind == "end", f"{self.client} gave up waiting: {records}"
        return records

    def close(self) -> None:
        pass


class NodeFollow(Follow):
    client = "eventsource"

    def __init__(
        self,
        url: str,
        cookie: str,
        *,
        grace: float,
        timeout: float = 60,
        last_event_id: str | None = None,
    ) -> None:
        argv = [
            node_binary(), str(FOLLOW_MJS), "--url", url, "--cookie", cookie,
            "--grace", str(int(grace * 1000)), "--timeout", str(int(timeout * 1000)),
        ]  # fmt: skip
        if last_event_id is not None:
            argv += ["--last-event-id", last_event_id]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._records: list[Record] = []
        self._raw: list[dict] = []
        self._stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                raw = json.loads(line)
                self._raw.append(raw)
                self._records.append(Record.from_json(raw))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.read()

    def records(self) -> list[Record]:
        if self.proc.poll() is not None:
            self._reader.join(5)
            if not self._records or self._records[-1].kind not in ("end", "timeout"):
                raise AssertionError(
                    f"node exited {self.proc.returncode}: {self._stderr[-2000:]} {self._raw}"
                )
        return list(self._records)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


class BrowserFollow(Follow):
    def __init__(self, chromium: Chromium, page, client: str, url: str, *, grace: float) -> None:
        self.chromium = chromium
        self.page = page
        self.client = client
        chromium.call(
            page.evaluate,
            "([c, u, g]) => window.__follow(c, u, g)",
            [client, url, int(grace * 1000)],
        )

    def records(self) -> list[Record]:
        raw = self.chromium.call(self.page.evaluate, "window.__records")
        return [Record.from_json(r) for r in raw]

    def close(self) -> None:
        self.chromium.call(self.page.evaluate, "window.__source && window.__source.close()")


class Client:
    """One identity with one EventSource client: it makes conversations and follows them."""

    name: str

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raise NotImplementedError

    def raw_get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        raise NotImplementedError

    def follow(self, events_url: str, *, grace: float, cursor: str | None = None) -> Follow:
        """Follow ``events_url``; ``cursor``: open with this last event id, sent the way this
        client can (see ``open_url``)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- the API, with this client's cookie --------------------------------------------
    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, data = self.api(method, path, body)
        assert status == expect, f"{method} {path}: {status} {data}"
        return data

    def start(self, model: str, content: str = "Stream for a while") -> tuple[str, dict]:
        cid = self.call("POST", "/api/conversations", expect=201)["id"]
        body = {"content": content, "model": model}
        gen = self.call("POST", f"/api/conversations/{cid}/messages", body, expect=202)
        return cid, gen["generation"]

    def conversation(self, cid: str) -> dict:
        return self.call("GET", f"/api/conversations/{cid}")

    def wait_final(self, cid: str, timeout: float = 20) -> dict:
        """The last message once it has ended, as stored in the database."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.conversation(cid)["messages"][-1]
            if last["role"] == "assistant" and last["status"] in ("done", "error", "cancelled"):
                return last
            assert time.monotonic() < deadline, f"the answer in {cid} did not end: {last}"
            time.sleep(0.05)


class NodeClient(Client):
    name = "eventsource"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = self.http.request(method, path, json=body)
        return response.status_code, response.json() if response.content else None

    def raw_get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        response = self.http.get(path, headers=headers)
        return response.status_code, response.text

    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.http.cookies.jar)

    def follow(self, events_url: str, *, grace: float, cursor: str | None = None) -> NodeFollow:
        # The package itself can only send a cursor it has seen; a stored one goes in the
        # header, through the fetch it is given (as a resuming client would do it).
        return NodeFollow(
            self.base_url + events_url, self.cookie(), grace=grace, last_event_id=cursor
        )

    def close(self) -> None:
        self.http.close()


class BrowserClient(Client):
    def __init__(self, chromium: Chromium, base_url: str, name: str) -> None:
        assert name in BROWSER_CLIENTS
        self.name = name
        self.chromium = chromium
        self.context, self.page = chromium.call(self._open, chromium.browser, base_url, name)

    @staticmethod
    def _open(browser, base_url: str, name: str):
        context = browser.new_context(base_url=base_url, bypass_csp=True)
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.goto(BLANK_PATH)  # the app's origin (a 404 document): same-origin requests
        if name == "polyfill":
            page.add_script_tag(path=str(POLYFILL_JS))
            assert page.evaluate("typeof window.EventSourcePolyfill") == "function"
        page.add_script_tag(path=str(FOLLOW_PAGE_JS))
        return context, page

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        def fetch() -> tuple[int, Any]:
            response = self.context.request.fetch(path, method=method, data=body)
            return response.status, response.json() if response.body() else None

        return self.chromium.call(fetch)

    def raw_get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            response = self.context.request.get(path, headers=headers)
            return response.status, response.text()

        return self.chromium.call(get)

    def follow(self, events_url: str, *, grace: float, cursor: str | None = None) -> BrowserFollow:
        url = events_url
        if cursor is not None:
            # Neither can be given a cursor to start from: it goes in the URL, under the name
            # the polyfill itself uses on reconnect, or ``after`` for the native one.
            name = "lastEventId" if self.name == "polyfill" else "after"
            url = f"{events_url}?{name}={cursor}"
        return BrowserFollow(self.chromium, self.page, self.name, url, grace=grace)

    def close(self) -> None:
        self.chromium.call(self.context.close)


class Chromium:
    """Chromium, driven by Playwright's sync API from a thread of its own.

    Every call goes through ``call``. A session may already run Playwright's sync API on the
    main thread (tests/browser/conftest.py's ``browser`` lives for the whole session), and
    two of them cannot share a thread.
    """

    def __init__(self, executable: str, args: list[str]) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._ready: Future = Future()
        self._thread = threading.Thread(
            target=self._run, args=(executable, args), daemon=True, name="chromium"
        )
        self._thread.start()
        self.browser = self._ready.result(timeout=60)

    def _run(self, executable: str, args: list[str]) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=executable, headless=True, args=args)
                self._ready.set_result(browser)
                while (job := self._jobs.get()) is not None:
                    fn, done = job
                    try:
                        done.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        done.set_exception(exc)
                browser.close()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
        done: Future = Future()
        self._jobs.put((functools.partial(fn, *args), done))
        return done.result(timeout=timeout)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(30)


# -- what the clients need ------------------------------------------------------------------
def node_binary() -> str:
    return shutil.which("node") or "/usr/bin/node"


def ensure_node_modules() -> str | None:
    """Install node_modules (``npm ci``) if the packages are missing; the reason they cannot
    be had, or None once they are there."""
    if POLYFILL_JS.exists() and EVENTSOURCE_PKG.exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed, so event-source-polyfill and eventsource cannot be had"
    env = {**os.environ, "npm_config_audit": "false", "npm_config_fund": "false"}
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0 or not (POLYFILL_JS.exists() and EVENTSOURCE_PKG.exists()):
        return f"npm ci failed ({done.returncode}): {done.stderr[-1000:]}"
    return None


# -- the wire, read without a client ----------------------------------------------------------
@dataclass(frozen=True)
class WireEvent:
    """One event block as sent: ``id`` is None when the block has no id line."""

    event: str
    id: str | None
    data: Any
    retry: int | None = None


def parse_sse(body: str) -> list[WireEvent]:
    """Every block of a text/event-stream body with its own fields (data parsed as JSON);
    blocks without data (a ``retry:`` alone, comments) are kept only for their retry."""
    out: list[WireEvent] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if not fields:
            continue
        data = "\n".join(fields["data"]) if "data" in fields else None
        retry = int(fields["retry"][-1]) if "retry" in fields else None
        out.append(
            WireEvent(
                event=fields.get("event", ["message"])[-1] if data is not None else "",
                id=fields["id"][-1] if "id" in fields else None,
                data=json.loads(data) if data else None,
                retry=retry,
            )
        )
    return out
