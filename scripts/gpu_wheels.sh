#!/usr/bin/env bash
# The wheels scripts/gpu_check.py needs on a GPU machine that has torch but cannot download:
# pydantic (launcher's config), DeepSpeed (check zero2) and torchao (check float8), for Python 3.12 on x86-64 Linux,
# into .whl/ (git-ignored). Run it here, with the venv active (DeepSpeed's wheel is built
# from its source, whose setup.py imports torch):
#
#     . .venv/bin/activate && scripts/gpu_wheels.sh
#
# and there, from the repository root:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# What the GPU image already holds (einops, msgpack, ninja, numpy, packaging, psutil,
# py-cpuinfo, PyYAML, safetensors, scikit-learn, torch, tqdm) is not fetched. typing-extensions
# is, because pydantic wants a newer one than an image may have.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=.whl

# One version of each: two versions of a package in .whl stop the whole install there.
WHEELS=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    hjson==3.1.0             # DeepSpeed's config parser
    torchao==0.18.0          # precision=float8 (check float8; abi3, torch >= 2.11)
)
DEEPSPEED=deepspeed==0.19.8  # published as source only: built into a wheel here

rm -rf "$OUT"
mkdir -p "$OUT"
for spec in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$OUT" "$spec"
done

# DeepSpeed builds no C++ ops by default (DS_BUILD_OPS=0): they compile on first use, and the
# ZeRO-2 check uses none (launcher hands DeepSpeed a torch optimizer). The wheel is pure
# Python (py3-none-any), so building it with this machine's Python and torch is fine.
if "$PYTHON" -c "import torch" 2>/dev/null; then
    src=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$DEEPSPEED"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$src"/deepspeed-*.tar.gz
    rm -rf "$src"
else
    echo "no torch in $PYTHON: DeepSpeed's wheel cannot be built (activate the venv); check zero2 will be skipped" >&2
fi

ls -l "$OUT"
du -sh "$OUT"
