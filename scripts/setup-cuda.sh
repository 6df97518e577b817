#!/usr/bin/env bash
# A CUDA 13 toolkit from PyPI wheels in third_party/cuda, for `cargo build --features cuda` on a
# machine with no CUDA install (no GPU needed to build). Prints the environment to export.
#
#   scripts/setup-cuda.sh && eval "$(scripts/setup-cuda.sh --env)"
#   cargo build --release --features cuda --target-dir target-cuda
#
# What it holds: nvcc + cicc + ptxas (candle-kernels compiles its .cu files to PTX), the CUDA and
# CCCL headers, and cuBLAS / cuBLASLt / cuRAND / NVRTC / cudart shared libraries for the linker
# (cudarc links them dynamically). libcuda.so comes with the driver, not the toolkit: the build
# links against a stub with the driver's symbol names (from cudarc's bindings), and the binary
# loads the real libcuda.so.1 where it runs. CUDA_COMPUTE_CAP (default 90: H100/H200) picks the
# PTX target when no GPU is present to ask.
#
# Where it runs, the CUDA 13 libraries must be on the loader path (a PyTorch cu13 install has
# them under site-packages/nvidia/cu13/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=third_party/cuda
ROOT=$PWD/$DEST/x/nvidia/cu13
if [ "${1:-}" = "--env" ]; then
    echo "export CUDA_ROOT=$ROOT CUDA_HOME=$ROOT PATH=$ROOT/bin:\$PATH CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} RUSTFLAGS=\"-L $PWD/$DEST/stub\""
    exit 0
fi
mkdir -p "$DEST/wheels" "$DEST/x" "$DEST/stub"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand"
for w in "$DEST"/wheels/*.whl; do unzip -qo "$w" -d "$DEST/x"; done
chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/*
# Unversioned names for the linker.
(cd "$ROOT/lib" && for l in cublas cublasLt curand nvrtc cudart; do
    t=$(ls lib$l.so.* | head -1) && ln -sf "$t" lib$l.so
done)
# The driver stub: every cu* entry point cudarc binds, with libcuda's soname.
bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -1)
if [ -z "$bindings" ]; then
    echo "cudarc sources not found: run 'cargo fetch' first" >&2
    exit 1
fi
grep -o 'fn cu[A-Za-z0-9_]*' "$bindings" | awk '{print $2}' | sort -u |
    awk '{print "void " $1 "(void) {}"}' > "$DEST/stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEST/stub/libcuda.so" "$DEST/stub/cuda_stub.c"
"$ROOT/bin/nvcc" --version | tail -1
echo "ready: eval \"\$($0 --env)\"; cargo build --release --features cuda --target-dir target-cuda"
