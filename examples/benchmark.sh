#!/usr/bin/env bash
# Benchmark plain decoding vs vLLM's native DFlash vs this plugin with
# `vllm-dflash bench`: each mode in its own engine process on identical
# inputs; prints a table and writes bench.json, bench.png and per-mode logs.
#
#   bash examples/benchmark.sh [bench args]          # GPU: Qwen3-8B shape, as in docs/benchmarks/
#   bash examples/benchmark.sh --tiny [bench args]   # CPU: tiny models, a few seconds of decoding
#
# Later arguments win, e.g. `--tiny --modes plugin` or `--batch-sizes 1`.
# GPU runs use dummy weights and synthetic acceptance (tau 7.8, vLLM >= 0.26),
# so the figures compare implementations, not drafters; --tau 0 measures the
# drafter's real acceptance. See `vllm-dflash bench --help`.
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-bench-results}

if [ "${1:-}" = "--tiny" ]; then
  shift
  # Synthetic acceptance is CUDA-only: measure the tiny drafter's real one.
  ARGS=(--preset tiny --modes none,plugin --batch-sizes 1,2 --k 7 --tau 0
        --prompt-len 8 --output-len 16 --dtype float32 --enforce-eager)
else
  ARGS=(--preset qwen3-8b --batch-sizes 1,8,32 --k 15 --tau 7.8
        --prompt-len 128 --output-len 256)
fi
exec "$PYTHON" -m vllm_dflash.cli bench "${ARGS[@]}" --out "$OUT" "$@"
