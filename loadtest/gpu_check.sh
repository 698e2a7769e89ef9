#!/usr/bin/env bash
# On a machine with CUDA: the GPU-marked tests, then the benchmark comparison, in one go (< 8 min).
#   bash loadtest/gpu_check.sh            # results in loadtest/gpu-results.json, ratios printed
# Sets up the venv first if needed (make setup installs the CUDA build of torch when nvidia-smi works).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L
make setup promtool >/dev/null
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('device:', torch.cuda.get_device_name(0))"
timeout 240 $PY -m pytest -q -m gpu tests/test_gpu.py
# bf16 is the GPU's dtype; one interleaved round keeps it inside the time box.
timeout 300 $PY -m loadtest.compare --dtype bfloat16 --rounds 1 --scaling --out loadtest/gpu-results.json
