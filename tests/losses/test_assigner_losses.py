"""The dynamic soft label assigner and the GFL losses, against the PyTorch reference and by hand.

``tests/data/golden_train.npz`` is written by ``python tools/make_golden_train.py REF_PATH``
(see there): NanoDet's own training step on a batch of 3 images (a few gts, none, a
crowded one) with random weights, in both detach phases. Checked here without torch:

* on the reference's own head outputs: the assignment per prior (gt index and label
  identical, IoU targets to 1e-6, box and distance targets) and every loss term (1e-5);
* end to end through our model (train mode, batch statistics): the same assignment and
  loss terms, and ``jax.grad`` of our total loss for named parameters all over the
  network, per phase; tolerance ``max(1e-4, 10 * noise)`` relative to ``max|ref|``, where
  noise is the float32 reference's own distance from float64 (recorded, ~1e-5).

Without the fixture: a hand-checked case, a loop-by-loop NumPy transcription of the
algorithm on random problems, padding invariance, empty images and batch independence.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.assigners.dynamic_soft_label import assign
from nanodet_jax.box_ops import center_priors
from nanodet_jax.losses.gfl_head import decode_predictions
from nanodet_jax.models.detectors.nanodet_plus import assign_from_aux, nanodet_plus_loss
from tools.golden_checks import (
    TRAIN_GOLDEN,
    TRAIN_NUM_CLASSES,
    TRAIN_REG_MAX,
    check_targets,
    failed,
    format_rows,
    ground_truth,
    rel_to_max,
    train_golden,
    train_step_outputs,
    train_step_report,
)

TERMS = ("loss_qfl", "loss_bbox", "loss_dfl", "aux_loss_qfl", "aux_loss_bbox", "aux_loss_dfl")
LOSS_CFG = {
    "loss_qfl": {"beta": 2.0, "loss_weight": 1.0},
    "loss_dfl": {"loss_weight": 0.25},
    "loss_bbox": {"loss_weight": 2.0},
}
NUM_CLASSES, REG_MAX = TRAIN_NUM_CLASSES, TRAIN_REG_MAX


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(TRAIN_GOLDEN):
        pytest.fail(
            "tests/data/golden_train.npz is absent: run tools/make_golden_train.py",
            pytrace=False,
        )
    return train_golden()


@pytest.mark.parametrize("dense", [False, True], ids=["factorised", "dense"])
def test_assignment_on_reference_outputs(golden, dense: bool) -> None:
    _, arrays, _, priors = golden
    cls, _, boxes = decode_predictions(jnp.asarray(arrays["aux_out"]), priors, NUM_CLASSES, REG_MAX)
    fn = jax.jit(assign, static_argnums=(6, 7, 8, 9, 10))
    ours = fn(cls, priors, boxes, *ground_truth(arrays), NUM_CLASSES, REG_MAX, 13, 3.0, dense)
    check_targets(ours, arrays)
    # The fixture is not trivial: several gts, conflicts resolved outside the own box.
    assert np.sum(arrays["assigned_gt"] >= 0, axis=1).tolist()[1] == 0
    assert len(np.unique(arrays["assigned_gt"][2])) > 15


def test_losses_on_reference_outputs(golden) -> None:
    meta, arrays, config, priors = golden
    loss = jax.jit(
        lambda h, a, b, lab, m: nanodet_plus_loss(
            h, a, b, lab, m, priors, config.model.arch.head.loss, NUM_CLASSES, REG_MAX
        )
    )
    total, terms = loss(arrays["head_out"], arrays["aux_out"], *ground_truth(arrays))
    for phase in meta["phases"]:  # same forward pass, same losses: both recorded
        for k in TERMS:
            assert rel_to_max(terms[k], arrays[f"{phase}/loss/{k}"]) <= 1e-5, k
        assert rel_to_max(total, arrays[f"{phase}/loss/total"]) <= 1e-5


@pytest.fixture(scope="module")
def train_step(golden):
    """Jitted (loss terms, assignment, named gradients) of our model on the fixture batch."""
    return train_step_outputs(golden)


@pytest.mark.parametrize("phase", ["joint", "detached"])
def test_training_step_matches_reference(golden, train_step, phase: str) -> None:
    rows = train_step_report(golden, train_step, phase)
    bad = failed(rows)
    assert not bad, f"{phase}: {bad}\n{format_rows(rows)}"


def test_detach_changes_only_shared_gradients(golden, train_step) -> None:
    """After detach_epoch the aux branch stops feeding the backbone and the main PAN:
    in our gradients exactly the backbone.* and fpn.* ones change between the phases
    (all of them), and on the recorded parameters the reference changes the same ones."""
    meta, arrays, _, _ = golden
    joint, detached = train_step["joint"][2], train_step["detached"][2]
    shared = ("backbone.", "fpn.")
    # The head, aux_fpn and aux_head see the same forward pass and the same losses in
    # both phases; stop_gradient only cuts what flows further back, so their gradients
    # come out bitwise equal.
    wrong = [
        f"{k}: {'changed' if k.startswith(shared) else 'unchanged'} expected"
        for k in joint
        if np.array_equal(joint[k], detached[k]) == k.startswith(shared)
    ]
    assert not wrong, f"{len(wrong)} of {len(joint)} gradients: " + "; ".join(wrong[:3])
    assert {k.split(".")[0] for k in joint} == {"backbone", "fpn", "aux_fpn", "head", "aux_head"}
    for k in meta["grad_params"]:
        ref_same = np.array_equal(arrays[f"joint/grad/{k}"], arrays[f"detached/grad/{k}"])
        assert ref_same == np.array_equal(joint[k], detached[k]), k


# ---------------------------------------------------------------- without the fixture


def _tiny_case():
    """4 priors on a row, 3 classes; gt 1 and gt 2 share a box, class 2 is predicted there."""
    priors = jnp.array([[4, 4, 8, 8], [12, 4, 8, 8], [20, 4, 8, 8], [28, 4, 8, 8]], jnp.float32)
    boxes = jnp.array([[0, 0, 16, 8], [8, 0, 24, 8], [16, 0, 40, 8], [20, 0, 40, 8]], jnp.float32)
    logits = jnp.zeros((4, 3)).at[2:, 2].set(2.0)
    nan = float("nan")  # padded rows hold garbage on purpose
    gt = jnp.array([[0, 0, 16, 8], [16, 0, 40, 8], [16, 0, 40, 8], [nan] * 4], jnp.float32)
    return logits, priors, boxes, gt, jnp.array([1, 0, 2, 7]), jnp.array([1, 1, 1, 0], bool)


def test_hand_checked_case() -> None:
    logits, priors, boxes, gt, labels, mask = _tiny_case()
    assign_jit = jax.jit(assign, static_argnums=(6, 7))
    out = assign_jit(logits[None], priors, boxes[None], gt[None], labels[None], mask[None], 3, 7)
    # IoUs with gt 0: 1, 1/3, 0, 0; with gts 1 and 2: 0, 1/4, 1, 5/6. dynamic k: gt 0
    # int(4/3) = 1, gts 1 and 2 int(25/12) = 2. gt 0 takes prior 0 (cost ~0.5 against
    # ~3.7 for prior 1); gts 1 and 2 both take priors 2 and 3, and the class-2 logit of
    # 2 makes gt 2 (class 2) the cheaper of the two for both, so gt 1 ends up with none.
    np.testing.assert_array_equal(out.assigned_gt[0], [0, -1, 2, 2])
    np.testing.assert_array_equal(out.labels[0], [1, 3, 2, 2])
    np.testing.assert_allclose(out.label_scores[0], [1, 0, 1, 5 / 6], rtol=1e-6)
    g = np.asarray(gt)
    np.testing.assert_array_equal(out.bbox_targets[0], [g[0], [0] * 4, g[2], g[2]])
    # (prior - x1, prior - y1, x2 - prior, y2 - prior) / stride
    np.testing.assert_allclose(
        out.dist_targets[0],
        [[0.5, 0.5, 1.5, 0.5], [0] * 4, [0.5, 0.5, 2.5, 0.5], [1.5, 0.5, 1.5, 0.5]],
    )
    # Without the class-2 evidence gts 1 and 2 tie and the first index wins.
    out = assign_jit(
        jnp.zeros((1, 4, 3)), priors, boxes[None], gt[None], labels[None], mask[None], 3, 7
    )
    np.testing.assert_array_equal(out.assigned_gt[0], [0, -1, 1, 1])


def _numpy_assign(logits, priors, boxes, gt, labels, topk=13):
    """The algorithm transcribed loop by loop (float64).

    Returns the assigned gt per prior (-1 = none) and how many priors several gts took.
    """
    num_priors = len(priors)
    out = -np.ones(num_priors, int)
    centers = priors[:, :2]
    inside = np.array(
        [[(g[0] < c[0] < g[2]) and (g[1] < c[1] < g[3]) for g in gt] for c in centers]
    )
    valid = np.flatnonzero(inside.any(1)) if len(gt) else np.array([], int)
    if len(valid) == 0:
        return out, 0
    iou = np.zeros((len(valid), len(gt)))
    cost = np.zeros((len(valid), len(gt)))
    for i, p in enumerate(valid):
        for j, g in enumerate(gt):
            b = boxes[p]
            w = max(min(b[2], g[2]) - max(b[0], g[0]), 0)
            h = max(min(b[3], g[3]) - max(b[1], g[1]), 0)
            union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - w * h
            iou[i, j] = w * h / max(union, 1e-6)
            for c, x in enumerate(logits[p]):
                soft = iou[i, j] if c == labels[j] else 0.0
                sig = 1 / (1 + np.exp(-x))
                cost[i, j] += ((1 - soft) * x + np.log1p(np.exp(-x))) * (soft - sig) ** 2
            cost[i, j] -= 3.0 * np.log(iou[i, j] + 1e-7)
    taken = np.zeros_like(cost, bool)
    for j in range(len(gt)):
        k = max(int(np.sort(iou[:, j])[::-1][:topk].sum()), 1)
        taken[np.argsort(cost[:, j], kind="stable")[:k], j] = True
    for i, p in enumerate(valid):
        if taken[i].sum() > 1:
            out[p] = int(np.argmin(cost[i]))
        elif taken[i].sum() == 1:
            out[p] = int(np.argmax(taken[i]))
    return out, int(np.sum(taken.sum(1) > 1))


def _random_batch(seed: int, batch: int, max_gts: int, hw=(48, 64)):
    rng = np.random.default_rng(seed)
    priors = center_priors(hw, (8, 16))
    p = len(priors)
    logits = rng.normal(0, 2, (batch, p, 4)).astype(np.float32)
    dist = rng.uniform(0.5, 4, (batch, p, 4)) * priors[:, 2:3]
    boxes = np.concatenate([priors[:, :2] - dist[..., :2], priors[:, :2] + dist[..., 2:]], -1)
    counts = rng.integers(0, max_gts + 1, batch)
    gt = np.zeros((batch, max_gts, 4), np.float32)
    labels = np.zeros((batch, max_gts), np.int32)
    for i, n in enumerate(counts):
        xy = rng.uniform(0, [hw[1], hw[0]], (n, 2))
        wh = rng.uniform(3, 40, (n, 2))
        gt[i, :n] = np.round(np.concatenate([xy - wh / 2, xy + wh / 2], -1) * 4) / 4
        labels[i, :n] = rng.integers(0, 4, n)
    mask = np.arange(max_gts)[None] < counts[:, None]
    return priors, logits, boxes.astype(np.float32), gt, labels, mask


def test_matches_loop_transcription_on_random_problems() -> None:
    priors, logits, boxes, gt, labels, mask = _random_batch(0, 12, 6)
    out = jax.jit(assign, static_argnums=(6, 7))(logits, priors, boxes, gt, labels, mask, 4, 7)
    conflicts = outside = 0
    for i in range(len(logits)):
        n = int(mask[i].sum())
        expected, shared = _numpy_assign(logits[i], priors, boxes[i], gt[i, :n], labels[i, :n])
        np.testing.assert_array_equal(out.assigned_gt[i], expected, err_msg=f"image {i}")
        own = np.array(
            [[g[0] < c[0] < g[2] and g[1] < c[1] < g[3] for g in gt[i, :n]] for c in priors[:, :2]]
        ).reshape(len(priors), n)
        pos = expected >= 0
        outside += int(np.sum(~own[pos, expected[pos]])) if n else 0
        conflicts += shared
    # The quirks are exercised: priors several gts took, and priors matched to a gt
    # whose box does not contain them.
    assert conflicts > 0 and outside > 0


def test_padding_changes_nothing() -> None:
    priors, logits, boxes, gt, labels, mask = _random_batch(1, 4, 8)
    wide_gt = np.full((4, 32, 4), np.nan, np.float32)  # garbage in the padding
    wide_gt[:, :8] = np.where(mask[..., None], gt, 1e6)
    wide_labels = np.full((4, 32), 99, np.int32)
    wide_labels[:, :8] = labels
    wide_mask = np.zeros((4, 32), bool)
    wide_mask[:, :8] = mask
    head = np.random.default_rng(2).normal(size=(4, len(priors), 4 + 32)).astype(np.float32)
    aux = np.random.default_rng(3).normal(size=head.shape).astype(np.float32)
    cfg = LOSS_CFG

    @jax.jit
    def run(gt, labels, mask):
        total, terms = nanodet_plus_loss(head, aux, gt, labels, mask, priors, cfg, 4, 7)
        return total, terms, assign_from_aux(aux, gt, labels, mask, priors, 4, 7)

    narrow, wide = run(gt, labels, mask), run(wide_gt, wide_labels, wide_mask)
    for a, b in zip(jax.tree.leaves(narrow), jax.tree.leaves(wide)):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(jax.tree.leaves(wide)[0]))


def test_empty_images_are_background_with_zero_box_losses() -> None:
    priors, _, _, gt, labels, _ = _random_batch(3, 2, 5)
    mask = np.zeros(labels.shape, bool)
    head = np.random.default_rng(4).normal(size=(2, len(priors), 4 + 32)).astype(np.float32)

    def loss(head):
        return nanodet_plus_loss(head, head, gt, labels, mask, priors, LOSS_CFG, 4, 7)

    (total, terms), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(head)
    targets = jax.jit(lambda h: assign_from_aux(h, gt, labels, mask, priors, 4, 7))(head)
    assert not np.any(targets.pos_mask) and np.all(targets.labels == 4)
    assert np.all(targets.assigned_gt == -1) and np.all(targets.label_scores == 0)
    for k in ("loss_bbox", "loss_dfl", "aux_loss_bbox", "aux_loss_dfl"):
        assert float(terms[k]) == 0.0, k
    assert np.isfinite(float(total)) and float(total) > 0 and np.all(np.isfinite(grad))
    # QFL is normalised by max(#positives, 1) = 1: the plain sum over priors and classes.
    x = head[..., :4].astype(np.float64)
    sig = 1 / (1 + np.exp(-x))
    expected = np.sum((x + np.log1p(np.exp(-x))) * sig**2)
    np.testing.assert_allclose(float(terms["loss_qfl"]), expected, rtol=1e-5)


def test_batch_is_assigned_image_by_image() -> None:
    priors, logits, boxes, gt, labels, mask = _random_batch(5, 5, 6)
    fn = jax.jit(assign, static_argnums=(6, 7))
    batched = fn(logits, priors, boxes, gt, labels, mask, 4, 7)
    for i in range(len(logits)):
        single = fn(
            logits[i : i + 1],
            priors,
            boxes[i : i + 1],
            gt[i : i + 1],
            labels[i : i + 1],
            mask[i : i + 1],
            4,
            7,
        )
        for a, b in zip(batched, single):
            np.testing.assert_array_equal(a[i], b[0])
