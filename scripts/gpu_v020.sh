#!/usr/bin/env bash
# vLLM 0.20.0 on the lent H200: native DFlash next to the plugin.
#
# Pack and move vLLM 0.20 first (../shared/device/README.md):
#   python3 ../shared/device/pack_vllm.py .device/vllm-0.20.0 --vllm 0.20.0
#   bash .device/vllm-0.20.0/part-1/stash.sh          # one command each,
#   bash .device/vllm-0.20.0/part-2/stash.sh          # back to back
#   bash .device/vllm-0.20.0/part-3/stash.sh && bash .device/vllm-0.20.0/part-3/install-vllm.sh \
#     && bash scripts/gpu_v020.sh install
# then, one command each (each fits the 10-minute limit):
#   bash scripts/gpu_v020.sh checks        # lossless + the TRITON_ATTN start-up, tiny Qwen3
#   bash scripts/gpu_v020.sh bench-qwen3   # none / native / plugin, Qwen3-8B shape
#   bash scripts/gpu_v020.sh bench-gemma4  # none / native / plugin, Gemma-4-26B-A4B shape
#   bash scripts/gpu_v020.sh compare       # 0.20 (in /tmp/site-prev, after
#       `gpu_session.sh retire-vllm`) next to 0.26 (in /tmp/site): the same
#       V1 jobs on both, float32 lossless check and bf16 outputs compared
#
# What to expect on 0.20 (see docs/vllm-0.20.md): every engine runs the V1
# runner (0.20 refuses VLLM_USE_V2_MODEL_RUNNER with DFlash). Native DFlash
# cannot start when the target runs TRITON_ATTN ("Selected backend TRITON_ATTN
# is not valid for this configuration. Reason: ['non-causal attention not
# supported']"): the checks' native16_v2 job and bench-gemma4's native mode
# fail with it, and this script saves that line. The plugin runs both.
# bench-gemma4 needs the gemma4-26b-a4b preset and Gemma drafter support
# (another branch); without them it stops at the preset or the drafter check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
WORK=/tmp/dflash-v020
mkdir -p "$OUT" "$WORK"
NATIVE_ERROR="non-causal attention not supported"

save_native_error() {  # $1: log to search, $2: name of the saved line
  if grep -m1 -h "$NATIVE_ERROR" "$1" > "$OUT/$2" 2>/dev/null; then
    echo "native DFlash failed as expected on 0.20: $(cut -c1-240 "$OUT/$2")"
  else
    echo "native DFlash: no '$NATIVE_ERROR' line in $1"
  fi
}

case "${1:-}" in
  install)
    bash scripts/gpu_session.sh install
    ;;
  checks)
    # plain16/plugin16_v2/native16_v2: bf16, target TRITON_ATTN, drafter
    # FLASH_ATTN (through VLLM_DFLASH_DRAFT_ATTENTION_BACKEND on 0.20); the
    # "_v2" names come from 0.26, on 0.20 these run V1. The fp32
    # FLEX_ATTENTION pair is left out: with DFlash on 0.20 it crashed (H200,
    # illegal memory access) and the plugin now refuses it at start-up.
    GPU_CHECKS_ONLY=plain16,plugin16_v2,native16_v2 \
      timeout 560 python3 scripts/gpu_checks.py "$WORK/checks" > "$OUT/checks.log" 2>&1
    echo "checks rc=$? (1 is expected: native16_v2 cannot start on 0.20)"
    cp "$WORK/checks/gpu_checks.json" "$OUT/" 2>/dev/null
    save_native_error "$OUT/checks.log" native_triton_error.txt
    python3 - "$OUT/gpu_checks.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("failed engines:", r.get("failed"))
print("fp32 plugin identical to no speculation:", r.get("fp32_flex_v1_identical"))
print("bf16 split plugin first divergence:", r.get("bf16_split_plugin16_v2_first_divergence"))
print("vLLM", r.get("vllm_version"))
EOF
    ;;
  bench-qwen3)
    timeout 570 vllm-dflash bench --preset qwen3-8b --modes none,native,plugin \
      --batch-sizes 1,8,32 --out "$WORK/bench-qwen3" > "$OUT/bench-qwen3.log" 2>&1
    echo "bench-qwen3 rc=$?"
    cp "$WORK/bench-qwen3/bench.json" "$OUT/bench-qwen3.json" 2>/dev/null
    cp "$WORK/bench-qwen3/bench.png" "$OUT/bench-qwen3.png" 2>/dev/null
    tail -n 12 "$OUT/bench-qwen3.log"
    ;;
  bench-gemma4)
    timeout 570 vllm-dflash bench --preset gemma4-26b-a4b --modes none,native,plugin \
      --attention-backend TRITON_ATTN --draft-attention-backend FLASH_ATTN \
      --batch-sizes 1,8 --output-len 512 --out "$WORK/bench-gemma4" \
      > "$OUT/bench-gemma4.log" 2>&1
    echo "bench-gemma4 rc=$? (1 is expected: native cannot start on 0.20)"
    cp "$WORK/bench-gemma4/bench.json" "$OUT/bench-gemma4.json" 2>/dev/null
    cp "$WORK/bench-gemma4/bench.png" "$OUT/bench-gemma4.png" 2>/dev/null
    for m in native plugin; do
      tail -c 20000 "$WORK/bench-gemma4/$m.log" > "$OUT/gemma4-$m.log" 2>/dev/null
    done
    save_native_error "$WORK/bench-gemma4/native.log" native_gemma4_error.txt
    tail -n 12 "$OUT/bench-gemma4.log"
    ;;
  compare)
    # float32, target TRITON_ATTN + drafter FLEX_ATTENTION: lossless on 0.20?
    # (FLEX for the target too crashed there; the guard is lifted to find out
    # which side did.) bf16 split on V1: does the patched 0.20 path give 0.26's
    # tokens? plain16_v1 is the control: do the two releases decode alike?
    jobs=plain32_triton_v1,plugin32_triton_v1,plain16_v1,plugin16_v1
    for v in 0.20:/tmp/site-prev 0.26:/tmp/site; do
      GPU_CHECKS_ONLY=$jobs VLLM_DFLASH_ALLOW_KNOWN_CRASHES=1 PYTHONPATH=${v#*:} \
        timeout "${2:-420}" python3 scripts/gpu_checks.py "$WORK/compare-${v%%:*}" \
        > "$OUT/compare-${v%%:*}.log" 2>&1 &
    done
    wait
    for v in 0.20 0.26; do
      cp "$WORK/compare-$v/gpu_checks.json" "$OUT/compare-$v.json" 2>/dev/null
      cp "$WORK/compare-$v/gpu_outputs.json" "$OUT/outputs-$v.json" 2>/dev/null
    done
    python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else {}
old, new = load("outputs-0.20.json"), load("outputs-0.26.json")
report = {
    "checks_0.20": load("compare-0.20.json"),
    "checks_0.26": load("compare-0.26.json"),
    "identical_across_releases": {k: old[k] == new[k] for k in old if k in new},
}
(out / "compare.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
    ;;
  *)
    echo "usage: bash scripts/gpu_v020.sh install|checks|bench-qwen3|bench-gemma4|compare" >&2
    exit 2
    ;;
esac
