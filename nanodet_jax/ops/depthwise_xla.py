"""Pure-XLA depthwise convolution for CPU (fallback when the C++ FFI kernel is unavailable).

XLA:CPU lowers ``lax.conv_general_dilated(feature_group_count=C)`` to a slow generic loop,
40-90x slower than PyTorch. Writing the convolution as a sum of K*K strided slices scaled
by per-channel weights ("shift-add") instead gives a single elementwise loop fusion, which
XLA vectorises over the contiguous channel dimension. Autodiff of that formulation
produces K*K pad+add ops for the input gradient and K*K column reductions for the weight
gradient, so both gradients are written by hand in a ``jax.custom_vjp``.

All maths is done in float32; callers cast.

This module also holds the sharding/batching wrappers shared with the FFI path
(:func:`batch_parallel`, :func:`batchable`): ops that must see the whole batch (the FFI
custom calls, and the weight gradient here, which scans over the batch) are wrapped in
``custom_partitioning`` so that under ``jit`` with a batch-sharded input they run per
shard instead of all-gathering the activations, plus ``custom_vmap`` because
``custom_partitioning`` has no batching rule.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

# A two-operand op f(a, b, out_shape, stride, padding) -> array; `a` is NHWC.
# raw(a, b, [c,] out_shape, stride, padding): the arrays, then the static arguments.
RawOp = Callable[..., jax.Array]


def out_size(n: int, k: int, stride: int, padding: int) -> int:
    """Output length of a 1-D convolution with symmetric padding (PyTorch semantics)."""
    return (n + 2 * padding - k) // stride + 1


def _shift_add(src: jax.Array, w: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
    """sum_{u,v} src[:, u + s*i, v + s*j, :] * w[u, v, :] for i < out_h, j < out_w.

    ``src`` is already padded; ``w`` is [K, K, C]. A single fusion: every slice is read
    directly from ``src`` and the K*K products are summed in registers.
    """
    n, _, _, c = src.shape
    k = w.shape[0]
    acc = None
    for u in range(k):
        for v in range(k):
            limit = (n, u + stride * (out_h - 1) + 1, v + stride * (out_w - 1) + 1, c)
            term = lax.slice(src, (0, u, v, 0), limit, (1, stride, stride, 1)) * w[u, v]
            acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def _pad_hw(x: jax.Array, lo_h: int, hi_h: int, lo_w: int, hi_w: int) -> jax.Array:
    # lax.pad accepts negative amounts (cropping), which the input gradient can need when
    # padding > K - 1.
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))


def _forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    _, h, wd, _ = x.shape
    k = w.shape[0]
    xp = _pad_hw(x, padding, padding, padding, padding)
    return _shift_add(
        xp, w, stride, out_size(h, k, stride, padding), out_size(wd, k, stride, padding)
    )


def _input_grad_1d_taps(k: int, stride: int, padding: int, phase: int) -> list[tuple[int, int]]:
    """(u, d) pairs for input index stride*a + phase: it receives g[a + d] * w[u]."""
    taps = []
    for u in range(k):
        num = phase + padding - u
        if num % stride == 0:
            taps.append((u, num // stride))
    return taps


def _input_grad(
    g: jax.Array, w: jax.Array, stride: int, padding: int, in_hw: tuple[int, int]
) -> jax.Array:
    n, ho, wo, c = g.shape
    h, wd = in_hw
    k = w.shape[0]
    if stride == 1:
        # Correlation of the (K-1-P)-padded cotangent with the flipped kernel.
        q = k - 1 - padding
        gp = _pad_hw(g, q, h + k - 1 - ho - q, q, wd + k - 1 - wo - q)
        return _shift_add(gp, w[::-1, ::-1], 1, h, wd)
    # Stride > 1: split the input grid into stride x stride phases. Within a phase every
    # pixel receives the same subset of kernel taps from unit-stride gradient windows, so
    # each phase is one shift-add fusion; the phases are then interleaved. This avoids the
    # K*K scatter (pad + add) that autodiff of the strided forward produces.
    ha, wa = -(-h // stride), -(-wd // stride)
    taps_h = [_input_grad_1d_taps(k, stride, padding, ph) for ph in range(stride)]
    taps_w = [_input_grad_1d_taps(k, stride, padding, ph) for ph in range(stride)]
    ds_h = [d for t in taps_h for _, d in t] or [0]
    ds_w = [d for t in taps_w for _, d in t] or [0]
    # Pad g once so that every window g[a + d] with 0 <= a < ha is in range.
    lo_h, lo_w = max(0, -min(ds_h)), max(0, -min(ds_w))
    hi_h = max(0, ha - 1 + max(ds_h) - (ho - 1))
    hi_w = max(0, wa - 1 + max(ds_w) - (wo - 1))
    gp = _pad_hw(g, lo_h, hi_h, lo_w, hi_w)
    rows = []
    for th in taps_h:
        cols = []
        for tw in taps_w:
            acc = jnp.zeros((n, ha, wa, c), g.dtype)
            for u, dh in th:
                for v, dw in tw:
                    win = lax.slice(
                        gp, (0, lo_h + dh, lo_w + dw, 0), (n, lo_h + dh + ha, lo_w + dw + wa, c)
                    )
                    acc = acc + win * w[u, v]
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))  # [N, ha, wa, s, C]
    full = jnp.stack(rows, axis=2).reshape(n, ha * stride, wa * stride, c)
    return full[:, :h, :wd]


def _weight_grad_local(
    x: jax.Array, g: jax.Array, out_shape: tuple[int, ...], stride: int, padding: int
) -> jax.Array:
    """dw[u, v, c] = sum_{b,i,j} xpad[b, i*s + u, j*s + v, c] * g[b, i, j, c]."""
    k = out_shape[0]
    _, ho, wo, c = g.shape
    xp = _pad_hw(x, padding, padding, padding, padding)

    # Measured alternatives at [8,40,40,96] 5x5: K*K whole-batch reductions 37-60 ms
    # (XLA:CPU column reductions are slow), channel-major layout 60 ms, a stacked
    # [K*K, ...] reduction 108 ms; scanning over the batch keeps each image's K*K
    # multiply-reduce fusions cache-resident and is ~5x faster than the best of those.
    def body(acc: jax.Array, xg: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        xi, gi = xg
        terms = []
        for u in range(k):
            for v in range(k):
                limit = (u + stride * (ho - 1) + 1, v + stride * (wo - 1) + 1, c)
                win = lax.slice(xi, (u, v, 0), limit, (stride, stride, 1))
                terms.append(jnp.sum(win * gi, axis=(0, 1)))
        return acc + jnp.stack(terms), None

    acc, _ = lax.scan(body, jnp.zeros((k * k, c), jnp.float32), (xp, g))
    return acc.reshape(k, k, 1, c)


# ------------------------------------------------------------------------------------
# Sharding: run per batch/channel shard, replicate spatial and kernel dimensions.


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _batch_channel(sharding: Any, ndim: int) -> tuple[Any, Any]:
    """(batch, channel) PartitionSpec entries of an NHWC operand; spatial dims dropped."""
    if not isinstance(sharding, NamedSharding):
        return None, None  # no mesh axis names to work with: replicate (still correct)
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return spec[0], spec[3]


def _named(mesh: Any, *spec: Any) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*spec))


def _mesh_of(mesh: Any, arg_shapes: Any) -> Any:
    sharding = arg_shapes[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else mesh


def batch_parallel(
    raw: RawOp, reduce_batch: bool, dense: bool = False, passthrough: bool = False
) -> RawOp:
    """custom_partitioning wrapper of an op ``raw(a, b, out_shape, stride, padding)``.

    ``a`` is NHWC and decides the sharding. For forward / input-gradient, ``b`` is the
    kernel and the output is NHWC; for the weight gradient (``reduce_batch``) ``b`` is the
    NHWC cotangent and the output is the [K, K, 1, C] kernel gradient (``out_shape`` when
    ``dense``), summed over the batch shards. ``dense``: the op mixes channels (a dense
    convolution, ``b`` any rank-4 kernel layout), so only the batch is split and the
    output's channel count comes from ``out_shape``. ``passthrough`` (dense forward): a
    third NHWC operand ``c`` with ``a``'s pixels, ``raw(a, b, c, out_shape, ...)``, split
    like ``a``.
    """
    n_arrays = 3 if passthrough else 2
    op = custom_partitioning(raw, static_argnums=tuple(range(n_arrays, n_arrays + 3)))

    def specs(mesh: Any, arg_shapes: Any) -> tuple[Any, tuple[NamedSharding, ...], NamedSharding]:
        """(batch axes, shardings of the operands, of the output) from ``a``'s sharding."""
        bat, ch = _batch_channel(arg_shapes[0].sharding, 4)
        ch = None if dense else ch
        nhwc = _named(mesh, bat, None, None, ch)
        kernel = _named(mesh, None, None, None, ch)
        if reduce_batch:
            return bat, (nhwc, nhwc), kernel
        return bat, (nhwc, kernel, nhwc)[:n_arrays], nhwc

    def partition(
        out_shape: Any, stride: int, padding: int, mesh: Any, arg_shapes: Any, result_shape: Any
    ) -> Any:
        mesh = _mesh_of(mesh, arg_shapes)
        bat, ins, out = specs(mesh, arg_shapes)

        def lower(a: jax.Array, *rest: jax.Array) -> jax.Array:
            # Per-shard output shape: the local batch/channel sizes come from the operand.
            if reduce_batch:  # a dense kernel gradient is whole on every shard
                local = tuple(out_shape) if dense else (*out_shape[:3], a.shape[3])
            else:
                local = (a.shape[0], *out_shape[1:3], out_shape[3] if dense else a.shape[3])
            y = raw(a, *rest, local, stride, padding)
            if reduce_batch and _axes(bat):
                y = lax.psum(y, _axes(bat))  # per-shard partial sums of dw
            return y

        return mesh, lower, out, ins

    def infer(
        out_shape: Any, stride: int, padding: int, mesh: Any, arg_shapes: Any, result_shape: Any
    ) -> NamedSharding:
        return specs(_mesh_of(mesh, arg_shapes), arg_shapes)[2]

    if dense:
        rule = "b h w c, b y z k -> p q r s" if reduce_batch else "b h w c, p q r s -> b y z k"
        if passthrough:
            rule = "b h w c, p q r s, b h w t -> b y z k"
    else:
        rule = "b h w c, b y z c -> u v i c" if reduce_batch else "b h w c, u v i c -> b y z c"
    # Spatial and kernel dims must not be sharded. Shardy wants these factors listed in
    # order of first appearance in the rule.
    factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    replicated = tuple(f for f in factors if f not in (("b",) if dense else ("b", "c")))
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=replicated,
        reduction_factors=("b",) if reduce_batch else (),
    )
    return op


# ------------------------------------------------------------------------------------
# Batching: custom_partitioning has no vmap rule, so give each op one.


def batchable(
    op: RawOp, out_shape: tuple[int, ...], stride: int, padding: int, fold: bool
) -> Callable[..., jax.Array]:
    """``op`` as a custom_vmap function of its array operands (two; three with a
    ``batch_parallel(passthrough=True)`` op).

    ``fold``: when the second operand (the shared kernel) is not batched, the vmapped axis
    can be merged into the batch of the NHWC ones (forward and input gradient).
    """

    @custom_vmap
    def f(*arrays: jax.Array) -> jax.Array:
        return op(*arrays, out_shape, stride, padding)

    @f.def_vmap
    def rule(axis_size: int, in_batched: list[bool], *arrays: jax.Array) -> tuple[jax.Array, bool]:
        def full(x: jax.Array, batched: bool) -> jax.Array:
            return x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))

        if fold and not in_batched[1]:
            nhwc = [full(x, b) for i, (x, b) in enumerate(zip(arrays, in_batched)) if i != 1]
            n = nhwc[0].shape[1]
            merged = (axis_size * n, *out_shape[1:])
            nhwc = [x.reshape(axis_size * n, *x.shape[2:]) for x in nhwc]
            y = batchable(op, merged, stride, padding, fold)(nhwc[0], arrays[1], *nhwc[1:])
            return y.reshape(axis_size, n, *out_shape[1:]), True
        arrays = tuple(full(x, b) for x, b in zip(arrays, in_batched))
        g = batchable(op, out_shape, stride, padding, fold)
        return lax.map(lambda xs: g(*xs), arrays), True

    return f


_weight_grad_op = batch_parallel(_weight_grad_local, reduce_batch=True)


def _weight_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    shape = (k, k, 1, x.shape[3])
    return batchable(_weight_grad_op, shape, stride, padding, fold=False)(x, g)


def float32_depthwise(
    forward: Callable[..., jax.Array],
    input_grad: Callable[..., jax.Array],
    weight_grad: Callable[..., jax.Array],
) -> Callable[[jax.Array, jax.Array, int, int], jax.Array]:
    """A depthwise conv ``(x NHWC, kernel [K, K, 1, C], stride, padding)`` computed in
    float32 from a forward and its two hand-written gradients (one per backend)."""

    @partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        return forward(x, kernel, stride, padding)

    def fwd(x, kernel, stride, padding):
        return forward(x, kernel, stride, padding), (x, kernel)

    def bwd(stride, padding, res, g):
        x, kernel = res
        dx = input_grad(g, kernel, stride, padding, (x.shape[1], x.shape[2]))
        return dx, weight_grad(x, g, kernel.shape[0], stride, padding)

    conv.defvjp(fwd, bwd)

    def depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        y = conv(x.astype(jnp.float32), kernel.astype(jnp.float32), stride, padding)
        return y.astype(x.dtype)

    return depthwise


# Shift-add depthwise conv with hand-written gradients (NHWC, kernel [K, K, 1, C]).
depthwise_conv2d_xla = float32_depthwise(
    lambda x, kernel, stride, padding: _forward(x, kernel[:, :, 0, :], stride, padding),
    lambda g, kernel, *args: _input_grad(g, kernel[:, :, 0, :], *args),
    _weight_grad,
)
