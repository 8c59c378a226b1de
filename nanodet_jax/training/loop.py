"""The training loop: data -> sharded global batches -> the compiled step -> logging,
checkpoints and COCO evaluation of the EMA weights. Generic over the detector protocol
(``models/detectors/base.py``); ``nanodet_jax/cli/train.py`` (``train.py``) calls
:func:`train_and_evaluate`.

The workdir holds ``checkpoints/`` (last K, resumed automatically), ``best/`` (best
val mAP, EMA weights), ``metrics.jsonl``, TensorBoard logs and ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax import paths
from nanodet_jax.config.batch import resolve_batch
from nanodet_jax.data import transforms
from nanodet_jax.data.coco import CocoDetection, load_image, require_image_files
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.data.pipeline import train_loader_from_config
from nanodet_jax.evaluation import coco_eval, evaluator_from_config
from nanodet_jax.evaluation.predictor import Predictor, canvas_groups, config_label_names
from nanodet_jax.models import build_model
from nanodet_jax.models.backbones.pretrained import load_pretrained_for_training
from nanodet_jax.models.detectors.base import Detector
from nanodet_jax.testing import array_digest
from nanodet_jax.training import distributed, fault_injection, preemption, trainer
from nanodet_jax.training.bn_recalibration import recalibrate_batchnorm
from nanodet_jax.training.optim import build_optimizer, lr_schedule
from nanodet_jax.training.training_log import TrainingLog, evaluated_steps
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import load_torch_weights

log = logging.getLogger("nanodet_jax")


def check_classes(model: Detector, dataset: CocoDetection) -> None:
    n = len(dataset.class_names)
    if n != model.num_label_classes:
        fields = " ".join(f"--config.{f}={n}" for f in model.NUM_CLASSES_FIELDS)
        raise SystemExit(
            f"error: {dataset.ann_file} has {n} categories "
            f"({', '.join(dataset.class_names[:5])}...) but the model trains on "
            f"{model.num_label_classes} classes; set {fields} and --config.class_names"
        )


def record_samples(workdir: str, step: int, epoch: int, image_ids: np.ndarray) -> None:
    """Which images this process trained on at a step (``--log_samples``)."""
    path = paths.join(workdir, f"samples_p{jax.process_index()}.jsonl")
    record = {"step": step, "epoch": epoch, "image_ids": image_ids.tolist()}
    paths.append_text(path, json.dumps(record) + "\n")


def best_record(workdir: str) -> float:
    """The metric ``best/`` was written with (-1 if none)."""
    best = paths.join(workdir, "best")
    if not paths.isdir(best):
        return -1.0
    return float(checkpoint.read_meta(best).get("best_map", -1.0))


def make_synthetic_data(spec: Any) -> None:
    """Write the generated dataset a config asks for (configs/quickstart.py) once."""
    from nanodet_jax.data.synthetic import write_dataset

    if distributed.is_main_process():
        log.info(f"writing the synthetic dataset to {spec.out_dir} ...")
        write_dataset(spec.out_dir, spec.num_train, spec.num_val, spec.size, spec.seed)
    distributed.barrier("synthetic data")


def init_weights(model: Detector, source: str) -> None:
    """Fine-tuning start point: NanoDet .pth/.ckpt or one of our checkpoint directories."""
    if paths.isdir(source):
        checkpoint.restore_weights(source, model)
        return
    class_dependent = model.CLASS_DEPENDENT
    report = load_torch_weights(model, source, allow_reinit=class_dependent)
    if report.reinitialized:
        layers = [p.rstrip(".") for p in class_dependent
                  if any(k.startswith(p) for k in report.reinitialized)]  # fmt: skip
        log.warning(f"class count differs from {source}: re-initialised {', '.join(layers)}")
    if report.missing_aux:
        branches = ", ".join(p.rstrip(".") for p in model.TRAINING_ONLY)
        log.info(f"the weights have no training-only branches ({branches}): they start fresh")


def recalibrate_bn(model: Detector, config: Any, dataset: CocoDetection, num_images: int) -> None:
    """BatchNorm statistics re-estimated on the first training images (resized as for
    validation), keeping the network's function; see bn_recalibration.py."""
    predictor = Predictor(model, config, fold_bn=False)  # only for its preprocessing
    mean, std = config.data.val.pipeline.normalize
    records = dataset.records[:num_images]
    batches = []
    for i in range(0, len(records), 16):
        prepared = [predictor.prepare(load_image(r)) for r in records[i : i + 16]]
        # One batch per canvas (several with data.val.resize).
        for rows in canvas_groups(prepared).values():
            canvases = np.stack([prepared[j].canvas for j in rows])
            batches.append(transforms.normalize(jnp.asarray(canvases), mean, std))
    recalibrate_batchnorm(model, batches)


def evaluate(graphdef: Any, state: Any, config: Any, val: CocoDetection, epoch: int) -> dict:
    """COCO mAP of the EMA weights on the val set, the images split over processes."""
    # A process-local copy of the replicated EMA weights: prediction runs on local devices.
    local_ema = distributed.local_copy(state.ema)
    predictor = Predictor(trainer.merge_for_eval(graphdef, local_ema), config)
    results = coco_eval.predict_dataset_all_hosts(
        predictor, val.records, int(config.test.batch_size), progress=False
    )
    evaluate_fn = evaluator_from_config(config)
    metrics = evaluate_fn(val, coco_eval.to_coco_json(results, val.cat_ids), val.class_names)
    stats = metrics["stats"]
    log.info(f"epoch {epoch} val (EMA): mAP {stats['AP']:.4f} AP50 {stats['AP50']:.4f}")
    return stats


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    max_steps: int | None = None,
    log_samples: bool = False,
    progress_bar: bool = True,
) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating
    the EMA weights every ``schedule.val_intervals`` epochs; returns the run's summary.

    SIGTERM / SIGINT stop it after the current step with a checkpoint of that step
    (``training/preemption.py``); the summary's ``stopped_by`` names the signal.
    Every process of a multi-process run calls this with the same arguments, after
    ``distributed.initialize``.
    """
    with preemption.StopOnSignal(float(config.checkpoint.preemption_grace_s)) as stop:
        return _train(config, workdir, stop, max_steps, log_samples, progress_bar)


def _train(
    config: Any,
    workdir: str,
    stop: preemption.StopOnSignal,
    max_steps: int | None,
    log_samples: bool,
    progress_bar: bool,
) -> dict:
    main_process = distributed.is_main_process()
    # First: a batch that does not split over the devices is a one-line error, not one
    # after the dataset is read.
    batch = resolve_batch(config.device, jax.device_count())
    global_batch = batch.global_size
    workdir = paths.abspath(workdir)
    paths.makedirs(workdir)

    if config.data.get("synthetic") and not paths.isfile(config.data.train.ann_file):
        make_synthetic_data(config.data.synthetic)
    names = config_label_names(config)  # the dataset labels' names (FCOS: via label_map)
    train_set = build_dataset(config.data.train, names, role="train")
    val_set = build_dataset(config.data.val, names, role="val")
    # Now, not at the first evaluation after an epoch of training.
    require_image_files(val_set.records, val_set.ann_file)
    mesh = distributed.data_mesh()
    loader = train_loader_from_config(
        train_set.records, config, global_batch,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    steps_per_epoch = loader.steps_per_epoch
    epochs = int(config.schedule.total_epochs)
    total_steps = min(epochs * steps_per_epoch, max_steps or 1 << 62)

    mngr = checkpoint.train_manager(paths.join(workdir, "checkpoints"), int(config.checkpoint.keep))
    model = build_model(config, seed=int(config.seed))
    check_classes(model, train_set)
    load_pretrained_for_training(model, config, resuming=mngr.latest_step() is not None)
    if config.get("init_from"):
        init_weights(model, config.init_from)
        if int(config.get("init_bn_recalibration_images", 0)):
            recalibrate_bn(model, config, train_set, int(config.init_bn_recalibration_images))
    tx = build_optimizer(config, steps_per_epoch)
    lr_fn = lr_schedule(config.schedule, steps_per_epoch)
    graphdef, state = trainer.create_train_state(model, tx)
    phase_of_epoch = model.phase
    del model
    state = jax.device_put(state, distributed.replicated(mesh))

    history = TrainingLog(workdir, enabled=main_process, progress_bar=progress_bar)
    best_map = -1.0  # of best_stat, evaluator.save_key's metric (NanoDet's default: mAP)
    best_stat = coco_eval.save_key_stat((config.get("evaluator") or {}).get("save_key", "mAP"))
    if mngr.latest_step() is not None:
        state, meta = checkpoint.restore_latest_train_state(mngr, state)
        # best/ may be newer than the checkpoint's record (written after it).
        best_map = max(float(meta.get("best_map", -1.0)), best_record(workdir))
        if meta.get("global_batch", global_batch) != global_batch:
            raise SystemExit(
                f"error: {mngr.directory} was written with a global batch of "
                f"{meta['global_batch']} images, this run has {global_batch} "
                f"({batch.per_device} per device x {batch.devices} devices, {batch.field}); "
                "resume with the same global batch (the data order depends on it)"
            )
        log.info(f"resumed from {mngr.directory} at step {int(state.step)}")
    start = int(state.step)
    start_epoch, start_in_epoch = divmod(start, steps_per_epoch)
    history.resume_at(start)  # a killed run's records after its last checkpoint are redone

    steps = {}  # one compiled program per training phase (NanoDet-Plus: the two AGM phases)

    def train_step(phase: str):
        if phase not in steps:
            steps[phase] = trainer.jit_train_step(
                graphdef, tx, config, mesh, phase=phase, lr_fn=lr_fn
            )
        return steps[phase]

    log.info(
        f"training {config.name}: {len(train_set)} images, {steps_per_epoch} steps/epoch, "
        f"{epochs} epochs, workdir {workdir}"
    )
    log.info(batch.describe())
    if config.get("init_from") and start == 0:
        # The starting point's accuracy, so a fine-tuning run shows what it changed.
        history.log_eval(0, 0, evaluate(graphdef, state, config, val_set, 0))
    saved_step, stopped_by = start, None

    def evaluate_and_keep_best(state: Any, done: int) -> None:
        nonlocal best_map
        epoch = (done - 1) // steps_per_epoch + 1  # the epoch the step belongs to, from 1
        stats = evaluate(graphdef, state, config, val_set, epoch)
        fault_injection.kill_point("eval", done)
        history.log_eval(done, epoch, stats)
        if stats[best_stat] > best_map:
            best_map = stats[best_stat]
            checkpoint.save_weights(
                paths.join(workdir, "best"), trainer.merge_for_eval(graphdef, state.ema),
                config, step=done, keep=1, extra_meta={"best_map": best_map},
            )  # fmt: skip

    def evaluation_due(done: int) -> bool:
        epochs_done, in_epoch = divmod(done, steps_per_epoch)
        end_of_epoch = in_epoch == 0 and epochs_done > 0
        val_due = end_of_epoch and epochs_done % int(config.schedule.val_intervals) == 0
        return val_due or done == total_steps

    if start and evaluation_due(start) and start not in evaluated_steps(workdir):
        # The run stopped (killed, or out of grace) after this step's checkpoint and
        # before its evaluation finished: done now, so no evaluation and no best/ is missed.
        log.info(f"the evaluation after step {start} did not finish: running it now")
        evaluate_and_keep_best(state, start)

    def save(state: Any, epoch: int) -> None:
        nonlocal saved_step
        meta = {"epoch": epoch, "best_map": best_map, "name": config.name,
                "global_batch": global_batch}  # fmt: skip
        checkpoint.save_train_state(mngr, state, meta)
        saved_step = int(state.step)

    progress = history.progress(total_steps, start)
    pending = None  # metrics of the previous step, checked after the next is dispatched
    t_last, images_since = time.perf_counter(), 0
    # Seconds spent waiting for the loader's next batch: its share of the wall time says
    # whether the device is starved (docs/distributed.md, "Feeding an accelerator").
    data_wait, t_asked = 0.0, t_last
    for epoch, step_in_epoch, local_batch in loader(start_epoch, start_in_epoch):
        data_wait += time.perf_counter() - t_asked
        step = epoch * steps_per_epoch + step_in_epoch
        if step >= total_steps:
            break
        if log_samples:
            record_samples(workdir, step, epoch, local_batch["image_id"])
        batch = distributed.global_batch(trainer.batch_from_host(local_batch), mesh)
        state, metrics = train_step(phase_of_epoch(epoch))(state, batch)
        fault_injection.kill_point("step", step + 1)
        if pending is not None:
            history.check_finite(*pending)
        pending = (step + 1, epoch, metrics)
        images_since += global_batch
        done = step + 1
        if done % int(config.log.interval) == 0 or done == total_steps or done == start + 1:
            values = history.check_finite(*pending)
            now = time.perf_counter()
            values["img_per_s"] = images_since / (now - t_last)
            values["data_wait"] = data_wait / (now - t_last)
            t_last, images_since, data_wait = now, 0, 0.0
            history.log_train(done, epoch, values)
        progress.update(1)
        end_of_epoch = step_in_epoch == steps_per_epoch - 1
        # The checkpoint first (a preemption during a long evaluation keeps the epoch's
        # steps); a run that stops before the evaluation ends redoes it on resume (above).
        if done % int(config.checkpoint.every_steps) == 0 or end_of_epoch or done == total_steps:
            save(state, epoch)
            fault_injection.kill_point("checkpoint", done)
        if evaluation_due(done):
            evaluate_and_keep_best(state, done)
        if done >= total_steps:
            break
        if stop.requested(done):
            if saved_step != done:
                save(state, epoch)
            mngr.wait_until_finished()  # the write is complete before the process exits
            log.warning(
                f"stopped by {stop.signal_name} after step {done}: its checkpoint is in "
                f"{paths.join(mngr.directory, str(done))}"
            )
            stopped_by = stop.signal_name
            break
        t_asked = time.perf_counter()
    if pending is not None:
        history.check_finite(*pending)
    mngr.wait_until_finished()
    progress.close()
    history.finish()
    local_params = distributed.local_copy(state.params)
    summary = {
        "process": jax.process_index(), "final_step": int(state.step), "best_mAP": best_map,
        "params_sha256": array_digest(dict(enumerate(jax.tree.leaves(local_params)))),
        "workdir": workdir, "stopped_by": stopped_by,
    }  # fmt: skip
    return summary
