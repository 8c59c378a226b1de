"""Record NanoDet's .yml configs for tests/config/test_nanodet_yml.py, and check our written .yml
files with NanoDet's own config loader.

    python tools/record_nanodet_yml.py /path/to/nanodet [--out tests/data/golden_nanodet_yml.json]

1. Writes the parsed content (``yaml.safe_load``, as NanoDet's loader reads it) of all 18
   NanoDet configs (:data:`CONFIGS`) to the golden json: data, not NanoDet's files, so the
   suite runs without a nanodet checkout.
2. Writes a .yml for each ``configs/**/*.py`` with :func:`write_nanodet_yml` and loads it with
   NanoDet's ``nanodet.util.config.load_config`` (yacs); for each config with a NanoDet file
   in :data:`CONFIGS` it prints every leaf where that result differs from NanoDet's loading
   of its own file.
3. Prints, for every .yml under NanoDet's ``config/``, whether our loader takes it or the one
   line it stops with.

Exits non-zero when NanoDet's loader refuses one of our files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nanodet_jax import runtime  # noqa: E402
from nanodet_jax.config.loading import load_config  # noqa: E402
from nanodet_jax.config.nanodet_yml import UnsupportedNanoDetConfig  # noqa: E402
from nanodet_jax.config.nanodet_yml_write import write_nanodet_yml  # noqa: E402

# NanoDet's COCO NanoDet-Plus-m files -> our config of the same model (under configs/).
PAIRS = {
    "nanodet-plus-m_320.yml": "nanodet_plus_m.py",
    "nanodet-plus-m_416.yml": "nanodet_plus_m_416.py",
    "nanodet-plus-m-1.5x_320.yml": "nanodet_plus_m_1.5x.py",
    "nanodet-plus-m-1.5x_416.yml": "nanodet_plus_m_1.5x_416.py",
}
LEGACY = "legacy_v0.x_configs/nanodet-m.yml"
_V0 = "legacy_v0.x_configs/"
_LITE = f"{_V0}EfficientNet-Lite/nanodet-EfficientNet-Lite"
# Every file under NanoDet's config/ -> our config of the same model (under configs/).
CONFIGS = {
    **PAIRS,
    LEGACY: "legacy/nanodet_m.py",
    "nanodet-plus-m_416-yolo.yml": "nanodet_plus_m_416_yolo.py",
    "nanodet_custom_xml_dataset.yml": "nanodet_custom_xml_dataset.py",
    "convnext/nanodet-plus_convnext-nano_640.yml": "nanodet_plus_convnext_nano_640.py",
    f"{_V0}nanodet-m-0.5x.yml": "legacy/nanodet_m_0.5x.py",
    f"{_V0}nanodet-m-416.yml": "legacy/nanodet_m_416.py",
    f"{_V0}nanodet-m-1.5x.yml": "legacy/nanodet_m_1.5x.py",
    f"{_V0}nanodet-m-1.5x-416.yml": "legacy/nanodet_m_1.5x_416.py",
    f"{_V0}nanodet-g.yml": "legacy/nanodet_g.py",
    f"{_V0}Transformer/nanodet-t.yml": "legacy/nanodet_t.py",
    f"{_V0}RepVGG/nanodet-RepVGG-A0_416.yml": "legacy/repvgg_a0_416.py",
    f"{_LITE}0_320.yml": "legacy/efficientnet_lite0_320.py",
    f"{_LITE}1_416.yml": "legacy/efficientnet_lite1_416.py",
    f"{_LITE}2_512.yml": "legacy/efficientnet_lite2_512.py",
}


# Our configs of models NanoDet does not have (torchvision's FCOS): no .yml expresses them.
NOT_NANODET = ("fcos_quickstart.py", "fcos_r50_fpn.py")


def our_configs(repo: str = REPO) -> list[str]:
    """Our config files, as paths relative to ``configs/`` (subfolders included)."""
    root = os.path.join(repo, "configs")
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(os.path.relpath(p, root) for p in paths)


def nanodet_loader(ref: str) -> tuple[Any, Any]:
    """NanoDet's ``cfg`` defaults and ``load_config``, without running its package
    ``__init__`` files (they import torch, Lightning and the models; the loader needs yaml)."""
    for name, sub in (("nanodet", "nanodet"), ("nanodet.util", "nanodet/util")):
        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(ref, sub)]
        sys.modules[name] = stub
    from nanodet.util.config import cfg, load_config  # type: ignore[import-not-found]

    return cfg, load_config


def leaves(node: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def plain(node: Any) -> Any:
    """A CfgNode tree as dicts and lists (it holds tuples where the yml had none)."""
    if isinstance(node, Mapping):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return node


def main() -> int:
    runtime.configure_xla()  # the entry points' XLA settings, before any computation
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref", help="a checkout of RangiLyu/nanodet")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "golden_nanodet_yml.json"))
    args = p.parse_args()
    config_dir = os.path.join(args.ref, "config")
    commit = subprocess.run(
        ["git", "-C", args.ref, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    on_disk = {
        os.path.relpath(p, config_dir)
        for p in glob.glob(os.path.join(config_dir, "**", "*.yml"), recursive=True)
    }
    if on_disk != set(CONFIGS):
        print(f"CONFIGS is not NanoDet's config/: {sorted(on_disk ^ set(CONFIGS))}")
        return 1
    files = {}
    for name in CONFIGS:  # the NanoDet-Plus-m files and nanodet-m first, as recorded before
        with open(os.path.join(config_dir, name), encoding="utf-8") as f:
            files[name] = yaml.safe_load(f)
    golden = {"source": f"RangiLyu/nanodet {commit or '?'} config/", "files": files}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(files)} files)")

    defaults, nanodet_load = nanodet_loader(args.ref)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in [r for r in our_configs() if r not in NOT_NANODET]:
            py = os.path.join(REPO, "configs", rel)
            out = os.path.join(tmp, rel[:-3].replace(os.sep, "+") + ".yml")
            write_nanodet_yml(load_config(py), out, os.path.relpath(py, REPO))
            cfg = defaults.clone()
            try:
                nanodet_load(cfg, out)
            except Exception as e:  # noqa: BLE001 -- report whatever NanoDet's loader raises
                failures += 1
                print(f"FAIL NanoDet's loader refuses ours for {rel}: {e!r}")
                continue
            theirs = [k for k, v in CONFIGS.items() if v == rel]
            line = f"ok   NanoDet's loader reads ours for {rel}"
            if theirs:
                ref_cfg = defaults.clone()
                nanodet_load(ref_cfg, os.path.join(config_dir, theirs[0]))
                a, b = dict(leaves(plain(cfg))), dict(leaves(plain(ref_cfg)))
                none = "<absent>"
                diff = [
                    f"{k}: ours {a.get(k, none)!r} vs {b.get(k, none)!r}"
                    for k in sorted(set(a) | set(b))
                    if a.get(k, none) != b.get(k, none)
                ]
                line += f"; vs NanoDet's {theirs[0]}: " + ("; ".join(diff) or "identical")
            print(line)

    for path in sorted(glob.glob(os.path.join(config_dir, "**", "*.yml"), recursive=True)):
        rel = os.path.relpath(path, config_dir)
        try:
            c = load_config(path)
            print(f"loads  {rel} -> {c.name}")
        except UnsupportedNanoDetConfig as e:
            print(f"stops  {rel}: {str(e).split(': ', 1)[1]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
