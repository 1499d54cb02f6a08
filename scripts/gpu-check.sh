#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and its driver, and no Rust or network:
#
#   scripts/gpu-check.sh [gpu-check flags]      # e.g. --device cuda:1, --skip-decode
#
# It runs a `gpu-check` binary built elsewhere with scripts/build-gpu-check.sh (carried
# gzipped in gpu-carry/, or named by MESH_GPU_CHECK_BIN) and prints one table: each kernel against
# its CPU reference, the transformers fixtures on the GPU, a 3-node loopback mesh on the
# GPU against the CPU's tokens, and batch-1 decode of TinyLlama-1.1B and Llama-3-8B
# shapes in bf16 against the bandwidth floor. The table is also written to
# $OUT/gpu-check.md when OUT is set. Exit status: 0 all passed, 1 a check failed,
# 2 no usable GPU, 127 libraries missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MESH_GPU_CHECK_BIN:-}"
if [ -z "$bin" ]; then
  [ -f gpu-carry/gpu-check.gz ] || {
    echo "no gpu-carry/gpu-check.gz: build it with scripts/build-gpu-check.sh" >&2
    exit 127
  }
  bin="${TMPDIR:-/tmp}/mesh-gpu-check.bin"
  gunzip -c gpu-carry/gpu-check.gz >"$bin"
  chmod +x "$bin"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true

# The binary needs the CUDA 13 runtime libraries (cuBLAS, cuRAND, runtime) beside the
# driver's libcuda.so.1. Take them from the system when ldconfig knows them, else from any
# Python's nvidia wheels (PyTorch brings them).
need=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13)
extra=""
for lib in "${need[@]}"; do
  if ldconfig -p 2>/dev/null | grep -q "$lib"; then continue; fi
  found="$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib" -print 2>/dev/null | head -n 1)"
  if [ -n "$found" ]; then
    case ":$extra:" in *":$(dirname "$found"):"*) ;; *) extra="$extra:$(dirname "$found")" ;; esac
  else
    echo "missing $lib (install the CUDA 13 runtime, or pip install nvidia-cublas nvidia-curand nvidia-cuda-runtime ==13.0.*)" >&2
  fi
done
export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$bin" | grep -q "not found"; then
  ldd "$bin" | grep "not found" >&2
  exit 127
fi

out_args=()
[ -n "${OUT:-}" ] && out_args=(--out "$OUT/gpu-check.md")
echo "== gpu-check"
RUST_BACKTRACE=1 timeout "${MESH_GPU_CHECK_TIMEOUT:-360}" "$bin" "${out_args[@]}" "$@"
