"""Input hygiene: no client input (body, path id, cursor) makes the API answer a 5xx.

Every case runs on SQLite and on PostgreSQL (which refuses NUL in text, even in a lookup).
No Celery worker runs here: a posted message stays queued, which these tests never need.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from tests.conftest import postgres_database
from tidechat import db
from tidechat.hygiene import MAX_JSON_DEPTH

DEEP = 100_000
DEEP_BODIES = {
    "list": b"[" * DEEP + b"]" * DEEP,
    "object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "in_field": b'{"content": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "unclosed": b"[" * DEEP,
    "just_too_deep": b'{"content": "hi", "x": '
    + b"[" * MAX_JSON_DEPTH
    + b"]" * MAX_JSON_DEPTH
    + b"}",
}
NUL, SURROGATE = r"\u0000", r"\ud83c"  # as JSON text: the body carries the escape


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('hygiene') / 'tidechat.db'}"
        db.upgrade(url)
        yield url
    else:
        with postgres_database() as url:
            db.upgrade(url)
            yield url


@pytest.fixture
def app(make_app, database_url):
    app = make_app(
        DATABASE_URL=database_url,
        # Let the fuzzer reach past the rate limiter, and past stream=false (no worker here).
        TIDECHAT_RATE_LIMIT_MESSAGES="100000/minute",
        TIDECHAT_NONSTREAM_TIMEOUT="0.05",
    )
    yield app
    hub = app.extensions.get("stream_hub")
    if hub is not None:
        hub.stop()
    app.extensions["db"].kw["bind"].dispose()


def error_of(response, status: int, code: str) -> str:
    """Assert the response is the JSON error ``code`` with ``status``; its message."""
    if response.status_code != status:
        # never read an event stream here: it would not end
        what = response.mimetype if response.is_streamed else response.get_data(as_text=True)
        raise AssertionError(f"{response.status_code}, not {status}: {what:.500}")
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def new_conversation(client) -> str:
    response = client.post("/api/conversations")
    assert response.status_code == 201
    return response.get_json()["id"]


def assert_untouched(client, cid: str) -> None:
    conv = client.get(f"/api/conversations/{cid}").get_json()
    assert conv["messages"] == []
    assert (conv["title"], conv["system_prompt"], conv["model"]) == ("New chat", None, None)


def post_json_text(client, url: str, text: str | bytes, method: str = "POST"):
    return client.open(url, method=method, data=text, content_type="application/json")


def body_routes(cid: str) -> list[tuple[str, str]]:
    return [
        ("PATCH", f"/api/conversations/{cid}"),
        ("POST", f"/api/conversations/{cid}/messages"),
        ("POST", f"/api/conversations/{cid}/regenerate"),
    ]


UNPARSEABLE_BODIES = {
    **DEEP_BODIES,
    # not UTF-8
    "bad_utf8": b'{"content": "\xff\xfe"}',
    "utf8_surrogate": b'{"content": "\xed\xa0\xbc"}',  # a surrogate, UTF-8-encoded
    "truncated_utf8": b'{"title": "\xc3"}',
    "utf16": b"\xff\xfe{\x00}\x00",
    "bad_utf8_model": b'{"content": "hi", "model": "\x80"}',
    # not JSON as the standard defines it
    "nan": b'{"temperature": NaN}',
    "infinity": b'{"temperature": Infinity}',
    "minus_infinity": b'{"temperature": -Infinity}',
    "huge_int": b'{"temperature": ' + b"9" * 5000 + b"}",  # past Python's int digits limit
    "unclosed_object": b"{",
    "raw_nul": b'{"content": "raw \x00 nul"}',
}


@pytest.mark.parametrize("body", UNPARSEABLE_BODIES.values(), ids=UNPARSEABLE_BODIES.keys())
def test_unparseable_body_is_400(client, body):
    cid = new_conversation(client)
    for method, url in body_routes(cid):
        error_of(post_json_text(client, url, body, method), 400, "invalid_json")
    assert_untouched(client, cid)


def test_nesting_up_to_the_limit_is_parsed(client):
    cid = new_conversation(client)
    nested = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    response = post_json_text(
        client, f"/api/conversations/{cid}", f'{{"title": {nested}}}', "PATCH"
    )
    error_of(response, 400, "invalid_title")  # parsed, then refused by the field's own rule


@pytest.mark.parametrize("bad", [NUL, SURROGATE, r"\udc00", "a" + NUL + "b", r"\udf0a\ud83c"])
@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("POST", "/messages", "content"),
        ("POST", "/messages", "model"),
        ("POST", "/regenerate", "model"),
        ("PATCH", "", "title"),
        ("PATCH", "", "system_prompt"),
        ("PATCH", "", "model"),
    ],
)
def test_nul_or_lone_surrogate_in_a_field_is_400_naming_it(client, bad, method, path, field):
    cid = new_conversation(client)
    fields = {"content": "hi"} if path == "/messages" else {}
    fields[field] = f"x{bad}y"
    text = "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields.items()) + "}"
    message = error_of(
        post_json_text(client, f"/api/conversations/{cid}{path}", text, method), 400, "invalid_text"
    )
    assert f"'{field}'" in message
    assert_untouched(client, cid)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"content": "hi", "extra": {"deep": ["ok", "' + NUL + '"]}}', "'extra.deep[1]'"),
        ('{"content": "hi", "' + NUL + '": 1}', "field name"),
        ('{"content": "hi", "x": {"' + SURROGATE + '": 1}}', "field name in 'x'"),
    ],
)
def test_bad_text_anywhere_in_the_body_is_400(client, text, named):
    cid = new_conversation(client)
    message = error_of(
        post_json_text(client, f"/api/conversations/{cid}/messages", text), 400, "invalid_text"
    )
    assert named in message
    assert_untouched(client, cid)


def test_surrogate_pairs_and_other_unicode_are_fine(client):
    cid = new_conversation(client)
    text = r'{"title": "Tide \ud83c\udf0a \u2028 \u00e9 \u0001", "system_prompt": "\ud83c\udf0a"}'
    response = post_json_text(client, f"/api/conversations/{cid}", text, "PATCH")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["title"] == "Tide \U0001f30a \u2028 é \x01"
    response = post_json_text(
        client, f"/api/conversations/{cid}/messages", r'{"content": "\ud83c\udf0a"}'
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    conv = client.get(f"/api/conversations/{cid}").get_json()
    assert conv["messages"][0]["content"] == "\U0001f30a"


def test_huge_numbers_are_refused_by_the_fields_rules(client):
    cid = new_conversation(client)
    for value in ("1" + "0" * 4000, "1e999", "-1e999", "1e-999"):
        response = post_json_text(
            client, f"/api/conversations/{cid}", f'{{"temperature": {value}}}', "PATCH"
        )
        if value == "1e-999":  # 0.0: a fine temperature
            assert response.status_code == 200
        else:
            error_of(response, 400, "invalid_temperature")


BAD_IDS = [
    "%00",
    "a%00",
    "nope",
    "0" * 31,
    "0" * 33,
    "g" * 32,
    "A" * 32,
    "%ED%A0%BC",  # a surrogate, UTF-8-encoded
    "%ff%fe",
    "%F0%9F%8C%8A",
    "%20" + "0" * 32,
    "%D9%A3" * 32,  # Arabic-Indic digits
    "x" * 5000,
]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=range(len(BAD_IDS)))
def test_odd_ids_are_404_without_a_query(client, app, bad_id):
    cid = new_conversation(client)
    statements: list[str] = []
    engine = app.extensions["db"].kw["bind"]

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for method, url, body in [
            ("GET", "/api/conversations/{}", None),
            ("PATCH", "/api/conversations/{}", {"title": "t"}),
            ("DELETE", "/api/conversations/{}", None),
            ("POST", "/api/conversations/{}/messages", {"content": "hi"}),
            ("POST", "/api/conversations/{}/regenerate", None),
            ("GET", "/api/generations/{}", None),
            ("POST", "/api/generations/{}/cancel", None),
            ("GET", "/api/generations/{}/events", None),
            ("DELETE", "/api/keys/{}", None),
        ]:
            response = client.open(url.format(bad_id), method=method, json=body)
            error_of(response, 404, "not_found")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statements == []
    assert_untouched(client, cid)


@pytest.fixture
def generation(client) -> str:
    cid = new_conversation(client)
    response = client.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
    assert response.status_code == 202
    return response.get_json()["generation"]["id"]


BAD_CURSORS = [
    ("header", "\x00"),
    ("header", "1-\x00"),
    ("header", "0\x00"),
    ("header", "18446744073709551616-0"),  # 2**64
    ("header", "0-18446744073709551616"),
    ("header", "9" * 21 + "-0"),
    ("header", "1" * 5000),
    ("header", "\xb2-1"),  # superscript two: a Latin-1 header byte int() would refuse
    ("header", "-1"),
    ("header", "1e3"),
    ("after", "%00"),
    ("after", "%ED%A0%BC"),
    ("after", "%D9%A3-1"),  # Arabic-Indic three: \d matches it
    ("after", "0%0A"),  # a trailing newline: $ matches before it
    ("after", "1-1%0A"),
    ("after", "%EF%BC%91-1"),  # fullwidth one
    ("lastEventId", "%00"),
    ("lastEventId", "99999999999999999999-99999999999999999999"),
    ("lastEventId", "1-2-3"),
]


@pytest.mark.parametrize(("where", "cursor"), BAD_CURSORS, ids=range(len(BAD_CURSORS)))
def test_odd_cursor_is_400(client, generation, where, cursor):
    url = f"/api/generations/{generation}/events"
    if where == "header":
        response = client.get(url, headers={"Last-Event-ID": cursor})
    else:
        response = client.get(f"{url}?{where}={cursor}")
    try:
        error_of(response, 400, "invalid_cursor")
    finally:
        response.close()


def test_largest_cursor_is_accepted(client, generation):
    largest = f"{2**64 - 1}-{2**64 - 1}"
    response = client.get(
        f"/api/generations/{generation}/events", headers={"Last-Event-ID": largest}
    )
    try:
        assert response.status_code in (200, 204), response.status_code
    finally:
        response.close()


# -- fuzzing ------------------------------------------------------------------------------

NASTY_TEXT = [
    "\x00", "a\x00b", "\ud83c", "\udc00x", "\ud83c\udf0a", "", " ", "\n", "\u2028", "\ufeff",
    "\U0001f30a", "\u0663", "x" * 300, "\\", '"', "%00", "null", "0", "-1",
]  # fmt: skip
RAW_ID_FRAGMENTS = [
    "%00", "a%00b", "%ED%A0%BC", "%ff", "%", "%zz", "..", ".", "%2e%2e", "%2F", "%0A", "%20",
    "0" * 32 + "%00", "f" * 31, "F" * 32, "%D9%A3" * 32,
]  # fmt: skip
RAW_BODIES = [
    b"[" * 5000 + b"]" * 5000,
    b'{"content": ' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"temperature": ' + b"9" * 4400 + b"}",
    b'{"content": "\xed\xa0\xbc"}',
    b'\xef\xbb\xbf{"content": "bom"}',
    b'\xff\xfe{\x00"\x00}\x00',
    b'{"content": "a", "content": "\\u0000"}',
    b'{"stream": false, "content": "wait"}',
    b'{"temperature": NaN}',
    b'"\\ud83c"',
]
METHODS = ["GET", "POST", "PATCH", "DELETE", "PUT"]

# Text no database column can hold: NUL, lone surrogates.
unstorable = st.tuples(
    st.text(max_size=8),
    st.sampled_from(["\x00", "\ud83c", "\udc00", "\udfff\ud800"]),
    st.text(max_size=8),
).map("".join)
texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=20),  # surrogates too
    st.sampled_from(NASTY_TEXT),
    st.tuples(st.text(max_size=8), st.sampled_from(NASTY_TEXT), st.text(max_size=8)).map("".join),
    unstorable,
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, -(2**63), 10**300, 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
good_text = st.text(min_size=1, max_size=30).filter(str.strip)


def field(good: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: often one the API takes, else odd text or any JSON value."""
    return st.one_of(good, good, texts, unstorable, json_values)


FIELD_VALUES = {
    "content": field(good_text),
    "title": field(good_text),
    "system_prompt": field(st.one_of(st.none(), good_text)),
    "model": field(st.sampled_from(["gpt-4o-mini", "m"])),
    "temperature": field(st.floats(0, 2)),
    "stream": field(st.sampled_from([True, True, False])),
}


def fields(required: list[str], optional: list[str]) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {name: FIELD_VALUES[name] for name in required},
        optional={name: FIELD_VALUES.get(name, json_values) for name in optional},
    ).map(json.dumps)  # surrogates as \ud83c escapes, NaN/Infinity as such


# Bodies shaped for each route, so most requests get past the first check, to storage
# and Redis; and bodies of any shape.
ROUTE_BODIES = {
    "api.post_message": fields(["content"], ["model", "stream"]),
    "api.update_conversation": fields([], ["title", "system_prompt", "model", "temperature"]),
    "api.regenerate": fields([], ["model"]),
}
any_bodies = st.one_of(
    st.none(),
    fields([], [*FIELD_VALUES, "extra"]),
    st.dictionaries(texts, json_values, max_size=4).map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=40),
    st.sampled_from(RAW_BODIES),
    st.integers(1, 2000).map(lambda d: "[" * d + "]" * d),
)
content_types = st.sampled_from(
    ["application/json"] * 12
    + ["application/json; charset=utf-8", "application/merge-patch+json", "text/plain", None]
)
ids = st.one_of(
    st.tuples(st.just("own"), st.integers(0, 50)),
    st.tuples(st.just("own"), st.integers(0, 50)),
    st.tuples(st.just("own"), st.integers(0, 50)),
    st.tuples(st.just("other"), st.integers(0, 50)),
    st.tuples(st.just("text"), texts),
    st.tuples(st.just("raw"), st.sampled_from(RAW_ID_FRAGMENTS)),
)
cursor_values = st.one_of(
    st.sampled_from(["0", "0-0", "1-1", "\x00", "1-\x00", f"{2**64}-0", "\u0663-1", "0\n", ""]),
    st.from_regex(r"\A[0-9]{1,22}-[0-9]{1,22}\Z"),
    texts,
)
cursors = st.one_of(
    st.none(), st.tuples(st.sampled_from(["header", "after", "lastEventId"]), cursor_values)
)


class Fuzzer:
    """One identity's client, with ids of its own and ids of another identity's."""

    def __init__(self, app) -> None:
        self.client = app.test_client()
        self.own = self._seed(self.client)
        self.other = self._seed(app.test_client())
        self.rules = sorted(
            (r for r in app.url_map.iter_rules() if r.rule.startswith("/api/")),
            key=lambda r: r.rule,
        )
        assert len(self.rules) >= 9, [r.rule for r in self.rules]

    @staticmethod
    def _seed(client) -> dict[str, list[str]]:
        cids = [new_conversation(client), new_conversation(client)]
        response = client.post(f"/api/conversations/{cids[0]}/messages", json={"content": "hi"})
        assert response.status_code == 202
        key = client.post("/api/keys", json={"name": "fuzz"}).get_json()["id"]
        me = client.get("/api/auth/me").get_json()["user"]  # a guest: no account id
        return {
            "cid": cids,
            "gid": [response.get_json()["generation"]["id"]],
            "key_id": [key],
            "uid": [me["id"] if me else "0" * 32],
        }

    def path(self, rule, id_choice) -> str:
        path = rule.rule
        for arg in rule.arguments:
            kind, value = id_choice
            if kind in ("own", "other"):
                known = (self.own if kind == "own" else self.other)[arg]
                if not known:  # the fuzzer deleted all its conversations
                    known.append(new_conversation(self.client))
                segment = known[value % len(known)]
            elif kind == "text":
                segment = quote(value, safe="", errors="surrogatepass")
            else:
                segment = value
            path = path.replace(f"<{arg}>", segment)
        return path

    def send(self, rule, method, id_choice, body, content_type, cursor) -> None:
        path = url = self.path(rule, id_choice)
        headers = {}
        if cursor is not None:
            where, value = cursor
            if where == "header":  # a WSGI header is Latin-1 text, on one line
                value = value.encode("latin-1", "replace").decode("latin-1")
                headers["Last-Event-ID"] = value.replace("\n", " ").replace("\r", " ")
            else:
                url += f"?{where}={quote(value, safe='', errors='surrogatepass')}"
        data = body.encode() if isinstance(body, str) else body
        response = self.client.open(
            url, method=method, data=data, content_type=content_type, headers=headers
        )
        try:
            self.check(response, method, path, f"{method} {url!r} {headers} {data!r:.300}")
        finally:
            response.close()  # an event stream (200) is never read, only closed

    def check(self, response, method: str, path: str, what: str) -> None:
        status = response.status_code
        what += f" -> {status}"
        if status >= 400:
            body = response.get_json(silent=True)
            assert isinstance(body, dict) and set(body) == {"error"}, what
            error = body["error"]
            assert isinstance(error.get("code"), str) and error["code"], what
            assert isinstance(error.get("message"), str) and error["message"], what
            what += f" {error}"
            # stream=false waits for an answer no worker gives here: 504 timeout, as it should
            if status == 504 and error["code"] == "timeout" and path.endswith("/messages"):
                self.cancel_pending(path.removesuffix("/messages"))
                return
        assert status < 500, what
        if status == 201 and path == "/api/conversations":
            self.own["cid"].append(response.get_json()["id"])
        if status == 204 and method == "DELETE":
            kind = "key_id" if path.startswith("/api/keys/") else "cid"
            self.own[kind].remove(path.rsplit("/", 1)[1])
        if status == 202 and method == "POST" and path.endswith(("/messages", "/regenerate")):
            self.own["gid"].append(response.get_json()["generation"]["id"])
            self.cancel_pending(path.rsplit("/", 1)[0])

    def cancel_pending(self, conversation_url: str) -> None:
        """Stop the conversation's queued answer, so it takes messages again."""
        messages = self.client.get(conversation_url).get_json()["messages"]
        for msg in messages:
            if msg["role"] == "assistant" and msg["status"] == "queued":
                cancel = self.client.post(f"/api/generations/{msg['generation_id']}/cancel")
                assert cancel.status_code == 200, cancel.get_data(as_text=True)


@st.composite
def requests(draw, rules):
    # Routes that take a body weigh most, then the other routes with an id.
    weighted = [
        r
        for r in rules
        for _ in range(4 if r.endpoint in ROUTE_BODIES else 2 if r.arguments else 1)
    ]
    rule = draw(st.sampled_from(weighted))
    methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
    method = draw(st.sampled_from(methods * 8 + METHODS))  # mostly the rule's own
    route_body = ROUTE_BODIES.get(rule.endpoint)
    body = draw(any_bodies if route_body is None else st.one_of(route_body, route_body, any_bodies))
    return rule, method, draw(ids), body, draw(content_types), draw(cursors)


def test_fuzz_api_never_answers_5xx(app):
    fuzzer = Fuzzer(app)

    @settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=1500,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(fuzzer.rules))
    def run(request):
        fuzzer.send(*request)

    run()
