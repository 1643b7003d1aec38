"""The benchmark harness runs end to end (``python -m bench --quick``) and writes its result.

Only that it runs and produces the expected shape is asserted: the numbers of a
seconds-long run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.e2e


def test_quick_bench_writes_a_result(tmp_path: Path, redis_url: str) -> None:
    result = main(["--quick", "--output", str(tmp_path), "--redis-url", redis_url])

    written = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert set(written) >= {"options", "machine", "streams", "capacity", "idle", "targets"}
    assert {r["target"] for r in written["streams"]} == {"proxy", "tidechat"}
    for row in written["streams"]:
        assert set(row) >= {
            "streams", "tokens_per_s", "relay_p50_ms", "relay_p99_ms", "ttft_overhead_p50_ms",
            "redis_cmds_per_token", "web_redis_conns", "model_peak_streams", "errors",
        }  # fmt: skip
        assert row["tokens"] > 0
    assert [s["target"] for s in written["idle"]] == ["proxy", "tidechat"]
    assert all("rss_per_client_kb" in p for s in written["idle"] for p in s["levels"])
    assert result["targets"]
