"""Train a detector (NanoDet-Plus and the rest of ``model.arch.name``'s registry).

    python train.py --config configs/nanodet_plus_m.py [--workdir DIR] [--config.a.b=value ...]

A thin entry point: see ``nanodet_jax/cli/train.py`` for the options and
``nanodet_jax/training/loop.py`` for the loop (also installed as ``nanodet-train``).
"""

from nanodet_jax.cli.train import main

if __name__ == "__main__":
    main()
