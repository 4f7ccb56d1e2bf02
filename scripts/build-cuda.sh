#!/usr/bin/env bash
# Build `nvp` with CUDA (candle's `cuda` feature) on a machine that has no GPU and no
# CUDA toolkit, and collect what a GPU machine needs into dist/.
#
#   scripts/build-cuda.sh            # venv + wheels, stub libcuda, cargo build, dist/
#
# What it does
#   1. A Python venv (.venv-cuda/, git-ignored) with NVIDIA's CUDA 13.0 wheels from PyPI:
#      nvcc (+ crt, nvvm), the runtime and its headers, CCCL headers, cuBLAS, cuRAND,
#      NVRTC. They all unpack into one prefix, site-packages/nvidia/cu13/, laid out like a
#      toolkit (bin/nvcc, include/, lib/, nvvm/), which becomes CUDA_HOME. And cuDNN 9.19
#      (nvidia-cudnn-cu13, its own prefix site-packages/nvidia/cudnn/): the binary links
#      libcudnn.so.9 for its convolutions (feature `cudnn`); 9.19 is what PyTorch 2.11
#      cu130 ships, so the GPU machine's copy is the one linked against here.
#      CUDA 13.0 (not 12.x, not 13.1+) because the lent GPU machines run driver 580
#      (CUDA 13.0) and PyTorch 2.11+cu130, whose pip libraries are libcublas.so.13,
#      libcudart.so.13, libnvrtc.so.13, libcurand.so.10: the binary is linked against
#      exactly those sonames, and nvcc 13.0 emits PTX (ISA 9.0) that driver 580 can JIT.
#   2. A link folder (.venv-cuda/cuda-link/) with the unversioned names the linker wants
#      (libcublas.so -> …so.13, …) and a stub libcuda.so (soname libcuda.so.1) that
#      defines every driver-API function (each returns CUDA_ERROR_STUB_LIBRARY = 34). The
#      driver library is not on PyPI; the stub only satisfies the linker, the binary
#      records NEEDED libcuda.so.1 and the real driver provides it at run time.
#   3. cargo build --release -p nvp-cli --features cudnn (= cuda + cuDNN) into target-cuda/ (separate from
#      the CPU build in target/), CUDA_COMPUTE_CAP=90 (Hopper: candle's kernels as PTX for
#      compute_90a plus its static MoE/GGUF kernels as sm_90a code).
#   4. dist/cuda/nvp.xz (the stripped binary, xz-compressed: ~55 MB -> ~7 MB; the
#      uncompressed one is target-cuda/nvp-stripped) + dist/cuda/README (what it links),
#      the two CUDA test binaries in dist/cuda/tests/ (xz, ~6 MB each), a CIFAR-10
#      sample in dist/data/cifar10/ and the PyTorch peer in dist/peer/ (all git-ignored,
#      ~56 MB together) for scripts/gpu-check.sh on the GPU machine, which unpacks them
#      there.
#
# Environment knobs: PYTHON (python3), CUDA_COMPUTE_CAP (90), NVP_CUDA_TARGET_DIR
# (target-cuda), NVP_CIFAR_SRC (../shared/data/cifar10), NVP_PEER_SRC
# (../shared/reference/realnvp_torch.py), NVP_TRAIN_IMAGES (how many training images to
# put into the carried sample; default all of data_batch_1.bin), JOBS (cargo -j),
# NVP_CUDA_TESTS=0 (do not build the CUDA test binaries).
# Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv-cuda
TARGET_DIR=${NVP_CUDA_TARGET_DIR:-$ROOT/target-cuda}
DIST=$ROOT/dist
CIFAR_SRC=${NVP_CIFAR_SRC:-$ROOT/../shared/data/cifar10}
PEER_SRC=${NVP_PEER_SRC:-$ROOT/../shared/reference/realnvp_torch.py}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# One CUDA release: 13.0 (matches driver 580 and torch 2.11+cu130 on the GPU machines).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cudnn-cu13==9.19.0.56
)

say() { printf '\n== %s\n' "$*"; }
die() { printf 'build-cuda.sh: error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found (install Rust: rustup, stable >= 1.85)"
command -v cc >/dev/null || die "no C compiler (cc) for the libcuda stub and nvcc's host side"
command -v "$PYTHON" >/dev/null || die "no $PYTHON (set PYTHON=)"
command -v xz >/dev/null || die "no xz (Debian: apt-get install xz-utils)"

# ---------------------------------------------------------------------------- 1. wheels
say "1/4 CUDA 13.0 wheels in $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || die "python venv failed (Debian: apt-get install python3-venv)"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEELS[@]}" \
  || die "pip install of the CUDA wheels failed"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA_ROOT=$SITE/nvidia/cu13
[ -x "$CUDA_ROOT/bin/nvcc" ] || die "no nvcc at $CUDA_ROOT/bin/nvcc after pip install"
[ -f "$CUDA_ROOT/include/cuda.h" ] || die "no cuda.h in $CUDA_ROOT/include"
CUDNN_LIB=$SITE/nvidia/cudnn/lib
[ -f "$CUDNN_LIB/libcudnn.so.9" ] || die "no libcudnn.so.9 in $CUDNN_LIB after pip install"
"$CUDA_ROOT/bin/nvcc" --version | tail -2

# ------------------------------------------------------------------- 2. link folder + stub
LINK=$VENV/cuda-link
say "2/4 link folder $LINK (unversioned .so names, stub libcuda.so)"
mkdir -p "$LINK"
for pair in cudart:libcudart.so.13 cublas:libcublas.so.13 cublasLt:libcublasLt.so.13 \
            curand:libcurand.so.10 nvrtc:libnvrtc.so.13; do
  name=${pair%%:*}; file=${pair#*:}
  [ -f "$CUDA_ROOT/lib/$file" ] || die "missing $CUDA_ROOT/lib/$file"
  ln -sfn "$CUDA_ROOT/lib/$file" "$LINK/lib$name.so"
done
ln -sfn "$CUDNN_LIB/libcudnn.so.9" "$LINK/libcudnn.so"
# Driver-API names: every cu* function declared in cuda.h (raw and after the
# preprocessor, which maps e.g. cuMemAlloc -> cuMemAlloc_v2), plus every function
# cudarc's bindings call (found in the cargo registry after `cargo fetch`).
cargo fetch --locked -q || die "cargo fetch failed"
CUDARC_VER=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
[ -n "$CUDARC_VER" ] || die "cudarc not in Cargo.lock (is the cuda feature wired to candle-core/cuda?)"
CUDARC_SYS=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VER"/src/driver/sys/mod.rs 2>/dev/null | head -1 || true)
{
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$CUDA_ROOT/include/cuda.h" || true
  cc -E -P -I"$CUDA_ROOT/include" -x c "$CUDA_ROOT/include/cuda.h" 2>/dev/null \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' || true
  [ -n "$CUDARC_SYS" ] && grep -ohE 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' "$CUDARC_SYS" | sed 's/pub unsafe fn //' || true
} | sed -E 's/[[:space:]]*\($//' | sort -u > "$LINK/libcuda-stub.syms"
NSYMS=$(wc -l < "$LINK/libcuda-stub.syms")
[ "$NSYMS" -gt 300 ] || die "only $NSYMS driver-API names found for the libcuda stub"
{
  echo '/* Link-time stand-in for the NVIDIA driver library; never shipped. */'
  while read -r s; do echo "int $s(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }"; done < "$LINK/libcuda-stub.syms"
} > "$LINK/libcuda-stub.c"
cc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda-stub.c" \
  || die "compiling the libcuda stub failed"
# libcuda.so.1 is only for trying the binary here (LD_LIBRARY_PATH=$LINK): every call
# then fails with CUDA_ERROR_STUB_LIBRARY. Never carry it to the GPU machine.
ln -sfn libcuda.so "$LINK/libcuda.so.1"
echo "stub libcuda.so: $NSYMS functions (cudarc ${CUDARC_VER}${CUDARC_SYS:+, bindings scanned})"

# ------------------------------------------------------------------------------ 3. build
say "3/4 cargo build --release -p nvp-cli --features cudnn (CARGO_TARGET_DIR=$TARGET_DIR, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
export PATH=$CUDA_ROOT/bin:$PATH
export NVCC=$CUDA_ROOT/bin/nvcc
export CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDA_ROOT=$CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT
export LIBRARY_PATH=$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=$TARGET_DIR
# cudaforge (candle-kernels' build script) compiles the .cu files on half the cores by
# default; use them all (the 15 static MoE/GGUF kernel files take most of the build).
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
T0=$(date +%s)
cargo build --release --locked -p nvp-cli --features cudnn ${JOBS:+-j "$JOBS"} \
  || die "cargo build failed (see above)"
T1=$(date +%s)
BUILD_S=$((T1 - T0))
BIN=$TARGET_DIR/release/nvp
[ -x "$BIN" ] || die "no binary at $BIN"
echo "build took ${BUILD_S} s"
# The CUDA test binaries (crates/nvp-kernels/tests/cuda.rs: the convolutions;
# tests/flow_cuda.rs: the whole flow, both modes, inverse, gradients), for gpu-check.sh
# to run on the GPU against the CPU. Skipped with NVP_CUDA_TESTS=0.
TESTS=()
if [ "${NVP_CUDA_TESTS:-1}" != 0 ]; then
  T0=$(date +%s)
  TESTS_JSON=$(cargo test --release --locked -p nvp -p nvp-kernels --features nvp/cudnn,nvp-kernels/cudnn \
      --test cuda --test flow_cuda --no-run --message-format=json ${JOBS:+-j "$JOBS"}) \
    || die "building the CUDA test binaries failed (rerun without --message-format to see why)"
  while read -r name exe; do TESTS+=("$name:$exe"); done < <("$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' <<<"$TESTS_JSON")
  [ "${#TESTS[@]}" -eq 2 ] || die "expected 2 CUDA test binaries, got ${#TESTS[@]}"
  echo "CUDA test binaries (${#TESTS[@]}) built in $(( $(date +%s) - T0 )) s"
fi

# ------------------------------------------------------------------------------- 4. dist
say "4/4 dist/"
mkdir -p "$DIST/cuda" "$DIST/data/cifar10" "$DIST/peer"
# The binary is ~55 MB stripped (33 MB of it is the sm_90a code of candle's static
# MoE/GGUF kernels): too much for a ~60 MiB carry with the data sample, so dist/ holds it
# xz-compressed (~7 MB); gpu-check.sh unpacks it to dist/cuda/nvp on the GPU machine.
# The uncompressed binary stays at $BIN.
STRIPPED=$TARGET_DIR/nvp-stripped
cp "$BIN" "$STRIPPED"
strip --strip-debug "$STRIPPED" 2>/dev/null || true
rm -f "$DIST/cuda/nvp" "$DIST/cuda/nvp.xz"
xz -T0 -6 -c "$STRIPPED" > "$DIST/cuda/nvp.xz.tmp" || die "xz failed"
mv "$DIST/cuda/nvp.xz.tmp" "$DIST/cuda/nvp.xz"
rm -rf "$DIST/cuda/tests"
if [ "${#TESTS[@]}" -gt 0 ]; then
  mkdir -p "$DIST/cuda/tests"
  for t in "${TESTS[@]}"; do
    name=${t%%:*}; exe=${t#*:}
    cp "$exe" "$TARGET_DIR/$name-stripped"
    strip --strip-debug "$TARGET_DIR/$name-stripped" 2>/dev/null || true
    xz -T0 -6 -c "$TARGET_DIR/$name-stripped" > "$DIST/cuda/tests/$name.xz" || die "xz of test $name failed"
  done
fi
NEEDED=$(readelf -d "$STRIPPED" | awk '/NEEDED/ {gsub(/[][]/, "", $NF); print $NF}')
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcurand.so.10 libcudnn.so.9; do
  grep -qx "$lib" <<<"$NEEDED" || echo "warning: $lib is not NEEDED by the binary" >&2
done
LDD=$(LD_LIBRARY_PATH=$CUDA_ROOT/lib:$CUDNN_LIB ldd "$STRIPPED" 2>&1 || true)
SIZE=$(stat -c %s "$STRIPPED")
XZSIZE=$(stat -c %s "$DIST/cuda/nvp.xz")
{
  echo "nvp built with --features cudnn (CUDA + cuDNN) by scripts/build-cuda.sh"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates src Cargo.toml Cargo.lock 2>/dev/null || echo ' (+ local changes)')"
  echo "CUDA: $("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP (kernels: PTX compute_90a + sm_90a code)"
  echo "size: $SIZE bytes (debug info stripped; nvp.xz: $XZSIZE bytes); cargo build: ${BUILD_S} s"
  [ "${#TESTS[@]}" -gt 0 ] && echo "CUDA test binaries: $(cd "$DIST/cuda/tests" && ls | tr '\n' ' ')(xz; run by gpu-check.sh)"
  echo "sha256: $(sha256sum "$STRIPPED" | cut -d' ' -f1)"
  echo
  echo "NEEDED (readelf -d):"
  sed 's/^/  /' <<<"$NEEDED"
  echo
  echo "Run-time requirements: an sm_90 GPU (H100/H200), the NVIDIA driver (libcuda.so.1,"
  echo "driver >= 580 = CUDA 13.0: the PTX is ISA 9.0), and the CUDA 13 libraries"
  echo "libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13, which cuBLAS loads),"
  echo "libcurand.so.10 and libcudnn.so.9 (+ the libcudnn_*.so.9 it loads) on"
  echo "LD_LIBRARY_PATH. PyTorch cu130's pip packages have them in site-packages/nvidia/cu13/lib"
  echo "and site-packages/nvidia/cudnn/lib; scripts/gpu-check.sh finds and exports them."
  echo "Without libcuda.so.1 the binary does not start at all, not even for --device cpu"
  echo "(candle's cuda feature links the driver library)."
  echo
  echo "ldd here (build machine: no driver, CUDA libs from the build venv):"
  sed 's/^/  /' <<<"$LDD"
} > "$DIST/cuda/README"

if [ -f "$CIFAR_SRC/data_batch_1.bin" ] && [ -f "$CIFAR_SRC/test_batch.bin" ]; then
  # (the shared copies are read-only: replace, don't overwrite)
  rm -f "$DIST"/data/cifar10/{data_batch_1.bin,test_batch.bin,batches.meta.txt}
  if [ -n "${NVP_TRAIN_IMAGES:-}" ]; then
    head -c $((NVP_TRAIN_IMAGES * 3073)) "$CIFAR_SRC/data_batch_1.bin" > "$DIST/data/cifar10/data_batch_1.bin"
  else
    install -m 0644 "$CIFAR_SRC/data_batch_1.bin" "$DIST/data/cifar10/"
  fi
  install -m 0644 "$CIFAR_SRC/test_batch.bin" "$DIST/data/cifar10/"
  if [ -f "$CIFAR_SRC/batches.meta.txt" ]; then install -m 0644 "$CIFAR_SRC/batches.meta.txt" "$DIST/data/cifar10/"; fi
else
  echo "warning: no CIFAR-10 sample at $CIFAR_SRC (set NVP_CIFAR_SRC=); dist/data/cifar10 left as is" >&2
fi
if [ -f "$PEER_SRC" ]; then
  install -m 0644 "$PEER_SRC" "$DIST/peer/realnvp_torch.py"
else
  echo "warning: PyTorch peer not found at $PEER_SRC (set NVP_PEER_SRC=); part (f) of gpu-check will be skipped" >&2
fi

say "done"
cat "$DIST/cuda/README"
echo
du -sh "$DIST"/cuda "$DIST"/data "$DIST"/peer
echo "dist total: $(du -sh "$DIST" | cut -f1) — carry it to the GPU machine and run scripts/gpu-check.sh there"
