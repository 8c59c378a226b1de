"""Weights I/O: orbax checkpoints (``checkpoint.py``) and NanoDet's PyTorch format
(``pytorch.py``; its stable import path is ``nanodet_jax.convert``)."""
