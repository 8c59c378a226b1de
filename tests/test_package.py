"""The package's shape: no import cycles, no side effects at import, stable entry points."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "nanodet_jax")


def module_files() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (imports inside functions
    are deferred on purpose and cannot form an import-time cycle)."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        edges = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` imports the submodule (pkg itself only as
                # its parent, which Python allows while pkg is still initialising).
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "nanodet_jax.weights.checkpoint" in graph
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_importing_every_module_has_no_side_effects():
    """Importing the whole package leaves XLA_FLAGS and the rest of the environment as they
    were, initialises no JAX backend, and ``import nanodet_jax`` alone does not import JAX."""
    names = sorted(m for m in module_files() if not m.endswith("__main__"))
    script = f"""
import importlib, json, os, sys
flags = os.environ.get("XLA_FLAGS")
import nanodet_jax
light = "jax" not in sys.modules
# Third-party imports have their own effects (cv2 extends LD_LIBRARY_PATH): taken first.
for dep in ("cv2", "jax", "flax.nnx", "optax", "orbax.checkpoint", "grain", "onnx"):
    importlib.import_module(dep)
before = dict(os.environ)
for name in {names!r}:
    importlib.import_module(name)
from jax._src import xla_bridge
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
same_flags = os.environ.get("XLA_FLAGS") == flags
print(json.dumps({{"light": light, "changed": changed, "flags": same_flags,
                   "backends": xla_bridge.backends_are_initialized()}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"light": True, "changed": [], "flags": True, "backends": False}


def test_stable_entry_points():
    import nanodet_jax
    from nanodet_jax.models import build_model
    from nanodet_jax.weights.pytorch import load_torch_weights

    assert nanodet_jax.build_model is build_model
    assert nanodet_jax.convert.load_torch_weights is load_torch_weights
    assert callable(nanodet_jax.load_config)
