#!/usr/bin/env bash
# One GPU: kernels against the CPU, kernel benchmarks, the PyTorch reference
# and the whole model, in one call (outputs under $OUT).
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
B=${B:-.gpu/fapool}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee $OUT/smi.txt
$B env 2>&1 | tee $OUT/env.txt
timeout 150 $B check-gpu --dtype all 2>&1 | tee $OUT/check-gpu.txt
timeout 120 $B bench kernels --dtype bf16 --iters 10 --out $OUT/bench-kernels.h5 2>&1 | tee $OUT/bench-kernels.txt
timeout 150 python3 scripts/torch_reference.py kernels --out $OUT/torch-kernels.json 2>&1 | tail -60 > $OUT/torch-kernels.txt
timeout 150 mpirun -np 1 $B run jobs/gpu-1-model.toml --out $OUT/model.h5 2>&1 | tee $OUT/model.txt
$B analyze $OUT/model.h5 > $OUT/model-analyze.txt 2>&1
echo DONE
