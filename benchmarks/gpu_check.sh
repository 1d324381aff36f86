#!/usr/bin/env bash
# The prepared GPU check (a few minutes on one H100/H200): the benchmarks of docs/benchmarks.md on a 0.5B model built
# from a config (Qwen2.5-0.5B's shape, no hub), in bf16, with LoRA and with QLoRA (bitsandbytes nf4), writing JSON.
#
#   benchmarks/gpu_check.sh [--out DIR]             # on the GPU machine; DIR defaults to $OUT, else ./gpu_check_out
#   benchmarks/gpu_check.sh --device cpu --tiny     # dry run here: the tiny model, a few batches, same code paths
#
# Steps, each with its own time limit; a failed step is recorded in status.txt and the next one still runs:
#   1. environment: nvidia-smi name/memory/driver, torch/CUDA/bitsandbytes versions  -> env.json, nvidia-smi.txt
#   2. scoring: ghost vs per-example loop vs train, LoRA and QLoRA, T 128 and 512     -> scoring.json
#      (targets: ghost ≥ 10× the loop, ghost throughput ≥ 0.9× training)
#   3. trainer, LoRA: U2A step vs KTO/SFT; U2A default vs reweighting off vs in_training_scores=False -> trainer_lora.json
#   4. trainer, QLoRA: the same step comparison                                        -> trainer_qlora.json
#   5. recipes: every `trl-u2a train` recipe for 10 steps under its launcher (gpu_recipes.py)  -> recipes.json
#   6. refresh scaling needs 2 GPUs: skipped on one card (the CPU figures are in docs/benchmarks.md).
# Extra arguments after `--` go to the scoring and trainer steps (e.g. `-- --seq-lens 512`).
set -uo pipefail

DEVICE=cuda
TINY=0
DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) DIR="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
EXTRA=("$@")
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"
DIR="${DIR:-$PWD/gpu_check_out}"
mkdir -p "$DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
: > "$DIR/status.txt"

if [ "$TINY" = 1 ]; then
  MODEL=tiny
  SCORE=(--model tiny --seq-lens 128 --n 16 --batch-size 8 --per-example-n 8)
  TRAIN_COMMON=(--models tiny --seq-lens 128 --batch-size 4 --steps 3 --warmup 1)
  OVERHEAD=(--negatives 32 --retain 16 --pairs 8 --run-steps 10 --reweight-steps 5)
  LIMIT=900
else
  MODEL=qwen0.5b
  SCORE=(--model qwen0.5b --seq-lens 128,512 --n 64 --batch-size 16 --per-example-n 32)
  TRAIN_COMMON=(--models qwen0.5b --seq-lens 512 --batch-size 8 --steps 12 --warmup 3)
  OVERHEAD=(--negatives 512 --retain 64 --pairs 64 --run-steps 150 --reweight-steps 50)
  LIMIT=420
fi
if [ "$DEVICE" = cuda ]; then
  DEV=(--device cuda)
  THREADS=(--threads 4)
else
  DEV=(--device cpu)
  THREADS=(--threads 1)
fi

step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$DIR/log.txt"
  timeout "$limit" "$@" >> "$DIR/log.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$DIR/status.txt"
}

# 1. environment
nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$DIR/nvidia-smi.txt"
step env 120 "$PY" - "$DIR/env.json" <<'EOF'
import json, subprocess, sys
info = {}
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"unavailable: {exc!r}"
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    info["device_name"] = torch.cuda.get_device_name(0)
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
for mod in ("transformers", "trl", "peft", "accelerate", "bitsandbytes"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"missing: {exc!r}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

# 2. scoring (LoRA and QLoRA)
step scoring "$LIMIT" "$PY" "$HERE/gpu_check.py" "${DEV[@]}" "${SCORE[@]}" --quant none,4bit --dtype bfloat16 \
  --workdir "$WORK" --json "$DIR/scoring.json" "${EXTRA[@]}"

# 3. trainer with LoRA: step comparison and reweighting overhead
step trainer_lora "$LIMIT" "$PY" "$HERE/bench_trainer.py" "${DEV[@]}" "${THREADS[@]}" --bf16 "${TRAIN_COMMON[@]}" \
  "${OVERHEAD[@]}" --parts step,overhead --workdir "$WORK" --json "$DIR/trainer_lora.json" "${EXTRA[@]}"

# 4. trainer with QLoRA: step comparison
step trainer_qlora "$LIMIT" "$PY" "$HERE/bench_trainer.py" "${DEV[@]}" "${THREADS[@]}" --bf16 --qlora \
  "${TRAIN_COMMON[@]}" --parts step --workdir "$WORK" --json "$DIR/trainer_qlora.json" "${EXTRA[@]}"

# 5. every trl-u2a train recipe for a few steps, under its accelerate launcher
RECIPES=()
[ "$TINY" = 1 ] && RECIPES=(--tiny --max-steps 2)
step recipes "$((LIMIT * 2))" "$PY" "$HERE/gpu_recipes.py" --device "$DEVICE" --out "$DIR" "${RECIPES[@]}"

echo "refresh_scaling skipped: needs 2 GPUs" >> "$DIR/status.txt"
echo "model $MODEL, device $DEVICE; results in $DIR:"
ls -1 "$DIR"
cat "$DIR/status.txt"
grep -q "rc=[^0]" "$DIR/status.txt" && exit 1
exit 0
