"""Correctness on CUDA: the plugin with CUDA graphs and split attention backends.

    python scripts/gpu_checks.py OUT_DIR

How losslessness is shown on a GPU: bf16 kernels for a (K+1)-token verify do
not round like single-token decode, so bf16 greedy outputs with and without
speculation can legitimately part after a near-tie. So:

1. float32 with FLEX_ATTENTION for target and drafter: greedy output with the
   plugin must equal output without speculation, token for token.
2. bfloat16, target TRITON_ATTN + drafter FLASH_ATTN (the reference split):
   report the first position where the plugin's output leaves plain decoding,
   and compare with vLLM's native DFlash on the same drafter weights; both see
   the same verify numerics.
3. An explicit VLLM_USE_V2_MODEL_RUNNER=1 is refused at start-up with the fix.

Writes ``gpu_checks.json``; exits non-zero if check 1 or 3 fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm_dflash import tiny
from vllm_dflash.engine import EngineFailed, EngineResult, EngineSpec, run

GPU_TARGET = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=4096,
)


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    out: list[int | None] = []
    for x, y in zip(a, b, strict=True):
        out.append(
            next(
                (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None
            )
        )
    return out


def engine(
    target: Path, drafter: Path | None, dtype: str, **kw: object
) -> EngineResult:
    llm_kwargs = {
        "enforce_eager": False,
        "gpu_memory_utilization": 0.3,
        **kw.pop("llm_kwargs", {}),  # type: ignore[dict-item]
    }
    return run(
        EngineSpec(
            target=str(target),
            drafter=None if drafter is None else str(drafter),
            num_speculative_tokens=15,
            prompts=tiny.prompts(8, vocab=4000, min_len=4, max_len=200, seed=5),
            max_tokens=96,
            dtype=dtype,
            llm_kwargs=llm_kwargs,
            **kw,  # type: ignore[arg-type]
        )
    )


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = tiny.build_target(out / "target", **GPU_TARGET)
    drafter = tiny.build_drafter(
        out / "drafter",
        target,
        tiny.TinyDrafter(block_size=16, target_layer_ids=[0, 1, 2], mask_token_id=4095),
    )
    report: dict[str, object] = {}
    ok = True

    flex = {"attention_backend": "FLEX_ATTENTION"}
    plain32 = engine(target, None, "float32", llm_kwargs=flex)
    plugin32 = engine(
        target,
        drafter,
        "float32",
        llm_kwargs=flex,
        speculative_extra={"attention_backend": "FLEX_ATTENTION"},
    )
    same32 = plain32.outputs == plugin32.outputs
    ok &= same32 and plugin32.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    report["fp32_flex_identical"] = same32
    report["fp32_first_divergence"] = first_divergence(
        plain32.outputs, plugin32.outputs
    )
    report["fp32_plugin_class"] = plugin32.drafter_class
    print("fp32 identical:", same32, flush=True)

    split = {"llm_kwargs": {"attention_backend": "TRITON_ATTN"}}
    draft_fa = {"attention_backend": "FLASH_ATTN"}
    plain16 = engine(target, None, "bfloat16", **split)
    plugin16 = engine(target, drafter, "bfloat16", speculative_extra=draft_fa, **split)
    native16 = engine(
        target,
        drafter,
        "bfloat16",
        speculative_extra=draft_fa,
        env={"VLLM_DFLASH_USE_NATIVE": "1"},
        **split,
    )
    report["bf16_split_plugin_vs_plain_first_divergence"] = first_divergence(
        plain16.outputs, plugin16.outputs
    )
    report["bf16_split_native_vs_plain_first_divergence"] = first_divergence(
        plain16.outputs, native16.outputs
    )
    report["bf16_split_plugin_equals_native"] = plugin16.outputs == native16.outputs
    report["bf16_plugin_class"] = plugin16.drafter_class
    report["bf16_native_class"] = native16.drafter_class
    print("bf16 split:", report, flush=True)

    try:
        engine(target, drafter, "bfloat16", env={"VLLM_USE_V2_MODEL_RUNNER": "1"})
        report["v2_refused"] = False
        ok = False
    except EngineFailed as e:
        refused = "invalid VLLM_USE_V2_MODEL_RUNNER" in e.log
        report["v2_refused"] = refused
        ok &= refused
    report["vllm_version"] = plugin32.vllm_version
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-checks"))
