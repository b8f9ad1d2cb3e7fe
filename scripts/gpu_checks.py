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
Check 1 runs on both model runners (V2, vLLM 0.26's default for dense
models, and V1 with ``VLLM_USE_V2_MODEL_RUNNER=0``), with a fixed K and with
the adaptive K (``VLLM_DFLASH_ADAPTIVE_K=1``), and with a schedule that
verifies 3 of 15 drafts per step, which must draft blocks of 4 and match an
engine whose K is 3 (same drafts, same acceptance); check 2 on V2. The ``*_v1``
and ``*_triton_*`` jobs are what two vLLM releases can both run (0.20 has V1
only): float32 with a TRITON_ATTN target and a FLEX_ATTENTION drafter, and the
bf16 split on V1; ``scripts/gpu_v020.sh compare`` runs them on 0.20 and 0.26.

Writes ``gpu_checks.json`` and every engine's token ids in
``gpu_outputs.json``; exits non-zero if an engine fails or check 1 does.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
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
        # Fixed KV cache: concurrent engines must not size it from free memory.
        "kv_cache_memory_bytes": 2 << 30,
        **kw.pop("llm_kwargs", {}),  # type: ignore[dict-item]
    }
    k = int(kw.pop("num_speculative_tokens", 15))  # type: ignore[call-overload]
    return run(
        EngineSpec(
            target=str(target),
            drafter=None if drafter is None else str(drafter),
            num_speculative_tokens=k,
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
    v1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    adaptive = {"VLLM_DFLASH_ADAPTIVE_K": "1"}
    flex = {"attention_backend": "FLEX_ATTENTION"}
    triton = {"attention_backend": "TRITON_ATTN"}
    split = {"llm_kwargs": {"attention_backend": "TRITON_ATTN"}}
    draft_fa = {"attention_backend": "FLASH_ATTN"}
    # Tiny models: the engines of one check share the GPU and run at once.
    jobs: dict[str, tuple[Path | None, str, dict[str, object]]] = {
        "plain32": (None, "float32", {"llm_kwargs": flex}),
        "plugin32_v2": (
            drafter,
            "float32",
            {"llm_kwargs": flex, "speculative_extra": flex},
        ),
        "plugin32_v1": (
            drafter,
            "float32",
            {"llm_kwargs": flex, "speculative_extra": flex, "env": v1},
        ),
        # Adaptive K: drafts verified per step vary (0 included), each K with
        # its own CUDA graphs; output must still equal plain decoding.
        "adaptive32_v2": (
            drafter,
            "float32",
            {"llm_kwargs": flex, "speculative_extra": flex, "env": adaptive},
        ),
        "adaptive32_v1": (
            drafter,
            "float32",
            {
                "llm_kwargs": flex,
                "speculative_extra": flex,
                "env": {**v1, **adaptive},
            },
        ),
        # K 15 verifying 3 drafts a step (a dynamic-K schedule) vs K 3.
        "sched3_v2": (
            drafter,
            "float32",
            {
                "llm_kwargs": flex,
                "speculative_extra": {
                    **flex,
                    "num_speculative_tokens_per_batch_size": [(1, 4096, 3)],
                },
            },
        ),
        "fixed3_v2": (
            drafter,
            "float32",
            {
                "llm_kwargs": flex,
                "speculative_extra": flex,
                "num_speculative_tokens": 3,
            },
        ),
        # float32 with a causal-only target backend: the drafter alone on FLEX.
        "plain32_triton_v1": (None, "float32", {"llm_kwargs": triton, "env": v1}),
        "plugin32_triton_v1": (
            drafter,
            "float32",
            {"llm_kwargs": triton, "speculative_extra": flex, "env": v1},
        ),
        "plain16": (None, "bfloat16", dict(split)),
        "plain16_v1": (None, "bfloat16", {**split, "env": v1}),
        "plugin16_v1": (
            drafter,
            "bfloat16",
            {**split, "speculative_extra": draft_fa, "env": v1},
        ),
        "plugin16_v2": (drafter, "bfloat16", {**split, "speculative_extra": draft_fa}),
        # The same pair in bf16 on the reference split, where the drafter runs
        # in FULL CUDA graphs (FLEX above runs eagerly): one graph set per K.
        "sched3_16_v2": (
            drafter,
            "bfloat16",
            {
                **split,
                "speculative_extra": {
                    **draft_fa,
                    "num_speculative_tokens_per_batch_size": [(1, 4096, 3)],
                },
            },
        ),
        "fixed3_16_v2": (
            drafter,
            "bfloat16",
            {**split, "speculative_extra": draft_fa, "num_speculative_tokens": 3},
        ),
        "native16_v2": (
            drafter,
            "bfloat16",
            {
                **split,
                "speculative_extra": draft_fa,
                "env": {"VLLM_DFLASH_USE_NATIVE": "1"},
            },
        ),
    }
    only = os.environ.get("GPU_CHECKS_ONLY")
    if only:
        jobs = {k: v for k, v in jobs.items() if k in only.split(",")}
    results: dict[str, EngineResult | str] = {}

    def one(name: str) -> None:
        path, dtype, kw = jobs[name]
        try:
            results[name] = engine(target, path, dtype, **dict(kw))
        except EngineFailed as e:
            results[name] = e.log[-3000:]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(one, jobs))
    failed = {k: v for k, v in results.items() if isinstance(v, str)}
    for name, log in failed.items():
        print(f"--- {name} failed:\n{log}", flush=True)
    report["failed"] = sorted(failed)
    ok = not failed
    done = {k: v for k, v in results.items() if isinstance(v, EngineResult)}
    plain32 = done.get("plain32")
    for runner in ("v1", "v2"):
        plugin = done.get(f"plugin32_{runner}")
        if plain32 is not None and plugin is not None:
            same = plain32.outputs == plugin.outputs
            ok &= same
            report[f"fp32_flex_{runner}_identical"] = same
            report[f"fp32_flex_{runner}_first_divergence"] = first_divergence(
                plain32.outputs, plugin.outputs
            )
            report[f"fp32_{runner}_plugin_class"] = plugin.drafter_class
            report[f"fp32_{runner}_acceptance_length"] = plugin.acceptance_length
        adaptive_run = done.get(f"adaptive32_{runner}")
        if plain32 is not None and adaptive_run is not None:
            same = plain32.outputs == adaptive_run.outputs
            ok &= same
            report[f"fp32_adaptive_{runner}_identical"] = same
            report[f"fp32_adaptive_{runner}_steps_per_k"] = adaptive_run.adaptive_k
            stats = adaptive_run.proposer_stats or {}
            # Every block was K + 1 long (K: that step's drafts per request).
            fits = stats.get("block_tokens") == stats.get(
                "draft_tokens", -1
            ) + stats.get("blocks", -1)
            ok &= fits
            report[f"fp32_adaptive_{runner}_blocks_k_plus_1"] = fits
            report[f"fp32_adaptive_{runner}_proposer_stats"] = stats
    sched, fixed = done.get("sched3_v2"), done.get("fixed3_v2")
    if plain32 is not None and sched is not None and fixed is not None:
        stats = sched.proposer_stats or {}
        same = plain32.outputs == sched.outputs == fixed.outputs
        same_drafts = all(
            sched.metrics.get(f"vllm:spec_decode_{m}")
            == fixed.metrics.get(f"vllm:spec_decode_{m}")
            for m in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
        )
        fits = stats.get("block_tokens") == 4 * stats.get("blocks", -1) > 0
        ok &= same and same_drafts and fits
        report["fp32_sched3_v2_identical"] = same
        report["fp32_sched3_v2_same_acceptance_as_k3"] = same_drafts
        report["fp32_sched3_v2_blocks_of_4"] = fits
        report["fp32_sched3_v2_proposer_stats"] = stats
        report["fp32_sched3_v2_acceptance_length"] = sched.acceptance_length
        report["fp32_fixed3_v2_acceptance_length"] = fixed.acceptance_length
    sched16, fixed16 = done.get("sched3_16_v2"), done.get("fixed3_16_v2")
    if sched16 is not None and fixed16 is not None:
        # Reported, not required: bf16 verify numerics may differ by graph size.
        report["bf16_sched3_v2_equals_fixed3"] = sched16.outputs == fixed16.outputs
        report["bf16_sched3_v2_first_divergence_from_fixed3"] = first_divergence(
            fixed16.outputs, sched16.outputs
        )
        report["bf16_sched3_v2_proposer_stats"] = sched16.proposer_stats
        report["bf16_sched3_v2_acceptance_length"] = sched16.acceptance_length
        report["bf16_fixed3_v2_acceptance_length"] = fixed16.acceptance_length
    plain_t, plugin_t = done.get("plain32_triton_v1"), done.get("plugin32_triton_v1")
    if plain_t is not None and plugin_t is not None:
        same = plain_t.outputs == plugin_t.outputs
        ok &= same
        report["fp32_triton_v1_identical"] = same
        report["fp32_triton_v1_first_divergence"] = first_divergence(
            plain_t.outputs, plugin_t.outputs
        )
    for name in ("plugin16_v2", "native16_v2", "plugin16_v1"):
        plain16 = done.get("plain16_v1" if name.endswith("_v1") else "plain16")
        other = done.get(name)
        if plain16 is None or other is None:
            continue
        report[f"bf16_split_{name}_first_divergence"] = first_divergence(
            plain16.outputs, other.outputs
        )
        report[f"bf16_{name}_class"] = other.drafter_class
    if "plugin16_v2" in done and "native16_v2" in done:
        report["bf16_split_plugin_equals_native"] = (
            done["plugin16_v2"].outputs == done["native16_v2"].outputs
        )
    if done:
        report["vllm_version"] = next(iter(done.values())).vllm_version
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_outputs.json").write_text(
        json.dumps({name: r.outputs for name, r in done.items()})
    )
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-checks"))
