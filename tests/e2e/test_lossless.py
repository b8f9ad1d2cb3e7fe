"""The core promise: greedy output with the plugin's DFlash equals output
without speculation, token for token, for two target families and two drafter
shapes (random drafter weights: almost every draft is rejected, so this checks
that verification and the draft KV bookkeeping never change the output)."""

from __future__ import annotations

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
