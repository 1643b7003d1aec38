# Sourced by bin/dev and bin/test: make .venv and install the project with the given extras.
# Reinstalls only when pyproject.toml or the extras change, so a second run starts at once.
ensure_venv() {
  local extras=$1 python=${PYTHON:-}
  if [ -z "$python" ]; then
    python=$(command -v python3.11 || command -v python3)
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "tidechat: creating .venv with $python" >&2
    "$python" -m venv .venv
  fi
  local stamp=.venv/.tidechat-installed
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16) [$extras]"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "tidechat: installing .[$extras] (the first time builds llama.cpp: a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
}
