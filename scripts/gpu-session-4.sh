#!/usr/bin/env bash
# Two GPUs: the 2-GPU sweep of jobs/gpu-2.toml and its analysis.
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
B=${B:-.gpu/fapool}
timeout 500 mpirun -np 2 $B run jobs/gpu-2.toml --out $OUT/gpu-2.h5 > $OUT/sweep.txt 2>&1; echo "sweep exit $?"
$B analyze $OUT/gpu-2.h5 > $OUT/sweep-analyze.txt 2>&1
grep -E "^(baseline|fapool)|^-- " $OUT/sweep-analyze.txt
