"""COCO evaluation of a detector: ``nanodet-eval`` / ``python eval.py``.

    nanodet-eval --config configs/nanodet_plus_m_416.py --torch-weights nanodet-plus-m_416.pth \
        --config.data.val.ann_file=instances_val2017.json --config.data.val.img_dir=val2017

Weights come from ``--torch-weights`` (a NanoDet .pth / Lightning .ckpt) or
``--checkpoint`` (an orbax directory written by ``nanodet_jax.weights.pytorch`` or
``train.py``; EMA weights are used when present). Prints the 12 COCO numbers and
a per-class AP table; writes ``detections.json`` and ``metrics.json`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from nanodet_jax import paths
from nanodet_jax.cli import common as cli
from nanodet_jax.data.coco import require_image_files
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.evaluation import coco_eval, evaluator_from_config
from nanodet_jax.evaluation.predictor import Predictor, config_label_names
from nanodet_jax.models import build_model

log = logging.getLogger("nanodet_jax")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config file, e.g. configs/nanodet_plus_m.py")
    cli.add_weight_args(p)
    p.add_argument("--out-dir", default=None, help="where to write detections/metrics json")
    p.add_argument("--batch-size", type=int, default=None, help="default: config.test.batch_size")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_known_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cli.start()
    config = cli.read_config(args.config, overrides)
    val = config.data.val
    cli.check_data_config(config)
    dataset = build_dataset(val, config_label_names(config), role="val")
    require_image_files(dataset.records, dataset.ann_file)  # before the model is built
    model = build_model(config, with_aux=False)
    if len(dataset.class_names) != model.num_label_classes:
        # FCOS with a label_map: the dataset's labels are that map's entries, not its logits.
        sys.exit(
            f"error: {dataset.ann_file} has {len(dataset.class_names)} categories but the model "
            f"predicts {model.num_label_classes} classes (config "
            f"{', '.join(model.NUM_CLASSES_FIELDS)}, or model.arch.label_map)"
        )
    cli.load_weights(model, args)

    predictor = Predictor(model, config)
    batch_size = args.batch_size or int(config.test.batch_size)
    start = time.perf_counter()
    results = coco_eval.predict_dataset(
        predictor,
        dataset.records,
        batch_size,
        progress=cli.progress_enabled() and not args.no_progress,
    )
    seconds = time.perf_counter() - start
    if predictor.truncated_images:
        log.warning(
            f"{predictor.truncated_images} image(s) had more than test.nms_pre="
            f"{config.test.nms_pre} candidates and fewer than {config.test.max_per_img} kept "
            "boxes; their detections may differ from NanoDet's unbounded NMS "
            "(raise --config.test.nms_pre)"
        )
    dets = coco_eval.to_coco_json(results, dataset.cat_ids)
    metrics = evaluator_from_config(config)(dataset, dets, dataset.class_names)
    print(metrics["summary"], end="")
    print(coco_eval.per_class_table(metrics["per_class"]))
    stats = metrics["stats"]
    print(
        f"\n{len(dataset)} images in {seconds:.1f} s ({len(dataset) / seconds:.1f} img/s, "
        f"compile included)\nmAP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  "
        f"AP75 {stats['AP75']:.4f}"
    )
    out_dir = args.out_dir
    if out_dir:
        coco_eval.write_results(out_dir, dets, metrics)
        print(f"wrote {paths.join(out_dir, 'detections.json')} and metrics.json")
    return metrics


if __name__ == "__main__":
    main()
