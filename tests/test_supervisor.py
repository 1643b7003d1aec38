"""The embedded servers' supervisor, with real processes: a crash is said plainly and
restarted with back-off, repeated crashes stop the restarts without ending the supervisor,
and SIGTERM ends the supervisor and its server together."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tidechat.supervisor import describe_exit


def start_supervisor(child: str, max_failures: int = 3) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        from tidechat.supervisor import Policy, supervise
        policy = Policy(first_delay=0.1, max_delay=0.4, max_failures={max_failures})
        supervise("demo", ["sh", "-c", {child!r}], policy, hint="Restart it by hand.")
    """)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 20) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not printed; got:\n{''.join(seen)}")


def children(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children()


def wait_for_child(proc: subprocess.Popen, not_pid: int | None = None) -> psutil.Process:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = [c for c in children(proc) if c.pid != not_pid]
        if kids:
            return kids[0]
        time.sleep(0.02)
    raise AssertionError("the supervisor started no server")


def test_sigill_is_said_plainly_and_repeated_crashes_stop_the_restarts():
    proc = start_supervisor("kill -ILL $$", max_failures=3)
    try:
        out = read_until(proc, "not restarting")
        assert out.count("demo stopped (SIGILL: illegal instruction.") == 3
        assert "restarting demo in 0.1 s (1/3)" in out
        assert "restarting demo in 0.2 s (2/3)" in out  # back-off doubles
        assert "The rest of the app keeps running. Restart it by hand." in out
        time.sleep(0.5)
        assert proc.poll() is None, "giving up must not end the supervisor (honcho would stop all)"
        assert children(proc) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()


def test_a_killed_server_is_restarted():
    proc = start_supervisor("exec sleep 60")
    try:
        first = wait_for_child(proc)
        first.kill()
        out = read_until(proc, "restarting demo")
        assert "demo stopped (killed by SIGKILL)" in out
        second = wait_for_child(proc, not_pid=first.pid)
        assert second.is_running()
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigterm_stops_supervisor_and_server_together():
    proc = start_supervisor("exec sleep 60")
    try:
        server = wait_for_child(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        server.wait(5)
        assert not server.is_running()
    finally:
        proc.kill()


def test_server_dies_with_a_sigkilled_supervisor():
    proc = start_supervisor("exec sleep 60")
    server = wait_for_child(proc)
    proc.kill()
    proc.wait(5)
    server.wait(5)  # PR_SET_PDEATHSIG: no orphan left holding the port
    assert not server.is_running()


@pytest.mark.parametrize(
    ("returncode", "said"),
    [(1, "exit code 1"), (-9, "killed by SIGKILL"), (-4, "SIGILL: illegal instruction")],
)
def test_describe_exit(returncode, said):
    assert said in describe_exit(returncode)
