#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI wheels, for building `--features cuda` on a
# machine without a GPU or a CUDA install (CI, a laptop). Source it:
#
#   . scripts/cuda-toolchain.sh        # installs once into $MESH_CUDA_DIR, then exports
#   cargo build --release --features cuda -p mesh-node
#
# What it sets up:
# - nvcc, ptxas, headers and the runtime/cuBLAS/cuRAND/NVRTC libraries, all pinned to
#   13.0 (an unpinned nvidia-nvvm brings a newer PTX ISA that the 13.0 ptxas and the
#   580 driver reject);
# - unversioned library names (the wheels ship only libcublas.so.13 and the like) so the
#   linker's -lcublas finds them;
# - a stub libcuda.so (soname libcuda.so.1) with every cu* entry point of cuda.h, since
#   the driver library comes with a GPU driver, never with a wheel. The binary links
#   against the stub and loads the real driver wherever it runs. Here, every stub entry
#   answers CUDA_ERROR_NO_DEVICE (100), so cuda builds run as on a machine without a GPU:
#   they fall back to the CPU and skip their GPU tests with a message.
#
# Binaries built this way need libcuda.so.1 (the driver) and the CUDA 13 libraries at run
# time; scripts/gpu-check.sh finds them on a GPU machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${MESH_CUDA_DIR:-$here/target/cuda-toolchain}"
if [ ! -x "$dir/venv/bin/python" ]; then
  python3 -m venv "$dir/venv"
fi
cu="$dir/venv/lib/python3*/site-packages/nvidia/cu13"
# shellcheck disable=SC2086
if ! ls $cu/bin/nvcc >/dev/null 2>&1; then
  # --no-cache-dir: a second copy of ~1 GB of wheels in pip's cache is disk CI lacks.
  "$dir/venv/bin/python" -m pip install --quiet --no-cache-dir \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cublas==13.0.*' \
    'nvidia-cuda-nvrtc==13.0.*' 'nvidia-curand==10.4.0.*'
fi
# shellcheck disable=SC2086
cu="$(cd $cu && pwd)"
lib="$cu/lib"
for versioned in "$lib"/lib*.so.*; do
  base="${versioned%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$versioned")" "$base"
done
if [ ! -e "$lib/libcuda.so" ]; then
  # Every driver entry point cuda.h declares, after the preprocessor maps names to their
  # versioned symbols (cuMemAlloc -> cuMemAlloc_v2), as an empty function.
  gcc -E -P -I"$cu/include" "$cu/include/cuda.h" 2>/dev/null |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
    sed 's/.*/int &(void) { return 100; }/' >"$dir/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$dir/cuda_stub.c"
  ln -sf libcuda.so "$lib/libcuda.so.1"
fi
export CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu"
export PATH="$cu/bin:$PATH"
export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# Tests and binaries run here load the wheels' libraries; the stub makes every CUDA call
# fail cleanly, which is what a machine without a GPU should see.
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The GPU this project's checks run on is an H200 (sm_90); PTX for compute_90 also
# JIT-compiles on later GPUs. Override for older cards (80 = A100, 89 = L4/4090).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
