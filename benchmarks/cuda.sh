#!/usr/bin/env bash
# The CUDA run in one command: minidiff vs diffusers on one GPU, ~7.5 min (benchmarks/README.md, "CUDA").
#
#   bash benchmarks/cuda.sh                          # on the GPU machine, from a plain checkout
#   bash benchmarks/cuda.sh --out-dir DIR            # JSON + profile into DIR (default benchmarks/)
#   bash benchmarks/cuda.sh --dry-run                # the whole path on CPU with a tiny model (CI)
#   bash benchmarks/cuda.sh --prepare-wheels         # here, with a registry: diffusers' wheel into .whl/
#
# Python packages: the installed environment is used when it imports torch, diffusers,
# transformers, safetensors and tokenizers. Otherwise wheels in .whl/ (made by --prepare-wheels on
# a machine with a package registry, for a GPU machine without one) are installed into a
# temporary target, and failing that `pip install -e .[test]` (needs a registry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}

if [[ "${1:-}" == "--prepare-wheels" ]]; then
    # the pinned reference (pyproject's [test] extra); pure-Python wheel, no dependencies fetched:
    # the GPU image has the rest (huggingface_hub, safetensors, numpy, Pillow, regex, requests)
    version=$(sed -n 's/.*"diffusers==\([0-9.]*\)".*/\1/p' pyproject.toml)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==$version"
    ls -l .whl
    exit 0
fi

imports="import torch, diffusers, transformers, safetensors, tokenizers"
if ! "$PY" -c "$imports" 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "cuda.sh: installing the carried wheels: $(ls .whl)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/minidiff-site .whl/*.whl
        export PYTHONPATH="/tmp/minidiff-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "cuda.sh: missing packages; installing minidiff with its test extra"
        "$PY" -m pip install -q -e ".[test]"
    fi
    "$PY" -c "$imports"
fi

export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/cuda_suite.py "$@"
