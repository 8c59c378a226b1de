"""A user's mistake through any entry point is one line on stderr and exit status 2
(``cli.common.entry_point``), with ``--debug`` / ``NANODET_JAX_DEBUG=1`` for the traceback;
a genuine bug keeps its traceback. No model is built here: every error is raised before."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from flax import nnx

from nanodet_jax.cli import check_dataset
from nanodet_jax.cli import common as cli
from nanodet_jax.errors import UnknownFieldError
from nanodet_jax.weights.pytorch import WeightMismatchError, load_torch_weights
from tests.conftest import config_path

CONFIG = config_path("nanodet_plus_m.py")
TYPO = "--config.data.val.ann_fle=x.json"
TYPO_LINE = (
    "error: --config.data.val.ann_fle: no field 'ann_fle' in data.val; did you mean "
    "'ann_file'? (fields: ann_file, difficult, img_dir, input_size, keep_ratio, name, "
    "pipeline, split)\n"
)
# What each entry point needs besides --config to get as far as reading it.
ENTRIES = {
    "train": [], "check_dataset": [], "eval": ["--torch-weights", "x.pth"],
    "predict": ["--torch-weights", "x.pth", "x.jpg"], "convert": ["--torch-weights", "x.pth"],
    "export": ["--torch-weights", "x.pth"], "nanodet_yml": ["--out", "x.yml"],
}  # fmt: skip


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point that fails."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_override_typo_is_one_line_with_close_matches(entry, capsys):
    main = importlib.import_module(f"nanodet_jax.cli.{entry}").main
    code, err = run_main(main, ["--config", CONFIG, TYPO, *ENTRIES[entry]], capsys)
    assert (code, err) == (2, TYPO_LINE)


def test_override_of_the_wrong_type_is_one_line(capsys):
    code, err = run_main(check_dataset.main, ["--config", CONFIG, "--config.class_names=a"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --config.class_names=a: Could not override field"), err


def test_yml_mistakes_name_the_file_and_the_problem(tmp_path, capsys):
    bad_syntax, unknown = tmp_path / "syntax.yml", tmp_path / "unknown.yml"
    bad_syntax.write_text("model:\n  arch: [1, 2\n")
    unknown.write_text("model:\n  arch:\n    name: NanoDetPlus\n    bogus_key: 3\n")
    expected = {
        bad_syntax: f"error: {bad_syntax}: not valid YAML (expected ',' or ']', but got "
        "'<stream end>' at line 3)",
        unknown: f"error: {unknown}: model.arch.bogus_key: 3 is not supported yet",
        tmp_path / "gone.yml": f"error: config file '{tmp_path / 'gone.yml'}' not found",
    }
    for path, line in expected.items():
        code, err = run_main(check_dataset.main, ["--config", str(path)], capsys)
        assert code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, capsys):
    with pytest.raises(UnknownFieldError, match="did you mean 'ann_file'"):
        check_dataset.main(["--config", CONFIG, TYPO, "--debug"])
    monkeypatch.setenv("NANODET_JAX_DEBUG", "1")
    with pytest.raises(UnknownFieldError):
        check_dataset.main(["--config", CONFIG, TYPO])
    assert capsys.readouterr().err == ""


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def buggy(*args, **kwargs):
        return {}["split"]  # a KeyError from our code, not from the user's input

    monkeypatch.setattr(check_dataset, "check_dataset", buggy)
    with pytest.raises(KeyError, match="split"):
        check_dataset.main(["--config", CONFIG, "--split", "train"])


def test_deeper_exits_and_weight_mismatches_become_one_line(capsys):
    def global_batch_changed(argv):  # as training/loop.py stops a resume
        raise SystemExit("error: ckpt was written with a global batch of 4 images")

    code, err = run_main(cli.entry_point(global_batch_changed), [], capsys)
    assert (code, err) == (2, "error: ckpt was written with a global batch of 4 images\n")
    with pytest.raises(WeightMismatchError) as info:  # weights of another architecture
        load_torch_weights(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), {"conv.weight": np.zeros(3)})
    assert str(info.value).count("\n") > 2  # the full list, for --debug
    assert cli.error_line(info.value) == (
        "error: a state_dict does not fit this model (missing 2, unexpected 1 keys; --debug "
        "lists them): check that --config matches the architecture the weights were trained "
        "with"
    )
