"""Bad options stop the engine at start-up with the plugin's message (field,
value, fix), before any request is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_dflash import tiny
from vllm_dflash.engine import EngineFailed, EngineSpec, run

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("k", "llm_kwargs", "message"),
    [
        (8, {}, "invalid num_speculative_tokens=8. This drafter's block_size is 8"),
        (7, {"max_num_batched_tokens": 96}, "invalid max_num_batched_tokens=96"),
    ],
    ids=["k-beyond-block", "token-budget"],
)
def test_bad_engine_option_fails_at_startup(
    models: dict[str, Path], k: int, llm_kwargs: dict, message: str
) -> None:
    spec = EngineSpec(
        target=str(models["qwen3-target"]),
        drafter=str(models["qwen3-draft-a"]),
        num_speculative_tokens=k,
        prompts=tiny.prompts(1),
        max_tokens=4,
        llm_kwargs=llm_kwargs,
    )
    with pytest.raises(EngineFailed) as info:
        run(spec)
    assert message in info.value.log
