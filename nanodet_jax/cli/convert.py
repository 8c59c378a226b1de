"""Convert weights between NanoDet's PyTorch format and our orbax checkpoints.

    nanodet-convert --config configs/nanodet_plus_m_416.py \\
        --torch-weights nanodet-plus-m_416.pth --out DIR          # .pth/.ckpt -> orbax
    nanodet-convert --config ... --checkpoint DIR --export-torch out.pth [--wrap]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

from nanodet_jax.cli import common as cli
from nanodet_jax.models import DETECTORS, build_model
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import (
    extract_state_dict,
    load_torch_weights,
    read_torch_file,
    save_torch_weights,
)

log = logging.getLogger("nanodet_jax")


def _has_training_branches(config: Any, names: Iterable[str]) -> bool:
    """Whether the weights carry the detector's training-only branches (an inference
    checkpoint, e.g. NanoDet's published ones, has none)."""
    prefixes = DETECTORS.get(config.model.arch.get("name", "NanoDetPlus")).TRAINING_ONLY
    return bool(prefixes) and any(k.startswith(prefixes) for k in names)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config .py file (configs/...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch-weights", help=".pth state_dict or Lightning .ckpt to import")
    src.add_argument("--checkpoint", help="orbax checkpoint directory to read")
    p.add_argument("--out", help="orbax checkpoint directory to write (with --torch-weights)")
    p.add_argument("--export-torch", help="write the weights as a NanoDet .pth state_dict")
    p.add_argument(
        "--wrap",
        action="store_true",
        help='with --export-torch: write {"state_dict": ...} for NanoDet\'s tools and demos',
    )
    p.add_argument("--no-ema", action="store_true", help="take raw, not EMA, weights of a .ckpt")
    args, overrides = p.parse_known_args(argv)
    cli.start()
    config = cli.read_config(args.config, overrides)
    if args.torch_weights:
        sd, _ = extract_state_dict(read_torch_file(args.torch_weights), not args.no_ema)
        model = build_model(config, with_aux=_has_training_branches(config, sd))
        load_torch_weights(model, sd)
        log.info(f"read {args.torch_weights}")
    else:
        # A checkpoint written from an inference .pth (NanoDet's published weights) has
        # no aux branch: a model with one would find its keys missing.
        names = checkpoint.saved_weight_names(args.checkpoint, prefer_ema=not args.no_ema)
        model = build_model(config, with_aux=_has_training_branches(config, names))
        checkpoint.restore_weights(args.checkpoint, model, prefer_ema=not args.no_ema)
    if args.out:
        checkpoint.save_weights(args.out, model, config)
        log.info(f"wrote orbax checkpoint {args.out}")
    if args.export_torch:
        save_torch_weights(model, args.export_torch, wrap=args.wrap)
        log.info(f"wrote {args.export_torch}")
    if not (args.out or args.export_torch):
        p.error("nothing to write: give --out and/or --export-torch")


if __name__ == "__main__":
    main()
