#!/usr/bin/env bash
# The test command: installs what is missing, then builds and runs every test
# (unit tests, and the MPI tests that launch fapool under mpirun on the CPU
# backend with up to 8 oversubscribed ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
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
