#!/usr/bin/env bash
# On the lent H200 (see ../shared/device/README.md): install this checkout
# beside the unpacked vLLM and run one step, copying results to $OUT.
#
#   bash scripts/gpu_session.sh install|checks|capture|profile|unit
#       (unit: the unit tests that need CUDA, e.g. the Triton block kernel
#       against its torch path; where the image lacks pytest, carry wheels in
#       .device/pytest, from `pip download pytest -d .device/pytest
#       --python-version 3.12 --only-binary=:all:` without packaging's)
#   bash scripts/gpu_session.sh correctness  # checks, capture gemma3, the
#       0.20/0.26 compare (if 0.20 is in /tmp/site-prev) and the H200 training
#       run at once; the training's bench waits for the others to finish
#   bash scripts/gpu_session.sh bench NAME [vllm-dflash bench options]
#       (BENCH_TIMEOUT=seconds; GPU_LOG=1 logs nvidia-smi beside it)
#   bash scripts/gpu_session.sh save-cache    # last: vLLM's compile cache to $OUT
#       (cache.*, <= 15 MiB each). Copy them here into .device/compile-cache/
#       and carry that folder in a later session's install call (a call
#       carries 64 MiB in all: the tree is about 7, a vLLM part 47-50, so
#       beside part 3 only a cache under about 10 MiB fits): install
#       restores it, and each engine loads its compiled graphs and kernels
#       instead of compiling them (64.7 s of a 99.2 s Gemma engine start on
#       a fresh H200, fourteenth session). Untried on the H200 so far.
#   bash scripts/gpu_session.sh retire-vllm   # before moving another vLLM over
#   bash scripts/gpu_session.sh swap-vllm     # back to the retired one (and forth)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
WORK=/tmp/dflash-work
mkdir -p "$OUT" "$WORK"

case "$1" in
  install)
    python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/pip.log" 2>&1
    bash scripts/gpu_session.sh restore-cache
    python3 -c 'import vllm, torch, vllm_dflash; print("vllm", vllm.__version__, "torch", torch.__version__, "plugin", vllm_dflash.__version__)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
  checks)
    timeout "${2:-480}" python3 scripts/gpu_checks.py "$WORK/checks" > "$OUT/checks.log" 2>&1
    echo "checks rc=$?"
    cp "$WORK/checks/gpu_checks.json" "$OUT/" 2>/dev/null
    tail -c 3000 "$OUT/checks.log"
    ;;
  unit)
    if ! python3 -c 'import pytest' 2>/dev/null && ls .device/pytest/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-deps --no-index .device/pytest/*.whl
    fi
    if python3 -c 'import pytest' 2>/dev/null; then
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/unit/test_speculator.py \
        tests/unit/test_context_kernels.py \
        > "$OUT/unit.log" 2>&1
      echo "unit rc=$?"
      tail -n 5 "$OUT/unit.log"
    else
      echo "unit: no pytest on this machine"
    fi
    ;;
  capture)
    shift
    timeout 560 python3 scripts/gpu_capture_check.py "$WORK/capture" "$@" > "$OUT/capture.log" 2>&1
    echo "capture rc=$?"
    cp "$WORK/capture/gpu_capture_check.json" "$OUT/" 2>/dev/null
    tail -c 3000 "$OUT/capture.log"
    ;;
  bench)
    name=$2
    shift 2
    mkdir -p "$OUT/$name"
    # bench.json grows mode by mode: keep a copy in $OUT in case the machine's
    # own limit stops this command before the copy below.
    (while sleep 10; do cp "$WORK/$name/bench.json" "$OUT/$name/" 2>/dev/null; done) &
    copier=$!
    # GPU_LOG=1: the GPU's clock, power, utilisation and clock-event reasons
    # every 250 ms beside the run, to line up with --step-log's steps.
    logger=
    if [ "${GPU_LOG:-0}" = 1 ]; then
      nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.active \
        --format=csv -lms 250 > "$OUT/$name/gpu.csv" 2>&1 &
      logger=$!
    fi
    timeout "${BENCH_TIMEOUT:-560}" vllm-dflash bench --out "$WORK/$name" "$@" > "$OUT/$name/bench.log" 2>&1
    echo "bench $name rc=$?"
    kill $copier $logger 2>/dev/null
    cp "$WORK/$name/bench.json" "$WORK/$name/bench.png" "$OUT/$name/" 2>/dev/null
    for log in "$WORK/$name"/*.log; do tail -c 12000 "$log" > "$OUT/$name/$(basename "$log")"; done
    tail -n 70 "$OUT/$name/bench.log"  # the tables: rows, summary, steps
    ;;
  save-cache)
    # vLLM keeps its compiled graphs and their Inductor and Triton kernels
    # under VLLM_CACHE_ROOT (~/.cache/vllm); files come back from $OUT at
    # 16 MiB each, at most 8 in all.
    root=${VLLM_CACHE_ROOT:-$HOME/.cache/vllm}
    [ -d "$root" ] || { echo "save-cache: no $root"; exit 0; }
    rm -f "$WORK"/cache.*
    tar -C "$(dirname "$root")" -cf - "$(basename "$root")" | xz -T0 -6 | split -b 15M -d - "$WORK/cache."
    parts=$(ls "$WORK"/cache.* | wc -l)
    echo "save-cache: $(du -sh "$root" | cut -f1) in $parts part(s) of <= 15 MiB"
    if [ "$parts" -le 6 ]; then cp "$WORK"/cache.* "$OUT/"; else echo "save-cache: too many parts to come back; none copied"; fi
    ;;
  restore-cache)
    root=${VLLM_CACHE_ROOT:-$HOME/.cache/vllm}
    if ls .device/compile-cache/cache.* > /dev/null 2>&1; then
      mkdir -p "$(dirname "$root")"
      cat .device/compile-cache/cache.* | xz -d | tar -C "$(dirname "$root")" -xf - \
        && echo "restore-cache: $(du -sh "$root" | cut -f1) in $root"
    fi
    ;;
  retire-vllm)
    # Keep the installed vLLM aside and clear the stash for the next one.
    rm -rf /tmp/vllm-parts /tmp/site-prev && mv /tmp/site /tmp/site-prev && echo "vLLM moved to /tmp/site-prev"
    ;;
  swap-vllm)
    # Exchange the installed vLLM with the one retire-vllm kept aside.
    mv /tmp/site /tmp/site-swap && mv /tmp/site-prev /tmp/site && mv /tmp/site-swap /tmp/site-prev
    python3 -c 'import vllm; print("vllm", vllm.__version__)'
    ;;
  correctness)
    rm -f "$WORK/correctness.done"
    GPU_TRAIN_BENCH_AFTER="$WORK/correctness.done" bash scripts/gpu_train.sh \
      > "$OUT/train.out" 2>&1 &
    train=$!
    GPU_CHECKS_ONLY=${GPU_CHECKS_ONLY:-plain32,plugin32_v2,adaptive32_v2,adaptive32_v1,sched3_v2,fixed3_v2} \
      bash scripts/gpu_session.sh checks 420 > "$OUT/checks.out" 2>&1 &
    bash scripts/gpu_session.sh capture gemma3 > "$OUT/capture.out" 2>&1 &
    if [ -d /tmp/site-prev ]; then
      bash scripts/gpu_v020.sh compare > "$OUT/compare.out" 2>&1 &
    fi
    while [ "$(jobs -rp | grep -vc "^$train$")" -gt 0 ]; do sleep 5; done
    touch "$WORK/correctness.done"
    echo "correctness jobs done at $(date +%T)"
    wait $train
    for f in checks capture compare train; do
      [ -f "$OUT/$f.out" ] && { echo "=== $f"; tail -c 1500 "$OUT/$f.out"; }
    done
    ;;
  profile)
    shift
    timeout 400 vllm-dflash bench --out "$WORK/profile" --profile "$@" > "$OUT/profile.log" 2>&1
    echo "profile rc=$?"
    cp "$WORK"/profile/profile-*.txt "$WORK"/profile/profile-*.trace.json.gz "$WORK/profile/bench.json" "$OUT/" 2>/dev/null
    tail -n 20 "$OUT/profile.log"
    ;;
esac
