"""Gemma 4, the reference deployment, in miniature: a Gemma-4-shaped target
(sliding + global layers with different head sizes, MoE, tied and
sqrt(hidden)-scaled embeddings, logit soft cap) and a Gemma-style drafter
(sliding causal layers + a full non-causal layer, mask id 4, GELU-tanh, its
own logit multiplier and soft cap).

One engine without and one with DFlash. Checked: greedy output is unchanged;
the drafter's layers run in their own attention groups with their own masks;
the captured target features are HF's ``hidden_states[i + 1]``; the first
step's draft logits equal a plain-PyTorch DFlash with the Gemma conventions,
and flipping any one convention would make them differ (so a missing
convention cannot pass silently). A third engine runs with vLLM's hybrid KV
cache manager off (one KV cache group, two masks)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.reference import Conventions, draft_logits
from vllm_dflash import tiny
from vllm_dflash.engine import EngineResult, EngineSpec, run

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# Longer than the sliding window (8); all in one prefill step.
PROMPTS = tiny.prompts(6, min_len=3, max_len=60, seed=3)
MAX_TOKENS = 32
K = 7


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma")
    # The target's window equals the drafter's: vLLM can then also run with the
    # hybrid KV cache manager off (one window per merged KV cache group).
    target = tiny.build_target(root / "target", family="gemma4", sliding_window=8)
    drafter = tiny.build_drafter(root / "drafter", target, tiny.gemma_drafter())
    return {"target": target, "drafter": drafter}


@pytest.fixture(scope="module")
def baseline(gemma: dict[str, Path]) -> EngineResult:
    return run(
        EngineSpec(target=str(gemma["target"]), prompts=PROMPTS, max_tokens=MAX_TOKENS)
    )


def run_recorded(
    gemma: dict[str, Path], out: Path, **llm_kwargs: Any
) -> tuple[EngineResult, dict[str, Any]]:
    """A DFlash engine over PROMPTS that records its first step at ``out``."""
    result = run(
        EngineSpec(
            target=str(gemma["target"]),
            drafter=str(gemma["drafter"]),
            num_speculative_tokens=K,
            prompts=PROMPTS,
            max_tokens=MAX_TOKENS,
            llm_kwargs=llm_kwargs,
            worker_hook="tests.e2e.recorder:record_first_step",
            env={
                "DFLASH_RECORD_PATH": str(out),
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO), os.environ.get("PYTHONPATH", "")]
                ),
            },
        )
    )
    return result, torch.load(out)


@pytest.fixture(scope="module")
def dflash(
    gemma: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[EngineResult, dict[str, Any]]:
    return run_recorded(gemma, tmp_path_factory.mktemp("record") / "first_step.pt")


def requests_of(record: dict[str, Any]) -> list[tuple[slice, int]]:
    """(rows of the captured features, next token) per request of the first
    step: every request is a whole prefill there, so positions restart at 0."""
    pos = record["target_positions"]
    pos = pos if pos.dim() == 1 else pos[0]
    starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
    nexts = record["next_token_ids"].tolist()
    assert len(starts) - 1 == len(nexts) == len(PROMPTS)
    return [
        (slice(a, b), int(t))
        for a, b, t in zip(starts, starts[1:], nexts, strict=False)
    ]


def test_greedy_output_equals_no_speculation(
    baseline: EngineResult, dflash: tuple[EngineResult, dict]
) -> None:
    result, _ = dflash
    assert [len(o) for o in baseline.outputs] == [MAX_TOKENS] * len(PROMPTS)
    assert result.outputs == baseline.outputs
    assert result.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    stats = result.proposer_stats
    assert stats is not None and stats["steps"] > 0
    assert stats["draft_tokens"] >= stats["steps"] * K


def test_sliding_and_full_layers_get_their_own_groups(
    dflash: tuple[EngineResult, dict],
) -> None:
    groups = dflash[1]["attention_groups"]  # (KV cache group, causal)
    # 2 sliding causal layers, 1 full non-causal layer; the hybrid KV cache
    # manager gives sliding layers KV cache groups of their own.
    assert {causal for _, causal in groups} == {True, False}
    sliding = {gid for gid, causal in groups if causal}
    full = {gid for gid, causal in groups if not causal}
    assert sliding and full and not sliding & full


def test_capture_is_output_of_each_gemma4_layer(
    dflash: tuple[EngineResult, dict], gemma: dict[str, Path]
) -> None:
    import transformers

    record = dflash[1]
    layer_ids = json.loads((gemma["drafter"] / "config.json").read_text())[
        "dflash_config"
    ]["target_layer_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gemma["target"], dtype=torch.float32
    )
    for (rows, _), prompt in zip(requests_of(record), PROMPTS, strict=True):
        captured = record["target_hidden_states"][rows]
        assert captured.shape[0] == len(prompt)
        with torch.no_grad():
            hidden = model(torch.tensor([prompt]), output_hidden_states=True)
        d = hidden.hidden_states[0].shape[-1]
        for j, layer in enumerate(layer_ids):
            mine = captured[:, j * d : (j + 1) * d]
            expected = hidden.hidden_states[layer + 1][0]
            torch.testing.assert_close(mine, expected, atol=2e-4, rtol=2e-4)
            assert not torch.allclose(mine, hidden.hidden_states[layer][0], atol=1e-2)


def reference_logits(
    record: dict[str, Any], gemma: dict[str, Path], conventions: Conventions
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(plugin's, reference) draft logits [K, vocab] per request."""
    pairs = []
    for b, (rows, next_token) in enumerate(requests_of(record)):
        expected = draft_logits(
            gemma["drafter"],
            gemma["target"],
            record["target_hidden_states"][rows],
            next_token,
            num_drafts=K,
            conventions=conventions,
        )
        pairs.append((record["logits"][b * K : (b + 1) * K], expected))
    return pairs


def test_draft_logits_follow_gemma_conventions(
    dflash: tuple[EngineResult, dict], gemma: dict[str, Path]
) -> None:
    record = dflash[1]
    conventions = Conventions.of(gemma["drafter"], gemma["target"])
    # What the tiny drafter's config implies (see tiny.gemma_drafter).
    assert conventions.embed_scale == pytest.approx(128**0.5)
    assert conventions.causal == (True, True, False)
    assert conventions.window == (8, 8, None)
    assert (conventions.multiplier, conventions.softcap) == (8.0, 2.0)
    assert conventions.activation == "gelu_tanh"
    pairs = reference_logits(record, gemma, conventions)
    for mine, expected in pairs:
        torch.testing.assert_close(mine, expected, atol=2e-3, rtol=2e-3)
    drafts = record["drafts"]  # [B, K]
    assert drafts.tolist() == [e.argmax(-1).tolist() for _, e in pairs]


FLIPS: dict[str, dict[str, Any]] = {
    "causality": {"causal": (False, False, True)},
    "sliding-non-causal": {"causal": (False, False, False)},
    "full-causal": {"causal": (True, True, True)},
    "no-window": {"window": (None, None, None)},
    "no-embed-scale": {"embed_scale": 1.0},
    "embed-scale-twice": {"embed_scale": 128.0},
    "silu-mlp": {"activation": "silu"},
    "no-logit-conventions": {"multiplier": 1.0, "softcap": None},
    "target-softcap-only": {"multiplier": 1.0, "softcap": 30.0},
}


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_each_convention_changes_the_logits(
    dflash: tuple[EngineResult, dict], gemma: dict[str, Path], flip: str
) -> None:
    """The test above can fail: each convention, flipped alone, no longer
    matches what the plugin computed."""
    record = dflash[1]
    conventions = Conventions.of(gemma["drafter"], gemma["target"])
    flipped = dataclasses.replace(conventions, **FLIPS[flip])
    pairs = reference_logits(record, gemma, flipped)
    assert not all(
        torch.allclose(mine, expected, atol=2e-3, rtol=2e-3) for mine, expected in pairs
    )


def test_one_kv_cache_group_still_gives_each_layer_its_mask(
    gemma: dict[str, Path],
    baseline: EngineResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With the hybrid KV cache manager off, sliding and full layers share one
    KV cache group (one block table) but not one mask."""
    result, record = run_recorded(
        gemma,
        tmp_path_factory.mktemp("record-one-group") / "first_step.pt",
        disable_hybrid_kv_cache_manager=True,
    )
    assert result.outputs == baseline.outputs
    groups = record["attention_groups"]
    assert len({gid for gid, _ in groups}) == 1
    assert {causal for _, causal in groups} == {True, False}
    conventions = Conventions.of(gemma["drafter"], gemma["target"])
    for mine, expected in reference_logits(record, gemma, conventions):
        torch.testing.assert_close(mine, expected, atol=2e-3, rtol=2e-3)


def test_bench_preset_passes_vllm_and_plugin_config_checks(tmp_path: Path) -> None:
    """The gemma4-26b-a4b preset (the lead's H200 run) through vLLM's own
    engine config and the plugin's validation, without loading weights."""
    import subprocess
    import sys

    code = f"""
import json, pathlib
from vllm.engine.arg_utils import EngineArgs
from vllm_dflash.bench import write_preset
from vllm_dflash.proposer import prepare_draft_config
target, drafter = write_preset("gemma4-26b-a4b", pathlib.Path({str(tmp_path)!r}))
config = EngineArgs(
    model=str(target), load_format="dummy", skip_tokenizer_init=True,
    dtype="bfloat16", max_model_len=4096, max_num_batched_tokens=8192,
    enforce_eager=True,
    speculative_config={{"method": "dflash", "model": str(drafter),
                        "num_speculative_tokens": 15}},
).create_engine_config()
draft = prepare_draft_config(config)
print(json.dumps(dict(
    layers=config.model_config.get_total_num_hidden_layers(),
    windows=[layer.sliding_window for layer in draft.layers],
    causal=[layer.causal for layer in draft.layers],
    aux=list(draft.aux_layer_ids),
    scale=draft.embed_scale,
)))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layers"] == 30
    assert out["windows"] == [2048] * 4 + [None]
    assert out["causal"] == [True] * 4 + [False]
    assert out["aux"] == [2, 7, 12, 18, 23, 28]
    assert out["scale"] == pytest.approx(2816**0.5)
