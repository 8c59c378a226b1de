"""Shared fixtures: configs, small models and the real data in ``../shared`` (skipped if absent).

Under ``CI=true`` a missing prerequisite (the real data, a C++ compiler, torch) fails the tests
that need it instead of skipping them: CI must not lose coverage without anyone noticing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import NoReturn

import pytest

from nanodet_jax import runtime

# The XLA settings the entry points apply (runtime.py), before any test computes.
runtime.configure_xla()

from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.models import build_model  # noqa: E402
from nanodet_jax.testing import SMALL_MODEL_OVERRIDES  # noqa: E402

# One persistent XLA cache per test session, used by this process and inherited by the
# train.py / eval.py / script subprocesses: a program the session compiled before (the
# tiny training run of several tests, a fixture's model in another module) loads instead
# (~1 min less per repeated NanoDet-Plus step compile on this 2-core machine).
if "NANODET_JAX_CACHE" not in os.environ:
    os.environ["NANODET_JAX_CACHE"] = tempfile.mkdtemp(prefix="nanodet_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["NANODET_JAX_CACHE"], ignore_errors=True)
runtime.enable_compilation_cache()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("NANODET_JAX_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
SHARED_DATA = os.path.join(SHARED, "data")
CI = os.environ.get("CI", "").lower() in ("true", "1")


def skip_unless_ci(reason: str, consequence: str) -> NoReturn:
    """Skip for ``reason`` locally; under CI fail with one line saying what would be lost."""
    if CI:
        pytest.fail(f"CI=true but {reason}: {consequence}", pytrace=False)
    pytest.skip(reason)


def config_path(name: str) -> str:
    return os.path.join(REPO, "configs", name)


@pytest.fixture(scope="session")
def shared_data() -> str:
    """``../shared/data`` (real weights, coco_tiny, demo photos) or a skip."""
    if not os.path.isdir(SHARED_DATA):
        skip_unless_ci(
            f"real data not found at {SHARED_DATA} (a fresh clone has no ../shared; "
            "set NANODET_JAX_SHARED to its location)",
            "the real-data tests would be skipped",
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def ffi_ok() -> bool:
    """Build the C++ FFI kernels once per session (and once per machine: cached)."""
    from nanodet_jax.ops import ffi_build

    if ffi_build.find_compiler() is None:
        skip_unless_ci(
            "no C++ compiler found (set CXX or install g++)",
            "the FFI kernel tests would be skipped",
        )
    assert ffi_build.load(), "C++ compiler found but the FFI kernels failed to build"
    return True


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A tiny generated COCO dataset (24 train / 4 val images, 3 classes) for train.py runs;
    shared so that every run on it compiles the same programs (persistent XLA cache)."""
    from nanodet_jax.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(str(out), num_train=24, num_val=4, size=128, seed=3)
    return out


@pytest.fixture(scope="session")
def small_config():
    """A narrow 5-class NanoDet-Plus config (fast to build and compile)."""
    return load_config(config_path("nanodet_plus_m.py"), SMALL_MODEL_OVERRIDES)


@pytest.fixture(scope="session")
def small_model(small_config):
    """The small model with its aux branch, eval mode. Tests must not mutate it."""
    return build_model(small_config, seed=0)


@pytest.fixture(scope="session")
def m_config():
    return load_config(config_path("nanodet_plus_m.py"))


def pytest_addoption(parser):
    parser.addoption(
        "--kill-suite", action="store_true",
        help="also run all seeds of the random kill -9 suite (tests/training/test_kill.py)",
    )  # fmt: skip
    parser.addoption(
        "--corruption-suite", action="store_true",
        help="also run every seed of the data corruption suite (tests/datasets/test_corruption.py)",
    )  # fmt: skip
    parser.addoption(
        "--accelerator-suite", action="store_true",
        help="also run the whole reduced accelerator check (tests/test_accelerator_check.py)",
    )  # fmt: skip


# The longest files (train.py runs, several-program fixtures), started first: with two
# xdist workers (README's command) a long test picked up last would run alone at the end.
LONG_FIRST = (
    "tests/training/test_distributed.py", "tests/training/test_train.py",
    "tests/training/test_kill.py", "tests/training/test_grad_precision.py",
    "tests/losses/test_assigner_losses.py", "tests/models/test_pretrained.py",
    "tests/training/test_finetune.py", "tests/training/test_trainer.py",
    "tests/models/test_fcos_train.py", "tests/cli/test_fcos_cli.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
    if not config.getoption("--kill-suite"):
        skip_kills = pytest.mark.skip(reason="the random kill -9 suite runs with --kill-suite")
        for item in items:
            if "kill_suite" in item.keywords:
                item.add_marker(skip_kills)
    if not config.getoption("--accelerator-suite"):
        skip_accel = pytest.mark.skip(reason="the whole reduced run: --accelerator-suite")
        for item in items:
            if "accelerator_suite" in item.keywords:
                item.add_marker(skip_accel)
    if not config.getoption("--corruption-suite"):
        skip_damage = pytest.mark.skip(
            reason="the full corruption suite runs with --corruption-suite"
        )
        for item in items:
            if "corruption_suite" in item.keywords:
                item.add_marker(skip_damage)
    # torch-dependent tests skip cleanly when the optional extra is not installed
    # (under CI, which installs it, its absence stops the run instead).
    try:
        import torch  # noqa: F401
    except ImportError:
        if CI and any("needs_torch" in item.keywords for item in items):
            raise pytest.UsageError(
                "CI=true but torch is not installed: the needs_torch tests would be skipped"
            ) from None
        skip = pytest.mark.skip(reason="needs torch (pip install 'nanodet-jax[torch]')")
        for item in items:
            if "needs_torch" in item.keywords:
                item.add_marker(skip)
