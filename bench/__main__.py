"""``python -m bench [--quick]``: run the benchmark, print the tables, write JSON and PNG.

``python -m bench soak --minutes N ...``: the soak (``bench/soak.py``); exits 1 if a check
failed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bench import report
from bench.harness import OUTPUT, Options, quick_options, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog="The soak's options: python -m bench soak --help",
    )
    parser.add_argument("--quick", action="store_true", help="tiny levels, a few seconds")
    parser.add_argument("--levels", help="comma-separated concurrent streams, e.g. 1,10,100")
    parser.add_argument("--idle-levels", help="comma-separated idle clients, e.g. 1000,10000")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-client sweep")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity level")
    parser.add_argument("--tokens", type=int, help="tokens per stream")
    parser.add_argument("--database-url", help="Tidechat's database (default: SQLite)")
    parser.add_argument("--redis-url", help="Redis (default: REDIS_URL or 127.0.0.1:6379)")
    parser.add_argument("--web-procs", type=int, help="Tidechat web processes (default 1)")
    parser.add_argument("--worker-procs", type=int, help="Celery worker processes (default 1)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    opts = quick_options() if args.quick else Options()
    if args.levels:
        opts.levels = [int(x) for x in args.levels.split(",")]
    if args.idle_levels:
        opts.idle_levels = [int(x) for x in args.idle_levels.split(",")]
    if args.no_capacity:
        opts.capacity_streams = 0
    if args.tokens:
        opts.tokens = args.tokens
    if args.database_url:
        opts.database_url = args.database_url
    if args.redis_url:
        opts.redis_url = args.redis_url
    opts.web_procs = args.web_procs or opts.web_procs
    opts.worker_procs = args.worker_procs or opts.worker_procs
    opts.output = args.output
    return opts


def main(argv: list[str] | None = None) -> dict:
    """Run, then write ``result-<time>.json`` and ``.png`` (and ``latest.*``) to the output."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from bench import soak

        return soak.main(argv[1:])
    args = parse_args(argv)
    opts = options_from(args)
    result = run(opts, idle=not args.no_idle)
    result["targets"] = report.targets(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = opts.output
    for name in (f"result-{stamp}", "latest"):
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        report.plot(result, out / f"{name}.png")
    print()
    print(report.tables(result))
    print()
    print(report.targets_table(result["targets"]))
    print(f"\nwrote {out / f'result-{stamp}.json'} and .png")
    return result


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so every started process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcome = main()
    if outcome.get("kind") == "soak" and not outcome["tally"]["ok"]:
        sys.exit(1)
