"""The NanoDet-Plus detector: backbone -> GhostPAN -> head, plus the training-only AGM branch."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.backbone import ShuffleNetV2
from nanodet_jax.fpn import GhostPAN
from nanodet_jax.head import NanoDetPlusHead, SimpleConvHead

BACKBONES = {"ShuffleNetV2": ShuffleNetV2}
FPNS = {"GhostPAN": GhostPAN}
HEADS = {"NanoDetPlusHead": NanoDetPlusHead, "SimpleConvHead": SimpleConvHead}
# Keys of NanoDet's head config that configure the loss/assigner, not the layers.
HEAD_TRAINING_KEYS = ("loss", "assigner_cfg")


def _to_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))


def _build(registry: Mapping[str, type], cfg: Any, rngs: nnx.Rngs, what: str) -> nnx.Module:
    kwargs = _to_dict(cfg)
    name = kwargs.pop("name", None)
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(registry)}")
    for key in HEAD_TRAINING_KEYS:
        kwargs.pop(key, None)
    return registry[name](**kwargs, rngs=rngs)


class NanoDetPlus(nnx.Module):
    """NanoDet-Plus. ``aux_fpn``/``aux_head`` (the Assign Guidance Module) exist only for training.

    ``model(images)`` runs inference on NHWC float32 images normalised as NanoDet
    does and returns the raw head output ``[B, num_priors, num_classes + 4*(reg_max+1)]``.
    """

    def __init__(
        self,
        backbone: Any,
        fpn: Any,
        head: Any,
        aux_head: Any | None = None,
        detach_epoch: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        self.backbone = _build(BACKBONES, backbone, rngs, "backbone")
        self.fpn = _build(FPNS, fpn, rngs, "fpn")
        self.head = _build(HEADS, head, rngs, "head")
        self.detach_epoch = detach_epoch
        if aux_head is not None:
            # NanoDet deep-copies the initialised fpn; a freshly initialised twin is
            # equivalent for training (its values are overwritten by checkpoints anyway).
            self.aux_fpn = _build(FPNS, fpn, rngs, "fpn")
            self.aux_head = _build(HEADS, aux_head, rngs, "aux_head")
        else:
            self.aux_fpn = None
            self.aux_head = None
        self.num_classes = self.head.num_classes
        self.reg_max = self.head.reg_max
        self.strides = self.head.strides

    @property
    def has_aux(self) -> bool:
        return self.aux_head is not None

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.fpn(self.backbone(images))).astype(jnp.float32)

    def forward_train(self, images: jax.Array, detach_aux: bool) -> tuple[jax.Array, jax.Array]:
        """Both heads' raw outputs. ``detach_aux`` (epoch >= detach_epoch) stops the aux
        branch's gradient into the backbone and the main PAN, as NanoDet's forward_train."""
        if not self.has_aux:
            raise ValueError("forward_train needs a model built with an aux_head")
        feats = self.backbone(images)
        fpn_feats = self.fpn(feats)
        if detach_aux:
            aux_in = [jax.lax.stop_gradient(f) for f in feats]
            main = [jax.lax.stop_gradient(f) for f in fpn_feats]
        else:
            aux_in, main = list(feats), list(fpn_feats)
        aux_feats = self.aux_fpn(aux_in)
        dual = [jnp.concatenate([m, a], axis=-1) for m, a in zip(main, aux_feats)]
        head_out = self.head(fpn_feats).astype(jnp.float32)
        aux_out = self.aux_head(dual).astype(jnp.float32)
        return head_out, aux_out


def build_model(config: Any, *, with_aux: bool | None = None, seed: int = 0) -> NanoDetPlus:
    """Build NanoDet-Plus from a config (the whole config or its ``model`` section).

    ``with_aux`` defaults to whether the config defines ``aux_head``; pass False
    for an inference-only model. The model is returned in eval mode (BatchNorm
    uses running statistics); call ``model.train()`` before training.
    """
    model_cfg = config.model if hasattr(config, "model") else config
    arch = _to_dict(model_cfg.arch)
    name = arch.pop("name", "NanoDetPlus")
    if name != "NanoDetPlus":
        raise ValueError(f"only arch NanoDetPlus is supported, got {name!r}")
    aux_head = arch.pop("aux_head", None)
    if with_aux is None:
        with_aux = aux_head is not None
    elif with_aux and aux_head is None:
        raise ValueError("with_aux=True but the config has no model.arch.aux_head")
    model = NanoDetPlus(**arch, aux_head=aux_head if with_aux else None, rngs=nnx.Rngs(seed))
    model.eval()
    return model
