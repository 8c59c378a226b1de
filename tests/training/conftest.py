"""Fixtures of the train.py tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def uninterrupted_run(shapes, tmp_path_factory):
    """(workdir, summary) of train.py's tiny run (test_train.args) for STEPS steps in one
    go: what every stopped, killed or resumed run of the same command must reproduce."""
    from nanodet_jax.cli import train as train_cli
    from tests.training.test_train import STEPS, args

    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = train_cli.main(args(shapes, workdir, STEPS))
    return workdir, summary
