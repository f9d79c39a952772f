#!/usr/bin/env bash
# GPU check in about five minutes: the conformance suite on CUDA for torch and JAX, then
# the full-scale benchmarks (ResNet-18 on CIFAR shapes at batch 128, a 4x512 transformer)
# for torch and JAX on CUDA.  Needs torch with CUDA, jax[cuda12] and this package installed
# (pip install -e .), PyHessian/curvlinops/BackPACK optionally on PYTHONPATH.
# Writes under $OUT when set (else benchmarks/results/gpu-check): the two logs, nvidia-smi,
# and the benchmark's JSON + markdown (also written after every model, so a time limit
# keeps what was measured).  Exit status: the conformance suite's, or the benchmark's.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/results/gpu-check}
mkdir -p "$out"
export OPENBLAS_NUM_THREADS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, jax; assert torch.cuda.is_available(), 'torch has no CUDA'; print(torch.cuda.get_device_name(), jax.devices())" 2>&1 | tee "$out/devices.txt"

# 1. Conformance on CUDA.  The suite has no device option: JAX uses its default device (the GPU),
#    torch tensors follow torch's default device, which the pytest plugin cuda_default_device sets.
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" timeout 120 \
    python -m multihess.conformance --backend torch --backend jax -p cuda_default_device -q 2>&1 | tail -n 60 | tee "$out/conformance-cuda.txt"
conformance=${PIPESTATUS[0]}

# 2. Full-scale benchmarks on CUDA, torch and JAX (TensorFlow is the CPU build here).
timeout 200 python "$here/run.py" --device cuda --scale full --frameworks torch jax --repeats 5 \
    --out "$out" --tag cuda-full 2>&1 | tee "$out/benchmarks-cuda-full.txt"
bench=${PIPESTATUS[0]}
echo "conformance exit $conformance, benchmarks exit $bench" | tee -a "$out/devices.txt"
[ "$conformance" -eq 0 ] && exit "$bench"
exit "$conformance"
