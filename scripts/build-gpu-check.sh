#!/usr/bin/env bash
# Build the `gpu-check` binary with the `cuda` feature here (no GPU needed) and put a
# stripped, gzipped copy in gpu-carry/, for scripts/gpu-check.sh on a GPU machine.
# Gzipped because candle's precompiled CUDA kernels alone are 33 MB of the 69 MB binary;
# compressed it is about 20 MB, well inside what a device run can carry.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-toolchain.sh
. scripts/cuda-toolchain.sh
cargo build --release -p mesh --features cuda --bin gpu-check
mkdir -p gpu-carry
strip -o gpu-carry/gpu-check.stripped target/release/gpu-check
ldd gpu-carry/gpu-check.stripped | grep -E "cuda|cublas|curand|nvrtc|not found" || true
gzip -9 -c gpu-carry/gpu-check.stripped >gpu-carry/gpu-check.gz
rm gpu-carry/gpu-check.stripped
ls -la gpu-carry/
