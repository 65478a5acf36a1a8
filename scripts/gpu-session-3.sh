#!/usr/bin/env bash
# Two GPUs: kernel checks and benchmarks against the PyTorch reference, NCCL
# through fapool against torch.distributed, the strategy equivalence checks,
# the whole model on one GPU, and the 2-GPU sweep. Everything lands in $OUT
# (logs in one archive, the tables in summary.txt).
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
B=${B:-.gpu/fapool}
L=$OUT/logs; mkdir -p $L
step() { local name=$1; shift; echo "=== $name: $*" | tee -a $OUT/summary.txt; ( "$@" ) > $L/$name.txt 2>&1; echo "exit $?" | tee -a $OUT/summary.txt; tail -n ${TAILN:-40} $L/$name.txt >> $OUT/summary.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $L/smi.txt 2>&1
TAILN=3 step check-gpu timeout 120 $B check-gpu --dtype all
step bench-kernels timeout 120 $B bench kernels --dtype bf16 --iters 10 --out $OUT/bench-kernels.h5
for bps in 1 2; do TAILN=12 step bench-decode-$bps env FAPOOL_DECODE_BLOCKS_PER_SM=$bps timeout 60 $B bench kernels --dtype bf16 --seq 4096,16384,65536 --iters 10; done
step torch-kernels timeout 180 python3 scripts/torch_reference.py kernels --out $L/torch-kernels.json
step verify-bf16 timeout 240 mpirun -np 2 $B verify jobs/gpu-verify-bf16.toml --tolerance 2e-2 --teacher-forcing
step model timeout 200 mpirun -np 1 $B run jobs/gpu-1-model.toml --out $OUT/model.h5
TAILN=80 step model-analyze $B analyze $OUT/model.h5
step sweep timeout 400 mpirun -np 2 $B run jobs/gpu-2.toml --out $OUT/gpu-2.h5
TAILN=120 step sweep-analyze $B analyze $OUT/gpu-2.h5
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo DONE
