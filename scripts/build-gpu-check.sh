#!/usr/bin/env bash
# Build the `gpu-check` binary with the `cuda` feature here (no GPU needed) and put a
# stripped copy in gpu-carry/, for scripts/gpu-check.sh on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-toolchain.sh
. scripts/cuda-toolchain.sh
cargo build --release -p mesh --features cuda --bin gpu-check
mkdir -p gpu-carry
strip -o gpu-carry/gpu-check target/release/gpu-check
ls -la gpu-carry/gpu-check
ldd gpu-carry/gpu-check | grep -E "cuda|cublas|curand|nvrtc|not found" || true
