#!/usr/bin/env bash
# Train a DFlash drafter for a ~1.3 B toy-language Qwen3 target and bench it
# with real acceptance, in one command of about 7 minutes on one H200 (after
# the vLLM parts are installed: ../shared/device/README.md).
#
#   bash scripts/gpu_train.sh                 # on the H200, results in $OUT
#   GPU_TRAIN_SMALL=1 PYTHON=/tmp/venv/bin/python bash scripts/gpu_train.sh
#                                             # same pipeline, tiny, on CPU
#
# Steps (each under `timeout`): build the target on the GPU (bf16
# safetensors), `vllm-dflash train` (stops after GPU_TRAIN_SECONDS of
# training), `vllm-dflash bench --tau 0` (real acceptance), summary.
# GPU_TRAIN_BENCH_AFTER=FILE: the bench waits (up to 150 s) for FILE to
# exist, so correctness jobs sharing the GPU are done before it times anything.
# GPU_TRAIN_PHASE=train|bench splits the run over two device calls (each has
# 600 s): `train` builds and trains, `bench` reuses that work folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
WORK=${GPU_TRAIN_WORK:-/tmp/dflash-train}
SMALL=${GPU_TRAIN_SMALL:-0}
PHASE=${GPU_TRAIN_PHASE:-all}
[ "$PHASE" = bench ] || rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
# Every step's limit is cut to what is left of the whole budget (the GPU
# machine allows 600 s a command).
DEADLINE=$(($(date +%s) + ${GPU_TRAIN_BUDGET:-560}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMALL" = 1 ]; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  BUILD=(--small)
  TRAIN=(--device cpu --num-layers 2 --intermediate-size 256 --target-layer-ids 1,2
    --steps 300 --lr 3e-3 --num-prompts 256 --new-tokens 96 --prompt-len 2,96
    --eval-every 100 --time-limit "${GPU_TRAIN_SECONDS:-120}")
  BENCH=(--modes "${GPU_TRAIN_MODES:-none,plugin}" --batch-sizes 1 --prompt-len 32
    --output-len 64 --enforce-eager --dtype float32)
  LIMITS=(120 420 900)
  DEADLINE=$((DEADLINE + 3600))  # CPU: no machine limit
else
  export PYTHONPATH="$PYTHONPATH:/tmp/site" VLLM_USE_FLASHINFER_SAMPLER=0
  # The plugin registers through its entry point: install it (no network).
  "$PY" -c 'import importlib.metadata as m; m.distribution("vllm-dflash")' 2>/dev/null ||
    timeout 60 "$PY" -m pip install --no-deps --no-build-isolation -q -e . \
      > "$OUT/pip.log" 2>&1
  # The toy language's vocabulary (scripts/gpu_train_check.py says why 4096).
  BUILD=(--vocab "${GPU_TRAIN_VOCAB:-4096}")
  # GPU_TRAIN_PROMPTS x GPU_TRAIN_NEW_TOKENS: the training text (docs/training.md
  # on why more, shorter continuations may generalise better).
  TRAIN=(--device cuda --tf32 --num-layers 5 --steps 1500 --lr 1e-3
    --num-prompts "${GPU_TRAIN_PROMPTS:-1024}" --new-tokens "${GPU_TRAIN_NEW_TOKENS:-192}"
    --prompt-len 2,64 --eval-every 500
    --time-limit "${GPU_TRAIN_SECONDS:-120}")
  # 1024 output tokens: at the trained drafter's tau (about 10) 256 tokens
  # were 26 steps, 0.1-0.2 s, too short to time.
  BENCH=(--modes "${GPU_TRAIN_MODES:-none,native,plugin}" --batch-sizes 1,8
    --prompt-len 128 --output-len 1024)
  # Training stops itself after GPU_TRAIN_SECONDS; the rest is start-up, the
  # held-out estimate and saving.
  LIMITS=(80 $((${GPU_TRAIN_SECONDS:-120} + 110)) "${GPU_TRAIN_BENCH_LIMIT:-280}")
fi

step() {  # step NAME LIMIT CMD...: run under timeout, log, record rc and seconds
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  limit=$((limit < DEADLINE - start ? limit : DEADLINE - start))
  echo "[gpu_train] $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(($(date +%s) - start))" >> "$WORK/timings.txt"
  echo "[gpu_train] $name rc=$rc in $(($(date +%s) - start))s"
  tail -n 3 "$OUT/$name.log" | tr '\r' '\n' | tail -n 2
  return $rc
}

wait_for_gpu() {  # the bench times steps: start it on an otherwise idle GPU
  local file=${GPU_TRAIN_BENCH_AFTER:-} waited=0
  [ -z "$file" ] && return 0
  while [ ! -e "$file" ] && [ $waited -lt 150 ]; do sleep 5; waited=$((waited + 5)); done
  echo "[gpu_train] waited ${waited}s for $file before the bench"
}

train() {
  step build "${LIMITS[0]}" "$PY" scripts/gpu_train_check.py build "$WORK" "${BUILD[@]}" &&
    step train "${LIMITS[1]}" "$PY" -m vllm_dflash.cli train --target "$WORK/target" \
      --output "$WORK/drafter" --block-size 16 --batch-size 16 --blocks-per-seq 16 \
      "${TRAIN[@]}"
}

bench() {
  wait_for_gpu &&
    step bench "${LIMITS[2]}" "$PY" -m vllm_dflash.cli bench --target "$WORK/target" \
      --drafter "$WORK/drafter" --tau 0 --k 15 --load-format auto \
      --out "$WORK/bench" "${BENCH[@]}"
}

case "$PHASE" in
  train) train ;;
  bench) bench ;;
  *) train && bench ;;
esac
cp "$WORK/target_info.json" "$WORK/drafter/dflash_training.json" \
  "$WORK/drafter/config.json" "$WORK/bench/bench.json" "$WORK/bench/bench.png" \
  "$WORK/timings.txt" "$OUT/" 2>/dev/null
for m in none native plugin; do
  [ -f "$WORK/bench/$m.log" ] && tail -c 20000 "$WORK/bench/$m.log" > "$OUT/bench-$m.log"
done
"$PY" scripts/gpu_train_check.py summary "$WORK" "$OUT"
