"""``python -m bench.metrics_plot --seconds 60``: Tidechat's own metrics during a real run.

Starts the stack the way the benchmark does (``bench.harness.Stack``: the bench model
server, one Celery worker, one gunicorn+gevent web process, with the harness's environment),
drives a modest mixed load through the page's API for ``--seconds`` (chats that run to
the end, chats the user stops part way, chats with a model the model server does not know,
which fail ``model_not_found``; more users in the middle of the run than the worker takes
at once, so answers queue), then lets the last answers end. Meanwhile it scrapes
``/metrics`` once a second from the loopback address (the operator's, ``OPS_ALLOW``), and
the operator's view (``/api/admin/answers``) and the model server's counters for
comparison, and plots:

- answers finished per second, by final status;
- event streams open (``tidechat_open_streams``);
- queue depth (``tidechat_queue_depth``) and answers running, against the queued and
  running answers the operator's view lists;
- time to first token p50/p95, from the histogram's buckets over a sliding window (the way
  Prometheus's ``histogram_quantile`` does it);
- tokens relayed per second (``tidechat_tokens_relayed``, an estimate at ~4 characters a
  token), against the tokens the model server really sent.

Writes the PNG (``--out``) and the raw samples as ``bench/output/metrics-<time>.json``
(``--replot that.json`` draws it again without a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import client
from bench.harness import OUTPUT, Options, Stack

SCRAPE_EVERY = 1.0  # seconds
RATE_WINDOW = 3.0  # seconds each per-second rate is taken over (Prometheus's rate()[3s])
QUANTILE_WINDOW = 5.0  # seconds of histogram counts each TTFT quantile is taken over
DRAIN_LIMIT = 30.0  # seconds to wait, after the load stops, for the last answers to end
# The load's shape, as (fraction of the run, users at once): a quiet start, a busier
# stretch, a peak above the worker's concurrency (answers queue), and a tail.
PHASES = ((0.0, 0.25), (0.2, 0.5), (0.45, 1.0), (0.75, 0.3))


@dataclass
class Load:
    """What to run: users at the peak, the worker's concurrency, the mix of answers."""

    seconds: float = 60.0
    peak_users: int = 20
    worker_concurrency: int = 8
    seed: int = 1
    # (kind, weight): answers run to the end, stopped by their user, failing
    mix: tuple[tuple[str, int], ...] = (("done", 7), ("cancelled", 2), ("error", 1))

    def users_at(self, t: float) -> int:
        """How many users are active ``t`` seconds into the run (none after it)."""
        if t >= self.seconds:
            return 0
        share = 0.0
        for start, users in PHASES:
            if t >= start * self.seconds:
                share = users
        return max(1, round(share * self.peak_users))


@dataclass
class Tally:
    """What the load generator itself saw (to check the metrics against)."""

    started: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ended: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by last event
    failures: list[str] = field(default_factory=list)


def model_for(kind: str, rng: random.Random) -> str:
    """A bench model name: its script (tokens, rate, time to first token) is in the name.
    Known-text tokens (``say-w``: "w.<i> ", 5-6 characters) rather than the default
    scripts' 20-character time stamps, so the relayed-tokens estimate (~4 characters a
    token) stays in the range of the model's own count."""
    ttft = rng.choice((50, 50, 150, 400, 1200))
    if kind == "done":
        return f"bench-n{rng.randint(30, 90)}-r{rng.choice((15, 25, 40))}-t{ttft}-say-w"
    if kind == "cancelled":
        return f"bench-n600-r20-t{ttft}-say-w"  # 30 s unless stopped
    return f"bench-unknown-{rng.randint(0, 9)}"  # the model server answers 404


async def read_events(
    http: aiohttp.ClientSession, url: str, cookie: dict, stop_after: float | None
) -> str:
    """Read an answer's events to the end; with ``stop_after``, ask it to stop that many
    seconds in (as the page's Stop button does). Returns the last event's name."""
    last = ""
    stopper = asyncio.create_task(_cancel(http, url, cookie, stop_after)) if stop_after else None
    try:
        async with http.get(url, cookies=cookie) as resp:
            if resp.status != 200:
                raise RuntimeError(f"events: HTTP {resp.status}")
            async for raw in resp.content:
                if raw.startswith(b"event: "):
                    last = raw[7:].strip().decode()
                    if last in ("done", "error"):
                        break
    finally:
        if stopper is not None and not stopper.done():
            stopper.cancel()  # it ended before its user stopped it
    return last


async def _cancel(http: aiohttp.ClientSession, events_url: str, cookie: dict, after: float) -> None:
    """``POST .../cancel`` (the generation's, next to its events) ``after`` seconds."""
    await asyncio.sleep(after)
    url = events_url.rsplit("/", 1)[0] + "/cancel"
    async with http.post(url, cookies=cookie) as resp:
        await resp.read()


async def user(slot: int, http: aiohttp.ClientSession, load: Load, t0: float, tally: Tally) -> None:
    """One user: while the load has room for them, ask, read (or stop), think, ask again."""
    rng = random.Random(load.seed * 1000 + slot)
    kinds = [k for k, _ in load.mix]
    weights = [w for _, w in load.mix]
    person: client.User | None = None
    asked = 0
    while (now := time.monotonic() - t0) < load.seconds:
        if slot >= load.users_at(now):
            await asyncio.sleep(0.25)
            continue
        kind = rng.choices(kinds, weights)[0]
        try:
            if person is None or asked % 8 == 0:  # a fresh chat now and then
                person = await client.new_user(http)
            asked += 1
            url = await client.post_message(http, person, model_for(kind, rng))
            tally.started[kind] += 1
            stop_after = rng.uniform(0.8, 3.0) if kind == "cancelled" else None
            last = await read_events(http, url, person.cookie, stop_after)
            tally.ended[last or "none"] += 1
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
            tally.failures.append(f"{kind}: {exc!r}"[:200])
            await asyncio.sleep(1.0)
        await asyncio.sleep(rng.uniform(0.2, 1.2))  # reading the answer, typing the next


# -- scraping ----------------------------------------------------------------------------
Sample = dict[str, Any]


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of the exposition as ``name{label="value",...}`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def scrape(
    stack: Stack, t0: float, until: asyncio.Event, load: Load, samples: list[Sample]
) -> None:
    """Every second until ``until``: ``/metrics``, the operator's view and the model
    server's counters, appended to ``samples``."""
    web, model = stack.procs["tidechat"].url, stack.procs["model"].url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not until.is_set():
            started = time.monotonic()
            sample: Sample = {"t": round(started - t0, 3), "users": load.users_at(started - t0)}
            try:
                async with http.get(web + "/metrics") as resp:
                    resp.raise_for_status()
                    sample["metrics"] = parse_metrics(await resp.text())
                async with http.get(web + "/api/admin/answers") as resp:
                    resp.raise_for_status()
                    view = await resp.json()
                    sample["view"] = {
                        "running": len(view["running"]),
                        "queued": len(view["queued"]),
                        "queue_depth": view["queue_depth"],
                    }
                async with http.get(model + "/bench/stats") as resp:
                    stats = await resp.json()
                    sample["model_tokens"] = sum(stats["tokens"].values())
                    sample["model_active"] = sum(stats["active"].values())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                sample["error"] = repr(exc)
            samples.append(sample)
            await asyncio.sleep(max(0.0, SCRAPE_EVERY - (time.monotonic() - started)))


async def drive(stack: Stack, load: Load) -> tuple[list[Sample], Tally, float]:
    tally = Tally()
    samples: list[Sample] = []
    t0 = time.monotonic()
    done = asyncio.Event()
    scraper = asyncio.create_task(scrape(stack, t0, done, load, samples))
    async with client.make_session(stack.procs["tidechat"].url) as http:
        users = [user(i, http, load, t0, tally) for i in range(load.peak_users)]
        await asyncio.gather(*users)
    loaded = time.monotonic() - t0
    # The load has stopped; let the last answers (and the queue) empty, still scraping.
    deadline = time.monotonic() + DRAIN_LIMIT
    await asyncio.sleep(2 * SCRAPE_EVERY)
    while time.monotonic() < deadline:
        await asyncio.sleep(SCRAPE_EVERY)
        view = samples[-1].get("view")
        if view and not view["running"] and not view["queued"]:
            break
    await asyncio.sleep(3 * SCRAPE_EVERY)  # a flat tail: the end is visible
    done.set()
    await scraper
    return samples, tally, loaded


# -- series ------------------------------------------------------------------------------
def series(samples: list[Sample], key: str) -> list[float | None]:
    """A gauge's values (None where a scrape failed or did not have it)."""
    return [s.get("metrics", {}).get(key) for s in samples]


def total(samples: list[Sample], keys: list[str]) -> list[float | None]:
    """The sum of counters (or gauges): one not shown yet is 0 (a label set appears on
    its first use), so the first answers of a status are not lost; None where a scrape
    failed."""
    out: list[float | None] = []
    for s in samples:
        metrics = s.get("metrics")
        out.append(sum(metrics.get(k, 0.0) for k in keys) if metrics else None)
    return out


def matching(samples: list[Sample], prefix: str) -> list[str]:
    keys = {k for s in samples for k in s.get("metrics", {}) if k.startswith(prefix)}
    return sorted(keys)


def label(key: str, name: str) -> str:
    return key.split(f'{name}="', 1)[1].split('"', 1)[0] if f'{name}="' in key else ""


def per_second(times: list[float], values: list[float | None]) -> list[float | None]:
    """A counter's rate over the last RATE_WINDOW seconds at each scrape (from the oldest
    good scrape in the window; None where there is none, or this one failed)."""
    out: list[float | None] = []
    for i, (now, value) in enumerate(zip(times, values, strict=True)):
        then = next(
            (j for j in range(i) if times[j] >= now - RATE_WINDOW and values[j] is not None),
            None,
        )
        if value is None or then is None:
            out.append(None)
        else:
            out.append(max(0.0, value - values[then]) / (now - times[then]))
    return out


def bucket_bounds(samples: list[Sample], metric: str) -> list[tuple[float, str]]:
    keys = matching(samples, f"{metric}_bucket{{")
    return sorted((float(label(k, "le")), k) for k in keys)


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """``histogram_quantile``: the q-quantile of cumulative bucket ``counts`` (upper
    ``bounds``, the last +Inf), interpolated linearly inside its bucket."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower  # above the last finite bound: that bound is all one knows
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return None


def windowed_quantiles(
    samples: list[Sample], metric: str, qs: tuple[float, ...]
) -> dict[float, list[float | None]]:
    """Each quantile over the histogram's counts of the last QUANTILE_WINDOW seconds."""
    bounds = bucket_bounds(samples, metric)
    les = [b for b, _ in bounds]
    out: dict[float, list[float | None]] = {q: [] for q in qs}
    start = 0
    for i, s in enumerate(samples):
        while samples[start]["t"] < s["t"] - QUANTILE_WINDOW:
            start += 1
        then, now = samples[start].get("metrics"), s.get("metrics")
        if not then or not now or not bounds:
            for q in qs:
                out[q].append(None)
            continue
        counts = [now.get(k, 0) - then.get(k, 0) for _, k in bounds]
        for q in qs:
            out[q].append(quantile(q, les, counts) if i > start else None)
    return out


# -- the plot ----------------------------------------------------------------------------
STATUS_COLORS = {
    "done": "tab:green",
    "cancelled": "tab:orange",
    "error": "tab:red",
    "interrupted": "tab:purple",
}


def plot(samples: list[Sample], out: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    (a_fin, a_open), (a_queue, a_ttft), (a_tok, a_load) = axes

    finished = matching(samples, "tidechat_generations_finished_total{")
    by_status: dict[str, list[str]] = defaultdict(list)
    for key in finished:
        by_status[label(key, "status")].append(key)
    for status, keys in sorted(by_status.items()):
        codes = sorted({label(k, "code") for k in keys} - {""})
        name = f"{status} ({', '.join(codes)})" if codes else status
        a_fin.plot(
            t, per_second(t, total(samples, keys)), label=name, color=STATUS_COLORS.get(status)
        )
    a_fin.set_title(f"Answers finished per second, by status (over {RATE_WINDOW:g} s)")
    a_fin.set_ylabel("answers/s")

    for key in matching(samples, "tidechat_open_streams{"):
        a_open.plot(t, total(samples, [key]), label=f"door={label(key, 'door')}")
    a_open.set_title("Event streams open (tidechat_open_streams)")
    a_open.set_ylabel("streams")

    views = [s.get("view", {}) for s in samples]
    a_queue.plot(
        t,
        series(samples, "tidechat_queue_depth"),
        label="tidechat_queue_depth",
        color="tab:red",
        linewidth=2,
    )
    a_queue.plot(
        t,
        [v.get("queued") for v in views],
        label="queued (operator's view)",
        color="tab:red",
        linestyle=":",
    )
    a_queue.plot(
        t,
        series(samples, "tidechat_answers_running"),
        label="tidechat_answers_running",
        color="tab:blue",
        linewidth=2,
    )
    a_queue.plot(
        t,
        [v.get("running") for v in views],
        label="running (operator's view)",
        color="tab:blue",
        linestyle=":",
    )
    a_queue.axhline(
        meta["worker_concurrency"],
        color="gray",
        linewidth=0.8,
        linestyle="--",
        label=f"worker concurrency ({meta['worker_concurrency']})",
    )
    a_queue.set_title("Queue depth and answers running")
    a_queue.set_ylabel("answers")

    qs = windowed_quantiles(samples, "tidechat_time_to_first_token_seconds", (0.5, 0.95))
    a_ttft.plot(t, qs[0.5], label="p50", color="tab:blue")
    a_ttft.plot(t, qs[0.95], label="p95", color="tab:purple")
    a_ttft.set_title(f"Time to first token (histogram, last {QUANTILE_WINDOW:g} s)")
    a_ttft.set_ylabel("seconds")

    relayed = per_second(t, total(samples, ["tidechat_tokens_relayed_total"]))
    model = per_second(t, [s.get("model_tokens") for s in samples])
    a_tok.plot(t, relayed, label="tidechat_tokens_relayed (estimate)", color="tab:green")
    a_tok.plot(t, model, label="tokens the model server sent", color="gray", linestyle=":")
    a_tok.set_title(f"Tokens relayed per second (over {RATE_WINDOW:g} s)")
    a_tok.set_ylabel("tokens/s")

    a_load.step(t, [s["users"] for s in samples], where="post", label="users asking", color="black")
    started = per_second(t, total(samples, ["tidechat_generations_started_total"]))
    queued = per_second(t, total(samples, ["tidechat_generations_queued_total"]))
    a_load.plot(t, queued, label="answers queued/s", color="tab:red", alpha=0.7)
    a_load.plot(t, started, label="answers started/s", color="tab:blue", alpha=0.7)
    a_load.set_title("The load")

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.axvline(meta["seconds"], color="gray", linewidth=0.8, linestyle=":")
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the load started (dotted line: no new answers after it)")
    fig.suptitle(
        f"Tidechat's /metrics during a {meta['seconds']:g} s mixed load "
        f"({meta['started']}; one web process, one worker at concurrency "
        f"{meta['worker_concurrency']}, up to {meta['peak_users']} users)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- the run -----------------------------------------------------------------------------
def run(load: Load, out: Path, opts: Options) -> dict[str, Any]:
    opts.worker_concurrency = load.worker_concurrency
    opts.output = opts.output.resolve()
    opts.output.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="metrics-", dir=opts.output))
    started = time.strftime("%Y-%m-%d %H:%M")
    stack = Stack(opts, rundir).start(proxy=False)
    try:
        samples, tally, loaded = asyncio.run(drive(stack, load))
    finally:
        stack.stop()
    meta = {
        "started": started,
        "seconds": load.seconds,
        "loaded_s": round(loaded, 1),
        "peak_users": load.peak_users,
        "worker_concurrency": load.worker_concurrency,
        "logs": str(rundir),
    }
    plot(samples, out, meta)
    result = {
        "meta": meta,
        "tally": {
            "started": dict(tally.started),
            "ended": dict(tally.ended),
            "failures": tally.failures[:20],
            "failure_count": len(tally.failures),
        },
        "samples": samples,
    }
    saved = opts.output / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(result, indent=0))
    result["saved"] = str(saved)
    return result


def summary(result: dict[str, Any]) -> str:
    last = next(s for s in reversed(result["samples"]) if "metrics" in s)["metrics"]
    finished = {
        k.split("{", 1)[1].rstrip("}"): int(v)
        for k, v in last.items()
        if k.startswith("tidechat_generations_finished_total{") and v
    }
    lines = [
        f"load: started {result['tally']['started']}, last events {result['tally']['ended']}, "
        f"client failures {result['tally']['failure_count']}",
        f"metrics at the end: queued {int(last.get('tidechat_generations_queued_total', 0))}, "
        f"started {int(last.get('tidechat_generations_started_total', 0))}, "
        f"tokens relayed {int(last.get('tidechat_tokens_relayed_total', 0))}",
    ]
    lines += [f"  finished {labels}: {n}" for labels, n in sorted(finished.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_plot", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--users", type=int, default=Load.peak_users, help="users at the peak")
    parser.add_argument(
        "--concurrency", type=int, default=Load.worker_concurrency, help="the worker's"
    )
    parser.add_argument("--seed", type=int, default=Load.seed)
    parser.add_argument("--out", type=Path, default=OUTPUT / "metrics.png")
    parser.add_argument("--redis-url", help="Redis (default: REDIS_URL or 127.0.0.1:6379)")
    parser.add_argument("--database-url", help="Tidechat's database (default: SQLite)")
    parser.add_argument("--replot", type=Path, help="plot a saved run's JSON again (no run)")
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot(result["samples"], args.out, result["meta"])
        print(f"wrote {args.out}")
        return result
    load = Load(args.seconds, args.users, args.concurrency, args.seed)
    opts = Options()
    if args.redis_url:
        opts.redis_url = args.redis_url
    if args.database_url:
        opts.database_url = args.database_url
    result = run(load, args.out, opts)
    print(summary(result))
    print(f"wrote {args.out} and {result['saved']}")
    return result


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so every started process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
