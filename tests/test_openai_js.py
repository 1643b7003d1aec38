"""The OpenAI-compatible API (/v1) driven by the official ``openai`` JS SDK (npm), as shipped:
a background streamed response whose connection drops mid-answer resumes exactly with
``responses.retrieve(id, {stream: true, starting_after})`` (tests/clients/openai_resume.mjs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.clients import NODE_MODULES, ROOT, node_binary

pytestmark = pytest.mark.e2e

RESUME_MJS = Path(__file__).resolve().parent / "clients" / "openai_resume.mjs"
OPENAI_PKG = NODE_MODULES / "openai" / "package.json"
LOCK = ROOT / "package-lock.json"
STAMP = NODE_MODULES / ".tidechat-lock-sha256"  # what bin/test writes after its npm ci

# 16 chunks, 0.15 s apart: 2.4 s, so the drop after 3 deltas lands well before the end.
ANSWER = ["The ", "tide ", "comes ", "in, ", "the ", "tide ", "goes ", "out, ",
          "and ", "the ", "moon ", "keeps ", "the ", "time ", "for ", "both."]  # fmt: skip
TEXT = "".join(ANSWER)


def _installed_version() -> str | None:
    try:
        return json.loads(OPENAI_PKG.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def node_openai() -> str:
    """The node binary, once node_modules holds the pinned ``openai`` (``npm ci`` if not)."""
    node = node_binary()
    if not Path(node).exists():
        pytest.skip("Node.js is not installed (apt-get install nodejs)")
    wanted = json.loads((ROOT / "package.json").read_text())["devDependencies"]["openai"]
    if _installed_version() != wanted:
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed, so the openai JS SDK cannot be had")
        env = {**os.environ, "npm_config_audit": "false", "npm_config_fund": "false"}
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0 or _installed_version() != wanted:
            pytest.skip(f"npm ci failed ({done.returncode}): {done.stderr[-1000:]}")
        STAMP.write_text(hashlib.sha256(LOCK.read_bytes()).hexdigest() + "\n")
    return node


def new_key(http: httpx.Client) -> str:
    response = http.post("/api/keys", json={"name": "openai-js"})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def run_resume(node: str, base_url: str, key: str, model: str) -> dict:
    done = subprocess.run(
        [node, str(RESUME_MJS), "--base-url", base_url, "--key", key, "--model", model,
         "--deltas", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, f"openai_resume.mjs failed:\n{done.stderr}\n{done.stdout}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_js_sdk_resumes_a_dropped_background_stream_exactly(node_openai, web, http, model_server):
    model = model_server.script(chunks=ANSWER, delay=0.15)
    key = new_key(http)
    out = run_resume(node_openai, web.url + "/v1", key, model)

    # nothing lost, nothing doubled: the two halves make the answer
    assert out["before"] + out["after"] == TEXT
    # the drop came mid-answer, right after the third delta (chunks may be merged on a
    # loaded machine, so the text is not counted in chunks)
    first = out["types"][: out["first_stream"]]
    assert first.count("response.output_text.delta") == 3
    assert first[-1] == "response.output_text.delta"
    assert out["before"] and out["after"]
    # every event once, in order, across the drop: 0, 1, 2, ... with no gap or repeat
    assert out["sequence"] == list(range(len(out["sequence"])))
    assert out["types"][0] == "response.created"
    assert out["last"] == "response.completed" == out["types"][-1]
    assert out["types"].count("response.completed") == 1

    # a background answer goes on when its reader drops: it was never stopped
    assert model_server.requests_for(model)[-1].hung_up is None
    sdk = openai.OpenAI(base_url=web.url + "/v1", api_key=key, max_retries=0, timeout=30)
    final = sdk.responses.retrieve(out["id"])
    assert final.status == "completed" and final.output_text == TEXT
