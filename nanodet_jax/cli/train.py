"""Train a detector: ``nanodet-train`` / ``python train.py``.

    nanodet-train --config configs/nanodet_plus_m.py [--workdir DIR] [--config.a.b=value ...]

Follow one batch: ``TrainLoader`` (nanodet_jax/data/pipeline.py: decode, NanoDet's warp
augmentation, uint8 batches) -> ``distributed.global_batch`` (sharded over every device
of every host) -> the ``training/trainer.py`` step (colour augmentation, the detector's
loss, the optimizer, the EMA) -> ``training/loop.py`` for logging, checkpoints and COCO
evaluation of the EMA weights.

The workdir holds ``checkpoints/`` (last K, resumed automatically), ``best/`` (best
val mAP, EMA weights), ``metrics.jsonl``, TensorBoard logs and ``curves.png``.
Multi-host: run the same command on every host; ``jax.distributed`` is initialised
automatically on Cloud TPU / SLURM, or with ``--coordinator``, ``--num_processes`` and
``--process_id``.

SIGTERM / SIGINT (a preemption, Ctrl-C) stop training after the current step with a
checkpoint of that step and exit 0; the same command resumes. A second Ctrl-C kills at
once; ``checkpoint.preemption_grace_s`` bounds how long a stop may take.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from nanodet_jax.cli import common as cli
from nanodet_jax.training import distributed
from nanodet_jax.training.loop import train_and_evaluate

log = logging.getLogger("nanodet_jax")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config file, e.g. configs/nanodet_plus_m.py")
    p.add_argument("--workdir", help="default: workdir/<config name>")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    p.add_argument("--max_steps", type=int, help="stop after this global step (testing)")
    p.add_argument(
        "--log_samples",
        action="store_true",
        help="write the image ids of every step to workdir/samples_p<process>.jsonl",
    )
    return p.parse_known_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    cli.start()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not distributed.is_main_process():
        log.setLevel(logging.WARNING)
    config = cli.read_config(args.config, overrides)
    cli.check_data_config(config)
    workdir = args.workdir or os.path.join("workdir", config.name)
    summary = train_and_evaluate(
        config, workdir, max_steps=args.max_steps, log_samples=args.log_samples,
        progress_bar=cli.progress_enabled(),
    )  # fmt: skip
    if summary["stopped_by"]:
        # (entry_point passes sys.argv[1:] on a command line, less --debug.)
        prog = "python train.py" if os.path.basename(sys.argv[0]) == "train.py" else "nanodet-train"
        command = f"{prog} {shlex.join(argv or [])}"
        log.warning(f"to resume, run the same command (it continues from {workdir}): {command}")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
