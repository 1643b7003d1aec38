"""Run the whole app on one machine with honcho and ``Procfile.dev``.

``python -m tidechat.devserver`` (what ``bin/dev`` runs).
It decides which processes a run needs and hands them to honcho, which supervises them
and stops every one on Ctrl-C:
- ``redis``: embedded, unless ``REDIS_URL`` is set (environment or ``.env``);
- ``model``: SmolLM2 on llama.cpp, unless ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set;
- ``web`` (gunicorn+gevent) and ``worker`` (Celery, gevent pool), always.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from honcho.environ import parse as parse_env

from tidechat.config import ROOT
from tidechat.embedded import LOCAL_BACKEND_LABEL, LOCAL_MODEL, MissingExtra, gguf_path


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
        )
        processes.append("model")
    return processes, extra


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
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # the venv's python, celery...
    subprocess.run(
        [str(bindir / "flask"), "--app", "app", "init-db"], env=env, check=True, cwd=ROOT
    )
    print(
        f"\n  Tidechat: http://127.0.0.1:{port}/   ({', '.join(processes)}; Ctrl-C stops all)\n",
        flush=True,
    )
    honcho = shutil.which("honcho", path=str(bindir)) or "honcho"
    argv = [honcho, "start", "-f", str(ROOT / "Procfile.dev"), "-d", str(ROOT), "-p", str(port)]
    os.execve(honcho, [*argv, *processes], env)  # web first: honcho gives it PORT


if __name__ == "__main__":
    main()
