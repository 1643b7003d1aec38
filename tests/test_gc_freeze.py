"""A ready web or worker process keeps its startup objects out of the garbage collector's
full collections: a full collection walking them paused the whole gevent process for
60-130 ms, the slowest bursts' time to first token (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

REPORT = """
import gc, json
print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""

# Each process as it gets ready: gunicorn's hook once its app is loaded, Celery's signal
# once the worker consumes.
WEB = """
import runpy, types
hooks = runpy.run_path("gunicorn.conf.py")
from app import create_app
hooks["post_worker_init"](types.SimpleNamespace(wsgi=create_app(), handle_exit=None))
"""
WORKER = """
from celery.signals import worker_ready
import worker.celery_app
worker_ready.send(sender=None)
"""


@pytest.mark.parametrize("process", [WEB, WORKER], ids=["web", "worker"])
def test_a_ready_process_leaves_its_startup_objects_out_of_collections(
    process: str, process_env: dict[str, str]
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", process + REPORT],
        cwd=ROOT, env=process_env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    heap = json.loads(out.stdout.strip().splitlines()[-1])
    # More than 100,000 objects at startup (the SDKs, the app); a full collection now
    # walks only what is left tracked, a small part of them.
    assert heap["frozen"] > 100_000
    assert heap["tracked"] < heap["frozen"] / 10
