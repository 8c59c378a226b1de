"""Under ``CI=true`` the conftest fails, rather than skips, tests whose prerequisites are
missing (the real data, a C++ compiler for the FFI kernels), with one line saying which."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import conftest

REPO = Path(__file__).resolve().parents[1]
TINY = """
def test_real_data(shared_data):
    pass


def test_kernels(ffi_ok):
    pass
"""


def run_tiny_suite(test_file: Path, env: dict[str, str]) -> tuple[int, str]:
    """pytest on one file with the repo's conftest as a plugin: the file lives outside
    tests/ (nothing else is collected), and `python -m` puts the repo (the `tests`
    package) on sys.path. Returns (exit code, output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*cmd, str(test_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    return run.returncode, run.stdout + run.stderr


def test_ci_fails_instead_of_skipping(tmp_path: Path) -> None:
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "bin").mkdir()  # PATH without any compiler (find_compiler reads CXX, PATH)
    env = {
        **os.environ,
        "CI": "true",
        "NANODET_JAX_SHARED": str(tmp_path / "missing"),
        "PATH": str(tmp_path / "bin"),
        "CXX": "",
    }
    returncode, out = run_tiny_suite(tmp_path / "test_tiny.py", env)
    assert returncode == 1, out
    assert "2 errors" in out, out
    missing = tmp_path / "missing" / "data"
    data_line = f"test_real_data - Failed: CI=true but real data not found at {missing} "
    assert data_line in out, out
    assert "the real-data tests would be skipped" in out, out
    ffi_line = (
        "test_kernels - Failed: CI=true but no C++ compiler found (set CXX or install g++): "
        "the FFI kernel tests would be skipped"
    )
    assert ffi_line in out, out


def test_without_ci_a_missing_prerequisite_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "CI", False)
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        conftest.skip_unless_ci("no C++ compiler", "the FFI kernel tests would be skipped")
    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="^CI=true but no C\\+\\+ compiler: the FFI"):
        conftest.skip_unless_ci("no C++ compiler", "the FFI kernel tests would be skipped")


def test_ci_without_torch_stops_the_run(tmp_path: Path) -> None:
    """torch hidden by a stand-in package that fails to import: the needs_torch tests
    would be skipped, so under CI the run stops at collection with one line."""
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n\n\n@pytest.mark.needs_torch\ndef test_with_torch():\n    pass\n"
    )
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(tmp_path / "fake")}
    returncode, out = run_tiny_suite(tmp_path / "test_tiny.py", env)
    assert returncode != 0, out
    assert "CI=true but torch is not installed: the needs_torch tests would be skipped" in out
