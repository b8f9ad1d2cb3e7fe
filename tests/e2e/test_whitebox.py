"""Inside a real engine: the captured target features are HF's
``hidden_states[i + 1]`` (the +1 convention), and the plugin's draft logits
equal a plain-PyTorch DFlash written from the method's description."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.e2e.reference import draft_logits
from vllm_dflash import tiny
from vllm_dflash.engine import EngineSpec, run

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def record_first_step(
    models: dict[str, Path], out: Path, modules_only: bool = False
) -> dict:
    prompt = tiny.prompts(1, min_len=23, max_len=23, seed=7)[0]
    result = run(
        EngineSpec(
            target=str(models["qwen3-target"]),
            drafter=str(models["qwen3-draft-b"]),
            num_speculative_tokens=15,
            prompts=[prompt],
            max_tokens=4,
            worker_hook="tests.e2e.recorder:record_first_step",
            env={
                "DFLASH_RECORD_PATH": str(out),
                "DFLASH_RECORD_MODULES": "1" if modules_only else "0",
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO), os.environ.get("PYTHONPATH", "")]
                ),
            },
        )
    )
    assert result.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    return {"prompt": prompt, **torch.load(out)}


@pytest.fixture(scope="module")
def first_step(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    return record_first_step(models, tmp_path_factory.mktemp("record") / "step.pt")


def hf_hidden_states(target_dir: Path, prompt: list[int]) -> tuple[torch.Tensor, ...]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=torch.float32
    )
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def test_capture_is_output_of_each_target_layer(first_step: dict, models: dict) -> None:
    layer_ids = json.loads((models["qwen3-draft-b"] / "config.json").read_text())[
        "dflash_config"
    ]["target_layer_ids"]
    prompt = first_step["prompt"]
    captured = first_step["target_hidden_states"]  # [N, n*d]
    assert captured.shape[0] == len(prompt)
    hidden = hf_hidden_states(models["qwen3-target"], prompt)
    d = hidden[0].shape[-1]
    for j, layer in enumerate(layer_ids):
        mine = captured[:, j * d : (j + 1) * d]
        torch.testing.assert_close(mine, hidden[layer + 1], atol=2e-4, rtol=2e-4)
        # The off-by-one this guards against is a real, silent difference.
        assert not torch.allclose(mine, hidden[layer], atol=1e-2)


def test_draft_logits_match_plain_pytorch_dflash(
    first_step: dict, models: dict
) -> None:
    logits = first_step["logits"]  # [K, vocab]: one request, slots 1..K
    expected = draft_logits(
        models["qwen3-draft-b"],
        models["qwen3-target"],
        first_step["target_hidden_states"],
        int(first_step["next_token_ids"][0]),
        num_drafts=15,
    )
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=2e-3)
    assert first_step["drafts"].tolist() == [expected.argmax(-1).tolist()]
    # hidden_norm and every layer's context keys ran on vLLM's kernels
    kernels = first_step["context_kernels"]
    assert len(kernels) > 2 and all(kernels)


def test_draft_logits_match_on_the_modules_own_forward(
    first_step: dict, models: dict, tmp_path: Path
) -> None:
    """The path for norms and RoPE vLLM's kernels do not cover gives the same
    logits."""
    modules = record_first_step(models, tmp_path / "step.pt", modules_only=True)
    assert not any(modules["context_kernels"])
    assert modules["target_hidden_states"].equal(first_step["target_hidden_states"])
    torch.testing.assert_close(
        modules["logits"], first_step["logits"], atol=2e-3, rtol=2e-3
    )
