#!/usr/bin/env bash
# Interleaved benchmark of `nvp bench` against the PyTorch peer
# (../shared/reference/realnvp_torch.py) on this machine, same architecture,
# same batch sizes and protocol. Prints per-run figures, medians and ratios.
#
#   scripts/bench-vs-pytorch.sh [small|paper|64] [RUNS] [AUTOCAST]
#
# small, paper: the CIFAR-10 configs (cifar10-small.toml, cifar10.toml) on real test
# images. 64: the 64x64 architecture (imagenet64.toml = celeba64 = lsun-*: 5 scales,
# 2 blocks, 32 features; 63 M parameters) through scripts/torch_peer_64.py, which runs
# the peer's own bench on it; evaluation at batch 64 there (EBATCH) to bound memory.
#
# AUTOCAST = none (PyTorch FP32 eager, default) or bf16 (PyTorch's AMX path:
# torch.autocast('cpu', dtype=torch.bfloat16) around the s/t networks).
# PRECISION = f32 (default) or bf16: nvp's training precision (`nvp bench
# --precision`; bf16 needs a CPU with AVX512-BF16; evaluation and sampling stay f32).
# Needs: a release build of nvp (cargo build --release -p nvp-cli) and a Python
# with torch, numpy and pillow: PY=/path/to/venv/bin/python (default python3).
# Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=${1:-small}
RUNS=${2:-3}
AUTOCAST=${3:-none}
PY=${PY:-python3}
PEER=${PEER:-../shared/reference/realnvp_torch.py}
DATA=${DATA:-../shared/data/cifar10}
NVP=${NVP:-target/release/nvp}
PRECISION=${PRECISION:-f32}
PEER_CMD=("$PY" "$PEER")
case "$CFG" in
  small) TOML=configs/cifar10-small.toml ;;
  paper) TOML=configs/cifar10.toml ;;
  64) TOML=configs/imagenet64.toml; PEER_CMD=("$PY" scripts/torch_peer_64.py --peer "$PEER") ;;
  *) echo "config must be small, paper or 64" >&2; exit 2 ;;
esac
EBATCH=${EBATCH:-$([ "$CFG" = 64 ] && echo 64 || echo 256)}
[ -x "$NVP" ] || { echo "build first: cargo build --release -p nvp-cli" >&2; exit 2; }
[ -f "$PEER" ] || { echo "PyTorch peer not found at $PEER (set PEER=)" >&2; exit 2; }
"$PY" -c "import torch" 2>/dev/null || { echo "no torch in $PY (set PY=)" >&2; exit 2; }
OUT=${OUT:-target/bench-vs-pytorch/$CFG-$AUTOCAST-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
# Same protocol on both sides: batch 64 training (warm-up then timed steps),
# batch 256 evaluation (64 for the 64x64 model), 64 samples; medians.
WARM=${WARM:-3}; STEPS=${STEPS:-20}; EREPS=${EREPS:-3}; SREPS=${SREPS:-3}
for i in $(seq 1 "$RUNS"); do
  echo "== run $i/$RUNS: nvp ($PRECISION)"
  "$NVP" bench --config "$TOML" --batch 64 --warmup "$WARM" --steps "$STEPS" --eval-batch "$EBATCH" \
    --eval-reps "$EREPS" --sample-n 64 --sample-reps "$SREPS" --precision "$PRECISION" --json | tee "$OUT/nvp-$i.json"
  echo "== run $i/$RUNS: pytorch ($AUTOCAST)"
  env MALLOC_MMAP_THRESHOLD_=34359738368 MALLOC_TRIM_THRESHOLD_=34359738368 \
    "${PEER_CMD[@]}" --threads 2 --autocast "$AUTOCAST" --data "$DATA" bench --config "$CFG" \
    --warmup "$WARM" --train-steps "$STEPS" --eval-batch "$EBATCH" --eval-reps "$EREPS" --sample-reps "$SREPS" \
    --json "$OUT/torch-$i.json" > "$OUT/torch-$i.log" 2>&1
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'params':d['params'],'train_img_per_s':d['train']['img_per_s'],'eval_img_per_s':d['eval']['img_per_s'],'sample_img_per_s':d['sample']['img_per_s'],'peak_rss_mib':d['maxrss_mib_after_train']}))" "$OUT/torch-$i.json"
done
"$PY" - "$OUT" "$RUNS" <<'PYEOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
ours = [json.load(open(f"{out}/nvp-{i}.json")) for i in range(1, runs + 1)]
theirs = [json.load(open(f"{out}/torch-{i}.json")) for i in range(1, runs + 1)]
med = statistics.median
rows = [
    ("train img/s", [o["train_img_per_s"] for o in ours], [t["train"]["img_per_s"] for t in theirs]),
    ("eval img/s", [o["eval_img_per_s"] for o in ours], [t["eval"]["img_per_s"] for t in theirs]),
    ("sample img/s", [o["sample_img_per_s"] for o in ours], [t["sample"]["img_per_s"] for t in theirs]),
    ("peak RSS MiB (train)", [o["peak_rss_train_mib"] for o in ours], [t["maxrss_mib_after_train"] for t in theirs]),
]
print(f"\nparameters: nvp {ours[0]['params']:,}  pytorch {theirs[0]['params']:,}")
# Two summaries: the ratio of the medians, and the median of the per-round ratios (each
# round's pair ran back to back, so it is less exposed to the machine's drift).
print(f"{'metric':<22}{'nvp (median)':>14}{'pytorch (median)':>18}{'ratio of medians':>18}{'median ratio':>14}   per-run ratios")
for name, a, b in rows:
    ratios = [x / y for x, y in zip(a, b)]
    per = " ".join(f"{r:.2f}" for r in ratios)
    print(f"{name:<22}{med(a):>14.2f}{med(b):>18.2f}{med(a) / med(b):>18.2f}{med(ratios):>14.2f}   {per}")
print(f"(raw JSON in {out})")
PYEOF
