"""The local model's llama.cpp, as ``bin/_venv.sh`` builds it, runs on any x86-64-v3 host.

A build with llama-cpp-python's defaults uses every instruction the building machine has:
on a host with AMX its first token died with SIGILL (``tilezero``) on the next machine of
the same kind, while the same tests had passed where the wheel was built. So these check the
installed build itself, instruction by instruction, and its first real tokens.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from tidechat.embedded import ModelCheckFailed, build_info, check_model

LIB_DIR = Path(llama_cpp.__file__).parent / "lib"
# AVX-512 (zmm, mask and upper xmm/ymm registers) and AMX (tile registers and instructions).
BEYOND_V3 = re.compile(
    r"%zmm\d+|%k[1-7]\b|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%tmm\d|\b(?:tilezero|ldtilecfg|tdp\w+)\b"
)


def libraries() -> list[Path]:
    libs = sorted(LIB_DIR.glob("*.so"))  # the .so.N files are copies of these
    assert libs, f"no llama.cpp libraries in {LIB_DIR}"
    return libs


@pytest.mark.skipif(platform.machine() != "x86_64", reason="instruction check is for x86-64")
@pytest.mark.parametrize("lib", libraries(), ids=lambda p: p.name)
def test_build_uses_no_instruction_beyond_x86_64_v3(lib):
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = sorted({m.group(0) for m in BEYOND_V3.finditer(disassembly)})
    assert found == [], f"{lib.name} uses AVX-512/AMX: {found[:10]}"


def test_build_reports_avx2_without_avx512_or_amx():
    info = build_info()
    assert "AVX2" in info.split()
    assert not [f for f in info.split() if f.startswith(("AVX512", "AMX"))], info


def test_real_model_first_tokens_from_the_installed_build():
    answer = check_model(timeout=120)
    assert answer.strip(), "SmolLM2 answered nothing"


def test_a_crashing_build_is_reported_with_the_fix():
    with pytest.raises(ModelCheckFailed) as failed:
        check_model(argv=["sh", "-c", "kill -ILL $$"])
    message = str(failed.value)
    assert "SIGILL: illegal instruction" in message
    assert "rm -rf .venv && bin/dev" in message
    assert "OPENAI_BASE_URL" in message
