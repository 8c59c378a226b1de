"""The ONNX column of ``tools/check_zoo.py``: our export in onnxruntime against both models.

The export is ``nanodet_jax.deploy.onnx_export.export_onnx`` (what ``nanodet-export``
calls), given a copy of the config whose val input size is the check's, so the graph is
built for the very input the parity check ran on. The graph's batch is 1 (NanoDet's
contract), so each image of the batch is run on its own and the outputs are stacked.

The file's output is in the deploy contract: class scores are sigmoid probabilities, the
rest raw DFL logits. Both models' raw outputs are brought into that space (a sigmoid on
the class channels) before ``max|a - b| / max|b|``; inverting the file's sigmoid instead
would amplify its rounding wherever a probability saturates.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import numpy as np


def in_contract(raw: np.ndarray, num_classes: int) -> np.ndarray:
    """A raw head output ``[B, P, C + 4(R+1)]`` with the class logits turned into sigmoids."""
    out = np.array(raw, np.float64)
    out[..., :num_classes] = 1.0 / (1.0 + np.exp(-out[..., :num_classes]))
    return out


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    return float(np.abs(a - ref).max()) / (scale if scale > 0 else 1.0)


def export_at(model: Any, config: Any, hw: tuple[int, int], path: str) -> None:
    """``export_onnx`` for an ``hw`` input: the config's val size (NanoDet's [w, h]) set to it."""
    from nanodet_jax.deploy.onnx_export import export_onnx, onnx_input_hw

    config = copy.deepcopy(config)
    config.data.val.input_size = [hw[1], hw[0]]
    if onnx_input_hw(config) != hw:  # the export rounds up to 32: the check's size must not
        raise ValueError(f"input {hw} is not a multiple of 32; the export would pad it")
    export_onnx(model, config, path)


def onnx_columns(
    model: Any, config: Any, x_nchw: np.ndarray, ours_raw: np.ndarray, ref_raw: np.ndarray
) -> dict[str, Any]:
    """``onnx_vs_ours`` / ``onnx_vs_ref`` relative errors, or ``onnx_error`` (one line) when
    the model does not export or the file does not run."""
    from nanodet_jax.deploy.onnx_export import INPUT_NAME, onnxruntime_session

    hw = (int(x_nchw.shape[2]), int(x_nchw.shape[3]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        try:
            export_at(model, config, hw, path)
        except NotImplementedError as e:  # the exporter's one line naming the module
            return {"onnx_error": f"export: {str(e).splitlines()[0]}"}
        except Exception as e:  # noqa: BLE001 -- a broken export must not hide the parity
            return {"onnx_error": f"export {type(e).__name__}: {str(e).splitlines()[0][:150]}"}
        session = onnxruntime_session(path)
        outs = [session.run(None, {INPUT_NAME: x_nchw[i : i + 1]})[0] for i in range(len(x_nchw))]
    onnx_out = np.concatenate(outs).astype(np.float64)
    ours, ref = (in_contract(r, model.num_classes) for r in (ours_raw, ref_raw))
    if onnx_out.shape != ours.shape:
        return {"onnx_error": f"output shape {onnx_out.shape}, ours {ours.shape}"}
    return {"onnx_vs_ours": _rel(onnx_out, ours), "onnx_vs_ref": _rel(onnx_out, ref)}


def format_onnx(row: dict[str, Any]) -> str:
    """The two table cells (``|``-joined) of a row."""
    if "onnx_error" in row:
        return f"{row['onnx_error']} | -"
    if "onnx_vs_ours" not in row:
        return "- | -"
    return f"{row['onnx_vs_ours']:.1e} | {row['onnx_vs_ref']:.1e}"


def onnx_failure(row: dict[str, Any], tol: float) -> str | None:
    """Why the row's ONNX column fails the check, or None."""
    if "onnx_error" in row:
        return f"onnx: {row['onnx_error']}"
    worst = max(row["onnx_vs_ours"], row["onnx_vs_ref"])
    return f"onnx error {worst:.1e} > {tol:g}" if worst > tol else None
