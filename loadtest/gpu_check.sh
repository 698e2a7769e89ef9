#!/usr/bin/env bash
# On the lent GPU machine (no network; its python3 3.12 has torch, transformers and peft): the GPU
# tests, then the benchmark on random-weight models, in under 8 minutes, offline.
#   here:   bash loadtest/gpu_wheels.sh                    # fills .whl/ (git-ignored)
#   there:  bash loadtest/gpu_check.sh   (carry .whl)      # results in $OUT or loadtest/gpu-results/
# It installs only the carried wheels (pip --no-index --target: nothing is fetched), never runs
# make setup, and needs no model download: the benchmark builds SmolLM2-135M- and Llama-8B-shaped
# models on the GPU in bf16 with random weights (loadtest/shapes.py).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-loadtest/gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/loraplex-site}
nvidia-smi -L
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$RESULTS/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import torch, transformers, peft, fastapi; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__)" | tee -a "$RESULTS/gpu.txt"
# 1. Correctness on CUDA (tiny random models against PEFT; graphs on and off; nf4 if bitsandbytes imports).
timeout 150 $PY -m pytest -q -rP -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$RESULTS/gpu-tests.txt"
# 2. Speed: the 135M shape at 32/128/256 streams, graphs on, then off at 32 (the graphs' own gain).
timeout 120 $PY -m loadtest.gpu_bench --shape smollm2-135m --streams 32,128,256 --tokens 128 \
  --out "$RESULTS/bench-135m.json" 2>&1 | tee "$RESULTS/bench-135m.txt"
timeout 60 $PY -m loadtest.gpu_bench --shape smollm2-135m --streams 32 --tokens 128 --modes base,mixed8 \
  --no-graphs --out "$RESULTS/bench-135m-eager.json" 2>&1 | tee "$RESULTS/bench-135m-eager.txt"
# 3. The 8B shape (16 GB of bf16 weights built on the GPU).
timeout 180 $PY -m loadtest.gpu_bench --shape llama-8b --streams 32,128,256 --tokens 128 \
  --modes base,one,mixed8,distinct --out "$RESULTS/bench-8b.json" 2>&1 | tee "$RESULTS/bench-8b.txt"
