#!/usr/bin/env bash
# tools/fetch_cuda.sh — fetch the CUDA toolkit pieces that `cargo build --features cuda` needs
# (nvcc, headers, the libraries candle links against) as NVIDIA's wheels from PyPI, lay them
# out as a CUDA_HOME tree under tools/.work/cuda/home, check that nvcc compiles for sm_90, and
# print the environment to export. Idempotent: a second run reuses what is there.
#
#   tools/fetch_cuda.sh            # fetch, lay out, check, print the exports
#   eval "$(tools/fetch_cuda.sh --env)"   # only print the exports (after a first run)
#
# Why CUDA 13.0: candle 0.11 links cuBLAS, cuBLASLt, cuRAND, NVRTC and the runtime dynamically
# (cudarc's `dynamic-linking`), so the binary needs those libraries, of the major version it
# was built against, on the GPU machine. cuBLASLt alone is hundreds of MB, too big to carry, so
# the build must match the GPU machine's own install: CUDA 13.0 (nvcc 13.0, driver 580).
# The sonames carry the major version only, so any 13.x install serves the binary.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${VITRINE_CUDA_WORK:-$ROOT/tools/.work/cuda}
PY=${PYTHON:-python3}
HOME_DIR=$WORK/home

# Exact pins: CUDA 13.0 update 2 (nvcc 13.0.88), the versions pip installs together.
PINS=(
  nvidia-cuda-nvcc==13.0.88    # bin/nvcc, ptxas, fatbinary, nvlink, cudafe++
  nvidia-cuda-crt==13.0.88     # include/crt (host_config.h, ...), split out of nvcc in 13.0
  nvidia-nvvm==13.0.88         # nvvm/bin/cicc, nvvm/libdevice, libnvvm
  nvidia-cuda-runtime==13.0.96 # include/cuda*.h, libcudart.so.13
  nvidia-cuda-cccl==13.0.85    # include/cuda/std, cub, thrust (used by some candle kernels)
  nvidia-cuda-nvrtc==13.0.88   # libnvrtc.so.13 (link time)
  nvidia-curand==10.4.0.35     # libcurand.so.10 (link time)
  nvidia-cublas==13.0.2.14     # libcublas.so.13, libcublasLt.so.13 (link time)
)

print_env() {
  cat <<EOF
export CUDA_HOME=$HOME_DIR
export CUDA_PATH=$HOME_DIR
export PATH=$HOME_DIR/bin:\$PATH
export LD_LIBRARY_PATH=$HOME_DIR/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=90
EOF
}

if [[ ${1:-} == --env ]]; then
  [[ -x $HOME_DIR/bin/nvcc ]] || { echo "run tools/fetch_cuda.sh first" >&2; exit 1; }
  print_env
  exit 0
fi

stamp=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)
if [[ -f $WORK/site/.stamp && $(cat "$WORK/site/.stamp") == "$stamp" ]]; then
  echo "wheels already installed ($WORK/site)" >&2
else
  mkdir -p "$WORK/wheels"
  echo "downloading ${#PINS[@]} wheels into $WORK/wheels (about 650 MB the first time)" >&2
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK/wheels" "${PINS[@]}"
  rm -rf "$WORK/site"
  "$PY" -m pip install --quiet --no-deps --no-index --find-links "$WORK/wheels" \
    --target "$WORK/site" "${PINS[@]}"
  echo "$stamp" >"$WORK/site/.stamp"
fi

# link TARGET NAME: make NAME a symlink to TARGET unless it already is one (a rerun must not
# pull the tree from under a build that is using it).
link() { [[ $(readlink "$2" 2>/dev/null) == "$1" ]] || ln -sfn "$1" "$2"; }

# The wheels all unpack into site/nvidia/cu13, which is already CUDA_HOME-shaped
# (bin/, include/, lib/, nvvm/); give it the names build scripts look for.
link "$WORK/site/nvidia/cu13" "$HOME_DIR"
link lib "$HOME_DIR/lib64"
lib=$HOME_DIR/lib
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
  [[ -e $lib/$so ]] || { echo "missing $lib/$so" >&2; exit 1; }
  link "$so" "$lib/${so%.so.*}.so"
done

# libcuda comes with the driver, not the toolkit, and no wheel ships it. Link against a stub
# (soname libcuda.so.1, so the real driver library is loaded at run time) whose every entry
# point returns CUDA_ERROR_STUB_LIBRARY (34). With the stub on LD_LIBRARY_PATH a cuda build
# also starts on a machine without a driver, and falls back to the CPU.
stub=$lib/stubs/libcuda.so
if [[ ! -f $stub || $0 -nt $stub ]]; then
  mkdir -p "$lib/stubs"
  gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I "$HOME_DIR/include" "$HOME_DIR/include/cuda.h" |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
    sed 's/.*/int &(void) { return 34; }/' >"$lib/stubs/libcuda_stub.c"
  # Also the versioned names cuda.h maps to (cuCtxCreate -> cuCtxCreate_v4, ...).
  gcc -E -dM -I "$HOME_DIR/include" "$HOME_DIR/include/cuda.h" |
    awk '$1 == "#define" && $2 ~ /^cu[A-Z]/ && $3 ~ /^cu[A-Z][A-Za-z0-9_]*$/ {print $3}' | sort -u |
    sed 's/.*/int &(void) { return 34; }/' >>"$lib/stubs/libcuda_stub.c"
  sort -u -o "$lib/stubs/libcuda_stub.c" "$lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stub" "$lib/stubs/libcuda_stub.c"
  link libcuda.so "$lib/stubs/libcuda.so.1"
fi

# Check: nvcc runs and builds sm_90 machine code and PTX.
check=$WORK/check
mkdir -p "$check"
cat >"$check/axpy.cu" <<'EOF'
#include <cuda_fp16.h>
extern "C" __global__ void axpy(float a, const float *x, float *y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + __half2float(__float2half(y[i]));
}
EOF
export PATH=$HOME_DIR/bin:$PATH
nvcc --version | tail -2 >&2
nvcc -arch=sm_90 -cubin -o "$check/axpy.cubin" "$check/axpy.cu"
nvcc -arch=sm_90 -ptx -o "$check/axpy.ptx" "$check/axpy.cu"
echo "nvcc ok: $(stat -c %s "$check/axpy.cubin") byte sm_90 cubin, $(grep -c . "$check/axpy.ptx") line PTX" >&2

echo "# paste into your shell, or: eval \"\$(tools/fetch_cuda.sh --env)\"" >&2
print_env
