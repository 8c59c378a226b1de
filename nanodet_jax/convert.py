"""The stable home of PyTorch-weight conversion (``nanodet_jax.convert.load_torch_weights``).

The implementation is ``nanodet_jax/weights/pytorch.py``; ``python -m nanodet_jax.convert``
is the ``nanodet-convert`` command (``nanodet_jax/cli/convert.py``).
"""

from nanodet_jax.weights.pytorch import (
    LoadReport,
    WeightMismatchError,
    extract_state_dict,
    load_torch_weights,
    model_variables,
    read_torch_file,
    save_torch_weights,
    torch_state_dict,
)

__all__ = [
    "LoadReport",
    "WeightMismatchError",
    "extract_state_dict",
    "load_torch_weights",
    "model_variables",
    "read_torch_file",
    "save_torch_weights",
    "torch_state_dict",
]

if __name__ == "__main__":
    from nanodet_jax.cli.convert import main

    main()
