"""Which side of each ReLU/LeakyReLU kink a run took, and float64 runs that take the same.

Used by ``tools/grad_precision.py`` and ``tests/test_grad_precision.py``. In a float32
training step every activation carries a forward rounding error of ~1e-5 of its range,
so the few elements within that distance of 0 can land on the other side of the kink
than in a float64 run: the gradient there is then multiplied by 1 instead of 0.1 (or
0.1 instead of 1). One such element can move a parameter's gradient by ~1e-2 of its
largest entry, which is chance, not the precision of the arithmetic: PyTorch's own
float32 run with its input moved by one float32 ulp at random elements misses the
"2 x PyTorch's distance" bound on ~40 of 463 parameters. A float64 run forced onto the
float32 run's kink sides measures the rounding error of everything else.
"""

from __future__ import annotations

import contextlib

SLOPES = {"ReLU": 0.0, "LeakyReLU": 0.1}  # NanoDet's LeakyReLU slope


class JaxKinks:
    """Patches ``nanodet_jax.models.layers.Activation``: records ``x > 0`` of every ReLU /
    LeakyReLU call in call order (``record``), or, given ``masks``, replaces each by
    ``where(mask, x, slope * x)``. Reset with :meth:`start` inside the traced function;
    ``use`` (a traced bool) switches the masks off without recompiling."""

    def __init__(self):
        self.masks, self.use, self.record, self.calls = None, True, [], 0

    def start(self, masks=None, use=True):
        self.masks, self.use, self.record, self.calls = masks, use, [], 0

    @contextlib.contextmanager
    def patched(self):
        import jax.numpy as jnp

        from nanodet_jax.models.layers import Activation

        original = Activation.__call__

        def call(layer, x):
            if layer.name not in SLOPES:
                return original(layer, x)
            i, self.calls = self.calls, self.calls + 1
            self.record.append(x > 0)
            if self.masks is None:
                return original(layer, x)
            side = jnp.where(self.use, self.masks[i], x > 0)
            return jnp.where(side, x, SLOPES[layer.name] * x)

        Activation.__call__ = call
        try:
            yield self
        finally:
            Activation.__call__ = original


@contextlib.contextmanager
def torch_kinks(model, masks: dict | None = None):
    """The same for a PyTorch model: yields a dict that collects ``input > 0`` per
    activation call (``"<module name>#<call>"``), or, given ``masks``, makes every
    ReLU / LeakyReLU output ``where(mask, input, slope * input)`` (NanoDet builds them
    in place; they are switched to out of place meanwhile so the input survives)."""
    import torch

    kinds = {torch.nn.ReLU: "ReLU", torch.nn.LeakyReLU: "LeakyReLU"}
    seen: dict = {}
    hooks, inplace = [], {}
    for name, mod in model.named_modules():
        kind = kinds.get(type(mod))
        if kind is None:
            continue
        if kind == "LeakyReLU" and mod.negative_slope != SLOPES[kind]:
            raise ValueError(f"{name}: LeakyReLU slope {mod.negative_slope}")
        inplace[mod] = mod.inplace
        mod.inplace = False

        def hook(mod, inputs, output, name=name, kind=kind):
            calls = sum(k.startswith(name + "#") for k in seen)
            key = f"{name}#{calls}"
            (x,) = inputs
            seen[key] = x.detach() > 0
            if masks is not None:
                return torch.where(masks[key], x, SLOPES[kind] * x)
            return None

        hooks.append(mod.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
        for mod, value in inplace.items():
            mod.inplace = value
