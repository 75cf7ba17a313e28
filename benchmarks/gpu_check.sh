#!/usr/bin/env bash
# adamix on a machine with one GPU, in one go of at most 8 minutes: the CUDA tests, then
# benchmarks/gpu_check.py (time per block at width 4096, a 7B and 70B projection, CPU-vs-GPU agreement).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]
#
# Needs a preinstalled torch (CUDA build), transformers, scipy and safetensors; adamix comes from src/
# (no install). pytest is optional (without it the CUDA tests are left out, and it says so).
# Writes OUT_DIR/gpu_check.json (step by step), gpu_check_tests.txt and gpu_check_env.txt.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [options]}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch, transformers, scipy, safetensors, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'scipy', scipy.__version__, 'numpy', numpy.__version__)"
  nproc
} 2>&1 | tee "$out/gpu_check_env.txt"
if python -c "import pytest" 2>/dev/null; then
  timeout 150 python -m pytest -q -p no:cacheprovider tests/compression/test_device.py 2>&1 | tail -25 | tee "$out/gpu_check_tests.txt"
else
  echo "pytest is not installed here: the CUDA tests were left out" | tee "$out/gpu_check_tests.txt"
fi
timeout 330 python benchmarks/gpu_check.py --out "$out" --work "${ADAMIX_GPU_WORK:-$(mktemp -d)}" "$@"
