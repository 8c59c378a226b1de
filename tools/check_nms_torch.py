"""Cross-check decode + multi-class NMS against NanoDet's own PyTorch code.

Usage: ``python tools/check_nms_torch.py REF_PATH [--trials 6] [--seed 0]``

``--record tests/data/golden_nms.npz`` instead writes the small seeded cases of
:func:`golden_cases` with NanoDet's outputs (``max_num`` 100 and -1) for
``tests/evaluation/test_postprocess.py``, and checks ours against them (see :func:`record`).

Per trial a random raw head output is decoded twice, by NanoDet's pieces (center
priors from ``NanoDetPlusHead.get_single_level_center_priors`` with the feature-map
sizes ``get_bboxes`` computes, ``Integral``, ``distance2bbox``, sigmoid) and by
:func:`nanodet_jax.evaluation.postprocess.decode`; priors must match exactly, boxes and scores
closely. Then NanoDet's real ``multiclass_nms`` (``nanodet/model/module/nms.py``, with
the dummy background column ``get_bboxes`` appends) and our jitted ``multiclass_nms`` run
on the same torch-decoded boxes and scores, and must agree exactly (count, boxes,
scores, labels and order) unless ours reports ``truncated``. torchvision's ``nms`` is
the real one when installed, else ``tools.reference.torch_nms``.

Score regimes: ``sparse`` (logits ~ N(-7, 1.5), ~1e3 candidates), ``dense`` (N(-6, 2),
~2e4 candidates: NanoDet's per-class ``split_thr`` branch), ``ties`` (a few logit
levels, many exactly equal scores) and ``pairs`` (hand-made box pairs with IoU ~0.6,
not from decode). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.box_ops import center_priors  # noqa: E402
from nanodet_jax.evaluation.postprocess import decode, multiclass_nms  # noqa: E402
from tools.reference import load_reference, torch_nms  # noqa: E402

STRIDES = (8, 16, 32, 64)
NUM_CLASSES, REG_MAX = 80, 7
SPLIT_THR = 10_000  # batched_nms's default split_thr
ALL = 25_000  # max_num and nms_pre of the "keep all" comparison (NanoDet max_num=-1)


def torch_decode(
    ref, torch, raw: np.ndarray, input_hw: tuple[int, int], num_classes: int = NUM_CLASSES
):
    """What ``NanoDetPlusHead.get_bboxes`` does before NMS, from NanoDet's own pieces."""
    head_mod = ref.module("nanodet.model.head.nanodet_plus_head")
    gfl = ref.module("nanodet.model.head.gfl_head")
    util = ref.module("nanodet.util")
    height, width = input_hw
    batch = raw.shape[0]
    sizes = [(math.ceil(height / s), math.ceil(width) / s) for s in STRIDES]
    priors = torch.cat(
        [
            head_mod.NanoDetPlusHead.get_single_level_center_priors(
                None, batch, size, s, dtype=torch.float32, device="cpu"
            )
            for size, s in zip(sizes, STRIDES)
        ],
        dim=1,
    )
    raw_t = torch.from_numpy(raw)
    cls, reg = raw_t.split([num_classes, 4 * (REG_MAX + 1)], dim=-1)
    dis = gfl.Integral(REG_MAX)(reg) * priors[..., 2, None]
    boxes = util.distance2bbox(priors[..., :2], dis, max_shape=input_hw)
    return priors[0].numpy(), boxes, cls.sigmoid()


def nanodet_nms(ref, torch, boxes, scores, max_num=100, iou_thr=0.6):
    nms_mod = ref.module("nanodet.model.module.nms")
    padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    dets, labels = nms_mod.multiclass_nms(
        boxes,
        padded,
        score_thr=0.05,
        nms_cfg=dict(type="nms", iou_threshold=iou_thr),
        max_num=max_num,
    )
    return dets[:, :4].numpy(), dets[:, 4].numpy(), labels.numpy()


def random_raw(rng: np.random.Generator, regime: str, num_priors: int) -> np.ndarray:
    raw = rng.normal(0, 2, (1, num_priors, NUM_CLASSES + 4 * (REG_MAX + 1))).astype(np.float32)
    shape = (1, num_priors, NUM_CLASSES)
    if regime == "sparse":
        raw[..., :NUM_CLASSES] = rng.normal(-7, 1.5, shape)
    elif regime == "dense":
        raw[..., :NUM_CLASSES] = rng.normal(-6, 2, shape)
    elif regime in ("ties", "dense-ties"):
        frac = 0.03 if regime == "ties" else 0.06
        raw[..., :NUM_CLASSES] = rng.choice(
            [-9.0, -2.5, -1.0, 0.0, 1.5], shape, p=[1 - frac] + [frac / 4] * 4
        )
    return raw


def pair_boxes(rng: np.random.Generator, n_pairs: int = 600):
    """Box pairs with IoU ~0.6 before the class offset, over many classes."""
    w, h = rng.uniform(8, 60, (2, n_pairs)).astype(np.float32)
    x, y = rng.uniform(0, 350, (2, n_pairs)).astype(np.float32)
    shift = (w / 4 + rng.integers(-40, 41, n_pairs) * np.spacing(w)).astype(np.float32)
    boxes = np.concatenate(
        [np.stack([x, y, x + w, y + h], 1), np.stack([x + shift, y, x + shift + w, y + h], 1)]
    ).astype(np.float32)
    scores = np.zeros((2 * n_pairs, NUM_CLASSES), np.float32)
    labels = rng.integers(0, NUM_CLASSES, n_pairs)
    scores[np.arange(n_pairs), labels] = rng.uniform(0.3, 1, n_pairs)
    scores[n_pairs + np.arange(n_pairs), labels] = rng.uniform(0.06, 0.6, n_pairs)
    return boxes, scores


def _rows(boxes, scores, labels, idx) -> set:
    return {(*boxes[i].tolist(), float(scores[i]), int(labels[i])) for i in idx}


def compare(out, expected, candidates: int, max_num: int) -> str:
    rb, rs, rl = expected
    n = int(out.num_dets)
    if bool(out.truncated):
        return "truncated (not compared)"
    ob, os_, ol = (np.asarray(a)[:n] for a in (out.boxes, out.scores, out.labels))
    if n == len(rs) and all(np.array_equal(a, b) for a, b in ((ob, rb), (os_, rs), (ol, rl))):
        return "identical"
    # With >= split_thr (10000) candidates NanoDet runs NMS per class and re-sorts the
    # kept boxes with torch's *unstable* argsort: rows with equal scores come out in an
    # implementation-defined order, and at the max_num cut a different one of them may
    # be kept. Accept exactly that: the same score sequence, the same set of rows per
    # score value, except for the last value when the list was cut at max_num.
    if candidates >= SPLIT_THR and n == len(rs) and n > 0 and np.array_equal(os_, rs):
        values = np.unique(rs)
        if n == max_num:
            values = values[values > rs[-1]]
        if all(
            _rows(ob, os_, ol, np.flatnonzero(os_ == v))
            == _rows(rb, rs, rl, np.flatnonzero(rs == v))
            for v in values
        ):
            return "order among equal scores differs (NanoDet split branch: accepted)"
    return "MISMATCH"


# ----------------------------------------------------------------- golden fixture

GOLDEN_HW = (64, 96)  # 128 priors; width 96 / stride 64 hits get_bboxes' ceil quirk
GOLDEN_CLASSES = 8  # classes of the decode cases (small raw arrays)
KEEP_ALL = -1  # NanoDet's max_num meaning "no cut"


def clustered_boxes(rng: np.random.Generator, n: int, size: float = 320.0) -> np.ndarray:
    """Jittered copies of a few boxes, so that many same-class pairs overlap."""
    xy = rng.uniform(0, size, (max(n // 20, 1), 2))
    wh = rng.uniform(20, 150, (len(xy), 2))
    base = np.clip(np.concatenate([xy - wh / 2, xy + wh / 2], 1), 0, size)
    jitter = rng.normal(0, 6, (n, 4))
    return np.clip(base[rng.integers(0, len(base), n)] + jitter, 0, size).astype(np.float32)


def offset_exact_pairs(rng: np.random.Generator, n_pairs: int = 120, num_classes: int = 80):
    """Pairs whose IoU is exactly 3/5, or one float32 spacing off, *after* the class offset.

    Coordinates are multiples of the float32 spacing in the offset frame of their class,
    so that IoU = 3/5 exactly (float32(0.6) > 0.6: torchvision suppresses) for a zero
    nudge. A low-score box holds the maximum coordinate ``m``, which sets the offsets.
    """
    m = np.float32(999.37)
    offsets = np.arange(num_classes).astype(np.float32) * (m + np.float32(1))
    labels = rng.integers(1, num_classes, n_pairs)
    o = offsets[labels].astype(np.float64)
    spacing = np.spacing((o + float(m)).astype(np.float32)).astype(np.float64)
    u = rng.integers(100, 1000, n_pairs) * spacing
    height = rng.integers(400, 3000, n_pairs) * spacing
    x = np.round((o + rng.uniform(0, 0.9, n_pairs) * (float(m) - 6 * u)) / spacing) * spacing
    y = np.round((o + rng.uniform(0, 0.9, n_pairs) * (float(m) - height)) / spacing) * spacing
    nudge = rng.integers(-1, 2, n_pairs) * spacing
    framed = np.concatenate(
        [
            np.stack([x, y, x + 4 * u, y + height], 1),
            np.stack([x + u + nudge, y, x + 5 * u + nudge, y + height], 1),
        ]
    ).astype(np.float32)
    shift = np.concatenate([o, o]).astype(np.float32)[:, None]
    boxes = np.concatenate([framed - shift, [[m - 10, m - 10, m, m]]]).astype(np.float32)
    scores = np.zeros((2 * n_pairs + 1, num_classes), np.float32)
    scores[np.arange(n_pairs), labels] = rng.uniform(0.6, 1, n_pairs)
    scores[n_pairs + np.arange(n_pairs), labels] = rng.uniform(0.1, 0.5, n_pairs)
    scores[-1, 0] = 0.051
    return boxes, scores


def golden_cases(rng: np.random.Generator) -> list[dict]:
    """Small NMS inputs: decoded raw head outputs (``raw`` given) and hand-made boxes."""
    cases = []
    num_priors = len(center_priors(GOLDEN_HW, STRIDES))
    width = GOLDEN_CLASSES + 4 * (REG_MAX + 1)
    for name, levels in (("decode-sparse", None), ("decode-ties", (-2.5, -1.0, 0.0, 1.5))):
        raw = rng.normal(0, 2, (1, num_priors, width)).astype(np.float32)
        cls_shape = (1, num_priors, GOLDEN_CLASSES)
        if levels is None:  # ~20% of the scores above 0.05
            raw[..., :GOLDEN_CLASSES] = rng.normal(-4.0, 1.2, cls_shape)
        else:  # a few logit levels: many exactly equal scores
            raw[..., :GOLDEN_CLASSES] = rng.choice(
                [-9.0, *levels], cls_shape, p=[0.7] + [0.075] * 4
            )
        cases.append({"name": name, "raw": raw, "iou_thr": 0.6})
    boxes = clustered_boxes(rng, 200)
    scores = (rng.integers(0, 8, (200, 4)) / 8).astype(np.float32)
    cases.append({"name": "ties", "boxes": boxes, "scores": scores, "iou_thr": 0.6})
    cases.append(
        {
            "name": "all-equal",
            "boxes": boxes[:60],
            "scores": np.full((60, 3), 0.5, np.float32),
            "iou_thr": 0.6,
        }
    )
    boxes, scores = pair_boxes(rng, 150)
    cases.append({"name": "pairs-iou-0.6", "boxes": boxes, "scores": scores, "iou_thr": 0.6})
    boxes, scores = offset_exact_pairs(rng)
    cases.append({"name": "offset-exact-0.6", "boxes": boxes, "scores": scores, "iou_thr": 0.6})
    # IoU exactly 3/5 and exactly 1/2 (representable), identical boxes in three classes
    boxes = np.array(
        [[0, 0, 4, 1], [1, 0, 5, 1], [10, 0, 13, 1], [11, 0, 14, 1]] + [[20, 20, 60, 70]] * 3,
        np.float32,
    )
    scores = np.zeros((7, 3), np.float32)
    scores[:4, 0] = [0.9, 0.8, 0.7, 0.6]
    scores[4:, :] = [[0.9, 0.8, 0.0], [0.7, 0.0, 0.6], [0.0, 0.0, 0.95]]
    for thr in (0.6, 0.5):
        cases.append({"name": f"exact-iou-{thr}", "boxes": boxes, "scores": scores, "iou_thr": thr})
    return cases


def record(ref, torch, path: str, seed: int) -> int:
    """Write NanoDet's decode + multiclass_nms outputs on :func:`golden_cases` to ``path``."""
    import json

    arrays: dict[str, np.ndarray] = {}
    tv = sys.modules["torchvision"].ops.nms
    nms_name = "tools.reference.torch_nms" if tv is torch_nms else f"{tv.__module__}.{tv.__name__}"
    meta = {"tool": "tools/check_nms_torch.py --record", "seed": seed, "nms": nms_name}
    meta["cases"] = []
    mismatches = 0
    for case in golden_cases(np.random.default_rng(seed)):
        name = case["name"]
        entry = {"name": name, "iou_thr": case["iou_thr"], "score_thr": 0.05}
        if "raw" in case:
            _, boxes_t, scores_t = torch_decode(ref, torch, case["raw"], GOLDEN_HW, GOLDEN_CLASSES)
            boxes, scores = boxes_t[0].numpy(), scores_t[0].numpy()
            arrays[f"{name}/raw"] = case["raw"]
            entry.update(input_hw=list(GOLDEN_HW), num_classes=GOLDEN_CLASSES, reg_max=REG_MAX)
            entry["strides"] = list(STRIDES)
        else:
            boxes, scores = case["boxes"], case["scores"]
        arrays[f"{name}/boxes"], arrays[f"{name}/scores"] = boxes, scores
        entry["candidates"] = int((scores > np.float32(0.05)).sum())
        for max_num in (100, KEEP_ALL):
            b, s, lab = nanodet_nms(
                ref,
                torch,
                torch.from_numpy(boxes),
                torch.from_numpy(scores),
                max_num,
                case["iou_thr"],
            )
            key = f"{name}/max_num={max_num}"
            arrays[f"{key}/boxes"], arrays[f"{key}/scores"] = b, s
            arrays[f"{key}/labels"] = lab.astype(np.int64)
            ours_max = max_num if max_num > 0 else max(entry["candidates"], 1)
            out = jax.jit(multiclass_nms, static_argnums=(2, 3, 4, 5))(
                boxes, scores, 0.05, case["iou_thr"], ours_max, 2000
            )
            ok = compare(out, (b, s, lab), entry["candidates"], ours_max) == "identical"
            mismatches += not ok
            entry.setdefault("kept", {})[str(max_num)] = len(s)
            print(
                f"{name:18s} cand {entry['candidates']:5d} max_num {max_num:4d} kept {len(s):4d} "
                f"ours {'identical' if ok else 'MISMATCH'}"
            )
        meta["cases"].append(entry)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    return mismatches


def main() -> int:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref_path", help="checkout of RangiLyu/nanodet")
    p.add_argument("--trials", type=int, default=6, help="trials per regime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--record",
        metavar="NPZ",
        help="write the golden fixture (e.g. "
        "tests/data/golden_nms.npz) instead of the random trials",
    )
    args = p.parse_args()

    ref = load_reference(args.ref_path)
    import torch

    if args.record:
        return int(record(ref, torch, args.record, args.seed) > 0)

    tv = sys.modules["torchvision"].ops.nms
    print(f"torchvision nms: {'tools.reference.torch_nms' if tv is torch_nms else tv}")
    rng = np.random.default_rng(args.seed)
    nms_default = jax.jit(multiclass_nms)
    nms_unbounded = jax.jit(lambda b, s: multiclass_nms(b, s, nms_pre=b.shape[0] * s.shape[1]))
    nms_all = jax.jit(lambda b, s: multiclass_nms(b, s, max_num=ALL, nms_pre=ALL))
    jit_decode = jax.jit(decode, static_argnums=range(1, 5))
    failures = 0
    tally: dict[str, int] = {}

    for input_hw in ((416, 416), (320, 192)):
        ours_priors = center_priors(input_hw, STRIDES)
        for regime in ("sparse", "dense", "ties", "dense-ties", "pairs"):
            for _ in range(args.trials):
                if regime == "pairs":
                    boxes_np, scores_np = pair_boxes(rng)
                    candidates = int((scores_np > np.float32(0.05)).sum())
                    note = ""
                else:
                    raw = random_raw(rng, regime, len(ours_priors))
                    priors, boxes_t, scores_t = torch_decode(ref, torch, raw, input_hw)
                    if not np.array_equal(priors, ours_priors):
                        print(f"  PRIORS DIFFER for {input_hw}")
                        failures += 1
                    boxes_j, scores_j = jit_decode(raw, input_hw, NUM_CLASSES, REG_MAX, STRIDES)
                    boxes_np, scores_np = boxes_t[0].numpy(), scores_t[0].numpy()
                    db = np.abs(np.asarray(boxes_j[0]) - boxes_np).max()
                    ds = np.abs(np.asarray(scores_j[0]) - scores_np).max()
                    candidates = int((scores_np > np.float32(0.05)).sum())
                    note = f"decode max|d| boxes {db:.2e} scores {ds:.2e}"
                    if db > 1e-3 or ds > 1e-6:
                        failures += 1
                        note += " TOO LARGE"

                boxes_t, scores_t = torch.from_numpy(boxes_np), torch.from_numpy(scores_np)
                top100 = nanodet_nms(ref, torch, boxes_t, scores_t)
                everything = nanodet_nms(ref, torch, boxes_t, scores_t, max_num=-1)
                for name, fn, expected, max_num in (
                    ("nms_pre=2000", nms_default, top100, 100),
                    ("unbounded", nms_unbounded, top100, 100),
                    ("keep-all", nms_all, everything, ALL),
                ):
                    if name == "keep-all" and candidates > ALL:
                        continue
                    status = compare(fn(boxes_np, scores_np), expected, candidates, max_num)
                    failures += status.startswith("MISMATCH")
                    tally[status] = tally.get(status, 0) + 1
                    print(
                        f"{input_hw} {regime:10s} cand {candidates:6d} kept {len(expected[1]):5d} "
                        f"{name:12s} {status}  {note}"
                    )
    for status, count in sorted(tally.items()):
        print(f"{count:4d} x {status}")
    print("no mismatch" if failures == 0 else f"{failures} failures")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
