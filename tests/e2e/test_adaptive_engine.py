"""The adaptive policy's step samples in a real engine (CPU vLLM, V1 runner).

The policy times a K from the interval between step outputs, and takes a step
as a sample of K only if it verified K drafts *and* drafted K for the next
step (``observe_step_output``). That relies on how vLLM's scheduler reports a
step: its scheduled drafts are the previous decision, its
``num_spec_tokens_to_schedule`` the current one. This drives the policy
through a fixed sequence of K and checks both, end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.adaptive_probe import SCRIPT
from vllm_dflash import adaptive

pytestmark = pytest.mark.e2e

PROBE = Path(__file__).with_name("adaptive_probe.py")


def test_a_three_step_switch_gives_two_samples(
    models: dict[str, Path], tmp_path: Path
) -> None:
    result = tmp_path / "probe.json"
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_DFLASH_ADAPTIVE_K": "1",
    }
    args = [str(models["qwen3-target"]), str(models["qwen3-draft-a"]), str(result)]
    done = subprocess.run(
        [sys.executable, str(PROBE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(result.read_text())
    decisions, outputs = probe["decisions"], probe["outputs"]
    # The scripted steps after the prefill: far from max_tokens, so no step
    # is clipped (a random drafter's drafts are rejected: ~1 token a step).
    decode = [o for o in outputs if o["drafts"] != [0]][: len(SCRIPT)]
    assert len(decode) == len(SCRIPT), outputs
    # Each output verified the previous decision and reports the current one.
    for i, out in enumerate(decode):
        assert out["drafts"] == [decisions[i]], (i, out, decisions)
        assert out["next_k"] == decisions[i + 1], (i, out, decisions)
        assert out["tokens"] == [1 + decisions[i]], (i, out)
    # Timed exactly where the step verified and drafted one K, past the
    # YOUNG_STEPS outputs after the request's prefill (the whole batch had
    # just joined). The switch to K 7 (decisions 8-10): the step drafting for
    # it verified K 3, the step switching back verified K 7, and the two
    # between are timed; the first of them is K 7's first step, no sample (a
    # shape's first run pays one-off costs).
    timed = [o["timed"] for o in decode]
    expected = [
        i >= adaptive.YOUNG_STEPS and o["drafts"] == [o["next_k"]]
        for i, o in enumerate(decode)
    ]
    assert timed == expected, decode
    k7 = [o for o in decode if o["drafts"] == [7]]
    assert [o["next_k"] for o in k7] == [7, 7, 3]
    assert [o["timed"] for o in k7] == [True, True, False]
    assert [o["sampled"] for o in k7] == [False, True, False]
    # The scheduler patch tells the policy, every step, whether the engine
    # deferred its sampling (structured outputs; none here).
    assert {o["blocked_earlier"] for o in outputs} == {False}
