#!/usr/bin/env bash
# Everything memscale checks on a GPU, in one run (a few minutes on one H100/H200-class device):
#   1. the gpu and triton tests: every kind's training window with the Triton kernels against the torch paths
#      and in bf16 against fp32, the blockwise relative attention against its reference on CUDA, the Triton
#      kernels compiled (tests/test_gpu.py, tests/test_triton_kernels.py);
#   2. `memscale bench kernels --device cuda`, fp32 and bf16: each kernel against its eager reference;
#   3. `memscale bench throughput --device cuda --dtype bfloat16 --shape rmt-1b --kinds all`: tokens/s, MFU
#      against the device's bf16 peak and peak memory for every kind at a ~1B-parameter RMT shape; then xl,
#      lamemo and infinity again with FlexAttention (`model.attention=flex`) in place of the blockwise kernel.
#
#     bash tools/gpu_check.sh [OUT_DIR]        # default bench/results/gpu-<date>
#
# OUT_DIR gets gpu-check.log (the device, the versions, every step's output and exit status) and the benches'
# JSON (kernels-fp32/, kernels-bf16/, throughput-1b/, throughput-1b-flex/). Runs from the checkout without
# installing it (PYTHONPATH), so a GPU image whose Python or torch differs from the pins can run it. It needs torch with CUDA, triton, pytest,
# pyyaml, numpy, psutil, safetensors and sentencepiece (transformers for the GPT-2 row); nothing here imports
# megatron-core, DeepSpeed or webdataset. Each step has a time limit and a failed step does not stop the next;
# the exit status is 0 only if every step passed. The limits add up to 9 minutes, so the whole script fits one
# 10-minute command; STEPS="tests kernels-fp32" (names as below) runs some steps only. Set PYTHON to choose the
# interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu-$(date -u +%F)}"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "tools/gpu_check.sh: $python cannot import torch; set PYTHON to the interpreter that has torch with CUDA" >&2
  exit 2
fi
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "tools/gpu_check.sh: $python sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$python" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
} 2>&1 | tee -a "$log"

failed=0
step() { # NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    return 0
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step tests 180 "$python" -m pytest -m "gpu or triton" -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_kernels.py
step kernels-fp32 45 "$python" -m memscale.cli bench kernels --device cuda --out "$out/kernels-fp32"
step kernels-bf16 45 "$python" -m memscale.cli bench kernels --device cuda --dtype bfloat16 --out "$out/kernels-bf16"
step throughput-1b 180 "$python" -m memscale.cli bench throughput --device cuda --dtype bfloat16 --shape rmt-1b \
  --kinds all --steps 2 --rounds 1 --out "$out/throughput-1b"
step throughput-1b-flex 90 "$python" -m memscale.cli bench throughput --device cuda --dtype bfloat16 --shape rmt-1b \
  --kinds xl,lamemo,infinity --set model.attention=flex --hf off --steps 2 --rounds 1 --out "$out/throughput-1b-flex"
echo "== $failed step(s) failed; log and results in $out" | tee -a "$log"
[ "$failed" -eq 0 ]
