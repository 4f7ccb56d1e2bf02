#!/usr/bin/env bash
# One prepared check of the CUDA build on a GPU machine (driver + PyTorch, no Rust,
# no CUDA toolkit needed), run from the repository root, within ~9.5 minutes:
#
#   bash scripts/gpu-check.sh 2>&1 | tee gpu-check.log
#
# Needs what scripts/build-cuda.sh put into dist/ (git-ignored, carried along):
#   dist/cuda/nvp.xz                    the binary built with --features cudnn (sm_90),
#                                       xz-compressed; unpacked here to dist/cuda/nvp
#   dist/cuda/tests/{cuda,flow_cuda}.xz the CUDA test binaries (unpacked likewise)
#   dist/data/cifar10/{data_batch_1,test_batch}.bin   CIFAR-10 sample
#   dist/peer/realnvp_torch.py          the PyTorch peer (for part f)
# and on the machine: nvidia-smi + the driver (libcuda.so.1), a python3 with torch
# whose pip packages hold the CUDA 13 libraries (nvidia/cu13/lib: cuBLAS, cuRAND,
# NVRTC, cudart) and cuDNN 9 (nvidia/cudnn/lib).
#
# Parts (each under `timeout`, each prints its wall time; one hang cannot eat the
# budget, and a part that would not fit in what is left is shortened or skipped):
#   a  nvidia-smi
#   b  LD_LIBRARY_PATH from python's site-packages; ldd must resolve everything
#   t  the CUDA test binaries: cuDNN / candle convolutions (values, dx, dw, db) and the
#      whole flow (both modes, inverse, gradients) on the GPU against the CPU in f64
#   c  exactness on the GPU: a tiny CIFAR model trained 20 steps on cuda, then test
#      bits/dim of that checkpoint on cuda with strict FP32 convolutions (NVP_TF32=0)
#      vs on cpu (same images, same noise: must agree to 1e-4 relative), on cuda with
#      TF32 (the default, reported), and sampling on cuda. Should training on cuda
#      fail with the defaults, it is retried with NVP_CUDNN_BN=0, then NVP_CUDNN=0,
#      and the first that works is kept for the rest of the check (said loudly)
#   d  nvp bench, configs/cifar10.toml and configs/cifar10-small.toml, on cuda (cuDNN,
#      TF32, cuDNN batch norm); cifar10 training with the opt-in GPU switches
#      (NVP_RESNET_OPS, NVP_CUDA_KEEP_FREED, NVP_CUDNN_BIAS, NVP_WEIGHT_NORM_OP,
#      NVP_CUDNN_BLEND) all on
#      and one at a time, then the defaults again; then cifar10-small training again with strict FP32
#      cuDNN (NVP_TF32=0), with algorithms chosen by timing (NVP_CUDNN_BENCHMARK=1),
#      with candle's batch norm (NVP_CUDNN_BN=0),
#      with candle's convolution ops (NVP_CUDNN=0; in this build candle's own conv2d
#      forward goes through cuDNN too, its backward is candle's: conv_transpose2d for
#      the input gradient, a direct kernel for the weight gradient) and with those plus
#      the input gradient by conv2d (NVP_DX_AS_CONV=1)
#   f  the PyTorch peer's bench on the same GPU (scripts/torch_peer_cuda.py)
#   p  (GPU_CHECK_PROFILE=1) GPU time by kernel in a window of cifar10 training (ncu)
#   e  a short training run (cifar10-small, 2 minutes) on cuda, then test bpd
#   g  ratios ours / PyTorch; for each bench of d and f, the most GPU memory in use
#      (nvidia-smi every 100 ms), so that NVP_WEIGHT_NORM_OP's saving shows
# (f runs before e so that the two benches are back to back and the ratios exist even
# if the training run is cut short.)
#
# Knobs: GPU_CHECK_PROFILE=1 (part p: GPU time by kernel name in a window of cifar10
# training, by ncu; PROFILE_BATCH, PROFILE_SKIP, PROFILE_COUNT, PROFILE_ENV),
# GPU_CHECK_ONLY_EXACTNESS=1 (stop after part c), GPU_CHECK_AB=0 (skip the
# cifar10-small A/B runs of part d, not those of the opt-in switches), GPU_CHECK_B256=1
# (also cifar10 training at batch 256: nvp with the defaults and with the opt-in
# switches on, and the peer), GPU_CHECK_BUDGET_S (total seconds, default 560), TRAIN_MINUTES (2), PY
# (python3), NVP (dist/cuda/nvp), DATA (dist/data/cifar10), PEER
# (dist/peer/realnvp_torch.py), WORK (a fresh /tmp folder), BENCH_WARMUP (3),
# BENCH_STEPS (20), BENCH_REPS (3), TORCH_TF32 (default|on|off: PyTorch's default lets
# cuDNN convolutions use TF32; candle's f32 GEMMs do not). If $OUT is a folder (the device tool sets it),
# summary.json, the sample grids and metrics.csv are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET=${GPU_CHECK_BUDGET_S:-560}
TRAIN_MINUTES=${TRAIN_MINUTES:-2}
PY=${PY:-python3}
NVP=${NVP:-dist/cuda/nvp}
DATA=${DATA:-dist/data/cifar10}
PEER=${PEER:-dist/peer/realnvp_torch.py}
WARM=${BENCH_WARMUP:-3}; STEPS=${BENCH_STEPS:-20}; REPS=${BENCH_REPS:-3}
WORK=${WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK"
START=$(date +%s.%N)
declare -A STATUS=()
ORDER=()

elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%.0f", n - s }'; }
left() { echo $((BUDGET - $(elapsed))); }
hdr() { printf '\n==================== %s   [t=%ss]\n' "$*" "$(elapsed)"; }

# run_part NAME CAP_SECONDS CMD...: stdout -> $WORK/NAME.out (and the terminal),
# stderr -> the terminal; the cap is cut to what is left of the budget. While a
# benchmark part (d_bench_*, f_torch_*) runs, nvidia-smi samples the GPU memory in use
# every 100 ms into $WORK/NAME.mem (MiB; what the process's CUDA memory pool holds), and
# the summary prints the most.
run_part() {
  local name=$1 cap=$2; shift 2
  local l; l=$(left)
  ORDER+=("$name")
  if (( l < 10 )); then
    echo "---- [$name] SKIPPED: only ${l}s of the ${BUDGET}s budget left"
    STATUS[$name]=skipped; return 0
  fi
  (( cap > l )) && cap=$l
  echo "---- [$name] (timeout ${cap}s) $*"
  local t0 rc=0 sampler=""
  case $name in
    d_bench_*|f_torch_*)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
        > "$WORK/$name.mem" 2>/dev/null &
      sampler=$! ;;
  esac
  t0=$(date +%s.%N)
  timeout -k 5 "$cap" "$@" > >(tee "$WORK/$name.out") || rc=$?
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi
  sleep 0.2   # let tee finish
  local w; w=$(awk -v s="$t0" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  if (( rc == 0 )); then STATUS[$name]="ok ${w}s"
  elif (( rc == 124 || rc == 137 )); then STATUS[$name]="TIMEOUT after ${w}s"
  else STATUS[$name]="FAILED rc=$rc after ${w}s"; fi
  echo "---- [$name] ${STATUS[$name]}"
  return 0
}

# json FILE KEY: the value of KEY in the last JSON line of FILE (empty if none).
json() {
  [ -f "$1" ] || return 0
  "$PY" - "$1" "$2" <<'EOF' 2>/dev/null || true
import json, sys
val = None
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        try:
            val = json.loads(line).get(sys.argv[2], val)
        except Exception:
            pass
print("" if val is None else val)
EOF
}

# ---------------------------------------------------------------------------------- checks
hdr "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); work folder $WORK; budget ${BUDGET}s"
NVP_XZ=${NVP_XZ:-dist/cuda/nvp.xz}
if [ -f "$NVP_XZ" ] && { [ ! -x "$NVP" ] || [ "$NVP_XZ" -nt "$NVP" ]; }; then
  echo "unpacking $NVP_XZ -> $NVP"
  "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2] + ".tmp", "wb"))' "$NVP_XZ" "$NVP" \
    && chmod +x "$NVP.tmp" && mv "$NVP.tmp" "$NVP" || { echo "error: cannot unpack $NVP_XZ" >&2; exit 2; }
fi
[ -x "$NVP" ] || { echo "error: no executable $NVP (run scripts/build-cuda.sh on the build machine and carry dist/)" >&2; exit 2; }
for f in data_batch_1.bin test_batch.bin; do
  [ -f "$DATA/$f" ] || { echo "error: $DATA/$f missing (carry dist/data/cifar10)" >&2; exit 2; }
done
TEST_BINS=()
for t in dist/cuda/tests/*.xz; do
  [ -f "$t" ] || continue
  b=${t%.xz}
  if [ ! -x "$b" ] || [ "$t" -nt "$b" ]; then
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2] + ".tmp", "wb"))' "$t" "$b" \
      && chmod +x "$b.tmp" && mv "$b.tmp" "$b" || { echo "error: cannot unpack $t" >&2; exit 2; }
  fi
  TEST_BINS+=("$b")
done
command -v "$PY" >/dev/null || { echo "error: no $PY" >&2; exit 2; }
[ -f dist/cuda/README ] && sed -n '1,4p' dist/cuda/README

# ---------------------------------------------------------------------------------- a
hdr "a. GPU"
run_part a_smi 20 nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

# ---------------------------------------------------------------------------------- b
hdr "b. CUDA libraries from python site-packages -> LD_LIBRARY_PATH"
LIBDIRS=$(timeout 60 "$PY" - <<'EOF' || true
import glob, os, site, sysconfig
roots = []
def add(r):
    if r and os.path.isdir(r) and r not in roots:
        roots.append(r)
try:
    import torch  # the site-packages that holds torch first
    add(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
for r in site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]:
    add(r)
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))) + \
             sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib64"))):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)
# A toolkit, if the machine has one, as a fallback after the pip libraries.
for d in ${CUDA_HOME:+"$CUDA_HOME/lib64"} /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  if [ -d "$d" ]; then LIBDIRS=${LIBDIRS:+$LIBDIRS:}$d; fi
done
export LD_LIBRARY_PATH=${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
LDD=$(ldd "$NVP" 2>&1 || true)
grep -E 'libcuda|libcudart|libcublas|libcurand|libnvrtc|libcudnn|libstdc|not found' <<<"$LDD" | sed 's/^/  /'
if grep -qi "not found" <<<"$LDD"; then
  echo "error: ldd $NVP: libraries not found (above). Point LD_LIBRARY_PATH at the CUDA 13 libraries" >&2
  echo "       (libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13)" >&2
  echo "       and cuDNN 9 (libcudnn.so.9 and its libcudnn_*.so.9) and rerun." >&2
  exit 3
fi
echo "ldd: every library resolved"
"$NVP" --version

# ---------------------------------------------------------------------------------- t
hdr "t. CUDA test binaries (GPU vs CPU f64)"
if [ "${#TEST_BINS[@]}" -eq 0 ]; then
  echo "SKIPPED: no dist/cuda/tests/*.xz (build-cuda.sh with NVP_CUDA_TESTS=0?)"
fi
for b in "${TEST_BINS[@]}"; do
  run_part "t_$(basename "$b")" 120 "$b" --test-threads=1 --nocapture
done

# ---------------------------------------------------------------------------------- c
hdr "c. exactness on the GPU (tiny model: cuda vs cpu)"
DATA_ABS=$(cd "$DATA" && pwd)
cat > "$WORK/tiny.toml" <<EOF
# written by scripts/gpu-check.sh: a tiny CIFAR-10 Real NVP for the exactness check
name = "gpu-check-tiny"
[data]
dataset = "cifar10"
path = "$DATA_ABS"
flip = true
alpha = 0.05
test-limit = 500
[model]
channels = 3
height = 32
width = 32
scales = 2
res-blocks = 1
features = 16
[train]
batch-size = 64
max-steps = 20
eval-every = 1000
samples = 16
seed = 0
EOF
TINY=$WORK/tiny
run_part c_train_tiny_cuda 120 "$NVP" train --config "$WORK/tiny.toml" --out "$TINY" --device cuda --max-steps 20
# Should the cuDNN paths fail on this GPU, fall back (cuDNN batch norm off, then all of
# cuDNN off) for the rest of the check rather than lose the session's measurements.
if [[ ${STATUS[c_train_tiny_cuda]} != ok* ]]; then
  for fallback in NVP_CUDNN_BN=0 NVP_CUDNN=0; do
    echo "WARNING: training on cuda failed; retrying with $fallback (and keeping it for the rest of the check)"
    TINY=$WORK/tiny-${fallback%%=*}
    run_part "c_train_tiny_cuda_${fallback%%=*}" 120 env "$fallback" "$NVP" train --config "$WORK/tiny.toml" --out "$TINY" --device cuda --max-steps 20
    if [[ ${STATUS[c_train_tiny_cuda_${fallback%%=*}]} == ok* ]]; then export "${fallback?}"; break; fi
  done
fi
run_part c_eval_tiny_cuda 60 env NVP_TF32=0 "$NVP" eval --ckpt "$TINY" --device cuda --json --limit 500 --check-inverse
run_part c_eval_tiny_cuda_tf32 60 "$NVP" eval --ckpt "$TINY" --device cuda --json --limit 500 --check-inverse
run_part c_eval_tiny_cpu 90 "$NVP" eval --ckpt "$TINY" --device cpu --json --limit 500 --check-inverse
run_part c_sample_tiny_cuda 60 "$NVP" sample --ckpt "$TINY" --device cuda --n 64 --temperature 0.7 --out "$WORK/samples-tiny.png"
BPD_GPU=$(json "$WORK/c_eval_tiny_cuda.out" bpd)
BPD_CPU=$(json "$WORK/c_eval_tiny_cpu.out" bpd)
EXACT=$("$PY" - "$BPD_GPU" "$BPD_CPU" <<'EOF'
import sys
try:
    g, c = float(sys.argv[1]), float(sys.argv[2])
except ValueError:
    print("UNKNOWN (an eval failed)"); sys.exit()
rel = abs(g - c) / abs(c)
print(f"{'PASS' if rel <= 1e-4 else 'FAIL'}: bpd cuda (FP32 convolutions) {g:.7f} vs cpu {c:.7f}, relative difference {rel:.2e} (tolerance 1e-4)")
EOF
)
echo "exactness: $EXACT"
echo "bpd cuda with TF32 convolutions (the default): $(json "$WORK/c_eval_tiny_cuda_tf32.out" bpd)"
echo "inverse max |f^-1(f(y)) - y| (logit space, 500 test images): cuda $(json "$WORK/c_eval_tiny_cuda.out" inverse_max_abs_error) (TF32: $(json "$WORK/c_eval_tiny_cuda_tf32.out" inverse_max_abs_error)), cpu $(json "$WORK/c_eval_tiny_cpu.out" inverse_max_abs_error)"
if [ "${GPU_CHECK_ONLY_EXACTNESS:-0}" = 1 ]; then
  echo "GPU_CHECK_ONLY_EXACTNESS=1: stopping after part c (total $(elapsed)s)"
  exit 0
fi

# ---------------------------------------------------------------------------------- d
hdr "d. nvp bench on cuda"
BENCH_ARGS=(--device cuda --json --batch 64 --warmup "$WARM" --steps "$STEPS" --eval-batch 256 --eval-reps "$REPS" --sample-n 64 --sample-reps "$REPS")
run_part d_bench_paper 150 "$NVP" bench --config configs/cifar10.toml "${BENCH_ARGS[@]}"
run_part d_bench_small 90 "$NVP" bench --config configs/cifar10-small.toml "${BENCH_ARGS[@]}"
AB_ARGS=(--device cuda --json --batch 64 --warmup "$WARM" --steps "$STEPS" --eval-reps 0 --sample-reps 0)
# The opt-in GPU switches (off by default until measured: written in sessions 10 and
# 11 without a GPU run after them), all on and one at a time: the s/t networks as one
# autograd node with a written-out backward (NVP_RESNET_OPS), the memory pool keeping
# freed memory (NVP_CUDA_KEEP_FREED), the convolution's bias by cuDNN (NVP_CUDNN_BIAS),
# weight normalisation's closed-form backward (NVP_WEIGHT_NORM_OP), the running averages
# by cuDNN (NVP_CUDNN_BLEND). The CUDA tests (part t) check their values first. Each
# bench JSON has the training step's autograd graph size (graph_nodes).
SWITCHES=(NVP_RESNET_OPS NVP_CUDA_KEEP_FREED NVP_CUDNN_BIAS NVP_WEIGHT_NORM_OP NVP_CUDNN_BLEND)
ALL_ON=(); for v in "${SWITCHES[@]}"; do ALL_ON+=("$v=1"); done
run_part d_bench_paper_new 60 env "${ALL_ON[@]}" "$NVP" bench --config configs/cifar10.toml "${AB_ARGS[@]}"
run_part d_bench_small_new 60 env "${ALL_ON[@]}" "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
for v in "${SWITCHES[@]}"; do
  run_part "d_bench_paper_only_$v" 60 env "$v=1" "$NVP" bench --config configs/cifar10.toml "${AB_ARGS[@]}"
done
# NVP_RESNET_OPS=1 also packs each s/t network's parameters into one variable (20
# parameter tensors for cifar10 instead of 890) and its running statistics into two
# (40 buffer tensors instead of 360); this run keeps them separate, so that the
# packing's own share shows against d_bench_paper_only_NVP_RESNET_OPS.
run_part d_bench_paper_ops_unpacked 60 env NVP_RESNET_OPS=1 NVP_PACK_PARAMS=0 "$NVP" bench --config configs/cifar10.toml "${AB_ARGS[@]}"
# The defaults again, after the others (the machine's drift shows against the first).
run_part d_bench_paper_again 60 "$NVP" bench --config configs/cifar10.toml "${AB_ARGS[@]}"
if [ "${GPU_CHECK_B256:-0}" = 1 ]; then
  B256=(--device cuda --json --batch 256 --warmup "$WARM" --steps "$STEPS" --eval-reps 0 --sample-reps 0 --phase-steps 0)
  run_part d_bench_paper_b256 60 "$NVP" bench --config configs/cifar10.toml "${B256[@]}"
  run_part d_bench_paper_b256_new 60 env "${ALL_ON[@]}" "$NVP" bench --config configs/cifar10.toml "${B256[@]}"
fi
# A/B, cifar10-small training only: strict FP32 cuDNN; candle's convolution ops (its
# conv2d is cuDNN's forward in this build; its backward is candle's own); the same with
# the input gradient by conv2d.
if [ "${GPU_CHECK_AB:-1}" = 1 ]; then
run_part d_bench_small_fp32 60 env NVP_TF32=0 "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
run_part d_bench_small_timed 60 env NVP_CUDNN_BENCHMARK=1 "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
run_part d_bench_small_nobn 60 env NVP_CUDNN_BN=0 "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
run_part d_bench_small_candle 40 env NVP_CUDNN=0 "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
run_part d_bench_small_dx 40 env NVP_CUDNN=0 NVP_DX_AS_CONV=1 "$NVP" bench --config configs/cifar10-small.toml "${AB_ARGS[@]}"
echo "cifar10-small training img/s: cuDNN+TF32 (default) $(json "$WORK/d_bench_small.out" train_img_per_s), cuDNN FP32 $(json "$WORK/d_bench_small_fp32.out" train_img_per_s), cuDNN timed algorithms $(json "$WORK/d_bench_small_timed.out" train_img_per_s), candle batch norm $(json "$WORK/d_bench_small_nobn.out" train_img_per_s), candle $(json "$WORK/d_bench_small_candle.out" train_img_per_s), candle+dx-as-conv $(json "$WORK/d_bench_small_dx.out" train_img_per_s)"
fi

# ---------------------------------------------------------------------------------- f
hdr "f. PyTorch peer on the same GPU (scripts/torch_peer_cuda.py)"
if [ -f "$PEER" ]; then
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0))' || true
  TORCH_ARGS=(--peer "$PEER" --data "$DATA" --device cuda --warmup "$WARM" --train-steps "$STEPS" --eval-reps "$REPS" --sample-reps "$REPS" --tf32 "${TORCH_TF32:-default}")
  run_part f_torch_paper 120 "$PY" scripts/torch_peer_cuda.py "${TORCH_ARGS[@]}" --configs paper
  run_part f_torch_small 90 "$PY" scripts/torch_peer_cuda.py "${TORCH_ARGS[@]}" --configs small
  if [ "${GPU_CHECK_B256:-0}" = 1 ]; then
    run_part f_torch_paper_b256 90 "$PY" scripts/torch_peer_cuda.py "${TORCH_ARGS[@]}" --configs paper --train-batch 256 --eval-reps 1 --sample-reps 1
  fi
else
  echo "SKIPPED: no PyTorch peer at $PEER"
fi

# ---------------------------------------------------------------------------------- p
# GPU time by kernel (GPU_CHECK_PROFILE=1): Nsight Compute times each kernel in a window
# of cifar10 training steps at batch PROFILE_BATCH (256). ncu serialises and replays
# every kernel it profiles (a whole step did not finish in 170 s in session 10), so only
# a window: PROFILE_COUNT (1500) kernels after the first PROFILE_SKIP (20000: past the
# start-up's parameter initialisation and into the bench's warm-up step), summed by
# kernel name. PROFILE_ENV: switches for the profiled run (e.g. "NVP_RESNET_OPS=1").
if [ "${GPU_CHECK_PROFILE:-0}" = 1 ]; then
  hdr "p. GPU time by kernel (ncu, a window of cifar10 training)"
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [ -x "$NCU" ]; then
    # shellcheck disable=SC2086  # PROFILE_ENV is a list of VAR=value words
    run_part p_ncu 150 env ${PROFILE_ENV:-} "$NCU" --csv --metrics gpu__time_duration.sum \
      --launch-skip "${PROFILE_SKIP:-20000}" --launch-count "${PROFILE_COUNT:-1500}" \
      "$NVP" bench --config configs/cifar10.toml --device cuda --json --batch "${PROFILE_BATCH:-256}" \
      --warmup 1 --steps 1 --phase-steps 0 --eval-reps 0 --sample-reps 0
    "$PY" - "$WORK/p_ncu.out" <<'EOF' || true
import csv, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1], errors="replace") if l.startswith('"')]
scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
by_name, count = defaultdict(float), defaultdict(int)
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1.0)
    name = r["Kernel Name"].split("(")[0][:70]
    by_name[name] += v
    count[name] += 1
total = sum(by_name.values())
print(f"{sum(count.values())} kernels profiled, {total * 1e3:.2f} ms of GPU time; by name:")
for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {t / total * 100:5.1f} %  {t * 1e3:8.3f} ms  {count[name]:5d}x  mean {t / count[name] * 1e6:8.1f} us  {name}")
EOF
  else
    echo "SKIPPED: no ncu on PATH or at /usr/local/cuda/bin/ncu"
  fi
fi

# ---------------------------------------------------------------------------------- e
hdr "e. short training run on cuda (cifar10-small, ${TRAIN_MINUTES} min) + test bpd"
# Fit the run into what is left: startup, the final checkpoint and the eval need ~60 s.
MIN=$("$PY" -c "import sys; l=int(sys.argv[1]); m=float(sys.argv[2]); print(f'{max(0.0, min(m, (l - 75) / 60)):.2f}')" "$(left)" "$TRAIN_MINUTES")
if awk -v m="$MIN" 'BEGIN { exit !(m >= 0.25) }'; then
  if awk -v m="$MIN" -v t="$TRAIN_MINUTES" 'BEGIN { exit !(m < t) }'; then
    echo "note: training shortened to $MIN min to fit the budget"
  fi
  CAP=$(awk -v m="$MIN" 'BEGIN { printf "%d", m * 60 + 60 }')
  run_part e_train_small "$CAP" "$NVP" train --config configs/cifar10-small.toml --data "$DATA" --out "$WORK/small" --device cuda --minutes "$MIN"
  run_part e_eval_small 60 "$NVP" eval --ckpt "$WORK/small" --device cuda --limit 2000 --json
  run_part e_sample_small 30 "$NVP" sample --ckpt "$WORK/small" --device cuda --n 64 --temperature 0.7 --out "$WORK/samples-small-T0.7.png"
  [ -f "$WORK/small/metrics.csv" ] && { echo "metrics.csv (head/tail):"; head -3 "$WORK/small/metrics.csv"; tail -3 "$WORK/small/metrics.csv"; }
else
  if awk -v t="$TRAIN_MINUTES" 'BEGIN { exit !(t == 0) }'; then echo "SKIPPED: TRAIN_MINUTES=0"
  else echo "SKIPPED: only $(left)s left"; fi
  ORDER+=(e_train_small); STATUS[e_train_small]=skipped
fi

# ---------------------------------------------------------------------------------- g
hdr "g. summary and ratios ours / PyTorch"
"$PY" - "$WORK" "$EXACT" <<'EOF'
import json, os, sys
work, exact = sys.argv[1], sys.argv[2]
def last_json(name):
    p = os.path.join(work, name + ".out")
    val = None
    if os.path.exists(p):
        for line in open(p):
            line = line.strip()
            if line.startswith("{"):
                try:
                    val = json.loads(line)
                except Exception:
                    pass
    return val
def gpu_mem(name):
    """The most GPU memory in use (MiB) nvidia-smi saw while part `name` ran."""
    p = os.path.join(work, name + ".mem")
    vals = []
    if os.path.exists(p):
        for line in open(p):
            try:
                vals.append(int(line.strip().split()[0]))
            except (ValueError, IndexError):
                pass
    return max(vals) if vals else None
summary = {"exactness": exact}
print(f"exactness (tiny model, test bpd cuda vs cpu): {exact}")
print()
print(f"{'config':<14}{'metric':<10}{'nvp cuda':>12}{'torch cuda':>12}{'ours/torch':>12}")
for cfg, ours_f, torch_f in (("cifar10", "d_bench_paper", "f_torch_paper"),
                             ("cifar10-small", "d_bench_small", "f_torch_small")):
    o, t = last_json(ours_f), last_json(torch_f)
    summary[cfg] = {"nvp": o, "torch": t}
    for m in ("train", "eval", "sample"):
        k = m + "_img_per_s"
        ov = o.get(k) if o else None
        tv = t.get(k) if t else None
        r = ov / tv if ov and tv else None
        fmt = lambda v: f"{v:12.1f}" if isinstance(v, (int, float)) else f"{'-':>12}"
        print(f"{cfg:<14}{m:<10}{fmt(ov)}{fmt(tv)}{(f'{r:12.3f}' if r else f'{chr(45):>12}')}")
        summary[cfg][k + "_ratio"] = r
print("(img/s; train batch 64, eval batch 256, 64 samples; medians)")
for cfg, ours_f, torch_f in (("cifar10", "d_bench_paper", "f_torch_paper"),
                             ("cifar10-small", "d_bench_small", "f_torch_small")):
    mo, mt = gpu_mem(ours_f), gpu_mem(torch_f)
    summary[cfg]["gpu_mem_mib"] = {"nvp": mo, "torch": mt}
    if mo or mt:
        print(f"{cfg}: GPU memory in use, most seen over the bench (train, eval, sample): nvp {mo} MiB, torch {mt} MiB")
for cfg, ours_f, torch_f in (("cifar10", "d_bench_paper", "f_torch_paper"),
                             ("cifar10-small", "d_bench_small", "f_torch_small")):
    for who, o in (("nvp", last_json(ours_f)), ("torch", last_json(torch_f))):
        if o and o.get("train_forward_s") is not None:
            print(f"{who:<5} {cfg} training step phases (synchronised): forward {o['train_forward_s']:.4f} s, "
                  f"backward {o['train_backward_s']:.4f} s, update {o['train_update_s']:.4f} s"
                  + (f" (conv {o.get('conv')}, batch norm {o.get('batch_norm')})" if who == "nvp" else ""))
ab = {}
for name, label in (("d_bench_small", "cuDNN + TF32 (default)"), ("d_bench_small_fp32", "cuDNN, strict FP32"),
                    ("d_bench_small_timed", "cuDNN, algorithms timed"),
                    ("d_bench_small_nobn", "cuDNN conv, candle batch norm"),
                    ("d_bench_small_candle", "candle's conv ops (NVP_CUDNN=0)"),
                    ("d_bench_small_dx", "candle, dx by conv2d")):
    o = last_json(name)
    if o:
        ab[name] = {"conv": o.get("conv"), "batch_norm": o.get("batch_norm"), "train_img_per_s": o.get("train_img_per_s")}
        print(f"cifar10-small training, {label:<32} [{o.get('conv')}, bn {o.get('batch_norm')}]: {o.get('train_img_per_s'):9.1f} img/s")
summary["cifar10_small_training_ab"] = ab
changes = {}
for name, label in (("d_bench_paper", "cifar10, batch 64, defaults"),
                    ("d_bench_paper_new", "cifar10, batch 64, the five opt-in switches on"),
                    ("d_bench_paper_only_NVP_RESNET_OPS", "cifar10, batch 64, NVP_RESNET_OPS=1"),
                    ("d_bench_paper_ops_unpacked", "cifar10, batch 64, the same, NVP_PACK_PARAMS=0"),
                    ("d_bench_paper_only_NVP_CUDA_KEEP_FREED", "cifar10, batch 64, NVP_CUDA_KEEP_FREED=1"),
                    ("d_bench_paper_only_NVP_CUDNN_BIAS", "cifar10, batch 64, NVP_CUDNN_BIAS=1"),
                    ("d_bench_paper_only_NVP_WEIGHT_NORM_OP", "cifar10, batch 64, NVP_WEIGHT_NORM_OP=1"),
                    ("d_bench_paper_only_NVP_CUDNN_BLEND", "cifar10, batch 64, NVP_CUDNN_BLEND=1"),
                    ("d_bench_paper_again", "cifar10, batch 64, defaults, again"),
                    ("d_bench_small", "cifar10-small, batch 64, defaults"),
                    ("d_bench_small_new", "cifar10-small, batch 64, the five on"),
                    ("d_bench_paper_b256", "cifar10, batch 256, defaults"),
                    ("d_bench_paper_b256_new", "cifar10, batch 256, the five on"),
                    ("f_torch_paper_b256", "PyTorch cifar10, batch 256")):
    o = last_json(name)
    if o:
        changes[name] = o.get("train_img_per_s")
        nodes = o.get("graph_nodes")
        changes[name + "_graph_nodes"] = nodes
        mem = gpu_mem(name)
        changes[name + "_gpu_mem_mib"] = mem
        print(f"training {label:<45}: {o.get('train_img_per_s'):9.1f} img/s"
              + (f", {nodes} graph nodes" if nodes else "")
              + (f", {o.get('param_tensors')} parameter tensors" if o.get('param_tensors') else "")
              + (f", GPU memory up to {mem} MiB" if mem else ""))
summary["opt_in_switches"] = changes
tests = {}
for f in sorted(os.listdir(work)):
    if f.startswith("t_") and f.endswith(".out"):
        res = [l.strip() for l in open(os.path.join(work, f)) if l.startswith("test result:")]
        tests[f[2:-4]] = res[-1] if res else "no result (crashed or timed out)"
        print(f"CUDA tests {f[2:-4]}: {tests[f[2:-4]]}")
summary["cuda_tests"] = tests
e = last_json("e_eval_small")
if e:
    print(f"\nshort training run (cifar10-small): test bpd {e.get('bpd'):.4f} ± {e.get('stderr') or float('nan'):.4f} on {e.get('images')} images")
    summary["short_run_eval"] = e
mpath = os.path.join(work, "small", "metrics.csv")
if os.path.exists(mpath):
    rows = open(mpath).read().strip().splitlines()
    print(f"metrics.csv: {len(rows) - 1} rows; last: {rows[-1]}")
    summary["short_run_last_metrics_row"] = rows[-1]
    summary["short_run_metrics_header"] = rows[0]
json.dump(summary, open(os.path.join(work, "summary.json"), "w"), indent=1)
EOF
echo
echo "part status:"
for n in "${ORDER[@]}"; do printf '  %-22s %s\n' "$n" "${STATUS[$n]:-?}"; done
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp -f "$WORK/summary.json" "$OUT/" 2>/dev/null || true
  cp -f "$WORK/samples-tiny.png" "$WORK/samples-small-T0.7.png" "$OUT/" 2>/dev/null || true
  cp -f "$WORK/small/metrics.csv" "$OUT/metrics-small.csv" 2>/dev/null || true
  [ -f "$WORK/small/bpd.png" ] && cp -f "$WORK/small/bpd.png" "$OUT/bpd-small.png"
  echo "copied summary.json, sample grids and metrics to \$OUT"
fi
echo "total wall time: $(elapsed)s (budget ${BUDGET}s); work folder $WORK"
