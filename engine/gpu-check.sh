#!/usr/bin/env bash
# GPU check of the engine node: on a host with an NVIDIA GPU, runs the golden-output check on CUDA
# and on TensorRT and prints time to first token and tokens/s per provider (engine-bench).
#
# It installs only what is carried to it, nothing from the network:
#   .whl/                     onnxruntime-gpu==1.31.1 and the NVIDIA runtime wheels it loads
#                             (cuda-runtime, cublas, cudnn, cufft, curand, nvrtc, tensorrt-libs)
#   target/release/engine-bench
#   .meridian/models/smollm2-135m-instruct/{fp32,int4}   (scripts/setup-engine)
#
# Prepare them on a machine with PyPI access:  engine/gpu-check.sh --prepare
# Then on the GPU host, in the repository root: engine/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1
WHEELS=(onnxruntime-gpu==$ORT_VERSION nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-cudnn-cu12
        nvidia-cufft-cu12 nvidia-curand-cu12 nvidia-cuda-nvrtc-cu12 tensorrt-cu12-libs)

if [ "${1:-}" = --prepare ]; then
  cargo build --release --locked -p meridian-bench --bin engine-bench
  scripts/setup-engine
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  echo "gpu-check: carry .whl, target/release/engine-bench and .meridian/models to the GPU host" >&2
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "gpu-check: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 1; }
for need in target/release/engine-bench .meridian/models/smollm2-135m-instruct/fp32 .whl; do
  [ -e "$need" ] || { echo "gpu-check: $need is missing; run engine/gpu-check.sh --prepare where PyPI is reachable" >&2; exit 1; }
done
site=/tmp/meridian-gpu-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export ORT_DYLIB_PATH
ORT_DYLIB_PATH=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -1)
# The providers' shared objects find CUDA, cuDNN and TensorRT through the loader path.
LD_LIBRARY_PATH=$(find "$site" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
echo "gpu-check: ONNX Runtime $ORT_DYLIB_PATH"

status=0
for provider in cuda tensorrt; do
  echo "== $provider"
  # An explicitly named provider that cannot start is an error (no silent CPU fallback), so a
  # broken CUDA or TensorRT install fails here instead of printing CPU numbers.
  target/release/engine-bench --provider "$provider" --golden engine/tests/golden.json \
    --python-loop off --runs 3 --tokens 128 || status=1
done
exit $status
