#!/usr/bin/env bash
# The GPU paths' code under another torch and triton than the pins, on CPU: before a GPU image whose versions
# differ from pyproject.toml's runs tools/gpu_check.sh, check here that nothing the GPU run imports uses an API
# its torch or triton lacks (FlexAttention's arguments, the lower-right causal bias, the Triton language).
#
#     bash tools/compat_check.sh                       # torch 2.11.0 + triton 3.6.0: the GPU image's versions
#     TORCH=2.12.0 TRITON=3.7.0 bash tools/compat_check.sh
#
# Builds a virtual environment in ${VENV:-.venv-compat} with torch==$TORCH from PyPI (a CUDA build: about 3.5 GB
# with its nvidia packages; it runs on CPU), triton==$TRITON and the packages the GPU image carries, without
# megatron-core, DeepSpeed or webdataset (the image has none; nothing the GPU run imports needs them). Then runs,
# from the checkout, the CPU tests of every path tools/gpu_check.sh exercises: FlexAttention's forward against the
# blockwise kernel, the Triton kernels under the interpreter, every kind's model and memory, the benches' CPU
# rows. Exit status: pytest's.
#
# numpy < 2.4: triton 3.6's interpreter converts one-element arrays with int(), which numpy 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars"); on a GPU the kernels are compiled, not interpreted.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${TORCH:-2.11.0}"
triton_version="${TRITON:-3.6.0}"
venv="${VENV:-.venv-compat}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
echo "tools/compat_check.sh: torch $torch_version, triton $triton_version in $venv (first run: ~3.5 GB of wheels)"
"$py" -m pip install -q "torch==$torch_version" "triton==$triton_version" "numpy<2.4" pytest pyyaml psutil \
  safetensors "sentencepiece==0.2.3" tensorboard
"$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The modules below import none of megatron-core, DeepSpeed or webdataset; test_bench is limited to the benches
# that do not train on prepared data.
exec "$py" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_flex_relative_attention.py tests/test_relative_attention.py tests/test_triton_kernels.py \
  tests/test_kernels.py tests/test_model.py tests/test_memory_xl_lamemo.py tests/test_memory_memformer_infinity.py \
  tests/test_memory_armt.py tests/test_bptt.py tests/test_bptt_sliding.py tests/test_precision.py \
  tests/test_flops.py tests/test_reference.py tests/test_gpu.py \
  tests/test_bench.py -k "not bench_long and not bench_plan and not bench_prepare"
