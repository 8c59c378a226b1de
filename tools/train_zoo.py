"""Two epochs of real training for every config of the zoo, each with its own recipe.

    python tools/train_zoo.py [--configs legacy/nanodet_m.py ...] [--size 96] [--epochs 2]
        [--out DIR] [--reuse]

For each config (default: every ``configs/**/*.py`` that ``tools/record_nanodet_yml.py``
maps to one of NanoDet's ymls, the v0.x ones first) this runs ``train.py`` as a user
would, on a generated COCO-format dataset (``write_dataset``: 128 train / 8 val images
of 128 px, three classes; batch 4, so 32 steps an epoch), overriding only what makes
the run small: the data paths (and the dataset kind: the XML / YOLO templates read the
generated COCO files), the input size (TAN's ``feature_hw`` with it: its position
embedding is sized for input / 16), the class count, the batch, the epochs, no
pretrained download, one ground-truth bucket (one compiled step), logging every step
and evaluation at the end only. Each config's optimizer and lr, warm-up kind and
ratio, lr schedule, EMA, keep_ratio and augmentation stay, as do its widths.

The schedule is compressed to ``--epochs`` so that every part of it is seen:
warm-up steps -> half the first epoch; CosineAnnealingLR T_max -> the epochs;
MultiStepLR milestone m of a T-epoch recipe -> max(1, floor(m * epochs / T)) (for 2
epochs every v0.x milestone lands on epoch 1, so the lr drops by gamma ** count there).
The logged lr of every step is compared with PyTorch's own scheduler stepped per epoch
under NanoDet's per-step warm-up (``TrainingTask.optimizer_step``), run here.

"Fell": the mean loss of the last quarter epoch (8 steps) is below that of the first 8
steps; for NanoDet-Plus, below that of the 8 steps where warm-up ends. While the scores
sit at their prior (0.01), NanoDet-Plus's bbox / DFL terms are score-weighted sums over
an ``avg_factor`` clamped at 1 (NanoDet's ``max(weight_targets.sum(), 1)``) and QFL's
IoU targets are near 0, so its loss *rises* several-fold during warm-up (0.8 -> 3.7
here) by construction, then falls. The v0.x GFLHead divides by the unclamped weight sum.

Prints a markdown table (also written to ``DIR/table.md``; per-config details in
``DIR/<config>.json``) and exits non-zero when a loss is not finite, does not fall,
a run fails or the lr is off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.data.synthetic import CLASSES, write_dataset  # noqa: E402
from tools.record_nanodet_yml import CONFIGS  # noqa: E402

LR_RTOL = 1e-5  # float32 rounding of PyTorch's float64 lr
# Detectors whose loss rises during warm-up by construction (see the module docstring):
# their fall is judged from the end of warm-up.
RISES_IN_WARMUP = ("NanoDetPlus",)


FIRST = ("nanodet_plus_m.py", "nanodet_plus_m_1.5x.py")  # after the v0.x ones


def zoo_configs() -> list[str]:
    """The configs NanoDet has a yml for: v0.x (configs/legacy/) first, then two Plus."""
    rank = lambda p: (not p.startswith("legacy/"), p not in FIRST, p)  # noqa: E731
    return sorted(set(CONFIGS.values()), key=rank)


def scaled_schedule(schedule: Any, epochs: int, steps_per_epoch: int) -> dict[str, Any]:
    """The config's schedule compressed to ``epochs`` (see the module docstring)."""
    total = int(schedule.total_epochs)
    lr_cfg = dict(schedule.lr_schedule)
    if lr_cfg["name"] == "CosineAnnealingLR":
        lr_cfg["T_max"] = epochs
    elif lr_cfg["name"] == "MultiStepLR":
        lr_cfg["milestones"] = [max(1, int(m) * epochs // total) for m in lr_cfg["milestones"]]
    else:
        raise ValueError(f"no compression rule for lr_schedule {lr_cfg['name']!r}")
    warmup = dict(schedule.warmup)
    if int(warmup["steps"]) > 0:
        warmup["steps"] = max(1, steps_per_epoch // 2)
    return {"lr_schedule": lr_cfg, "warmup": warmup}


def overrides(config: Any, args: argparse.Namespace, data: str) -> list[str]:
    """``--config.a.b=value`` for the small run; nothing of the recipe itself."""
    arch = config.model.arch
    n = len(CLASSES)
    out = [f"--config.class_names={list(CLASSES)}", f"--config.model.arch.head.num_classes={n}"]
    if "aux_head" in arch:
        out.append(f"--config.model.arch.aux_head.num_classes={n}")
    for role in ("train", "val"):
        split = config.data[role]
        out += [
            f"--config.data.{role}.name=CocoDataset",
            f"--config.data.{role}.img_dir={data}/{role}",
            f"--config.data.{role}.ann_file={data}/annotations/instances_{role}.json",
            f"--config.data.{role}.input_size=[{args.size}, {args.size}]",
        ]
        if "class_names" in split:  # the XML template names its classes per split too
            out.append(f"--config.data.{role}.class_names={list(CLASSES)}")
    if arch.fpn.name == "TAN":
        out.append(f"--config.model.arch.fpn.feature_hw=[{args.size // 16}, {args.size // 16}]")
    backbone = arch.backbone
    if "pretrain" in backbone:
        out.append("--config.model.arch.backbone.pretrain=None")
    if "pretrained" in backbone:  # TIMMWrapper
        out.append("--config.model.arch.backbone.pretrained=False")
    steps_per_epoch = args.train // args.batch
    sched = scaled_schedule(config.schedule, args.epochs, steps_per_epoch)
    for key, value in sched["lr_schedule"].items():
        if key != "name":
            out.append(f"--config.schedule.lr_schedule.{key}={value}")
    out += [
        f"--config.schedule.warmup.steps={sched['warmup']['steps']}",
        f"--config.schedule.total_epochs={args.epochs}",
        f"--config.schedule.val_intervals={args.epochs}",
        # The global batch, so that steps_per_epoch above holds on any device count.
        f"--config.device.global_batch_size={args.batch}",
        "--config.device.workers=1",
        "--config.data.train.max_boxes_buckets=[16]",  # >= synthetic MAX_OBJECTS
        "--config.test.batch_size=8",
        "--config.log.interval=1",
        "--config.checkpoint.every_steps=100000",  # epoch ends only
    ]
    return out


def warmup_k(step: int, warmup: dict) -> float:
    """NanoDet's ``TrainingTask.optimizer_step`` multiplier (its own formulas)."""
    name, steps, ratio = warmup["name"], warmup["steps"], warmup["ratio"]
    if name == "constant":
        return ratio
    if name == "linear":
        return 1 - (1 - step / steps) * (1 - ratio)
    if name == "exp":
        return ratio ** (1 - step / steps)
    raise ValueError(f"unknown warm-up {name!r}")


def torch_lrs(schedule: Any, epochs: int, steps_per_epoch: int) -> list[float]:
    """The lr of each 0-based step as NanoDet trains: torch's scheduler stepped at every
    epoch end, NanoDet's warm-up overwriting the lr on steps <= warmup.steps."""
    import warnings

    import torch

    # Stepping the scheduler without an optimizer step is the point here (lr only).
    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=float(schedule["optimizer"]["lr"]))
    cfg = dict(schedule["lr_schedule"])
    cls = getattr(torch.optim.lr_scheduler, cfg.pop("name"))
    scheduler = cls(opt, **cfg)
    warmup = dict(schedule["warmup"])
    lrs = []
    for epoch in range(epochs):
        if epoch > 0:
            scheduler.step()
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            if 0 < warmup["steps"] and step <= warmup["steps"]:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * warmup_k(step, warmup)
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


def recipe(config: Any) -> dict[str, Any]:
    opt = config.schedule.optimizer
    averager = config.model.weight_averager
    return {
        "optimizer": opt.name,
        "lr": float(opt.lr),
        "warmup": dict(config.schedule.warmup),
        "lr_schedule": dict(config.schedule.lr_schedule),
        "ema_decay": float(averager.decay) if averager else 0.0,
        "keep_ratio": bool(config.data.train.keep_ratio),
    }


def summarise(name: str, cfg_path: str, run_config: Any, workdir: str, args) -> dict:
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps_per_epoch = args.train // args.batch
    expected = torch_lrs(run_config.schedule, args.epochs, steps_per_epoch)
    lr_err = max(abs(r["lr"] - expected[r["step"] - 1]) / expected[r["step"] - 1] for r in train)
    losses = [r["loss"] for r in train]
    terms = sorted(k for k in train[0] if k.startswith(("loss_", "aux_loss")))
    finite = all(math.isfinite(v) for v in losses)
    w = int(run_config.schedule.warmup.steps)  # record w: the first step at the full lr
    k = max(3, steps_per_epoch // 4)  # windows of a quarter epoch: a batch of 4 is noisy
    start = w if run_config.model.arch.name in RISES_IN_WARMUP else 0
    reference = losses[start : start + k]
    tail = losses[-k:]
    fell = finite and sum(tail) / len(tail) < sum(reference) / len(reference)
    base = float(run_config.schedule.optimizer.lr)
    probes = sorted({0, w, steps_per_epoch - 1, steps_per_epoch, len(train) - 1})
    return {
        "config": cfg_path,
        "name": name,
        "first_step_s": args.batch / train[0]["img_per_s"],  # compile + one step + loading
        "steps": len(train),
        "loss_first": losses[0],
        "loss_reference": [start, sum(reference) / len(reference)],
        "loss_tail": sum(tail) / len(tail),
        "loss_last": losses[-1],
        "terms": {t: [train[0][t], train[-1][t]] for t in terms},
        "finite": finite,
        "fell": fell,
        "lr_probes": {s: [train[s]["lr"], expected[s], train[s]["lr"] / base] for s in probes},
        "lr_max_rel_err": lr_err,
        "lr_ok": lr_err <= LR_RTOL,
        "mAP": evals[-1]["AP"] if evals else None,
    }


def resummarise(result: dict, args: argparse.Namespace) -> dict:
    """A saved result judged again from its run's metrics.jsonl (no training)."""
    if result["rc"] == 0:
        path = os.path.join(REPO, "configs", result["config"])
        run_config = load_config(path, result["overrides"])
        workdir = os.path.join(args.out, result["name"])
        result.update(summarise(result["name"], result["config"], run_config, workdir, args))
        result["ok"] = bool(result["fell"] and result["lr_ok"])
    return result


def run_one(cfg_path: str, args: argparse.Namespace, data: str) -> dict:
    path = os.path.join(REPO, "configs", cfg_path)
    config = load_config(path)
    name = cfg_path.removesuffix(".py").replace("/", "__")
    workdir = os.path.join(args.out, name)
    shutil.rmtree(workdir, ignore_errors=True)  # train.py would resume an old run
    os.makedirs(workdir)
    extra = overrides(config, args, data)
    run_config = load_config(path, extra)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", path,
           "--workdir", workdir, *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO}
    print(f"== {cfg_path}: {' '.join(extra)}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "w") as log_file:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=args.timeout, check=False)  # fmt: skip
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {
        "config": cfg_path, "name": name, "rc": rc, "wall_s": wall,
        "recipe": recipe(config), "ran": recipe(run_config), "overrides": extra,
    }  # fmt: skip
    if rc == 0:
        result.update(summarise(name, cfg_path, run_config, workdir, args))
    else:
        with open(os.path.join(workdir, "train.log")) as f:
            lines = f.read().strip().splitlines() or [""]
        # The first exception's own line: not JAX's closing note about filtered frames,
        # nor what the background checkpoint threads raise as the interpreter exits.
        errors = [x for x in lines if re.match(r"\w*(Error|Exception|Interrupt)\b", x)]
        result["error"] = (errors or lines[-1:])[:1]
    result["ok"] = bool(rc == 0 and result.get("fell") and result.get("lr_ok"))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def describe_recipe(yml: dict, ran: dict) -> str:
    """The config's recipe; ``a→b`` where the compressed run used b for a."""
    w, s, rs = yml["warmup"], yml["lr_schedule"], ran["lr_schedule"]
    steps = f"{w['steps']}→{ran['warmup']['steps']}" if w["steps"] else "0"
    if s["name"] == "CosineAnnealingLR":
        sched = f"cos T{s['T_max']}→{rs['T_max']} min {s['eta_min']:g}"
    else:
        sched = f"step {s['milestones']}→{rs['milestones']} γ{s['gamma']:g}"
    ema = f"EMA {yml['ema_decay']:g}" if yml["ema_decay"] else "no EMA"
    keep = "keep_ratio" if yml["keep_ratio"] else "stretch"
    warm = f"{w['name']} {steps} steps from {w['ratio']:g}"
    return f"{yml['optimizer']} {yml['lr']:g}, {warm}, {sched}, {ema}, {keep}"


def table(results: list[dict]) -> str:
    head = ("| config | recipe (yml) | first step s | loss first → last (windows) "
            "| terms first → last "
            "| fell | lr/base at steps (✓ = torch) | mAP | wall s |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in results:
        what = describe_recipe(r["recipe"], r["ran"])
        if r["rc"] != 0:
            error = " ".join(r.get("error", []))[:120]
            lines.append(f"| {r['config']} | {what} | failed ({r['rc']}): "
                         f"{error} | | | ✗ | | | {r['wall_s']:.0f} |")  # fmt: skip
            continue
        terms = ", ".join(f"{t.removeprefix('loss_')} {a:.2f}→{b:.2f}"
                          for t, (a, b) in r["terms"].items())  # fmt: skip
        probes = " ".join(f"s{s}:{v[2]:.3g}" for s, v in r["lr_probes"].items())
        mark = "✓" if r["lr_ok"] else f"✗ (err {r['lr_max_rel_err']:.1e})"
        lines.append(
            f"| {r['config']} | {what} | {r['first_step_s']:.0f} "
            f"| {r['loss_first']:.2f} → {r['loss_last']:.2f} "
            f"(mean {r['loss_reference'][1]:.2f} from s{r['loss_reference'][0]} → "
            f"{r['loss_tail']:.2f}) "
            f"| {terms} | "
            f"{'yes' if r['fell'] else 'NO'} | {probes} {mark} | {r['mAP']:.4f} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", help="paths under configs/ (default: the zoo)")
    p.add_argument("--size", type=int, default=96, help="input size of the runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="workdir/train_zoo")
    p.add_argument("--train", type=int, default=128, help="generated training images")
    p.add_argument("--val", type=int, default=8, help="generated validation images")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    keep = "keep the results already in --out (run only the missing configs)"
    p.add_argument("--reuse", action="store_true", help=keep)
    args = p.parse_args(argv)
    if args.size % 32:
        p.error("--size must be a multiple of 32 (the stride-32 level)")
    args.out = os.path.abspath(args.out)
    data = os.path.join(args.out, f"data_{args.train}_{args.val}")
    results = []
    for cfg_path in args.configs or zoo_configs():
        saved = os.path.join(args.out, cfg_path.removesuffix(".py").replace("/", "__") + ".json")
        if args.reuse and os.path.isfile(saved):
            with open(saved) as f:
                results.append(resummarise(json.load(f), args))
            continue
        if not os.path.isfile(os.path.join(data, "annotations", "instances_val.json")):
            write_dataset(data, args.train, args.val, 128, seed=0)
        results.append(run_one(cfg_path, args, data))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
