"""EfficientNet-Lite0, GhostNet 1.0x and CustomCspNet against NanoDet's own modules.

``tests/data/golden_backbones_2.npz`` is written by
``python tools/make_golden_backbones_2.py REF_PATH`` (see that script). Each backbone is
built from the registry with the recorded constructor arguments, filled with the same
``random_state_dict`` weights (every BatchNorm affine parameter and running statistic
randomised) and run on the same 2 x 64 x 64 input:

* its state_dict keys and shapes, in order, are the reference's;
* eval mode: every output stage;
* train mode (one forward on batch statistics; EfficientNet-Lite's drop connect fed the
  reference's recorded uniforms): every output stage and BatchNorm statistic, and
  ``num_batches_tracked`` exactly;

each within ``tol = max(1e-5, 10 x the float32 reference's own error against its float64
twin)``, as in ``test_golden_parity``. In eval mode that is 1e-5 except for GhostNet's
deeper stages, where the reference itself is 7.6e-6 / 7.8e-6 away from float64 and our
output under the project's tuned XLA CPU flags (``runtime.CPU_FLAGS``) 3.9e-5 (4.6e-6
without them).

``test_efficientnet_lite_imagenet_file``: RangiLyu/EfficientNet-Lite's released file layout
(NanoDet's ``pretrain``) loads into the backbone and reproduces the eval golden.

``rel = max|ours - ref| / max|ref|``, and elementwise ``|ours - ref| <= 1e-4 |ref| + tol
max|ref|`` (``test_golden_parity.compare``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.models.backbones import BACKBONES, efficientnet_lite
from nanodet_jax.models.backbones.pretrained import load_pretrained_backbone
from nanodet_jax.testing import array_digest, normal_input, random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.models.test_golden_parity import compare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(REPO, "tests", "data", "golden_backbones_2.npz")
NETS = ("efficientnet_lite0", "ghostnet", "custom_csp")
MAX_REL = 1e-5
NOISE_FACTOR = 10.0
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def _build(spec: dict) -> nnx.Module:
    return BACKBONES.build({"name": spec["registry_name"], **spec["kwargs"]}, rngs=nnx.Rngs(0))


def _torch_shapes(model: nnx.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (k, to_torch_layout(np.asarray(v[...])).shape) for k, v in model_variables(model).items()
    ]


@pytest.mark.parametrize("net", NETS)
def test_state_dict_keys(golden, net: str) -> None:
    spec = golden[0]["nets"][net]
    ours = _torch_shapes(_build(spec))
    ref = [(k, tuple(s)) for k, s in spec["torch_keys"]]
    only_ours = sorted(set(ours) - set(ref))
    only_ref = sorted(set(ref) - set(ours))
    assert ours == ref, f"only ours {only_ours[:8]}, only reference {only_ref[:8]}"


def _loaded(spec: dict) -> tuple[nnx.Module, jax.Array]:
    model = _build(spec)
    weights = random_state_dict(dict(_torch_shapes(model)), spec["weight_seed"])
    assert array_digest(weights) == spec["weights_sha256"], "weights differ: re-record"
    load_torch_weights(model, weights)
    x = normal_input(spec["input_seed"], spec["input_shape_nchw"])
    assert array_digest({"input": x}) == spec["input_sha256"], "input RNG stream changed"
    return model, jnp.asarray(x.transpose(0, 2, 3, 1))


def _run(model: nnx.Module, x: jax.Array, mode: str):
    model.train() if mode == "train" else model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        m = nnx.merge(graphdef, state, copy=True)
        outs = m(x)
        stats = {k: v[...] for k, v in model_variables(m).items() if k.endswith(BN_STATS)}
        return outs, stats

    return jax.device_get(f(state, x))


@pytest.mark.parametrize("mode", ("eval", "train"))
@pytest.mark.parametrize("net", NETS)
def test_parity(golden, net: str, mode: str, monkeypatch) -> None:
    meta, arrays = golden
    spec = meta["nets"][net]
    prefix = f"{net}/{mode}"
    uniforms = [
        arrays[f"{prefix}/uniform/{j}"]
        for j in range(len(arrays))
        if f"{prefix}/uniform/{j}" in arrays
    ]
    fed = iter(uniforms)

    def recorded(key, shape, dtype):  # the reference's torch.rand draws, in call order
        return jnp.asarray(next(fed), dtype).reshape(shape)

    monkeypatch.setattr(efficientnet_lite, "_uniform", recorded)
    model, x = _loaded(spec)
    outs, stats = _run(model, x, mode)
    assert next(fed, None) is None, "fewer drop-connect draws than the reference made"
    noise = spec["float32_noise"]

    def tol(name: str) -> float:
        return max(MAX_REL, NOISE_FACTOR * noise[f"{mode}/{name}"])

    rows = []
    n_out = sum(1 for k in arrays if k.startswith(prefix + "/") and k.count("/") == 2)
    assert len(outs) == n_out
    for i, out in enumerate(outs):
        rel, ok = compare(out, arrays[f"{prefix}/{i}"], tol(str(i)))
        rows.append((f"stage {i}", rel, tol(str(i)), ok))
    if mode == "train":
        for key, value in stats.items():
            ref = arrays[f"{prefix}/state/{key}"]
            stat = key.rsplit(".", 1)[-1]
            if stat == "num_batches_tracked":
                assert int(value) == int(ref), key
                continue
            t = tol(f"state/{stat}")
            rel, ok = compare(value[: ref.shape[0]], ref, t)
            rows.append((key, rel, t, ok))
    report = "\n".join(
        f"  {n:50s} rel={r:.2e} tol={t:.1e} {'ok' if ok else 'FAIL'}" for n, r, t, ok in rows
    )
    print(f"{net}/{mode}\n{report}")
    assert all(r <= t and ok for _, r, t, ok in rows), f"{net}/{mode} parity broken:\n{report}"


def test_drop_connect_semantics() -> None:
    """Whole samples are kept with probability 1 - rate and rescaled; eval never drops."""
    x = jnp.ones((4000, 1, 1, 2))
    y = np.asarray(efficientnet_lite.drop_connect(x, 0.3, jax.random.key(0)))
    kept = y[:, 0, 0, 0] > 0
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert np.all(y[~kept] == 0)
    assert abs(kept.mean() - 0.7) < 0.03, kept.mean()

    net = BACKBONES.build(
        {"name": "EfficientNetLite", "model_name": "efficientnet_lite0"},
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    net.eval()  # BatchNorm on running statistics: only the drop connect is random below
    stage = net.blocks[1]  # its second block is residual, dropped at rate 0.2 * 2 / 7
    rate = net.drop_connect_rate * 2 / 7
    h = stage[0](jnp.asarray(normal_input(0, (256, 8, 8, 16))))
    branch = np.asarray(stage[1](h, rate, None) - h)
    dropped = np.asarray(stage[1](h, rate, net.rngs()) - h)
    zero = np.abs(dropped).reshape(256, -1).max(axis=1) == 0
    np.testing.assert_allclose(dropped[~zero], branch[~zero] / (1 - rate), rtol=1e-4, atol=1e-5)
    assert 0 < zero.sum() < 64, zero.sum()  # ~15 of 256 expected

    # The whole network in train mode draws new masks on every call (eval mode's output is
    # the reference's, test_parity).
    net.train()
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(normal_input(1, (8, 32, 32, 3)))
    first, second = forward(net, x)[0], forward(net, x)[0]
    assert not np.array_equal(first, second), "train-mode drop connect did not draw new masks"


def _lite_file(spec: dict) -> dict[str, np.ndarray]:
    """A state_dict in RangiLyu/EfficientNet-Lite's classifier layout: the golden backbone's
    weights plus the 1280-channel head conv and the classifier NanoDet's backbone lacks."""
    shapes = {k: tuple(s) for k, s in spec["torch_keys"]}
    head = {"head.0.weight": (1280, 320, 1, 1), "fc.weight": (1000, 1280), "fc.bias": (1000,)}
    head.update({f"head.1.{k}": (1280,) for k in ("weight", "bias", "running_mean")})
    head.update({"head.1.running_var": (1280,), "head.1.num_batches_tracked": ()})
    return {**random_state_dict(head, 5), **random_state_dict(shapes, spec["weight_seed"])}


def test_efficientnet_lite_imagenet_file(golden, tmp_path, monkeypatch) -> None:
    """The released file loads by rule (head.* and fc.* left out, as NanoDet's strict=False
    load leaves them), giving NanoDet's EfficientNet-Lite0 on those weights; ``True`` reads
    ``efficientnet_lite0.pth`` from the torch hub cache, and says where to put it."""
    torch = pytest.importorskip("torch")
    meta, arrays = golden
    spec = meta["nets"]["efficientnet_lite0"]
    state = _lite_file(spec)
    model = _build(spec)
    report = load_pretrained_backbone(model, state)
    assert sorted(report.loaded) == sorted(model_variables(model))
    assert sorted(set(state) - set(report.loaded)) == sorted(
        k for k in state if k.startswith(("head.", "fc."))
    )
    x = normal_input(spec["input_seed"], spec["input_shape_nchw"]).transpose(0, 2, 3, 1)
    outs, _ = _run(model, jnp.asarray(x), "eval")
    for i, out in enumerate(outs):
        rel, ok = compare(out, arrays[f"efficientnet_lite0/eval/{i}"])
        assert rel <= MAX_REL and ok, (i, rel)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="efficientnet_lite0.pth") as e:
        load_pretrained_backbone(_build(spec), True)
    assert "RangiLyu/EfficientNet-Lite/releases/download/v1.0/efficientnet_lite0.pth" in str(
        e.value
    )
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
        cache / "efficientnet_lite0.pth",
    )
    model = _build(spec)
    load_pretrained_backbone(model, True)
    got = np.asarray(model_variables(model)["blocks.5.3._bn1.running_var"][...])
    np.testing.assert_array_equal(got, state["blocks.5.3._bn1.running_var"])

    with pytest.raises(ValueError, match="no ImageNet weights for CustomCspNet"):
        load_pretrained_backbone(_build(meta["nets"]["custom_csp"]), True)
