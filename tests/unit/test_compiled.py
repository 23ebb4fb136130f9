"""Which build runs (engine/compiled.py): the test pass's own build, and the rules that choose it.

CI runs the whole suite twice, ``DNSGATE_BUILD=pure`` and ``DNSGATE_BUILD=compiled``; the first test here
proves each pass ran the build it names (the compiled pass cannot fall back to pure Python unnoticed).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import compiled

ROOT = Path(__file__).resolve().parents[2]
NAMES = [compiled.module_name(source) for source in compiled.COMPILED_SOURCES]


def test_this_pass_runs_the_build_it_names() -> None:
    for name in NAMES:
        importlib.import_module(name)
    mode = os.environ.get(compiled.BUILD_ENV, "auto")
    loaded = compiled.status().imported_compiled()
    if mode == "pure":
        assert loaded == []
        assert all(sys.modules[name].__file__.endswith(".py") for name in NAMES)  # type: ignore[union-attr]
    elif mode == "compiled":
        assert loaded == NAMES, compiled.status().describe()
        assert compiled.status().describe() == "compiled (mypyc): " + ", ".join(NAMES)
    else:  # auto: compiled exactly when a current build is there
        assert loaded == (NAMES if compiled.status().modules else [])


def _fake_build(tmp_path: Path, digest: str | None = None, suffix: str | None = None) -> Path:
    """A build directory whose manifest lists engine/packet.py, with an (empty) extension file."""
    build_dir = tmp_path / "build"
    extension = Path("engine") / ("packet" + compiled.extension_suffix())
    (build_dir / extension).parent.mkdir(parents=True)
    (build_dir / extension).write_bytes(b"")
    entry = {"source": "engine/packet.py", "extension": str(extension),
             "sha256": digest or compiled.source_digest(ROOT / "engine/packet.py")}
    manifest = {"suffix": suffix or compiled.extension_suffix(), "modules": {"engine.packet": entry}}
    (build_dir / compiled.MANIFEST_NAME).write_text(json.dumps(manifest))
    return build_dir


def test_a_current_build_is_used(tmp_path: Path) -> None:
    modules, reason = compiled.check_build(_fake_build(tmp_path), ROOT)
    assert reason == "" and list(modules) == ["engine.packet"]


def test_a_changed_source_makes_the_whole_build_stale(tmp_path: Path) -> None:
    modules, reason = compiled.check_build(_fake_build(tmp_path, digest="0" * 64), ROOT)
    assert modules == {} and reason == "compiled build stale: engine/packet.py changed since it was built"


def test_a_build_for_another_python_is_not_used(tmp_path: Path) -> None:
    modules, reason = compiled.check_build(_fake_build(tmp_path, suffix=".cpython-39-x86_64-linux-gnu.so"), ROOT)
    assert modules == {} and "is for .cpython-39" in reason


def test_no_build(tmp_path: Path) -> None:
    modules, reason = compiled.check_build(tmp_path / "nothing", ROOT)
    assert modules == {} and reason.startswith("no compiled build in")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_compiled_mode_without_a_build_refuses_to_import_a_compiled_module(tmp_path: Path) -> None:
    result = _python("import engine.packet", DNSGATE_BUILD="compiled", DNSGATE_BUILD_DIR=str(tmp_path))
    assert result.returncode == 1
    assert "CompiledBuildError: DNSGATE_BUILD=compiled but no compiled build in" in result.stderr
    # ... while the rest of the engine still imports (the build command itself must run)
    assert _python("import engine.compiled_build", DNSGATE_BUILD="compiled", DNSGATE_BUILD_DIR=str(tmp_path)).returncode == 0


def test_pure_mode_ignores_a_build_and_version_says_so() -> None:
    result = _python("from engine.cli import main; main(['--version'])", DNSGATE_BUILD="pure")
    assert result.returncode == 0
    assert result.stdout.splitlines()[1] == "build: pure Python (DNSGATE_BUILD=pure)"


def test_an_unknown_mode_is_refused() -> None:
    result = _python("import engine", DNSGATE_BUILD="fast")
    assert result.returncode == 1 and "DNSGATE_BUILD='fast': expected one of auto, pure, compiled" in result.stderr


@pytest.mark.skipif(os.environ.get(compiled.BUILD_ENV) != "compiled", reason="needs the compiled build")
def test_version_names_the_compiled_modules() -> None:
    result = _python("from engine.cli import main; main(['--version'])")
    assert result.stdout.splitlines()[1] == "build: compiled (mypyc): " + ", ".join(NAMES)
