"""With the plugin excluded by ``VLLM_PLUGINS`` or switched to native with
``VLLM_DFLASH_USE_NATIVE=1``, vLLM runs exactly as without the plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_dflash import tiny
from vllm_dflash.engine import EngineSpec, run

pytestmark = pytest.mark.e2e
NATIVE = "vllm.v1.spec_decode.dflash.DFlashProposer"


@pytest.mark.parametrize(
    "env",
    [{"VLLM_PLUGINS": "some_other_plugin"}, {"VLLM_DFLASH_USE_NATIVE": "1"}],
    ids=["plugins-excluded", "native-switch"],
)
def test_native_dflash_runs_when_plugin_is_off(
    models: dict[str, Path], env: dict
) -> None:
    result = run(
        EngineSpec(
            target=str(models["qwen3-target"]),
            drafter=str(models["qwen3-draft-a"]),
            prompts=tiny.prompts(2),
            max_tokens=8,
            # vLLM's native DFlash crashes in float32 on CPU; bfloat16 runs.
            dtype="bfloat16",
            env=env,
        )
    )
    assert result.drafter_class == NATIVE
    assert result.proposer_stats is None  # no plugin counters
    assert result.metrics["vllm:spec_decode_num_drafts"] > 0
