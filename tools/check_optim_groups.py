"""Our per-parameter lr / weight decay against NanoDet's own ``build_optimizer``.

    python tools/check_optim_groups.py /path/to/nanodet

Builds NanoDet-Plus-m in the reference and ours, runs the reference's builder with
``no_norm_decay`` / ``param_level_cfg`` settings, and compares every parameter's group
lr and weight_decay with ``param_groups.assign`` (our norm layers are found by the
shape rule, the reference's by module type). Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.reference import _AttrDict, load_reference  # noqa: E402

CASES = [
    # nanodet-plus_convnext-nano_640.yml's optimizer
    {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.05, "no_norm_decay": True,
     "param_level_cfg": {"backbone": {"lr_mult": 0.1}}},
    {"name": "SGD", "lr": 0.14, "momentum": 0.9, "weight_decay": 1e-4, "no_norm_decay": True,
     "param_level_cfg": {"gfl_cls": {"lr_mult": 2.0, "decay_mult": 0.0},
                         "backbone": {"lr_mult": 0.1, "decay_mult": 3.0},
                         "head": {"decay_mult": 0.5}}},
    {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.05},
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("nanodet", help="path of a RangiLyu/nanodet checkout")
    args = p.parse_args()
    import jax
    from flax import nnx

    from nanodet_jax.config.loading import load_config
    from nanodet_jax.models import build_model
    from nanodet_jax.training.param_groups import assign, leaf_name

    ref = load_reference(args.nanodet)
    config = load_config(os.path.join(REPO, "configs", "nanodet_plus_m.py"))
    torch_model = ref.build_model(config.model.arch.to_dict())
    builder = ref.module("nanodet.optim.builder")
    params = nnx.state(build_model(config, seed=0), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {leaf_name(path): x.shape for path, x in flat}
    failed = False
    for case in CASES:
        opt = builder.build_optimizer(torch_model, _AttrDict.wrap(dict(case)))
        names = {param: name for name, param in torch_model.named_parameters()}
        theirs = {names[q]: (g["lr"], g["weight_decay"]) for g in opt.param_groups
                  for q in g["params"]}  # fmt: skip
        ours = {n: (case["lr"] * h.lr_mult, h.weight_decay)
                for n, h in assign(case, shapes, case["weight_decay"]).items()}  # fmt: skip
        differ = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
        no_decay = sum(1 for _, wd in theirs.values() if wd == 0)
        lrs = sorted({lr for lr, _ in theirs.values()})
        print(f"{case['name']} {sorted(k for k in case if k not in ('name', 'lr'))}: "
              f"{len(theirs)} parameters, {len(differ)} differ, no decay on {no_decay}, "
              f"lrs {lrs}")  # fmt: skip
        for n in differ[:10]:
            print(f"  {n}: ours {ours.get(n)} NanoDet {theirs.get(n)}")
        failed |= bool(differ)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
