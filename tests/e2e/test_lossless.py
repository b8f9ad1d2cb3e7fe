"""The core promise: greedy output with the plugin's DFlash equals output
without speculation, token for token, for two target families and two drafter
shapes (random drafter weights: almost every draft is rejected, so this checks
that verification and the draft KV bookkeeping never change the output)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_dflash import tiny
from vllm_dflash.engine import EngineResult, EngineSpec, run

pytestmark = pytest.mark.e2e

PROMPTS = tiny.prompts(8, min_len=2, max_len=120, seed=3)
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def baselines(models: dict[str, Path]) -> dict[str, EngineResult]:
    return {
        family: run(
            EngineSpec(
                target=str(models[f"{family}-target"]),
                prompts=PROMPTS,
                max_tokens=MAX_TOKENS,
            )
        )
        for family in ("qwen3", "llama")
    }


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize(("drafter", "k"), [("draft-a", 7), ("draft-b", 15)])
def test_greedy_output_equals_no_speculation(
    models: dict[str, Path],
    baselines: dict[str, EngineResult],
    family: str,
    drafter: str,
    k: int,
) -> None:
    result = run(
        EngineSpec(
            target=str(models[f"{family}-target"]),
            drafter=str(models[f"{family}-{drafter}"]),
            num_speculative_tokens=k,
            prompts=PROMPTS,
            max_tokens=MAX_TOKENS,
        )
    )
    expected = baselines[family].outputs
    assert [len(o) for o in expected] == [MAX_TOKENS] * len(PROMPTS)
    assert result.outputs == expected
    # The plugin's classes ran, and really drafted.
    assert result.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    stats = result.proposer_stats
    assert stats is not None and stats["steps"] > 0
    assert stats["draft_tokens"] >= stats["steps"] * k
    assert result.metrics["vllm:spec_decode_num_draft_tokens"] > 0


def _split_cores(parts: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each CPU worker its own cores
    (vLLM's automatic binding wants one NUMA node per worker)."""
    cores = sorted(os.sched_getaffinity(0))
    size = max(1, len(cores) // parts)
    groups = [cores[i * size : (i + 1) * size] or cores[-1:] for i in range(parts)]
    return "|".join(",".join(map(str, g)) for g in groups)


def test_tensor_parallel_drafter_is_lossless(
    models: dict[str, Path], baselines: dict[str, EngineResult]
) -> None:
    """TP 2 (target and drafter sharded alike, CPU workers) against TP 1."""
    result = run(
        EngineSpec(
            target=str(models["qwen3-target"]),
            drafter=str(models["qwen3-draft-b"]),
            num_speculative_tokens=15,
            prompts=PROMPTS,
            max_tokens=MAX_TOKENS,
            llm_kwargs={
                "tensor_parallel_size": 2,
                "distributed_executor_backend": "mp",
            },
            env={"VLLM_CPU_OMP_THREADS_BIND": _split_cores(2)},
        )
    )
    assert result.outputs == baselines["qwen3"].outputs
    assert result.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    assert result.metrics["vllm:spec_decode_num_draft_tokens"] > 0
