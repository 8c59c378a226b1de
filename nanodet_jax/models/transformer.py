"""NanoDet's transformer encoder (``nanodet/model/module/transformer.py``), tokens batch-major.

NanoDet runs ``nn.MultiheadAttention`` sequence-first (``[L, B, C]``); here tokens are
``[B, L, C]``, which changes no value. Parameter names are PyTorch's:
``attn.in_proj_weight`` ``[3C, C]`` (query, key, value rows), ``attn.in_proj_bias``,
``attn.out_proj.weight``; ``nn.Linear`` weights stay ``[out, in]`` (2-D, not transposed
by the weight mapping). Dropout is ``nnx.Dropout``: off after ``model.eval()``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import (
    Activation,
    ConvModule,
    Initializer,
    Sequential,
    random_normal,
    random_uniform,
)
from nanodet_jax.models.norm import LayerNorm


class Linear(nnx.Module):
    """``nn.Linear``; ``std`` set: N(0, std) weights and zero bias (NanoDet's ViT-style init),
    else PyTorch's default U(+-1/sqrt(in)) for both."""

    def __init__(self, in_dim: int, out_dim: int, std: float | None = None, *, rngs: nnx.Rngs):
        if std is None:
            bound = 1.0 / math.sqrt(in_dim)
            weight = random_uniform(rngs.params(), (out_dim, in_dim), bound)
            bias = random_uniform(rngs.params(), (out_dim,), bound)
        else:
            # trunc_normal_(std=std) truncates at +-2 (absolute), i.e. at 100 std for
            # std 0.02: a plain normal draw is the same distribution.
            weight = random_normal(rngs.params(), (out_dim, in_dim), std)
            bias = jnp.zeros((out_dim,), jnp.float32)
        self.weight = nnx.Param(weight)
        self.bias = nnx.Param(bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype)


class MLP(nnx.Module):
    """fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        drop: float = 0.0,
        activation: str = "GELU",
        *,
        linear_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        out_dim = out_dim or in_dim
        hidden_dim = hidden_dim or in_dim
        self.fc1 = Linear(in_dim, hidden_dim, linear_std, rngs=rngs)
        self.act = Activation(activation)
        self.fc2 = Linear(hidden_dim, out_dim, linear_std, rngs=rngs)
        self.drop = nnx.Dropout(drop, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def _xavier_uniform_2d(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    fan_out, fan_in = shape
    return random_uniform(key, shape, math.sqrt(6.0 / (fan_in + fan_out)))


class MultiheadAttention(nnx.Module):
    """``nn.MultiheadAttention(dim, num_heads, dropout)`` as self-attention, no bias_kv.

    Queries are scaled by ``1 / sqrt(head_dim)`` before the dot products; ``dropout``
    drops attention weights after the softmax (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        out_proj_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        # PyTorch's own reset: xavier_uniform projections, zero biases.
        self.in_proj_weight = nnx.Param(_xavier_uniform_2d(rngs.params(), (3 * dim, dim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * dim,), jnp.float32))
        self.out_proj = Linear(dim, dim, out_proj_std, rngs=rngs)
        if out_proj_std is None:
            self.out_proj.bias[...] = jnp.zeros((dim,), jnp.float32)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        qkv = jnp.einsum("bnc,oc->bno", x, self.in_proj_weight[...].astype(x.dtype))
        qkv = qkv + self.in_proj_bias[...].astype(x.dtype)
        q, k, v = (t.reshape(b, n, h, d) for t in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(d)), k)
        weights = self.dropout(jax.nn.softmax(scores, axis=-1))
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c)
        return self.out_proj(out)


class TransformerEncoder(nnx.Module):
    """Pre-norm encoder layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        dropout_ratio: float = 0.0,
        activation: str = "GELU",
        kv_bias: bool = False,
        *,
        linear_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        if kv_bias:
            raise ValueError("kv_bias=True (nn.MultiheadAttention's add_bias_kv) is not supported")
        self.norm1 = LayerNorm(dim)
        self.attn = MultiheadAttention(
            dim, num_heads, dropout_ratio, out_proj_std=linear_std, rngs=rngs
        )
        self.norm2 = LayerNorm(dim)
        self.mlp = MLP(
            dim,
            int(dim * mlp_ratio),
            drop=dropout_ratio,
            activation=activation,
            linear_std=linear_std,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerBlock(nnx.Module):
    """1x1 ConvModule (ReLU, when the widths differ), + position embedding, encoders.

    ``linear`` is built but unused, as in NanoDet: it exists so the state_dicts match.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_heads: int,
        num_encoders: int = 1,
        mlp_ratio: float = 1,
        dropout_ratio: float = 0.0,
        kv_bias: bool = False,
        activation: str = "GELU",
        *,
        conv_init: Initializer | None = None,
        linear_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        if out_channels % num_heads:
            raise ValueError(f"out_channels {out_channels} not divisible by num_heads {num_heads}")
        if in_channels == out_channels:
            self.conv = Sequential([])  # nn.Identity: no parameters
        else:
            self.conv = ConvModule(in_channels, out_channels, 1, kernel_init=conv_init, rngs=rngs)
        self.linear = Linear(out_channels, out_channels, linear_std, rngs=rngs)
        self.encoders = Sequential(
            [
                TransformerEncoder(
                    out_channels,
                    num_heads,
                    mlp_ratio,
                    dropout_ratio,
                    activation,
                    kv_bias,
                    linear_std=linear_std,
                    rngs=rngs,
                )
                for _ in range(num_encoders)
            ]
        )

    def __call__(self, x: jax.Array, pos_embed: jax.Array) -> jax.Array:
        """``x`` NHWC; ``pos_embed`` ``[h * w, 1, C]`` (NanoDet's shape), tokens row-major."""
        x = self.conv(x)
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c) + pos_embed[:, 0, :].astype(x.dtype)[None]
        return self.encoders(tokens).reshape(b, h, w, c)
