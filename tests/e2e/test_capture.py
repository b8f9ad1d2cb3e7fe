"""DFlash on targets whose vLLM class has no EAGLE-3 aux-hidden-state
interface (without the plugin they stop with vLLM's "Model does not support
EAGLE3 interface").

Gemma 3 and Mixtral get the plugin's capture: greedy output equals the output
without speculation, and the captured states are HF's ``hidden_states[i+1]``
(the Gemma 3 engine runs under torch.compile). vLLM's Transformers backend, the
documented fallback for architectures the capture does not cover, captures
the same states. (An uncovered architecture stopping at start-up:
tests/unit/test_capture.py::test_uncovered_target_fails_with_the_fix.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.test_whitebox import hf_hidden_states
from vllm_dflash import tiny
from vllm_dflash.engine import EngineResult, EngineSpec, run

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
LAYER_IDS = [0, 2]
PROMPTS = tiny.prompts(3, min_len=5, max_len=30, seed=3)
PLUGIN = "vllm_dflash.proposer.DFlashProposer"
# Dynamo traces the target (fullgraph) with the eager backend: the capture's
# appends must trace as side effects whose tensors the forward returns.
COMPILED = dict(llm_kwargs={"enforce_eager": False}, env={"VLLM_CPU_CI_ENV": "1"})


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capture-models")
    out: dict[str, Path] = {}
    for family in ("gemma3", "mixtral"):
        target = tiny.build_target(root / f"{family}-target", family=family)
        out[family] = target
        out[f"{family}-draft"] = tiny.build_drafter(
            root / f"{family}-draft",
            target,
            tiny.TinyDrafter(target_layer_ids=LAYER_IDS),
        )
    return out


def run_dflash(
    targets: dict[str, Path], family: str, record: Path, **spec: Any
) -> tuple[EngineResult, dict]:
    env = {
        "DFLASH_RECORD_PATH": str(record),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    extra_env = dict(spec.pop("env", {}))
    result = run(
        EngineSpec(
            target=str(targets[family]),
            drafter=str(targets[f"{family}-draft"]),
            prompts=PROMPTS,
            max_tokens=16,
            worker_hook="tests.e2e.recorder:record_first_step",
            env={**env, **extra_env},
            **spec,
        )
    )
    return result, torch.load(record)


@pytest.fixture(scope="module", params=["gemma3", "mixtral"])
def captured(
    request: pytest.FixtureRequest,
    targets: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, EngineResult, EngineResult, dict]:
    family = request.param
    base = run(EngineSpec(target=str(targets[family]), prompts=PROMPTS, max_tokens=16))
    record = tmp_path_factory.mktemp("record") / f"{family}.pt"
    spec = COMPILED if family == "gemma3" else {}
    dflash, first_step = run_dflash(targets, family, record, **spec)
    return family, base, dflash, first_step


def assert_capture_is_hf_layer_output(target: Path, first_step: dict) -> None:
    """The first step prefills every prompt: its captured features, split per
    prompt, must be HF's hidden_states[i+1] for each target layer id i."""
    features = first_step["target_hidden_states"]  # [sum of prompt lengths, n*d]
    assert features.shape[0] == sum(len(p) for p in PROMPTS)
    start = 0
    for prompt in PROMPTS:
        mine = features[start : start + len(prompt)]
        start += len(prompt)
        hidden = hf_hidden_states(target, prompt)
        d = hidden[0].shape[-1]
        for j, layer in enumerate(LAYER_IDS):
            part = mine[:, j * d : (j + 1) * d]
            torch.testing.assert_close(part, hidden[layer + 1], atol=2e-4, rtol=2e-4)
            assert not torch.allclose(part, hidden[layer], atol=1e-2)


def test_greedy_output_equals_no_speculation(captured: tuple) -> None:
    family, base, dflash, _ = captured
    assert dflash.drafter_class == PLUGIN
    assert dflash.proposer_stats and dflash.proposer_stats["steps"] > 0
    assert dflash.outputs == base.outputs, family


def test_capture_is_output_of_each_target_layer(
    captured: tuple, targets: dict[str, Path]
) -> None:
    family, _, _, first_step = captured
    assert_capture_is_hf_layer_output(targets[family], first_step)


def test_transformers_backend_is_the_fallback(
    targets: dict[str, Path], tmp_path: Path
) -> None:
    result, first_step = run_dflash(
        targets,
        "gemma3",
        tmp_path / "transformers.pt",
        llm_kwargs={"model_impl": "transformers"},
    )
    assert result.drafter_class == PLUGIN
    assert result.proposer_stats and result.proposer_stats["steps"] > 0
    assert_capture_is_hf_layer_output(targets["gemma3"], first_step)
