#!/usr/bin/env bash
# The main job: installs what is missing, builds fapool, runs the quickstart
# job and prints the analysis. With two or more NVIDIA GPUs it runs the
# dense-4l GPU job on two of them (one rank per GPU: baseline TP=2 against FA
# Pool); with one GPU, dense-4l's baseline at TP=1 on it (jobs/gpu-1.toml);
# otherwise the tiny model on 4 CPU ranks.
#
#   bash scripts/quickstart.sh          # install, build, run, analyze
#   bash scripts/quickstart.sh --plan   # only print the run command it would use
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -ge 2 ]; then
  plan=(mpirun -np 2 target/release/fapool run jobs/gpu-2.toml)
elif [ "$gpus" -eq 1 ]; then
  plan=(mpirun -np 1 target/release/fapool run jobs/gpu-1.toml)
else
  plan=(mpirun -np 4 target/release/fapool run jobs/quickstart.toml --backend cpu)
fi
if [ "${1:-}" = "--plan" ]; then
  echo "${plan[*]}"
  exit 0
fi

bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export NCCL_NVLS_ENABLE=0
cargo build --release
mkdir -p results
out="results/quickstart-$(date -u +%Y%m%dT%H%M%SZ).h5"
"${plan[@]}" --out "$out"
target/release/fapool analyze "$out" --plots "${out%.h5}-plots"
target/release/fapool check "$out" || echo "fapool check found problems in $out (listed above)"
