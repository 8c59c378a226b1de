"""COCO evaluation of a detector.

    python eval.py --config configs/nanodet_plus_m_416.py --torch-weights nanodet-plus-m_416.pth

A thin entry point: see ``nanodet_jax/cli/eval.py`` for the options (also installed as
``nanodet-eval``).
"""

from nanodet_jax.cli.eval import main

if __name__ == "__main__":
    main()
