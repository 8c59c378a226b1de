"""Input-pipeline cost per image on real COCO images: what one host core can feed.

    python benchmarks/input_pipeline.py --data /work/shared/data/coco_tiny \
        [--sizes 320 416] [--batch 96] [--threads 1 2] [--repeats 3] [--flops] [--json out]

Reports, for NanoDet-Plus-m's train config (``configs/nanodet_plus_m.py``, its warp and
colour ranges) at each input size:

* CPU time per image of every host stage, single-threaded (``time.thread_time``, which
  counts only this thread's CPU, so other jobs on a shared machine barely move it): the
  end-marker check, JPEG decode from bytes in memory (no disk) at full and 1/2, 1/4, 1/8
  scale, the warp augmentation, the colour draws, padding + batching; and the whole
  synchronous ``TrainLoader.batch`` (everything above plus Python overhead) => images/s
  per core;
* NanoDet's colour jitter + normalisation done on the host (numpy/cv2, as NanoDet does)
  for reference: here it runs on the device (``augment.color_augment_and_normalize``);
* ``TrainLoader`` over grain threads (1, 2, ...): wall images/s and CPU per image, with
  the 1-minute load average before and after (wall figures mean something only when the
  load is below the core count);
* reduced decoding: which JPEG reduction the warp could afford (its largest magnification
  over the config's scale x stretch range), and the mean abs pixel difference of the
  augmented samples decoded at 1/2 vs full scale (same draws; boxes are unchanged since
  the matrix maps original-image coordinates);
* ``--flops``: the training step's FLOPs per image from XLA's cost analysis (lax
  convolutions, the GPU/TPU path; our CPU kernels are custom calls XLA cannot count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from common import markdown_table, write_json

from nanodet_jax.config.loading import load_config
from nanodet_jax.data import augment, transforms
from nanodet_jax.data.coco import CocoDetection
from nanodet_jax.data.image_integrity import truncation_problem
from nanodet_jax.data.pipeline import TrainLoader, train_loader_from_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "nanodet_plus_m.py")
REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}  # fmt: skip


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def cpu_ms_per_item(fn: Callable[[], int], repeats: int) -> float:
    """Median over ``repeats`` of this thread's CPU ms per item (``fn`` returns its count)."""
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.thread_time()
        n = fn()
        out.append((time.thread_time() - start) * 1e3 / n)
    return statistics.median(out)


def host_color_norm(img: np.ndarray, c: np.ndarray, mean, std) -> np.ndarray:
    """NanoDet's host-side color_aug_and_norm (float32, HSV round trip), for its cost."""
    x = img.astype(np.float32) / 255
    x += c[augment.BRIGHTNESS]
    x *= c[augment.CONTRAST]
    hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)
    hsv[..., 1] *= c[augment.SATURATION]
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return (x - np.float32(mean) / 255) / (np.float32(std) / 255)


def source_matrix(full_wh, small_wh) -> np.ndarray:
    """Reduced-image pixels -> original-image pixels (pixel centres), per axis from the
    actual sizes (a reduced decode of W is ceil(W / f), not W / f)."""
    sx, sy = full_wh[0] / small_wh[0], full_wh[1] / small_wh[1]
    return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])


def max_magnification(pipeline, raw_wh, input_wh) -> tuple[float, float]:
    """The warp's largest output/input pixel ratio per axis over the config's ranges."""
    top = max(pipeline["scale"]) * np.array([max(s) for s in pipeline["stretch"]])
    return float(top[0] * input_wh[0] / raw_wh[0]), float(top[1] * input_wh[1] / raw_wh[1])


def stage_costs(data: list[bytes], ds, pipeline, sizes, batch, repeats) -> dict:
    imgs = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in data]
    res: dict = {"load": load()}

    def check() -> int:
        for r in ds.records:
            truncation_problem(r.path)
        return len(ds.records)

    res["end-marker check (file)"] = cpu_ms_per_item(check, repeats)
    for f, flag in REDUCED.items():

        def dec(flag=flag) -> int:
            for b in data:
                cv2.imdecode(np.frombuffer(b, np.uint8), flag)
            return len(data)

        res[f"decode 1/{f}"] = cpu_ms_per_item(dec, repeats)
    rng = np.random.default_rng(0)
    for size in sizes:
        wh = (size, size)
        hw = transforms.canvas_hw(wh)
        params = [augment.sample_warp_params(rng, pipeline) for _ in imgs]

        def warp(wh=wh, params=params) -> int:
            for img, r, p in zip(imgs, ds.records, params):
                augment.shape_transform(img, r.boxes, p, wh, False)
            return len(imgs)

        def draws() -> int:
            for _ in range(1000):
                augment.sample_warp_params(rng, pipeline)
                augment.sample_color_params(rng, pipeline)
            return 1000

        warped = [augment.shape_transform(i, r.boxes, p, wh, False)[0]
                  for i, r, p in zip(imgs, ds.records, params)]  # fmt: skip
        colors = [augment.sample_color_params(rng, pipeline) for _ in imgs]

        def collate(hw=hw, warped=warped) -> int:
            rows = [{"images": transforms.place_on_canvas(warped[i % len(warped)], hw)[0]}
                    for i in range(batch)]  # fmt: skip
            TrainLoader.collate(rows)
            return batch

        mean, std = pipeline["normalize"]

        def color(warped=warped, colors=colors, mean=mean, std=std) -> int:
            for w, c in zip(warped, colors):
                host_color_norm(w, c, mean, std)
            return len(warped)

        res[f"warp {size}"] = cpu_ms_per_item(warp, repeats)
        res[f"draws {size}"] = cpu_ms_per_item(draws, repeats)
        res[f"pad + batch {size}"] = cpu_ms_per_item(collate, repeats)
        res[f"host colour + normalise {size}"] = cpu_ms_per_item(color, repeats)
    return res


def loader_costs(ds, config, sizes, batch, threads, repeats) -> list[dict]:
    records = (ds.records * (-(-2 * batch // len(ds.records))))[: 2 * batch]
    rows = []
    for size in sizes:
        config.data.train.input_size = [size, size]
        loader = train_loader_from_config(records, config, batch)
        sync = cpu_ms_per_item(lambda loader=loader: len(loader.batch(0, 0)["images"]), repeats)
        rows.append({"size": size, "mode": "batch() synchronous", "load": load(),
                     "cpu_ms": sync, "per_core": 1e3 / sync})  # fmt: skip
        for n in threads:
            loader.num_threads = n
            before = load()
            walls, cpus = [], []
            for epoch in range(repeats + 1):
                w0, c0, images = time.perf_counter(), time.process_time(), 0
                for b in loader.epoch(epoch):
                    images += len(b["images"])
                if epoch:  # the first one warms up
                    walls.append(images / (time.perf_counter() - w0))
                    cpus.append((time.process_time() - c0) * 1e3 / images)
            rows.append({"size": size, "mode": f"epoch() {n} thread(s)",
                         "load": f"{before}->{load()}", "wall_img_s": statistics.median(walls),
                         "cpu_ms": statistics.median(cpus)})  # fmt: skip
    return rows


def reduced_parity(data, ds, pipeline, sizes) -> list[dict]:
    """Same draws, image decoded at full vs 1/2 scale: the augmented samples' difference."""
    rows = []
    for size in sizes:
        wh, diffs = (size, size), []
        rng = np.random.default_rng(1)
        needed = []
        for b, r in zip(data, ds.records):
            full = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
            half = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
            fwh, swh = full.shape[1::-1], half.shape[1::-1]
            p = augment.sample_warp_params(rng, pipeline)
            a, boxes, m = augment.shape_transform(full, r.boxes, p, wh, False)
            c = transforms.warp_image(half, m @ source_matrix(fwh, swh), wh)
            diffs.append(np.abs(a.astype(np.float32) - c).mean())
            mx = max(max_magnification(pipeline, fwh, wh))
            needed.append(max(f for f in REDUCED if f * mx <= 1 or f == 1))
        rows.append({"size": size, "mean_abs_diff": float(np.mean(diffs)),
                     "max_abs_diff_mean": float(np.max(diffs)),
                     "affordable_reduction": sorted(set(needed)),
                     "max_magnification": max_magnification(pipeline, (640, 480), wh)})  # fmt: skip
    return rows


def train_flops(config, size: int, batch: int = 8) -> dict:
    """XLA's FLOP count of the compiled training step (lax convolutions) per image."""
    os.environ["NANODET_JAX_DEPTHWISE"] = os.environ["NANODET_JAX_CONV3X3"] = "lax"
    import jax

    from nanodet_jax.models import build_model
    from nanodet_jax.training import distributed, trainer
    from nanodet_jax.training.optim import build_optimizer

    config.data.train.input_size = [size, size]
    mesh = distributed.data_mesh(jax.devices()[:1])
    model = build_model(config)
    tx = build_optimizer(config, 1000)
    graphdef, state = trainer.create_train_state(model, tx)
    slots = 32
    spec = {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
        "color": jax.ShapeDtypeStruct((batch, 4), np.float32),
        "gt_boxes": jax.ShapeDtypeStruct((batch, slots, 4), np.float32),
        "gt_labels": jax.ShapeDtypeStruct((batch, slots), np.int32),
        "gt_mask": jax.ShapeDtypeStruct((batch, slots), bool),
    }
    step = trainer.jit_train_step(graphdef, tx, config, mesh, phase="joint")
    cost = step.lower(state, spec).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"size": size, "train_gflop_per_image": cost["flops"] / batch / 1e9}


def forward_flops(config, size: int, batch: int = 8) -> dict:
    """XLA's FLOP count of the inference forward (no aux head) per image."""
    os.environ["NANODET_JAX_DEPTHWISE"] = os.environ["NANODET_JAX_CONV3X3"] = "lax"
    import jax
    from flax import nnx

    from nanodet_jax.models import build_model

    config.data.val.input_size = [size, size]
    model = build_model(config, with_aux=False)
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    x = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
    cost = forward.lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"size": size, "forward_gflop_per_image": cost["flops"] / batch / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/coco_tiny", help="COCO folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 416])
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flops", action="store_true", help="also count the step's FLOPs")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    cv2.setNumThreads(1)  # cv2's own pool would blur the per-core figures
    config = load_config(CONFIG)
    pipeline = config.data.train.pipeline.to_dict()
    ds = CocoDetection(os.path.join(args.data, "annotations", "instances_train2017.json"),
                       os.path.join(args.data, "train2017"))  # fmt: skip
    data = []
    for r in ds.records:
        with open(r.path, "rb") as f:
            data.append(f.read())
    sizes = sorted({(r.width, r.height) for r in ds.records})
    kb = np.median([len(b) for b in data]) / 1e3
    print(f"{len(data)} images, {os.cpu_count()} cores, load {load()}, "
          f"sizes {sizes[0]}..{sizes[-1]}, median {kb:.0f} kB")  # fmt: skip
    out: dict = {"stages": stage_costs(data, ds, pipeline, args.sizes, args.batch, args.repeats)}
    print(markdown_table(["stage (load " + out["stages"].pop("load") + ")", "CPU ms/image"],
                         [[k, f"{v:.3f}"] for k, v in out["stages"].items()]))  # fmt: skip
    out["reduced"] = reduced_parity(data, ds, pipeline, args.sizes)
    for row in out["reduced"]:
        print(row)
    if not args.skip_loader:
        out["loader"] = loader_costs(ds, config, args.sizes, args.batch, args.threads,
                                     args.repeats)  # fmt: skip
        print(markdown_table(["size", "mode", "load (1 min)", "CPU ms/image", "img/s"],
                             [[r["size"], r["mode"], r["load"], f"{r['cpu_ms']:.2f}",
                               f"{r.get('per_core', r.get('wall_img_s')):.0f}"]
                              for r in out["loader"]]))  # fmt: skip
    if args.flops:
        out["flops"] = [{**forward_flops(config, s), **train_flops(config, s)}
                        for s in args.sizes]  # fmt: skip
        print(out["flops"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
