"""Write a NanoDet ``.yml`` for one of our configs: ``nanodet-yml``.

    nanodet-yml --config configs/nanodet_plus_m.py --out m.yml

NanoDet's own tools (``tools/demo.py``, its export scripts) then load the ``.pth`` that
``nanodet-convert --export-torch`` writes, with this file as their config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nanodet_jax.cli import common as cli
from nanodet_jax.config.loading import split_overrides
from nanodet_jax.config.nanodet_yml_write import write_nanodet_yml


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    others, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description="Write a NanoDet .yml for one of our configs.")
    p.add_argument("--config", required=True, help="e.g. configs/nanodet_plus_m.py")
    p.add_argument("--out", required=True, help="the .yml to write")
    args = p.parse_args(others)
    config = cli.read_config(args.config, overrides)
    write_nanodet_yml(config, args.out, args.config)  # UnsupportedNanoDetConfig: one line
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
