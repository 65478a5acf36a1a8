#!/usr/bin/env bash
# The test command: installs what is missing, then builds and runs every test
# (unit tests, and the MPI tests that launch fapool under mpirun on the CPU
# backend with up to 8 oversubscribed ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# NVRTC (the CUDA 13.0 series the GPU machines run), so the kernel compile
# test builds every .cu file (sm_90a included) without a GPU or CUDA toolkit.
nvrtc="$HOME/.cache/fapool/nvrtc-13.0"
if [ ! -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc" "nvidia-cuda-nvrtc==13.0.88" ||
    echo "test.sh: NVRTC could not be installed; the kernel compile test will say it skipped" >&2
fi
export LD_LIBRARY_PATH="$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# mpirun refuses root unless told; oversubscription lets 8 ranks share 2 cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build --all-targets
log=$(mktemp)
status=0
cargo test --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
