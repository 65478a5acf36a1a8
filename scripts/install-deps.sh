#!/usr/bin/env bash
# Installs what fapool needs to build and run on Debian/Ubuntu: an MPI,
# libhdf5, libclang (for the MPI bindings), pkg-config, a C toolchain, Python
# with h5py and pandas (tests read results files with them) and NumPy (the
# cross-checks' NumPy model), Graphviz (the planner's SVG DAGs), and Rust if
# it is missing. Plots need no system font: the binary embeds its own.
set -euo pipefail

need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || need+=(libopenmpi-dev)
dpkg -s libhdf5-dev >/dev/null 2>&1 || need+=(libhdf5-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
dpkg -s python3-h5py >/dev/null 2>&1 || need+=(python3-h5py python3-numpy)
# The NumPy model the cross-checks compare with (scripts/numpy_reference.py).
dpkg -s python3-numpy >/dev/null 2>&1 || need+=(python3-numpy)
dpkg -s python3-pandas >/dev/null 2>&1 || need+=(python3-pandas)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
# Open MPI's launcher looks for an ssh agent even for ranks on one node.
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v pkill >/dev/null 2>&1 || need+=(procps)
# `fapool plan --dot` renders DAGs to SVG with Graphviz's `dot`.
command -v dot >/dev/null 2>&1 || need+=(graphviz)

if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    :
  else
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
# The test command also checks formatting and lints.
if command -v rustup >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
