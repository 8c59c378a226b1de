"""Our weights exported to PyTorch load into NanoDet's own model, strictly, and give the
same outputs.

    python tools/check_export_torch.py /path/to/nanodet [--config configs/nanodet_plus_m.py]

Builds our model (with the aux branch) with random weights, writes them with
``save_torch_weights`` (plain and ``wrap=True``), loads the plain file into NanoDet's
NanoDetPlus with ``load_state_dict(strict=True)`` and the wrapped one through NanoDet's
``load_model_weight``, and compares eval-mode head outputs on a random image.

    python tools/check_export_torch.py /path/to/nanodet \\
        --record-keys tests/data/golden_torch_keys.json

instead records, for every config in :data:`CONFIGS`, the ordered keys, shapes and dtypes
of NanoDet's own ``NanoDetPlus(...).state_dict()`` (what ``strict=True`` checks), one
entry per distinct architecture, for ``tests/weights/test_export_torch.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.models import build_model  # noqa: E402
from nanodet_jax.testing import random_state_dict  # noqa: E402
from nanodet_jax.weights.pytorch import (  # noqa: E402
    load_torch_weights,
    model_variables,
    save_torch_weights,
    to_torch_layout,  # noqa: E402
)
from tools.reference import load_reference  # noqa: E402

CONFIGS = (
    "configs/nanodet_plus_m.py",
    "configs/nanodet_plus_m_416.py",
    "configs/nanodet_plus_m_1.5x.py",
    "configs/nanodet_plus_m_1.5x_416.py",
)


def record_keys(nanodet: str, path: str) -> dict:
    """Write NanoDet's state_dict layout (key, shape, dtype, in order) per config to ``path``."""
    ref = load_reference(nanodet)
    archs: dict[str, list] = {}
    by_config: dict[str, str] = {}
    for cfg_path in CONFIGS:
        model = ref.build_model(load_config(os.path.join(REPO, cfg_path)).model.arch.to_dict())
        layout = [
            [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()
        ]
        name = next((n for n, keys in archs.items() if keys == layout), None)
        if name is None:
            name = os.path.splitext(os.path.basename(cfg_path))[0]
            archs[name] = layout
        by_config[cfg_path] = name
    # One key per line: small diffs when the reference changes.
    lines = [
        "{",
        f'  "tool": {json.dumps("tools/check_export_torch.py --record-keys")},',
        f'  "configs": {json.dumps(by_config)},',
        '  "architectures": {',
    ]
    for i, (name, layout) in enumerate(archs.items()):
        rows = ",\n".join(f"      {json.dumps(row)}" for row in layout)
        lines.append(f'    "{name}": [\n{rows}\n    ]{"," if i < len(archs) - 1 else ""}')
    lines += ["  }", "}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}: " + ", ".join(f"{n} {len(k)} keys" for n, k in archs.items()))
    with open(path) as f:
        return json.load(f)


def main() -> None:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("nanodet")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "nanodet_plus_m.py"))
    p.add_argument("--record-keys", metavar="JSON", help="write NanoDet's state_dict layout")
    args = p.parse_args()
    if args.record_keys:
        record_keys(args.nanodet, args.record_keys)
        return
    import jax.numpy as jnp
    import torch

    ref = load_reference(args.nanodet)
    config = load_config(args.config)
    ours = build_model(config)
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(ours).items()
    }
    load_torch_weights(ours, random_state_dict(shapes, seed=7))
    x = np.random.default_rng(0).normal(size=(1, 3, 320, 320)).astype(np.float32)
    ours_out = np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 1))))
    with tempfile.TemporaryDirectory() as d:
        plain, wrapped = os.path.join(d, "plain.pth"), os.path.join(d, "wrapped.pth")
        save_torch_weights(ours, plain)
        save_torch_weights(ours, wrapped, wrap=True)
        strict = ref.build_model(config.model.arch.to_dict())
        result = strict.load_state_dict(torch.load(plain, weights_only=True), strict=True)
        print(f"load_state_dict(strict=True): {result}")
        via_tool = ref.build_model(config.model.arch.to_dict())
        util = ref.module("nanodet.util.check_point")
        util.load_model_weight(via_tool, torch.load(wrapped, weights_only=True), _Log())
        for name, m in (("strict", strict), ("load_model_weight", via_tool)):
            m.eval()
            with torch.no_grad():
                out = m(torch.from_numpy(x)).numpy()
            diff = float(np.abs(out - ours_out).max() / np.abs(out).max())
            print(f"{name}: head output max rel diff vs ours {diff:.2e}")
            assert diff < 1e-5


class _Log:
    def log(self, msg: str) -> None:  # NanoDet's logger interface
        print("  nanodet:", msg)


if __name__ == "__main__":
    main()
