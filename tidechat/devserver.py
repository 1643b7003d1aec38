"""Run the whole app on one machine with honcho and ``Procfile.dev``.

``python -m tidechat.devserver`` (what ``bin/dev`` runs).
It decides which processes a run needs and hands them to honcho, which supervises them
and stops every one on Ctrl-C:
- ``redis``: embedded, unless ``REDIS_URL`` is set (environment or ``.env``);
- ``model``: SmolLM2 on llama.cpp, unless ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set;
- ``web`` (gunicorn+gevent) and ``worker`` (Celery, gevent pool), always.
Before it starts them it checks that the local model answers on this CPU, and it prints the
URL once the page answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from honcho.environ import parse as parse_env

from tidechat.config import DEFAULTS, INSTANCE_DIR, ROOT
from tidechat.embedded import (
    LOCAL_BACKEND_LABEL,
    LOCAL_MODEL,
    MissingExtra,
    ModelCheckFailed,
    check_model,
    gguf_path,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def plan(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The honcho process names to start and the environment variables to add."""
    processes, extra = ["web", "worker"], {}
    if not env.get("REDIS_URL"):
        port = free_port()
        extra.update(EMBEDDED_REDIS_PORT=str(port), REDIS_URL=f"redis://127.0.0.1:{port}/0")
        processes.append("redis")
    if not env.get("OPENAI_API_KEY") and not env.get("OPENAI_BASE_URL"):
        gguf_path()  # fail early, with the install hint, if the extra is missing
        port = free_port()
        extra.update(
            EMBEDDED_MODEL_PORT=str(port),
            OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
            TIDECHAT_DEFAULT_MODEL=env.get("TIDECHAT_DEFAULT_MODEL", LOCAL_MODEL),
            TIDECHAT_BACKEND_LABEL=env.get("TIDECHAT_BACKEND_LABEL", LOCAL_BACKEND_LABEL),
            TIDECHAT_MAX_OUTPUT_TOKENS=env.get("TIDECHAT_MAX_OUTPUT_TOKENS", "512"),
            # its context is 2048 tokens: the history and the answer must fit in it together
            TIDECHAT_CONTEXT_TOKENS=env.get("TIDECHAT_CONTEXT_TOKENS", "1400"),
            # SmolLM2 speaks ChatML: a deploy's handed-on answer goes on as a raw completion
            TIDECHAT_CONTINUATION=env.get("TIDECHAT_CONTINUATION", "completion"),
        )
        processes.append("model")
    return processes, extra


def check_local_model() -> None:
    """One tiny completion before anything starts: a build that crashes on this CPU is
    reported in one paragraph, not as a wall of logs after the first message."""
    print("tidechat: checking the local model (one tiny completion)...", flush=True)
    try:
        check_model()
    except ModelCheckFailed as exc:
        sys.exit(f"tidechat: {exc}")


def without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def banner(port: int, env: dict[str, str], processes: list[str]) -> str:
    model = env.get("TIDECHAT_DEFAULT_MODEL") or DEFAULTS["DEFAULT_MODEL"]
    backend = env.get("TIDECHAT_BACKEND_LABEL") or env.get("OPENAI_BASE_URL") or "api.openai.com"
    redis_at = (
        f"embedded, data in {INSTANCE_DIR / 'redis'}"
        if "redis" in processes
        else without_password(env["REDIS_URL"])
    )
    database = without_password(env.get("DATABASE_URL") or DEFAULTS["DATABASE_URL"])
    return "\n".join([
        "",
        f"  Tidechat is running: http://127.0.0.1:{port}/",
        f"  model:    {model} on {backend}",
        f"  redis:    {redis_at}",
        f"  database: {database}",
        "  Ctrl-C stops everything.",
        "",
    ])  # fmt: skip


def wait_until_up(url: str, honcho: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and honcho.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def main() -> None:
    dotenv = ROOT / ".env"
    file_env = parse_env(dotenv.read_text()) if dotenv.exists() else {}
    env = {**os.environ, **file_env}
    try:
        processes, extra = plan(env)
    except MissingExtra as exc:
        sys.exit(f"tidechat: {exc}")
    env.update(extra)
    port = int(env.get("PORT", "8000"))
    if port_in_use(port):
        sys.exit(f"tidechat: port {port} is taken; set PORT to another one")
    env["PORT"] = str(port)
    env.setdefault("HOST", "127.0.0.1")
    if "model" in processes:
        check_local_model()
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # the venv's python, celery...
    subprocess.run(
        [str(bindir / "flask"), "--app", "app", "init-db"], env=env, check=True, cwd=ROOT
    )
    honcho = shutil.which("honcho", path=str(bindir)) or "honcho"
    argv = [honcho, "start", "-f", str(ROOT / "Procfile.dev"), "-d", str(ROOT), "-p", str(port)]
    child = subprocess.Popen([*argv, *processes], env=env)  # web first: honcho gives it PORT

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    if wait_until_up(f"http://127.0.0.1:{port}/api/models", child):
        print(banner(port, env, processes), flush=True)
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
