"""``benchmarks/accelerator.py --reduced`` runs end to end: golden parity passes, the table
and the JSON have their rows (issue 14, item 5).

In-process, so that its programs come from the session's persistent XLA cache
(conftest.py) when the tests that compile the same ones ran first, or go into it for
them: the golden model's small/eval forward (test_golden_parity), the golden training
step (test_assigner_losses) and test_trainer's bf16 step. Only bf16 is timed here (the
fp32 step would be a compile no other test shares); the full reduced run is
``python benchmarks/accelerator.py --reduced``. CI runs it without the training step;
``pytest --accelerator-suite`` adds the whole reduced run (~3 min more here).
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from tests.conftest import REPO


def _load_script():
    path = os.path.join(REPO, "benchmarks", "accelerator.py")
    spec = importlib.util.spec_from_file_location("accelerator_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_accelerator_check_inference(tmp_path):
    """CI's run: the golden model check and the inference rows (the training step's golden
    check and rows take ~3 min more here: ``--accelerator-suite``)."""
    script = _load_script()
    argv = ["--reduced", "--inference-only", "--precisions", "bf16", "--infer-batches", "1"]
    assert script.main([*argv, "--out", str(tmp_path)]) == 0, "a parity check failed"
    payload = json.loads((tmp_path / "accelerator.json").read_text())
    assert [p["check"] for p in payload["parity"]] == ["golden_model small/eval"]
    assert all(p["passed"] and p["compared"] > 10 for p in payload["parity"])
    [row] = payload["rows"]
    assert (row["what"], row["batch"], row["precision"]) == ("inference", 1, "bf16")
    assert row["ours_s"] > 0 and row["torch_s"] is None  # no --nanodet given
    text = (tmp_path / "accelerator.md").read_text()
    assert "| inference | 1 | bf16 |" in text and "not run: no --nanodet PATH given" in text


@pytest.mark.accelerator_suite
def test_reduced_accelerator_check(tmp_path):
    script = _load_script()
    argv = ["--reduced", "--precisions", "bf16", "--infer-batches", "1", "--out", str(tmp_path)]
    assert script.main(argv) == 0, "a parity check failed (see the printed table)"
    payload = json.loads((tmp_path / "accelerator.json").read_text())
    for key in ("jax", "jaxlib", "torch", "device"):
        assert payload["versions"][key], key
    checks = {p["check"]: p for p in payload["parity"]}
    assert set(checks) == {
        "golden_model small/eval",
        "golden_train step/joint",
        "golden_train step/detached",
    }
    for name, p in checks.items():
        assert p["passed"] and p["compared"] > 10 and 0 <= p["worst_rel_over_tol"] <= 1, name
    rows = {(r["what"], r["batch"], r["precision"]): r for r in payload["rows"]}
    assert set(rows) == {("train step", 2, "bf16"), ("inference", 1, "bf16")}
    for r in rows.values():
        assert r["ours_s"] > 0 and r["torch_s"] is None  # no --nanodet given
    if jax.default_backend() != "cpu":  # the CPU-only C++ kernels must step aside
        assert rows["train step", 2, "bf16"]["ffi_kernels"] == []
    memory = rows["train step", 2, "bf16"]["memory"]
    assert memory["source"].startswith("compiled memory_analysis")  # CPU: no memory_stats
    # The state alone (parameters, two Adam moments, the EMA: four float32 copies of the
    # small model) is several MiB, over a batch of 2 images.
    assert 1 < memory["mib_per_image"] < 500
    text = (tmp_path / "accelerator.md").read_text()
    assert f"| golden_train step/joint | {checks['golden_train step/joint']['compared']} |" in text
    assert "| train step | 2 | bf16 |" in text and "not run: no --nanodet PATH given" in text
    assert f"jax {payload['versions']['jax']}" in text
