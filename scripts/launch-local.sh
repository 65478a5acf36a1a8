#!/usr/bin/env bash
# Runs a job on this workstation: one MPI rank per visible NVIDIA GPU, or,
# without a GPU, CPU ranks sharing the cores. Arguments go to `fapool run`.
#
#   bash scripts/launch-local.sh jobs/gpu-2.toml
#   bash scripts/launch-local.sh jobs/quickstart.toml --backend cpu --set workload.sequences_per_category=4
#
# Settings, from the environment:
#   FAPOOL_BIN    the fapool binary (default: target/release/fapool)
#   FAPOOL_RANKS  how many ranks (default: one per visible GPU, else 4, the
#                 quickstart job's size); a job needs the ranks its
#                 strategies use, which may be fewer than the GPUs
set -euo pipefail

bin=${FAPOOL_BIN:-target/release/fapool}
[ -x "$bin" ] || {
  echo "launch-local: no fapool binary at $bin (cargo build --release, or set FAPOOL_BIN)" >&2
  exit 2
}
(($#)) || {
  echo "usage: $0 JOB.toml [fapool run arguments...]" >&2
  exit 2
}

# Visible GPUs: CUDA_VISIBLE_DEVICES narrows what nvidia-smi lists, so it
# wins where set (an empty value hides every GPU).
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  gpus=${#visible[@]}
elif command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

mpi=()
if [ "$gpus" -gt 0 ]; then
  ranks=${FAPOOL_RANKS:-$gpus}
  # fapool binds each rank to the GPU of its node-local rank.
  echo "launch-local: $ranks ranks on $gpus visible GPUs"
else
  ranks=${FAPOOL_RANKS:-4}
  # More ranks than cores is fine for the tiny model on the CPU backend.
  mpi+=(--oversubscribe)
  echo "launch-local: no GPU visible; $ranks CPU ranks"
fi

# NVLink SHARP (multicast) collectives need a fabric manager set-up that
# workstations rarely have.
export NCCL_NVLS_ENABLE=0
# Open MPI refuses to start as root (containers often are) unless told.
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

exec mpirun "${mpi[@]}" -np "$ranks" -x NCCL_NVLS_ENABLE "$bin" run "$@"
