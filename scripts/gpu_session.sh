#!/usr/bin/env bash
# On the lent H200 (see ../shared/device/README.md): install this checkout
# beside the unpacked vLLM and run one step, copying results to $OUT.
#
#   bash scripts/gpu_session.sh install|checks|capture|profile
#   bash scripts/gpu_session.sh bench NAME [vllm-dflash bench options]
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
    python3 -c 'import vllm, torch, vllm_dflash; print("vllm", vllm.__version__, "torch", torch.__version__, "plugin", vllm_dflash.__version__)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
  checks)
    timeout "${2:-480}" python3 scripts/gpu_checks.py "$WORK/checks" > "$OUT/checks.log" 2>&1
    echo "checks rc=$?"
    cp "$WORK/checks/gpu_checks.json" "$OUT/" 2>/dev/null
    tail -c 3000 "$OUT/checks.log"
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
    timeout "${BENCH_TIMEOUT:-560}" vllm-dflash bench --out "$WORK/$name" "$@" > "$OUT/$name/bench.log" 2>&1
    echo "bench $name rc=$?"
    cp "$WORK/$name/bench.json" "$WORK/$name/bench.png" "$OUT/$name/" 2>/dev/null
    for log in "$WORK/$name"/*.log; do tail -c 12000 "$log" > "$OUT/$name/$(basename "$log")"; done
    tail -n 30 "$OUT/$name/bench.log"
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
  profile)
    shift
    timeout 400 vllm-dflash bench --out "$WORK/profile" --profile "$@" > "$OUT/profile.log" 2>&1
    echo "profile rc=$?"
    cp "$WORK"/profile/profile-*.txt "$WORK/profile/bench.json" "$OUT/" 2>/dev/null
    tail -n 20 "$OUT/profile.log"
    ;;
esac
