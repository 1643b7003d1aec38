# Sourced by bin/dev and bin/test: make .venv and install the project with the given extras,
# every dependency from the hash-checked locks (requirements.txt, requirements-dev.txt: see
# scripts/lock). Reinstalls only when a lock, pyproject.toml, the extras or this file (so the
# llama.cpp build options) change, so a second run starts at once.

# The local model's llama.cpp is built for any x86-64-v3 CPU (AVX2, FMA, F16C), never for
# "this" one: llama-cpp-python's default (GGML_NATIVE) uses whatever the build machine has,
# AVX-512 or AMX included, and that build dies with SIGILL on the next machine of the same
# kind. docs/benchmarks.md has what this costs in tokens/s against a native build.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
-DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"

# The exact llama-cpp-python version pinned in pyproject.toml's `local` extra.
llama_version() {
  sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' pyproject.toml
}

# Build (once per version and options) and install llama-cpp-python. The wheel is kept in a
# cache of our own whose key is the version, the CMake options and the architecture: pip's
# wheel cache is keyed by the source alone, so it hands a wheel built on another CPU, or
# with other options, to the next install without a word.
ensure_llama() {
  local version key cache
  version=$(llama_version)
  [ -n "$version" ] || { echo "tidechat: no llama-cpp-python pin in pyproject.toml" >&2; return 1; }
  key=$(printf '%s|%s|%s' "$version" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-16)
  cache="${TIDECHAT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidechat/wheels}/llama-$key"
  if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "tidechat: building llama.cpp $version for any x86-64-v3 CPU (about 5 minutes on 2 cores)" >&2
    rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
      -w "$cache.tmp" "llama-cpp-python==$version"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
  fi
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "$cache"/llama_cpp_python-*.whl
}

# ensure_venv EXTRAS: "" installs the production lock alone; any extras ("local,dev" for bin/dev
# and bin/test) install requirements-dev.txt on top, which holds both extras (so also the
# local model, whose llama-cpp-python ensure_llama builds: the lock leaves it out). Every
# package comes from a lock with --require-hashes and --no-deps (the locks are complete; pip
# check proves it after), then the project itself goes in editable, again with --no-deps.
ensure_venv() {
  local extras=$1 python=${PYTHON:-}
  if [ -z "$python" ]; then
    python=$(command -v python3.11 || command -v python3)
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "tidechat: creating .venv with $python" >&2
    "$python" -m venv .venv
  fi
  local locks=(requirements.txt)
  [ -z "$extras" ] || locks+=(requirements-dev.txt)
  local stamp=.venv/.tidechat-installed
  local want
  want="[$extras] $(sha256sum pyproject.toml bin/_venv.sh "${locks[@]}" | cut -c1-16 | tr '\n' ' ')"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "tidechat: installing .[$extras] from ${locks[*]}" >&2
    rm -f "$stamp"
    .venv/bin/python -m pip install -q --upgrade pip
    [ -z "$extras" ] || ensure_llama
    .venv/bin/python -m pip install -q --require-hashes --no-deps "${locks[@]/#/--requirement=}"
    .venv/bin/python -m pip install -q --no-deps -e .
    local broken
    if ! broken=$(.venv/bin/python -m pip check); then
      echo "$broken" >&2
      echo "tidechat: .venv does not fit together: re-lock (scripts/lock) or rm -rf .venv" >&2
      return 1
    fi
    echo "$want" > "$stamp"
  fi
}
