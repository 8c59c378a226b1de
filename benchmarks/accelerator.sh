#!/usr/bin/env bash
# The accelerator check (benchmarks/accelerator.py) on a machine without a package index.
#
#   benchmarks/accelerator.sh download [PYTHON_VERSION]   # here, with the index: fill .wheels/
#   benchmarks/accelerator.sh run [accelerator.py options] # there, from the checkout's root
#
# download: one wheel per distribution our code imports for the check that is not jax,
#   jaxlib, numpy, torch or their own dependencies (the list is computed by importing the
#   check, at the versions installed here). PYTHON_VERSION (e.g. 3.12, the target's
#   `python3 -c 'import sys; print(sys.version[:4])'`) fetches manylinux x86_64 binary
#   wheels for that interpreter; without it, wheels for this interpreter.
# run: installs the wheels of .wheels/ whose distribution is not already installed into
#   .wheels/site (--no-index --no-deps: nothing is fetched), puts the checkout and
#   .wheels/site on PYTHONPATH (no `pip install -e .` needed) and runs the check with an
#   8-minute limit, writing results/accelerator/accelerator.{md,json} unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
PY=${PYTHON:-python3}

case "${1:-}" in
download)
  mkdir -p "$WHEELS"
  target=()
  if [[ -n "${2:-}" ]]; then
    target=(--only-binary=:all: --python-version "$2" --platform manylinux2014_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
  fi
  # What the target machine brings (jax 0.11 + CUDA plugin, torch, torchvision) and the
  # standard dependencies of those; everything else the check imports travels.
  specs=$(PYTHONPATH=.:benchmarks "$PY" - <<'EOF'
import importlib.metadata as md
import sys

sys.argv = ["accelerator.py"]
import accelerator  # noqa: F401,E402 -- the check's module-level imports
import tools.grad_precision_checks  # noqa: F401,E402 -- imported by its full run
import tools.reference  # noqa: F401,E402

PRESENT = {"jax", "jaxlib", "ml_dtypes", "numpy", "opt_einsum", "scipy", "torch",
           "torchvision", "setuptools", "typing_extensions", "filelock", "nanodet-jax"}
dists = md.packages_distributions()
names = {d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])}
for name in sorted(names):
    if name not in PRESENT and not name.lower().startswith(("nvidia", "jax-cuda", "jax_cuda")):
        print(f"{name}=={md.version(name)}")
EOF
)
  echo "downloading into $WHEELS: $(echo $specs | tr '\n' ' ')"
  # shellcheck disable=SC2086
  pip download --no-deps "${target[@]}" -d "$WHEELS" $specs
  ;;
run)
  shift
  mkdir -p "$WHEELS/site"
  missing=()
  for whl in "$WHEELS"/*.whl; do
    [[ -e "$whl" ]] || continue
    dist=$(basename "$whl" | cut -d- -f1)
    if ! PYTHONPATH="$WHEELS/site" "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
      missing+=("$whl")
    fi
  done
  if ((${#missing[@]})); then
    echo "installing ${#missing[@]} wheels into $WHEELS/site"
    "$PY" -m pip install --no-index --no-deps --target "$WHEELS/site" "${missing[@]}"
  fi
  export PYTHONPATH="$PWD:$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
  out=()
  [[ " $* " == *" --out "* ]] || out=(--out results/accelerator)
  exec timeout 480 "$PY" benchmarks/accelerator.py "${out[@]}" "$@"
  ;;
*)
  sed -n 2,15p "$0"
  exit 2
  ;;
esac
