"""Web CPU per POST that starts an answer, by conversation length (issue 14, "POST path").

    .venv/bin/python -m bench.post_cost                  # SQLite and PostgreSQL, limits off and on
    .venv/bin/python -m bench.post_cost --db sqlite --limits off --profile 200

Each configuration runs in a process of its own (the rate limiter is module-global): it
builds the app with the app factory against this machine's Redis (a fresh key prefix,
deleted afterwards) and a fresh database, makes conversations of 2 and of 200 finished
messages (and, for the page, one of none: a new conversation's first message, which titles
it), then times ``time.process_time()`` around each Flask test-client request:

- ``page``: ``POST /api/conversations/<id>/messages`` (stream: answer followed elsewhere);
- ``v1``: ``POST /v1/responses`` with ``background: true`` and ``previous_response_id`` the
  conversation's last answer (the /v1 door's way to go on with a long conversation).

``--server served`` sends the same requests to a real gunicorn + gevent web process (the
production server, one worker, started with the same settings) over one keep-alive
connection, and reads that process's CPU from ``/proc`` (every thread's schedstat) around
each request: the request's parsing, the gevent hub's wake-ups and the response's writes
count too, and the test client's own work (``inproc``: in the bench process, not in
production) does not. SQL, row and Redis counts are the bench process's own: ``inproc``
rows only.

No Celery worker runs: the task is only enqueued. Between requests, outside the clock, the
answer is cancelled through the real core (``answers.cancel``) and the messages it added
are deleted, so every request sees a conversation of exactly its length with nothing in
progress. ``limits on`` is the production configuration except the rate-limit amounts
(the same windows, so the same Redis work, but high enough not to refuse a benchmark).

``--against REV`` measures git revision ``REV``'s app in the same run, each case taking turns
with this checkout's (``--rounds`` times), and prints each row's ratio to it: the cost on
this machine as a fraction of that code's, which a CPU-seconds figure from another machine
is not. The revision runs from a temporary worktree with this checkout's measuring code
copied in (``BENCH_CODE``) and a database of its own; it must still run on this
environment's packages. ``--against 0b75606`` is the code issue 14 measured its 6-8 ms
POST on.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import metrics

ROOT = Path(__file__).resolve().parent.parent
# What a baseline's worktree gets from this checkout: the measuring code, not the app.
BENCH_CODE = ("bench/post_cost.py", "bench/metrics.py", "bench/procs.py", "bench/limits.py")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
LENGTHS = (2, 200)
# (door, messages): a new conversation's first message (page only: it titles it), then
# each door at each length.
CASES = (("page", 0), *((door, n) for door in ("page", "v1") for n in LENGTHS))
MODEL = "bench-model"
# Production's windows, amounts no benchmark reaches.
_HIGH_RATES = {
    "TIDECHAT_RATE_LIMIT_MESSAGES": "1000000/minute;10000000/day",
    "TIDECHAT_RATE_LIMIT_MESSAGES_IP": "1000000/minute;10000000/day",
    "TIDECHAT_RATE_LIMIT_WRITES": "1000000/minute",
    "TIDECHAT_RATE_LIMIT_WRITES_IP": "1000000/minute",
}


# --- one configuration, in its own process --------------------------------------------


def run_one(
    database_url: str, limits_on: bool, n: int, profile: int | None, served: bool = False
) -> dict[str, Any]:
    prefix = f"tcpost:{uuid.uuid4().hex[:8]}:"
    from tidechat import limits

    env = {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_API_KEY": "sk-bench",
        "SECRET_KEY": "bench-" + prefix,
        "TIDECHAT_KEY_PREFIX": prefix,
        "TIDECHAT_CELERY_QUEUE": prefix + "generate",
        "TIDECHAT_MODELS": MODEL,
        "TIDECHAT_DEFAULT_MODEL": MODEL,
        **(_HIGH_RATES if limits_on else limits.UNLIMITED_ENV),
    }
    for name in [k for k in os.environ if k.startswith(("TIDECHAT_", "OPENAI_"))]:
        del os.environ[name]
    os.environ.update(env)

    import redis
    from sqlalchemy import event

    from app import create_app
    from tidechat import db, models

    db.upgrade(database_url)
    app = create_app()
    r = redis.Redis.from_url(REDIS_URL)
    server = _Served(dict(os.environ)) if served else None
    try:
        bench = _Bench(app, r, server)
        statements = {"n": 0, "rows": 0, "redis": 0}
        engine = app.extensions["db"].kw["bind"]
        event.listen(engine, "before_cursor_execute", lambda *a: _count(statements, "n"))
        event.listen(models.Message, "load", lambda *a: _count(statements, "rows"))
        _count_redis_round_trips(statements)
        result: dict[str, Any] = {
            "database": engine.dialect.name, "limits": limits_on, "served": served, "rows": [],
            "app": str(Path(models.__file__).resolve().parent.parent),  # the code measured
        }  # fmt: skip
        convs = {(door, length): bench.conversation(length) for door, length in CASES}
        for key in convs:  # warm up imports, pools, caches
            for _ in range(5):
                bench.post(key[0], convs[key])
        cpu: dict[tuple[str, int], list[float]] = {key: [] for key in convs}
        sql: dict[tuple[str, int], list[int]] = {key: [] for key in convs}
        rows: dict[tuple[str, int], list[int]] = {key: [] for key in convs}
        trips: dict[tuple[str, int], list[int]] = {key: [] for key in convs}
        for _ in range(n):
            for key, conv in convs.items():  # interleaved: drift hits every case alike
                statements.update(n=0, rows=0, redis=0)
                cpu[key].append(bench.post(key[0], conv, counts=statements) * 1000)
                sql[key].append(statements["n"])
                rows[key].append(statements["rows"])
                trips[key].append(statements["redis"])
        for (door, length), samples in cpu.items():
            result["rows"].append(
                {
                    "door": door,
                    "messages": length,
                    "p50_ms": statistics.median(samples),
                    "mean_ms": statistics.fmean(samples),
                    "sql": statistics.median(sql[(door, length)]),
                    "loaded": statistics.median(rows[(door, length)]),
                    "redis": statistics.median(trips[(door, length)]),
                }
            )
        if profile and not served:
            result["profile"] = {}
            for door in ("page", "v1"):
                prof = cProfile.Profile()
                for _ in range(50):
                    bench.post(door, convs[(door, profile)], prof)
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out)
                stats.sort_stats("cumulative").print_stats(r"/tidechat/|/worker/", 15)
                stats.sort_stats("tottime").print_stats(15)
                result["profile"][door] = out.getvalue()
        return result
    finally:
        if server is not None:
            server.stop()
        metrics.delete_keys(r, prefix)


def _count(counts: dict[str, int], what: str) -> None:
    counts[what] += 1


def _count_redis_round_trips(counts: dict[str, int]) -> None:
    """Count each command or pipeline redis-py sends, from any client in this process (the
    app's and Flask-Limiter's; the task's push rides in the app's pipeline)."""
    from redis.connection import AbstractConnection

    send = AbstractConnection.send_packed_command

    def counted(self, *args, **kwargs):
        counts["redis"] += 1
        return send(self, *args, **kwargs)

    AbstractConnection.send_packed_command = counted


class _Conv:
    def __init__(self, cid: str, base_seq: int, last_gid: str) -> None:
        self.cid, self.base_seq, self.last_gid = cid, base_seq, last_gid


class _Served:
    """A gunicorn + gevent web process of its own, and this process's client of it."""

    def __init__(self, env: dict[str, str]) -> None:
        import httpx

        from bench.procs import start_gunicorn

        logdir = Path(tempfile.mkdtemp(prefix="tcpost-served-"))
        env = {**env, "LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
        self.proc = start_gunicorn("web", "app:create_app()", env, logdir, "/healthz")
        self.pid = self.proc.work_pid()
        self.http = httpx.Client(base_url=self.proc.url, timeout=30)

    def cpu(self) -> float:
        """CPU seconds the web process has used, all its threads (nanosecond counters)."""
        return metrics.cpu_seconds_exact(self.pid)

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()


class _Bench:
    def __init__(self, app, r, server: _Served | None = None) -> None:
        from tidechat import limits

        self.app, self.r, self.server = app, r, server
        self.client = app.test_client()
        assert self.client.post("/api/conversations").status_code == 201  # the guest cookie
        key = self.client.post("/api/keys", json={"name": "bench"}).get_json()
        self.auth = {"Authorization": "Bearer " + key["key"]}
        keys = app.extensions["redis_keys"]
        self.queues = limits.queue_names(keys.celery_queue(app.config["CELERY_QUEUE"]))

    def conversation(self, length: int) -> _Conv:
        """A conversation of ``length`` finished messages (user and assistant in turn),
        owned by both this client's guest and its API key's owner."""
        from sqlalchemy import select

        from tidechat import accounts, db, models

        with self.app.test_request_context("/", headers=self.client_headers()):
            owner = accounts.current_owner()
        s = db.session_scope(self.app)
        with s as s:
            conv = models.Conversation(owner=owner, title="bench")
            s.add(conv)
            for i in range(length):
                role = "user" if i % 2 == 0 else "assistant"
                conv.messages.append(
                    models.Message(
                        role=role,
                        content=f"message {i} " + "lorem ipsum " * 20,
                        status=models.DONE,
                        model=MODEL if role == "assistant" else None,
                        generation_id=models.new_id() if role == "assistant" else None,
                        finish_reason="stop" if role == "assistant" else None,
                    )
                )
            s.commit()
            last = s.scalar(
                select(models.Message)
                .where(models.Message.conversation_id == conv.id)
                .order_by(models.Message.seq.desc())
                .limit(1)
            )
            return _Conv(conv.id, last.seq, last.generation_id) if last else _Conv(conv.id, 0, "")

    def client_headers(self) -> dict[str, str]:
        cookie = self.client.get_cookie("session")
        return {"Cookie": f"session={cookie.value}"} if cookie else {}

    def post(
        self, door: str, conv: _Conv, prof: cProfile.Profile | None = None,
        counts: dict[str, int] | None = None,
    ) -> float:  # fmt: skip
        """One request's CPU seconds (then end its answer and drop what it added)."""
        if door == "page":
            url, body, headers = (
                f"/api/conversations/{conv.cid}/messages",
                {"content": "Hi there"},
                {},
            )
        else:
            url, headers = "/v1/responses", self.auth
            body = {"model": MODEL, "input": "Hi there", "background": True,
                    "previous_response_id": "resp_" + conv.last_gid}  # fmt: skip
        if self.server is not None:
            spent, status, text = self._post_served(url, body, headers)
        else:
            if prof is not None:
                prof.enable()
            start = time.process_time()
            response = self.client.post(url, json=body, headers=headers)
            spent = time.process_time() - start
            if prof is not None:
                prof.disable()
            status, text = response.status_code, response.get_data(as_text=True)
        if counts is not None:  # what the request did, before the reset's own queries
            snapshot = dict(counts)
        if status not in (200, 202):
            raise RuntimeError(f"{door}: {status} {text}")
        self.reset(conv)
        if counts is not None:
            counts.update(snapshot)
        return spent

    def _post_served(self, url: str, body: dict, headers: dict) -> tuple[float, int, str]:
        server = self.server
        headers = {**headers, **self.client_headers()}  # the test client's guest cookie
        start = server.cpu()
        response = server.http.post(url, json=body, headers=headers)
        return server.cpu() - start, response.status_code, response.text

    def reset(self, conv: _Conv) -> None:
        from sqlalchemy import delete, select

        from tidechat import answers, db, models

        M = models.Message
        with self.app.app_context():
            s = db.session()
            added = list(
                s.scalars(select(M).where(M.conversation_id == conv.cid, M.seq > conv.base_seq))
            )
            for msg in added:
                if msg.generation_id is not None:
                    answers.cancel(s, msg)
            s.execute(delete(M).where(M.conversation_id == conv.cid, M.seq > conv.base_seq))
            s.commit()
        self.r.delete(*self.queues)


# --- the whole run ----------------------------------------------------------------------


def _postgres_database():
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"tidechat_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False), drop


def _database(kind: str) -> tuple[str, Any]:
    """A fresh database of ``kind``: its URL, and what drops it (or None)."""
    if kind == "sqlite":
        return f"sqlite:///{Path(tempfile.mkdtemp(prefix='tcpost-')) / 'tidechat.db'}", None
    return _postgres_database()


def _run_case(root: Path, kind: str, mode: str, server: str, n: int, profile: int | None) -> dict:
    """One configuration in a process of its own, on the app of the checkout at ``root``."""
    url, drop = _database(kind)
    cmd = [sys.executable, "-m", "bench.post_cost", "--one", f"{url}|{mode}|{server}", "-n", str(n)]
    if profile:
        cmd += ["--profile", str(profile)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root).stdout
    except subprocess.CalledProcessError as exc:
        print(exc.stdout, exc.stderr, file=sys.stderr)
        raise
    finally:
        if drop is not None:
            drop()
    return json.loads(out.strip().splitlines()[-1])


def _median_rows(runs: list[dict]) -> dict:
    """One configuration's runs merged: each row's p50 and mean the median of the runs'."""
    merged = dict(runs[0], rows=[dict(row) for row in runs[0]["rows"]])
    for i, row in enumerate(merged["rows"]):
        for key in ("p50_ms", "mean_ms"):
            row[key] = statistics.median(run["rows"][i][key] for run in runs)
    return merged


def _print_table(results: list[dict], n: int, profile: int | None) -> None:
    print(f"web CPU per POST (ms), {n} requests per row; per request: sql statements, "
          "Message rows the ORM loaded, Redis round trips")  # fmt: skip
    print(f"{'database':<11}{'limits':<8}{'server':<8}{'door':<6}{'messages':>9}{'p50':>8}"
          f"{'mean':>8}{'sql':>6}{'loaded':>8}{'redis':>7}")  # fmt: skip
    for res in results:
        for row in res["rows"]:
            counted = "".join(
                f"{'-' if res['served'] else format(row[k], '.0f'):>{w}}"
                for k, w in (("sql", 6), ("loaded", 8), ("redis", 7))
            )
            print(
                f"{res['database']:<11}{'on' if res['limits'] else 'off':<8}"
                f"{'served' if res['served'] else 'inproc':<8}{row['door']:<6}"
                f"{row['messages']:>9}{row['p50_ms']:>8.2f}{row['mean_ms']:>8.2f}{counted}"
            )
        for door, text in (res.get("profile") or {}).items():
            print(f"\n--- {res['database']}, limits {'on' if res['limits'] else 'off'}, {door}, "
                  f"{profile} messages, 50 requests ---")  # fmt: skip
            print("\n".join(line for line in text.strip().splitlines() if line.strip()))


def _print_ratios(ours: list[dict], theirs: list[dict], rev: str) -> None:
    print(f"\nthis checkout's p50 against {rev}'s, same cases (median of the rounds)")
    print(f"{'database':<11}{'limits':<8}{'server':<8}{'door':<6}{'messages':>9}"
          f"{'this':>8}{rev[:10]:>12}{'ratio':>8}")  # fmt: skip
    for res, base in zip(ours, theirs, strict=True):
        for row, brow in zip(res["rows"], base["rows"], strict=True):
            print(
                f"{res['database']:<11}{'on' if res['limits'] else 'off':<8}"
                f"{'served' if res['served'] else 'inproc':<8}{row['door']:<6}"
                f"{row['messages']:>9}{row['p50_ms']:>8.2f}{brow['p50_ms']:>12.2f}"
                f"{row['p50_ms'] / brow['p50_ms']:>8.2f}"
            )


OPTIONS = {
    "--db": ("sqlite", "postgres"),
    "--limits": ("off", "on"),
    "--server": ("inproc", "served"),
}


def choices(parser: argparse.ArgumentParser, option: str, value: str) -> list[str]:
    """An option's values: one, several comma-separated, or ``both``. Anything else is an
    error (``--db both`` once ran PostgreSQL alone)."""
    known = OPTIONS[option]
    values = list(known) if value == "both" else value.split(",")
    for v in values:
        if v not in known:
            parser.error(f"{option}: {v!r} is not one of {', '.join(known)} or both")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.post_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--db", default="sqlite,postgres", help="sqlite, postgres or both")
    parser.add_argument("--limits", default="off,on", help="off, on or both")
    parser.add_argument("-n", type=int, default=100, help="requests per case (default 100)")
    parser.add_argument(
        "--profile", type=int, choices=LENGTHS, help="cProfile (top 15) at this length"
    )
    parser.add_argument(
        "--server", default="inproc,served", help="inproc (Flask's test client), served or both"
    )
    parser.add_argument(
        "--against", metavar="REV", help="also measure git revision REV's app, taking turns"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each case (each side), default 1"
    )
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    # internal: "<database url>|<on|off>|<inproc|served>"
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        url, mode, server = args.one.rsplit("|", 2)
        print(json.dumps(run_one(url, mode == "on", args.n, args.profile, server == "served")))
        return 0

    cases = [(kind, mode, server) for kind in choices(parser, "--db", args.db)
             for mode in choices(parser, "--limits", args.limits)
             for server in choices(parser, "--server", args.server)]  # fmt: skip
    if any(kind == "postgres" for kind, _, _ in cases):
        try:  # PostgreSQL reachable?
            _postgres_database()[1]()
        except Exception as exc:  # noqa: BLE001
            print(f"(skipping PostgreSQL: {exc.__class__.__name__}: {exc})", file=sys.stderr)
            cases = [case for case in cases if case[0] == "sqlite"]
    from bench.procs import worktree

    against = worktree(args.against, BENCH_CODE) if args.against else None
    with against or contextlib.nullcontext() as base:
        roots = [ROOT] if base is None else [ROOT, base]
        runs: dict[Path, list[list[dict]]] = {root: [[] for _ in cases] for root in roots}
        for _ in range(args.rounds):
            for i, case in enumerate(cases):
                for root in roots:  # taking turns: the machine's drift falls on both alike
                    profile = args.profile if root == ROOT else None
                    runs[root][i].append(_run_case(root, *case, args.n, profile))
    results = {root: [_median_rows(case_runs) for case_runs in per] for root, per in runs.items()}
    if args.json:
        print(json.dumps({"this": results[ROOT], args.against: results.get(base)}, indent=2)
              if base else json.dumps(results[ROOT], indent=2))  # fmt: skip
        return 0
    _print_table(results[ROOT], args.n, args.profile)
    if base is not None:
        print(f"\n{args.against}:")
        _print_table(results[base], args.n, None)
        _print_ratios(results[ROOT], results[base], args.against)
    return 0


if __name__ == "__main__":
    sys.exit(main())
