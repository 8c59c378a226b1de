"""Feature-pyramid necks, selected by ``model.arch.fpn.name`` (NanoDet's ``fpn`` key)."""

from nanodet_jax.models.necks.ghost_pan import GhostPAN
from nanodet_jax.registry import Registry

NECKS = Registry("model.arch.fpn", {"GhostPAN": GhostPAN})
