"""Tokens/s of the local model (SmolLM2-135M on llama.cpp) for one or more llama.cpp builds.

``python -m bench.local_model`` measures the installed build (the portable one that
``bin/_venv.sh`` makes). To compare it with another build, unpack that build's wheel and
name its ``llama_cpp/lib`` folder: ``python -m bench.local_model --lib /tmp/native/llama_cpp/lib``.
Builds are measured in alternating rounds, each in a fresh process (the library is chosen
when ``llama_cpp`` is imported, through ``LLAMA_CPP_LIB_PATH``), and reported as ratios to
the first, so a noisy neighbour slows every build alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a lighthouse keeper and a storm."


def measure_once(tokens: int) -> dict[str, float]:
    """In this process: load the model, warm up, and time one generation of ``tokens``."""
    from llama_cpp import Llama

    from tidechat.embedded import build_info, gguf_path, model_threads

    llm = Llama(model_path=str(gguf_path()), n_ctx=1024, n_threads=model_threads(), verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    generated, started = 0, 0.0
    # generate() does not stop at end-of-text: every run times exactly ``tokens`` tokens.
    for generated, _token in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
        if generated == 8:  # warmed up: time from here
            started = time.perf_counter()
        if generated == tokens + 8:
            break
    elapsed = time.perf_counter() - started
    generated -= 8
    return {"tokens": generated, "seconds": elapsed, "build": build_info()}


def run_build(lib: str | None, tokens: int) -> dict:
    env = dict(os.environ)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    code = f"import json, bench.local_model as m; print(json.dumps(m.measure_once({tokens})))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", action="append", default=[], help="another build's lib folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    builds: list[str | None] = [None, *args.lib]
    rates: dict[int, list[float]] = {i: [] for i in range(len(builds))}
    names: dict[int, str] = {}
    for _ in range(args.rounds):
        for i, lib in enumerate(builds):
            result = run_build(lib, args.tokens)
            rates[i].append(result["tokens"] / result["seconds"])
            names[i] = f"{lib or 'installed'}: {result['build']}"
    base = statistics.median(rates[0])
    for i in rates:
        median = statistics.median(rates[i])
        spread = f"{min(rates[i]):.1f}-{max(rates[i]):.1f}"
        print(f"{median:7.1f} tok/s (range {spread}, x{median / base:.2f})  {names[i]}")


if __name__ == "__main__":
    main()
