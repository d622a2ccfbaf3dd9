#!/usr/bin/env bash
# The project's test command (README): installs a pinned nvcc from PyPI into a
# cache folder (scripts/cuda-toolchain.sh; about 340 MB once), then runs every
# test of the workspace with the `ptx` feature, so the CUDA kernels are
# compiled to PTX and executed under the ptx-emu emulator. Extra arguments go
# to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolchain.sh)"
exec cargo test --workspace --release --features ptx "$@"
