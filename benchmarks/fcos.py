"""FCOS-R50-FPN (``configs/fcos_r50_fpn.py``): ours vs torchvision, same weights, same run.

    python benchmarks/infer.py --fcos [--repeats 3] [--sizes 512 800] [--batches 1 8]
                                      [--train-batch 2] [--train-size 512] [--json out]
    (or python benchmarks/fcos.py with the same options)

Both models are torchvision's pretrained layout (``FCOS(_resnet_fpn_extractor(resnet50(
norm_layer=FrozenBatchNorm2d), 3, ...), 91)``, what the config builds) with one set of
random weights (``random_state_dict`` on torchvision's state_dict, loaded into ours by
``load_torch_weights``). Rows:

* ``forward``: raw head outputs of an already normalised, padded batch: ours
  ``model(images)`` jitted (NHWC, BGR as the config's pipeline delivers it: the model
  reverses the channels), torchvision ``head(backbone(x))`` under ``no_grad`` (NCHW, RGB),
  i.e. ``FCOS.forward`` without ``GeneralizedRCNNTransform`` (resize + normalise) and
  without post-processing, so both run the same network on the same pixels;
* ``train step``: forward + loss + backward + SGD (lr 0.01, momentum 0.9, weight decay
  1e-4, the config's optimiser) on the trainable parameters: ours one jitted function of
  ``model.loss``; torchvision ``model.train()``, backbone + head + anchors +
  ``compute_loss`` (``FCOS.forward``'s training branch past the transform), ``backward``,
  ``SGD.step``. Eight random boxes per image.

Before timing, the outputs are compared on the timed input (max |ours - torchvision|, and
relative to max |torchvision|), the loss terms and the first step's parameter updates too.
The implementations take turns within each repeat (``interleaved_medians``). Threads:
torch's and XLA's defaults (one per core each), or one each with ``--threads1``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from common import (
    REPO,
    interleaved_medians,
    machine_summary,
    markdown_table,
    single_thread,
    thread_summary,
    write_json,
)
from flax import nnx

from nanodet_jax import runtime
from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

CONFIG = os.path.join(REPO, "configs", "fcos_r50_fpn.py")
HEAD_KEYS = ("cls_logits", "bbox_regression", "bbox_ctrness")
WEIGHT_SEED, NUM_BOXES, SLOTS = 5, 8, 16
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


def torchvision_fcos(tv: Any, train: bool) -> Any:
    """torchvision's FCOS in the layout of the config (pretrained: FrozenBN, 3 trainable)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = tv.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3, [2, 3, 4], LastLevelP6P7(256, 256))
    return tv.models.detection.FCOS(backbone, 91).train(train)


def shared_models(tv: Any, train: bool) -> tuple[Any, Any, Any]:
    """(ours, torchvision, config) holding the same random weights."""
    import torch

    config = load_config(CONFIG)
    theirs = torchvision_fcos(tv, train)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    weights = random_state_dict(shapes, WEIGHT_SEED)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    ours = build_model(config, with_aux=False)
    load_torch_weights(ours, weights)
    return ours, theirs, config


def error(a: Any, ref: Any) -> str:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    err = np.abs(a - ref).max()
    return f"{err:.2e} ({err / max(np.abs(ref).max(), 1e-30):.1e} rel)"


def inputs(batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(torchvision's NCHW RGB, our NHWC BGR) of one normalised random batch."""
    nchw = np.random.default_rng(batch * 10_000 + size).normal(size=(batch, 3, size, size))
    nchw = nchw.astype(np.float32)
    return nchw, np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)[..., ::-1])


def forward_rows(tv: Any, batches: list[int], sizes: list[int], repeats: int) -> list[dict]:
    import torch

    ours, theirs, _ = shared_models(tv, train=False)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    results = []
    for size in sizes:
        for batch in batches:
            nchw, nhwc = inputs(batch, size)
            x_t, x_j = torch.from_numpy(nchw), jax.device_put(nhwc)

            def run_theirs(x_t=x_t):
                with torch.no_grad():
                    return theirs.head(list(theirs.backbone(x_t).values()))

            def run_ours(x_j=x_j):
                return jax.block_until_ready(forward(state, x_j))

            got, want = run_ours(), run_theirs()
            errors = {k: error(got[k], want[k].numpy()) for k in HEAD_KEYS}
            print(f"forward {size} b{batch}: max error {errors}", flush=True)
            t = interleaved_medians({"ours": run_ours, "torchvision": run_theirs}, repeats)
            results.append({"row": "forward", "batch": batch, "size": size,
                            "seconds": t, "errors": errors})  # fmt: skip
            print(f"  ours {t['ours']:.3f} s, torchvision {t['torchvision']:.3f} s", flush=True)
    return results


def random_targets(batch: int, size: int, label_map: Sequence[int]) -> tuple[dict, list]:
    """(ours: padded gts with dataset labels, torchvision: per-image dicts with logit ids)."""
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, size * 0.6, (batch, NUM_BOXES, 2))
    wh = rng.uniform(16, size * 0.4, (batch, NUM_BOXES, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    labels = rng.integers(0, len(label_map), (batch, NUM_BOXES))
    ours = {"gt_boxes": np.zeros((batch, SLOTS, 4), np.float32),
            "gt_labels": np.zeros((batch, SLOTS), np.int32),
            "gt_mask": np.arange(SLOTS)[None].repeat(batch, 0) < NUM_BOXES}  # fmt: skip
    ours["gt_boxes"][:, :NUM_BOXES], ours["gt_labels"][:, :NUM_BOXES] = boxes, labels
    import torch

    theirs = [{"boxes": torch.from_numpy(boxes[i]),
               "labels": torch.as_tensor(np.asarray(label_map)[labels[i]])}
              for i in range(batch)]  # fmt: skip
    return ours, theirs


def our_step(model: nnx.Module) -> tuple[Any, ...]:
    """(jitted step, params, opt_state, graphdef, rest); the update is torch.optim.SGD's with
    weight_decay (decay added to the gradient before momentum)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))

    def step(params, opt_state, images, targets):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(images, targets, "train")

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms

    return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), graphdef, rest


def train_rows(tv: Any, batch: int, size: int, repeats: int) -> list[dict]:
    import torch
    from torchvision.models.detection.image_list import ImageList

    ours, theirs, config = shared_models(tv, train=True)
    before = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    nchw, nhwc = inputs(batch, size)
    x_t, x_j = torch.from_numpy(nchw), jax.device_put(nhwc)
    j_targets, t_targets = random_targets(batch, size, config.model.arch.label_map)
    j_targets = jax.device_put(j_targets)

    def run_theirs():
        features = list(theirs.backbone(x_t).values())
        head = theirs.head(features)
        anchors = theirs.anchor_generator(ImageList(x_t, [(size, size)] * batch), features)
        counts = [f.size(2) * f.size(3) for f in features]
        terms = theirs.compute_loss(t_targets, head, anchors, counts)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        return terms

    step, params, opt_state, graphdef, rest = our_step(ours)
    state = {"params": params, "opt": opt_state}

    def run_ours():
        state["params"], state["opt"], terms = step(state["params"], state["opt"], x_j, j_targets)
        return jax.block_until_ready(terms)

    # The first step of each from the same weights: loss terms and parameter updates.
    got, want = run_ours(), run_theirs()
    errors = {k: error(got[k], float(want[k].detach())) for k in want}
    after = {k: to_torch_layout(np.asarray(v[...])) for k, v in
             model_variables(nnx.merge(graphdef, state["params"], rest)).items()}  # fmt: skip
    # Per updated tensor, relative to its largest torchvision update; the worst is shown.
    worst = max((np.abs(after[k] - before[k].numpy() - (v - before[k]).numpy()).max()
                 / max(float((v - before[k]).abs().max()), 1e-30), k)
                for k, v in theirs.state_dict().items() if (v != before[k]).any())  # fmt: skip
    errors["update, worst tensor"] = f"{worst[0]:.1e} rel ({worst[1]})"
    print(f"train step {size} b{batch}: {errors}", flush=True)
    t = interleaved_medians({"ours": run_ours, "torchvision": run_theirs}, repeats)
    print(f"  ours {t['ours']:.3f} s, torchvision {t['torchvision']:.3f} s", flush=True)
    return [{"row": "train step", "batch": batch, "size": size, "seconds": t, "errors": errors}]


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        s, b = r["seconds"], r["batch"]
        cells = [f"{s[k] * 1e3:.0f} ms ({b / s[k]:.2f} img/s)" for k in ("ours", "torchvision")]
        size = f"{r['size']}x{r['size']}"
        rows.append([r["row"], size, b, *cells, f"{s['torchvision'] / s['ours']:.2f}x"])
    return markdown_table(["row", "input", "batch", "ours", "torchvision",
                           "speed-up (torchvision / ours)"], rows)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-size", type=int, default=512, help="0: no training row")
    p.add_argument("--threads1", action="store_true", help="one thread each (common.py)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads1:
        single_thread()
    import torch

    from tools.torchvision_cpu import import_torchvision

    tv = import_torchvision()
    print(f"{machine_summary()}; torch {torch.__version__}, torchvision {tv.__version__}; "
          f"{thread_summary()}; median of {args.repeats}")  # fmt: skip
    results = forward_rows(tv, args.batches, args.sizes, args.repeats)
    if args.train_size:
        results += train_rows(tv, args.train_batch, args.train_size, args.repeats)
    print(table(results))
    meta = {"machine": machine_summary(), "threads": thread_summary()}
    write_json(args.json, meta | {"repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
