#!/usr/bin/env bash
# On the build machine (which reaches the package registry): fill .whl/ (git-ignored) with the
# wheels the lent GPU machine lacks, for its CPython 3.12 on manylinux x86-64, at the versions this
# venv runs, and print their size beside the tree's: together they must stay under 64 MiB.
#   bash loadtest/gpu_wheels.sh && bash loadtest/gpu_check.sh   # the second one there, carrying .whl
# That machine has torch, transformers, peft, accelerate, prometheus-client, httpx, pytest, anyio,
# h11, click and typing-extensions; not fastapi, starlette, pydantic, sse-starlette or uvicorn.
# bitsandbytes (about 60 MB) does not fit: the nf4 GPU test skips there when it cannot import it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NEEDED="fastapi starlette pydantic pydantic_core annotated-types typing-inspection sse-starlette uvicorn"
rm -rf .whl && mkdir -p .whl
for name in $NEEDED; do
  version=$($PY -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in $PY's venv (make setup first)"; exit 1; }
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
ls -1 .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "wheels $((wheels / 1024)) KiB + tracked tree $((tree / 1024)) KiB = $(((wheels + tree) / 1048576)) MiB (limit 64)"
[ $((wheels + tree)) -lt $((64 * 1048576)) ] || { echo "over the 64 MiB the device carries"; exit 1; }
