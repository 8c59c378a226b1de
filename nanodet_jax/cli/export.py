"""Export a detector to ONNX: ``nanodet-export``.

    nanodet-export --config configs/nanodet_plus_m_416.py \
        --torch-weights nanodet-plus-m_416.pth --out nanodet-plus-m_416.onnx \
        [--dynamic-batch] [--benchmark 20]

The file's contract (input ``data``, output ``output``, opset 11; FCOS: outputs
``cls_logits``, ``bbox_regression``, ``bbox_ctrness``) is described in
``nanodet_jax/deploy/onnx_export.py``. ``--dynamic-batch`` makes the batch axis the
symbolic ``batch`` (one file for any batch size, e.g. TensorRT). NanoDet-Plus and legacy
NanoDet exports also write ``nanodet-plus-m_416.json`` beside the file: the pre/post-
processing numbers ``tools/onnx_predict.py`` (NumPy + onnxruntime, no JAX) needs.
"""

from __future__ import annotations

import argparse
import time

from nanodet_jax.cli import common as cli
from nanodet_jax.deploy.onnx_export import (
    INPUT_NAME,
    OPSET,
    deploy_metadata,
    export_onnx,
    onnxruntime_latency,
    sidecar_path,
)
from nanodet_jax.models import build_model


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    cli.add_weight_args(p)
    p.add_argument("--out", default="nanodet.onnx", help="output .onnx path")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis instead of 1")
    p.add_argument("--benchmark", type=int, default=0, help="also time N onnxruntime runs")
    args, overrides = p.parse_known_args(argv)
    cli.start()
    config = cli.read_config(args.config, overrides)
    model = build_model(config, with_aux=False)
    cli.load_weights(model, args)
    start = time.perf_counter()
    onnx_model = export_onnx(model, config, args.out, dynamic_batch=args.dynamic_batch)
    graph = onnx_model.graph
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    dims = [(v.name, shape(v)) for v in graph.output]
    inp = shape(graph.input[0])
    outs = ", ".join(f"{name} {shape}" for name, shape in dims)  # FCOS: three outputs
    print(
        f"wrote {args.out} (opset {OPSET}, {len(graph.node)} nodes, "
        f"{time.perf_counter() - start:.1f} s): {INPUT_NAME} {inp} -> {outs}"
    )
    if deploy_metadata(model, config) is not None:
        print(f"wrote {sidecar_path(args.out)} (pre/post-processing for tools/onnx_predict.py)")
    if args.benchmark:
        ms = onnxruntime_latency(args.out, args.benchmark) * 1e3
        print(f"onnxruntime CPU latency (batch 1, median of {args.benchmark}): {ms:.1f} ms")


if __name__ == "__main__":
    main()
