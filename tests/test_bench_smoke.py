"""The benchmark harness runs end to end (``python -m bench --quick``) and writes its result.

Only that it runs and produces the expected shape is asserted: the numbers of a
seconds-long run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.harness import TARGETS
from tests.stack import ROOT

pytestmark = pytest.mark.e2e


def test_quick_bench_writes_a_result(tmp_path: Path, redis_url: str) -> None:
    result = main(["--quick", "--output", str(tmp_path), "--redis-url", redis_url])

    written = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert set(written) >= {"options", "machine", "streams", "capacity", "idle", "targets"}
    assert {r["target"] for r in written["streams"]} == {"proxy", "bare", "tidechat", "v1"}
    # The /v1/responses path (stream + background) and the bare relay (the baseline of
    # the mission's hops) at every level, every stream complete.
    for target in ("v1", "bare"):
        assert [r["streams"] for r in written["streams"] if r["target"] == target] == [1, 5]
    rows = written["streams"] + written["capacity"]
    complete = [r for r in rows if r["target"] in ("v1", "bare")]
    assert len(complete) == 6
    for row in complete:
        assert row["errors"] == 0, row["error_samples"]
        assert row["completed"] == row["streams"]
        assert row["tokens"] == row["streams"] * row["tokens_per_stream"]
    for row in written["streams"]:
        assert set(row) >= {
            "streams", "tokens_per_s", "relay_p50_ms", "relay_p99_ms", "ttft_overhead_p50_ms",
            "redis_cmds_per_token", "web_redis_conns", "model_peak_streams", "errors",
        }  # fmt: skip
        assert row["tokens"] > 0
    # Bursts run again and again, the targets taking turns: each burst's first-token
    # overhead, and the median the TTFT targets are judged by.
    bursts = written["bursts"]
    assert [(b["streams"], b["target"]) for b in bursts] == [(5, t) for t in TARGETS]
    for burst in bursts:
        assert len(burst["ttft_p50_ms"]) == 2 and None not in burst["ttft_p50_ms"]
        assert min(burst["ttft_p50_ms"]) <= burst["median_ms"] <= max(burst["ttft_p50_ms"])
    assert [s["target"] for s in written["idle"]] == ["proxy", "tidechat"]
    assert all("rss_per_client_kb" in p for s in written["idle"] for p in s["levels"])
    assert result["targets"]
    # The CPU target's row shows the floor of the mission's shape beside the proxy's.
    cpu = next(t for t in result["targets"] if t["target"].startswith("CPU per delivered"))
    assert "bare relay" in cpu["proxy"]
    # Every process stopped cleanly: no greenlet died with an error (the baselines' web
    # processes once failed at SIGTERM, building a Tidechat stream hub they do not have).
    logs = {log.name: log.read_text() for log in Path(written["logs"]).glob("*.log")}
    assert {"proxy.log", "bare.log", "tidechat.log", "worker.log"} <= set(logs)
    assert not {name for name, text in logs.items() if " failed with " in text}


def test_short_soak_through_a_redis_restart_passes_its_checks(tmp_path: Path) -> None:
    """``python -m bench soak`` for 20 s: 5 answers in flight, Redis killed (SIGKILL) and
    restarted from its AOF in the middle; every client's text, ids and end must check out."""
    # The command line in a process of its own, as an operator runs it (and so with an
    # event loop of its own: the browser tests' Playwright holds this process's).
    argv = ["soak", "--minutes", "0.33", "--streams", "5", "--tokens", "40", "--rate", "10",
            "--restart-at", "0.5", "--grace", "45", "--output", str(tmp_path)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    written = json.loads((tmp_path / "soak-latest.json").read_text())
    tally = written["tally"]
    assert tally["ok"], json.dumps({"checks": tally["checks"], "failures": tally["failures"][:5]})
    assert written["restart"]["down_s"] >= 3
    assert written["redis"]["appendonly"] == "yes"
    assert tally["answers"] >= 10
    assert tally["clients"]["clients"] > 0 and tally["clients"]["reconnects"] > 0
    assert sum(tally["statuses"].values()) >= 10
    assert written["rss_end"]["web"] > 0


def test_post_cost_measures_both_servers(redis_url: str) -> None:
    """``python -m bench.post_cost``: the in-process rows carry the request's counts; the
    served rows come from a real gunicorn process (its CPU, no counts)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.post_cost", "--db", "sqlite", "--limits", "on", "-n", "3",
         "--server", "both", "--json"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    inproc, served = json.loads(out)
    assert (inproc["served"], served["served"]) == (False, True)
    for result in (inproc, served):
        rows = {(row["door"], row["messages"]): row for row in result["rows"]}
        assert set(rows) == {("page", 0), ("page", 2), ("page", 200), ("v1", 2), ("v1", 200)}
        assert all(row["p50_ms"] > 0 for row in rows.values())
    # a new conversation's first message (it titles it) included
    assert [row["sql"] for row in inproc["rows"] if row["door"] == "page"] == [4, 4, 4]


def test_post_cost_refuses_a_value_it_does_not_know() -> None:
    """``--db both`` once ran PostgreSQL alone: a value is one of the option's, or an error."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.post_cost", "--db", "sqlite,mysql"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--db: 'mysql' is not one of sqlite, postgres or both" in run.stderr


def test_post_cost_measures_another_revision_from_its_own_checkout(redis_url: str) -> None:
    """``--against REV``: the revision's app is what the baseline rows measured (not this
    checkout's, which an installed package or a process's working directory could give),
    and its temporary worktree is gone afterwards."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.post_cost", "--db", "sqlite", "--limits", "off",
         "--server", "inproc", "-n", "2", "--against", "HEAD", "--json"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    results = json.loads(out)
    (ours,), (theirs,) = results["this"], results["HEAD"]
    assert Path(ours["app"]) == ROOT.resolve()
    assert Path(theirs["app"]).name == "tree" and not Path(theirs["app"]).exists()
    assert all(row["p50_ms"] > 0 for row in ours["rows"] + theirs["rows"])
    worktrees = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert theirs["app"] not in worktrees


_START_WORKER = """
import sys, uuid
from pathlib import Path
import redis
from bench import celery_floor, metrics, procs
prefix = f"tctree:{uuid.uuid4().hex[:8]}:"
env = celery_floor.settings(prefix, Path(sys.argv[1]))
try:
    proc = procs.start_worker(env, Path(sys.argv[1]), 2)
    proc.stop()
    print(proc.output())
finally:  # the worker's keys in the shared Redis
    metrics.delete_keys(redis.Redis.from_url(env["REDIS_URL"]), prefix)
"""


def test_a_worker_started_from_another_checkout_runs_that_checkouts_code(
    tmp_path: Path, redis_url: str
) -> None:
    """An A/B run starts one side's processes from a second checkout (a git worktree): its
    Celery worker must run that checkout's code, not the one the venv has installed (it
    did not: Celery puts the working directory on ``sys.path`` only while it imports the
    app module, so the later imports came from the installed checkout)."""
    from bench.procs import worktree

    # (this checkout's bench code, which the script runs, over HEAD's: uncommitted work too)
    bench_code = ("bench/procs.py", "bench/worker_app.py", "bench/metrics.py", "bench/limits.py",
                  "bench/celery_floor.py")  # fmt: skip
    with worktree("HEAD", bench_code) as tree:
        out = subprocess.run(
            [sys.executable, "-c", _START_WORKER, str(tmp_path)],
            cwd=tree, env={**os.environ, "REDIS_URL": redis_url},
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert f"bench worker ready: code from {tree}\n" in out, out


def test_celery_floor_starts_every_task_of_its_bursts(tmp_path: Path, redis_url: str) -> None:
    """``python -m bench.celery_floor``: Tidechat's own Celery worker, its generation task
    recording only when it began, starts every task of each burst."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.celery_floor", "--sizes", "3,7", "--bursts", "2",
         "--concurrency", "20", "--output", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (written,) = tmp_path.glob("celery-floor-*.json")
    rows = json.loads(written.read_text())["rows"]
    assert [(row["size"], len(row["bursts"])) for row in rows] == [(3, 2), (7, 2)]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["max_ms"]
        assert row["cpu_ms_per_task"] > 0
