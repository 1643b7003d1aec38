"""The dependency locks match pyproject.toml (offline: this reads files, nothing else).

``requirements.txt`` (production, what Heroku's buildpack installs) and
``requirements-dev.txt`` (production + the ``local`` and ``dev`` extras, what bin/_venv.sh
installs) are made by ``scripts/lock``. Adding, removing or changing a dependency in
pyproject.toml without running it fails here, and so does a hand edit that drops a hash.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROD_LOCK = ROOT / "requirements.txt"
DEV_LOCK = ROOT / "requirements-dev.txt"
EXTRAS = ("local", "dev")
# Built from source by bin/_venv.sh (ensure_llama) and installed with --no-deps: the dev lock
# holds its dependencies but never the package itself, whose hash could not match our build.
BUILT_BY_US = "llama-cpp-python"
# How uv and pip-compile mark a requirement that comes from pyproject.toml itself.
FROM_PYPROJECT = "tidechat (pyproject.toml)"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    name: str
    version: Version
    hashes: set[str]
    via: set[str] = field(default_factory=set)


def parse_lock(path: Path) -> dict[str, Pin]:
    """Each pin of a lock: name, exact version, hashes and its ``# via`` annotations."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    entry = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            # An annotation: "# via pkg" or "# via" then "#   pkg" lines; anything else ends it.
            text = line.lstrip("#").strip()
            if current is not None and (text.startswith("via") or raw.startswith("    #   ")):
                via = text.removeprefix("via").strip()
                if via:
                    current.via.add(via)
            else:
                current = None
            continue
        entry += " " + line.removesuffix("\\")
        if line.endswith("\\"):
            continue
        entry, text = "", entry.strip()
        if not text:
            continue
        assert not text.startswith("-"), f"{path.name}: an option in a lock: {text!r}"
        req = Requirement(text.split("--hash=")[0])
        specs = list(req.specifier)
        pinned = len(specs) == 1 and specs[0].operator == "=="
        assert pinned, f"{path.name}: {str(req)!r} is not pinned with =="
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {name} is pinned twice"
        hashes = {h.removeprefix("--hash=") for h in HASH.findall(text)}
        current = pins[name] = Pin(name, Version(specs[0].version), hashes)
    return pins


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def prod_requirements() -> list[Requirement]:
    return [Requirement(r) for r in project()["dependencies"]]


def extra_requirements() -> list[Requirement]:
    extras = project()["optional-dependencies"]
    return [Requirement(r) for extra in EXTRAS for r in extras[extra]]


@pytest.fixture(scope="module")
def prod() -> dict[str, Pin]:
    return parse_lock(PROD_LOCK)


@pytest.fixture(scope="module")
def dev() -> dict[str, Pin]:
    return parse_lock(DEV_LOCK)


def assert_pinned(lock: dict[str, Pin], requirements: list[Requirement], lock_name: str):
    missing, unfit = [], []
    for req in requirements:
        pin = lock.get(canonicalize_name(req.name))  # "celery[redis]" is pinned as "celery"
        if pin is None:
            missing.append(str(req))
        elif not req.specifier.contains(pin.version, prereleases=True):
            unfit.append(f"{req} (locked {pin.version})")
    assert not missing, f"not in {lock_name}: {missing}: run scripts/lock"
    assert not unfit, f"{lock_name} pins versions pyproject.toml refuses: {unfit}: run scripts/lock"


def test_prod_lock_pins_every_dependency(prod):
    assert_pinned(prod, prod_requirements(), PROD_LOCK.name)


def test_dev_lock_pins_every_dependency_and_extra(dev):
    requirements = prod_requirements() + extra_requirements()
    ours = [r for r in requirements if canonicalize_name(r.name) == BUILT_BY_US]
    assert_pinned(dev, [r for r in requirements if r not in ours], DEV_LOCK.name)
    # bin/_venv.sh builds exactly the version pyproject.toml pins (and reads it with sed).
    assert [str(r.specifier) for r in ours] == ["==" + llama_version()], ours


def llama_version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        found = re.search(r'"llama-cpp-python\[server\]==([0-9.]+)"', line)
        if found:
            return found.group(1)
    raise AssertionError("no llama-cpp-python[server]==VERSION in pyproject.toml")


@pytest.mark.parametrize(
    ("lock_path", "requirements"),
    [
        (PROD_LOCK, prod_requirements),
        (DEV_LOCK, lambda: prod_requirements() + extra_requirements()),
    ],
    ids=["prod", "dev"],
)
def test_lock_was_made_from_this_pyproject(lock_path, requirements):
    """What the lock says came from pyproject.toml is exactly what pyproject.toml asks for:
    catches a dependency removed (or renamed) without re-locking too."""
    direct = {canonicalize_name(r.name) for r in requirements()} - {BUILT_BY_US}
    from_pyproject = {p.name for p in parse_lock(lock_path).values() if FROM_PYPROJECT in p.via}
    assert from_pyproject == direct, (
        f"{lock_path.name} is stale (run scripts/lock): locked for pyproject.toml but not "
        f"asked for: {sorted(from_pyproject - direct)}; asked for but not locked as such: "
        f"{sorted(direct - from_pyproject)}"
    )


@pytest.mark.parametrize("lock_path", [PROD_LOCK, DEV_LOCK], ids=["prod", "dev"])
def test_every_pin_has_a_hash(lock_path):
    pins = parse_lock(lock_path)
    assert pins, f"{lock_path.name} pins nothing"
    unhashed = [p.name for p in pins.values() if not p.hashes]
    assert not unhashed, f"{lock_path.name}: pins without --hash=sha256: {unhashed}"
    text = lock_path.read_text()
    assert text.count("--hash=") == len(HASH.findall(text)), "a hash that is not sha256"


@pytest.mark.parametrize("lock_path", [PROD_LOCK, DEV_LOCK], ids=["prod", "dev"])
def test_header_says_how_the_lock_was_made(lock_path):
    lines = lock_path.read_text().splitlines()
    header = "\n".join(takewhile(lambda line: line.startswith("#"), lines))
    assert "scripts/lock" in header
    assert "uv pip compile --no-config pyproject.toml" in header
    assert f"--output-file {lock_path.name}" in header


def test_prod_lock_holds_no_dev_only_package(prod):
    prod_direct = {canonicalize_name(r.name) for r in prod_requirements()}
    dev_only = {canonicalize_name(r.name) for r in extra_requirements()} - prod_direct
    assert "pytest" in dev_only
    leaked = sorted(dev_only & prod.keys())
    assert not leaked, f"{PROD_LOCK.name} holds packages of the local/dev extras: {leaked}"
    assert BUILT_BY_US not in prod


def test_dev_lock_agrees_with_prod_lock(prod, dev):
    """Both locks go to one pip install: a package in both needs the same version and hashes."""
    assert BUILT_BY_US not in dev
    missing = sorted(prod.keys() - dev.keys())
    assert not missing, f"in {PROD_LOCK.name} but not in {DEV_LOCK.name}: {missing}"
    differ = [
        f"{name}: {prod[name].version} ({len(prod[name].hashes)} hashes) vs "
        f"{dev[name].version} ({len(dev[name].hashes)} hashes)"
        for name in sorted(prod)
        if (prod[name].version, prod[name].hashes) != (dev[name].version, dev[name].hashes)
    ]
    assert not differ, f"the locks disagree (run scripts/lock): {differ}"


def test_parse_lock_reads_extras_markers_and_annotations(tmp_path):
    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "# header\n"
        f"celery[redis]==5.4.0 ; python_version >= '3.11' \\\n    --hash=sha256:{'a' * 64} \\\n"
        f"    --hash=sha256:{'b' * 64}\n"
        "    # via\n    #   tidechat (pyproject.toml)\n    #   flower\n"
        f"Psycopg_Binary==3.2.1 \\\n    --hash=sha256:{'c' * 64}\n    # via psycopg\n"
        "\n# The following packages were excluded from the output:\n# llama-cpp-python\n"
    )
    pins = parse_lock(lock)
    assert set(pins) == {"celery", "psycopg-binary"}
    assert pins["celery"].version == Version("5.4.0")
    assert len(pins["celery"].hashes) == 2
    assert pins["celery"].via == {FROM_PYPROJECT, "flower"}
    assert pins["psycopg-binary"].via == {"psycopg"}
    lock.write_text("flask>=3.1 \\\n    --hash=sha256:" + "d" * 64 + "\n")
    with pytest.raises(AssertionError, match="not pinned"):
        parse_lock(lock)
