"""Keep one embedded server (Redis, the local model) running under ``bin/dev``.

honcho stops every process as soon as one exits, so a crash of the model server used to end
the whole app a second after the first message. ``supervise`` runs the server as a child
instead, restarts it with back-off when it dies, says plainly what happened, and after too
many crashes in a row stops restarting but stays up itself, so the page and the API keep
working (answers then fail with a clear error) until the user restarts ``bin/dev``.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Policy:
    first_delay: float = 1.0  # seconds before the first restart; doubles each crash
    max_delay: float = 30.0
    max_failures: int = 5  # crashes in a row before giving up
    healthy_after: float = 60.0  # a run this long resets the count
    stop_timeout: float = 10.0  # seconds the child gets to exit after SIGTERM


def describe_exit(returncode: int) -> str:
    """``rc=-4`` as a person would want it said."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGILL:
        return (
            f"{name}: illegal instruction. The program was built for a CPU with instructions "
            "this machine does not run"
        )
    return f"killed by {name}"


def _die_with_parent() -> None:
    # If the supervisor itself is SIGKILLed, its server must not live on as an orphan.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, name: str, argv: Sequence[str], policy: Policy, hint: str = "") -> None:
        self.name, self.argv, self.policy, self.hint = name, list(argv), policy, hint
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None

    def say(self, line: str) -> None:
        print(f"tidechat: {line}", flush=True)

    def stop(self, signum: int, _frame: object = None) -> None:
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)
        failures, delay = 0, self.policy.first_delay
        while not self.stopping.is_set():
            started = time.monotonic()
            returncode = self._run_once()
            if self.stopping.is_set():
                break
            if time.monotonic() - started >= self.policy.healthy_after:
                failures, delay = 0, self.policy.first_delay
            failures += 1
            self.say(f"{self.name} stopped ({describe_exit(returncode)}).")
            if failures >= self.policy.max_failures:
                self.say(
                    f"{self.name} crashed {failures} times in a row; not restarting it. "
                    f"The rest of the app keeps running. {self.hint}".rstrip()
                )
                self.stopping.wait()
                break
            tries = f"{failures}/{self.policy.max_failures}"
            self.say(f"restarting {self.name} in {delay:g} s ({tries}).")
            self.stopping.wait(delay)
            delay = min(delay * 2, self.policy.max_delay)
        return 0

    def _run_once(self) -> int:
        self.child = subprocess.Popen(self.argv, preexec_fn=_die_with_parent)
        if self.stopping.is_set():  # a signal came while it was starting
            self.child.terminate()
        try:
            return self.child.wait()
        finally:
            if self.stopping.is_set():
                self._reap()

    def _reap(self) -> None:
        try:
            self.child.wait(self.policy.stop_timeout)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


def supervise(name: str, argv: Sequence[str], policy: Policy | None = None, hint: str = "") -> None:
    """Run ``argv`` until SIGTERM/SIGINT, restarting it when it dies; exits the process."""
    sys.exit(Supervisor(name, argv, policy or Policy(), hint).run())
