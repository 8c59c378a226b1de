"""Record NanoDet's learning-rate and EMA-decay schedules from the reference itself.

    python tools/make_golden_schedule.py /path/to/nanodet [--out tests/data/golden_schedule.json]

The lr comes from running the reference's own ``TrainingTask.optimizer_step`` (its
warm-up) on a real ``torch.optim.AdamW`` with ``torch.optim.lr_scheduler.CosineAnnealingLR``
stepped at every epoch end, as Lightning does; the EMA decay from the reference's
``ExpMovingAverager.calculate_dacay``. Several (steps per epoch, warm-up) cases cover
warm-up ending inside the first epoch and warm-up spanning several epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.reference import _AttrDict, load_reference  # noqa: E402

CASES = [
    # steps_per_epoch, warmup steps, warmup name, epochs (= T_max)
    {"steps_per_epoch": 7, "warmup_steps": 20, "warmup": "linear", "epochs": 12},
    {"steps_per_epoch": 50, "warmup_steps": 20, "warmup": "linear", "epochs": 6},
    {"steps_per_epoch": 9, "warmup_steps": 30, "warmup": "exp", "epochs": 8},
    {"steps_per_epoch": 1222, "warmup_steps": 500, "warmup": "linear", "epochs": 300},
]
EMA_ITERATIONS = [1, 2, 10, 100, 1000, 2000, 5000, 20000, 100000]


def record_case(ref, case: dict) -> dict:
    import torch

    task_module = ref.module("nanodet.trainer.task")
    schedule = _AttrDict.wrap({
        "optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.05},
        "warmup": {"name": case["warmup"], "steps": case["warmup_steps"], "ratio": 0.0001},
        "total_epochs": case["epochs"],
        "lr_schedule": {"name": "CosineAnnealingLR", "T_max": case["epochs"], "eta_min": 5e-5},
    })  # fmt: skip
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=schedule.optimizer.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=schedule.lr_schedule.T_max, eta_min=schedule.lr_schedule.eta_min
    )
    fake_task = types.SimpleNamespace(
        trainer=types.SimpleNamespace(global_step=0), cfg=_AttrDict.wrap({"schedule": schedule})
    )
    total = case["steps_per_epoch"] * case["epochs"]
    # Every step of small cases; for the long one a sample around the interesting points.
    wanted = set(range(total)) if total <= 2000 else {
        *range(0, 520), *range(1215, 1230), *range(2440, 2450), *range(0, total, 997), total - 1
    }  # fmt: skip
    lrs = {}
    for epoch in range(case["epochs"]):
        for batch_idx in range(case["steps_per_epoch"]):
            step = fake_task.trainer.global_step
            task_module.TrainingTask.optimizer_step(
                fake_task, epoch, batch_idx, optimizer, optimizer_closure=lambda: None
            )
            if step in wanted:
                lrs[step] = optimizer.param_groups[0]["lr"]
            fake_task.trainer.global_step += 1
        scheduler.step()
    return {**case, "lr": {str(k): v for k, v in sorted(lrs.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("nanodet", help="path of a RangiLyu/nanodet checkout")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_schedule.json"))
    args = p.parse_args()
    ref = load_reference(args.nanodet)
    ema = ref.module("nanodet.model.weight_averager.ema").ExpMovingAverager(0.9998)
    payload = {
        "cases": [record_case(ref, c) for c in CASES],
        "ema_decay": {str(i): ema.calculate_dacay(i) for i in EMA_ITERATIONS},
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=0)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
