"""Presenting a result: the text table, the target checks, and the plot (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STREAM_COLUMNS = (
    ("streams", "streams"),
    ("target", "target"),
    ("tokens_per_s", "tok/s"),
    ("ratio", "vs proxy"),
    ("relay_p50_ms", "relay p50 ms"),
    ("relay_p99_ms", "relay p99 ms"),
    ("ingest_p50_ms", "model→Redis p50/p99 ms"),
    ("fanout_p50_ms", "Redis→client p50/p99 ms"),
    ("ttft_overhead_p50_ms", "TTFT+ p50 ms"),
    ("ttft_overhead_p99_ms", "TTFT+ p99 ms"),
    ("redis_cmds_per_token", "Redis cmd/tok"),
    ("web_redis_conns", "web Redis conns"),
    ("model_peak_streams", "peak model streams"),
    ("errors", "errors"),
    ("cpu", "CPU s web/worker/model/redis/clients"),
    ("cpu_us_per_token", "CPU µs/tok web/worker/redis"),
    ("cpu_ratio", "CPU/tok vs proxy"),
)
CAPACITY_COLUMNS = (
    ("streams", "streams"),
    ("rate", "tok/s each"),
    ("target", "target"),
    ("model_peak_streams", "peak concurrent"),
    ("completed", "completed"),
    ("tokens_per_s", "tok/s"),
    ("ratio", "vs proxy"),
    ("relay_p50_ms", "relay p50 ms"),
    ("relay_p99_ms", "relay p99 ms"),
    ("ttft_overhead_p50_ms", "TTFT+ p50 ms"),
    ("errors", "errors"),
    ("cpu", "CPU s web/worker/model/redis/clients"),
    ("cpu_us_per_token", "CPU µs/tok web/worker/redis"),
    ("cpu_ratio", "CPU/tok vs proxy"),
)
BURST_COLUMNS = (
    ("streams", "burst of"),
    ("target", "target"),
    ("ttft_p50_ms", "TTFT+ p50 ms, each burst"),
    ("median_ms", "median ms"),
)
IDLE_COLUMNS = (
    ("clients", "idle clients"),
    ("target", "target"),
    ("live", "connected (client)"),
    ("server_conns", "connected (server)"),
    ("rss_mb", "web RSS MB"),
    ("rss_per_client_kb", "KB/client"),
    ("redis_conns", "web Redis conns"),
)


# Each target's web process (the CPU column's first figure): /v1 is served by Tidechat's;
# and its worker process (the second): the bare relay has its own.
WEB = {"v1": "tidechat"}
WORKER = {"bare": "bare_worker"}
COLORS = {"proxy": "tab:gray", "bare": "tab:green", "tidechat": "tab:blue", "v1": "tab:orange"}


# The relay's own processes: what a delivered token costs (the model server and the load
# generators are the same for every target, and left out).
RELAY = ("web", "worker", "redis")


def cpu_per_token(row: dict) -> dict[str, float] | None:
    """CPU µs per delivered token of each relay process (the proxy has only "web"), and
    their sum ("total")."""
    cpu, tokens = row.get("cpu_s", {}), row.get("tokens")
    if not cpu or not tokens:
        return None
    proxy = row["target"] == "proxy"
    seconds = {
        "web": cpu.get(WEB.get(row["target"], row["target"]), 0.0),
        "worker": 0.0 if proxy else cpu.get(WORKER.get(row["target"], "worker"), 0.0),
        "redis": 0.0 if proxy else cpu.get("redis", 0.0),  # (the proxy uses no Redis)
    }
    out = {name: round(v * 1e6 / tokens, 1) for name, v in seconds.items()}
    out["total"] = round(sum(seconds.values()) * 1e6 / tokens, 1)
    return out


def with_ratios(rows: list[dict]) -> list[dict]:
    """Stream rows plus each Tidechat row's (page or /v1) throughput and CPU-per-token
    ratios to the proxy's at its level."""
    proxy = {r["streams"]: r for r in rows if r["target"] == "proxy"}
    out = []
    for row in rows:
        row = dict(row)
        base = proxy.get(row["streams"])
        if row["target"] != "proxy" and base and base["tokens_per_s"]:
            row["ratio"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
        per_token, base_cost = cpu_per_token(row), base and cpu_per_token(base)
        if per_token:
            row["cpu_us_per_token"] = "/".join(
                str(per_token[name]) for name in RELAY if row["target"] != "proxy" or name == "web"
            )
            row["cpu_total_us_per_token"] = per_token["total"]
            if row["target"] != "proxy" and base_cost and base_cost["total"]:
                row["cpu_ratio"] = round(per_token["total"] / base_cost["total"], 2)
        cpu = row.get("cpu_s", {})
        web = cpu.get(WEB.get(row["target"], row["target"]), "")
        for hop in ("ingest", "fanout"):
            if row.get(f"{hop}_p50_ms") is not None:
                row[f"{hop}_p50_ms"] = f"{row[f'{hop}_p50_ms']} / {row[f'{hop}_p99_ms']}"
        row["cpu"] = "/".join(
            str(v) for v in (web, "-" if row["target"] == "proxy"
                             else cpu.get(WORKER.get(row["target"], "worker"), "-"),
                             cpu.get("model", ""), cpu.get("redis", ""), cpu.get("clients", ""))
        )  # fmt: skip
        out.append(row)
    return out


def idle_rows(idle: list[dict]) -> list[dict]:
    rows = []
    for sweep in idle:
        for point in sweep["levels"]:
            rows.append({**point, "target": sweep["target"], "rss_mb": round(point["rss"] / 2**20)})
    return sorted(rows, key=lambda r: (r["clients"], r["target"]))


def markdown_table(rows: list[dict], columns: tuple) -> str:
    """A GitHub-flavoured Markdown table (also readable as plain text)."""
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def tables(result: dict) -> str:
    """Both tables of a result, as Markdown."""
    parts = [markdown_table(with_ratios(result["streams"]), STREAM_COLUMNS)]
    if result.get("capacity"):
        parts.append(markdown_table(with_ratios(result["capacity"]), CAPACITY_COLUMNS))
    if result.get("bursts"):
        rows = [{**b, "ttft_p50_ms": " / ".join(map(_cell, b["ttft_p50_ms"]))}
                for b in result["bursts"]]  # fmt: skip
        parts.append(markdown_table(rows, BURST_COLUMNS))
    if result.get("idle"):
        parts.append(markdown_table(idle_rows(result["idle"]), IDLE_COLUMNS))
    return "\n\n".join(parts)


def targets(result: dict) -> list[dict]:
    """Each target of issue 14 (and those met before, which must stay met): the page's
    figure, the proxy's beside it, and whether it is met."""
    rows = with_ratios(result["streams"])
    capacity = with_ratios(result.get("capacity", []))
    tc = {r["streams"]: r for r in rows if r["target"] == "tidechat"}
    px = {r["streams"]: r for r in rows if r["target"] == "proxy"}
    checks: list[dict] = []
    if tc:
        cap = [r for r in capacity if r["target"] == "tidechat"]
        levels = [*(tc[n] for n in sorted(tc)), *cap]
        names = [str(r["streams"]) if r in tc.values() else "capacity" for r in levels]
        cost = {n: r.get("cpu_ratio") for n, r in zip(names, levels, strict=True)}
        ratios = {n: r.get("ratio") for n, r in zip(names, levels, strict=True)}
        checks += [
            _check("CPU per delivered token <= 1.5 x proxy (every level)", cost,
                   _with_bare_relay(rows, capacity),
                   all(v is not None and v <= 1.5 for v in cost.values())),
            _check("tok/s >= 0.8 x proxy at every level and capacity", ratios, "proxy = 1.0",
                   all(v is not None and v >= 0.8 for v in ratios.values())),
        ]  # fmt: skip
        checks += _ttft_checks(_first_tokens(tc, result.get("bursts", []), "tidechat"),
                               _first_tokens(px, result.get("bursts", []), "proxy"))  # fmt: skip
        if 1 in tc:
            p50 = tc[1]["relay_p50_ms"]
            checks.append(
                _check(
                    "relay p50 <= 2 ms at 1 stream",
                    p50,
                    px.get(1, {}).get("relay_p50_ms"),
                    p50 is not None and p50 <= 2,
                )
            )
    checks += _capacity_checks(result.get("capacity", []))
    checks += _idle_checks(result.get("idle", []))
    return checks


def _with_bare_relay(rows: list[dict], capacity: list[dict]) -> str:
    """The proxy's column of the CPU target: 1.0, and beside it the bare relay's ratios
    (the floor of the mission's shape, bench/bare_relay.py) where the run has them."""
    bare = {str(r["streams"]): r.get("cpu_ratio") for r in rows if r["target"] == "bare"}
    for row in capacity:
        if row["target"] == "bare":
            bare["capacity"] = row.get("cpu_ratio")
    return f"proxy = 1.0; bare relay {bare}" if bare else "proxy = 1.0"


def _first_tokens(levels: dict, bursts: list[dict], target: str) -> dict[int, Any]:
    """A target's TTFT overhead p50 by burst size: the median of its repeated bursts where
    the run has them (a result from before them: its stream level's, one burst)."""
    out = {n: r["ttft_overhead_p50_ms"] for n, r in levels.items()}
    out.update({b["streams"]: b["median_ms"] for b in bursts if b["target"] == target})
    return out


def _ttft_checks(tc: dict, px: dict) -> list[dict]:
    """TTFT overhead p50: <= 25 ms at a burst of 10, <= 2 x the proxy's at a burst of 100."""
    checks = []
    if 10 in tc:
        v = tc[10]
        checks.append(
            _check("TTFT overhead p50 <= 25 ms at a burst of 10", v, px.get(10),
                   v is not None and v <= 25)
        )  # fmt: skip
    if 100 in tc and 100 in px:
        v, base = tc[100], px[100]
        checks.append(
            _check(
                "TTFT overhead p50 <= 2 x proxy at a burst of 100",
                v,
                base,
                v is not None and base is not None and v <= 2 * base,
            )
        )
    return checks  # fmt: skip


def _capacity_checks(rows: list[dict]) -> list[dict]:
    by = {r["target"]: r for r in rows}
    tc, px = by.get("tidechat"), by.get("proxy", {})
    if not tc:
        return []
    name = f"one worker runs 1000 generations at once ({tc['rate']:g} tok/s each)"
    met = tc["model_peak_streams"] >= 1000 and tc["errors"] == 0
    return [_check(name, tc["model_peak_streams"], px.get("model_peak_streams"), met)]


def _idle_checks(idle: list[dict]) -> list[dict]:
    sweeps = {s["target"]: s for s in idle}
    tc, px = sweeps.get("tidechat"), sweeps.get("proxy")
    if not tc or not tc["levels"]:
        return []
    last = tc["levels"][-1]
    base = px["levels"][-1] if px and px["levels"] else {}
    conns = sorted({p["redis_conns"] for p in tc["levels"]} | {tc["base_redis_conns"]})
    return [
        _check(f"{last['clients']} idle clients at <= 40 KB RSS each", last["rss_per_client_kb"],
               base.get("rss_per_client_kb"),
               min(last["live"], last.get("server_conns", last["live"])) >= last["clients"]
               and last["rss_per_client_kb"] <= 40),
        _check("constant Redis connections of the web process", conns, 0, len(conns) == 1),
    ]  # fmt: skip


def _check(name: str, value: Any, proxy: Any, met: bool) -> dict:
    return {"target": name, "tidechat": value, "proxy": proxy, "met": bool(met)}


def targets_table(checks: list[dict]) -> str:
    columns = (("target", "target"), ("tidechat", "Tidechat"), ("proxy", "direct proxy"),
               ("verdict", "met?"))  # fmt: skip
    rows = [{**c, "verdict": "yes" if c["met"] else "**no**"} for c in checks]
    return markdown_table(rows, columns)


def plot(result: dict, path: Path) -> Path:
    """Four panels: throughput, relay overhead, TTFT overhead, idle RSS per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _series(axes[0][0], result["streams"], "tokens_per_s", "delivered tokens/s", log=True)
    _series(
        axes[0][1], result["streams"], "relay_p50_ms", "relay overhead ms (p50 ─, p99 ┄)", log=True
    )
    _series(axes[0][1], result["streams"], "relay_p99_ms", None, dashed=True)
    _series(axes[1][0], result["streams"], "ttft_overhead_p50_ms", "TTFT overhead p50 ms", log=True)
    _idle_panel(axes[1][1], result.get("idle", []))
    fig.suptitle(
        f"Tidechat (page and /v1) vs direct proxy "
        f"({result['machine']['cpus']} cores, one web process)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(ax, rows: list[dict], key: str, title: str | None, log: bool = False,
            dashed: bool = False) -> None:  # fmt: skip
    for target, color in COLORS.items():
        pts = [(r["streams"], r[key]) for r in rows if r["target"] == target and r[key] is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "--" if dashed else "-o", color=color,
                    label=None if dashed else target)  # fmt: skip
    ax.set_xscale("log")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    if title:
        ax.set_title(title)
        ax.legend()
    ax.grid(True, alpha=0.3)


def _idle_panel(ax, idle: list[dict]) -> None:
    for sweep in idle:
        color = COLORS.get(sweep["target"], "tab:gray")
        pts = [(p["clients"], p["rss_per_client_kb"]) for p in sweep["levels"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-o", color=color, label=sweep["target"])
    ax.axhline(40, color="tab:red", linestyle=":", label="target 40 KB")
    ax.set_xscale("log")
    ax.set_xlabel("idle SSE clients on one web process")
    ax.set_title("web RSS per idle client (KB)")
    ax.legend()
    ax.grid(True, alpha=0.3)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report result.json``: print a saved result's tables again."""
    import json
    import sys

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    result = json.loads(path.read_text())
    print(tables(result))
    print()
    print(targets_table(targets(result)))


if __name__ == "__main__":
    main()
