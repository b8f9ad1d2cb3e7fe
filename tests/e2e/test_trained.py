"""A drafter trained by ``vllm-dflash train`` (the session's ``trained``
fixture) in real engines: drafts are accepted many at a time, greedy output
still equals decoding without speculation (stop tokens included), vLLM's
acceptance length is what the trainer's own estimate predicts for the same
text, and vLLM's native DFlash loads the checkpoint too.

The tiny drafter learned to continue the target's cycles from the context
(induction), so it misses while a cycle is first produced and is accepted
after. Half the prompts are "cold" (random ids); the other half are "warm":
they end with the target's own text, as a conversation's history does, so
drafts are accepted from the first step and a stop token can be met inside
an accepted run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_dflash import tiny
from vllm_dflash.engine import EngineResult, EngineSpec, run
from vllm_dflash.torch_drafter import load_drafter
from vllm_dflash.train import (
    Sequence,
    Target,
    accepted_runs,
    block_logits,
    make_batch,
    walk_acceptance,
)

pytestmark = pytest.mark.e2e

K = tiny.TINY_RECIPE["block_size"] - 1
MAX_TOKENS = 64
COLD = tiny.prompts(4, min_len=2, max_len=32, seed=21)
WARM_SEEDS = tiny.prompts(4, min_len=2, max_len=32, seed=22)
STOPPED = range(len(COLD), len(COLD) + len(WARM_SEEDS))  # the warm prompts


@pytest.fixture(scope="module")
def prompts(trained: tiny.TrainedPair) -> list[list[int]]:
    target = Target(str(trained.target), torch.device("cpu"), torch.float32)
    warm = [seq.ids for seq in target.greedy(WARM_SEEDS, new_tokens=16)]
    return COLD + warm


@pytest.fixture(scope="module")
def baseline(trained: tiny.TrainedPair, prompts: list[list[int]]) -> EngineResult:
    return run(
        EngineSpec(target=str(trained.target), prompts=prompts, max_tokens=MAX_TOKENS)
    )


def trainer_runs(
    trained: tiny.TrainedPair, prompts: list[list[int]], outputs: list[list[int]]
) -> list[list[int]]:
    """Accepted drafts of the block anchored at every generated token, by the
    trainer's plain-PyTorch drafter (the figures its held-out estimate uses)."""
    target = Target(str(trained.target), torch.device("cpu"), torch.float32)
    drafter = load_drafter(str(trained.drafter)).eval()
    layer_ids = list(drafter.cfg.target_layer_ids)
    runs = []
    for prompt, out in zip(prompts, outputs, strict=True):
        seq = Sequence(prompt + out, len(prompt))
        anchors = list(range(len(prompt), len(seq.ids) - K))
        with torch.no_grad():
            batch = make_batch([seq], [anchors], K + 1, torch.device("cpu"))
            logits = block_logits(drafter, target, batch, layer_ids)
        runs.append(accepted_runs(logits, batch.labels)[0].tolist())
    return runs


def stops_inside_accepted_runs(
    outputs: list[list[int]], runs: list[list[int]]
) -> list[list[int]]:
    """For the prompts in STOPPED, a token of the output that is drafted (not
    the bonus token) inside an accepted run, whose first occurrence is there."""
    stops: list[list[int]] = [[] for _ in outputs]
    for i in STOPPED:
        out, j = outputs[i], 0
        while j < len(runs[i]):
            run_len = runs[i][j]
            for pos in range(j + 2, j + run_len + 1):  # 2nd.. accepted draft
                if out.index(out[pos]) == pos:
                    stops[i] = [out[pos]]
                    break
            if stops[i]:
                break
            j += run_len + 1
    return stops


def truncate(out: list[int], stop: list[int]) -> list[int]:
    for pos, token in enumerate(out):
        if token in stop:
            return out[: pos + 1]
    return out


def with_drafter(
    trained: tiny.TrainedPair, prompts: list[list[int]], **spec: Any
) -> EngineResult:
    """The trained pair at K = block size - 1, greedy, MAX_TOKENS tokens."""
    return run(
        EngineSpec(
            target=str(trained.target),
            drafter=str(trained.drafter),
            num_speculative_tokens=K,
            prompts=prompts,
            max_tokens=MAX_TOKENS,
            **spec,
        )
    )


@pytest.fixture(scope="module")
def with_stops(
    trained: tiny.TrainedPair, prompts: list[list[int]], baseline: EngineResult
) -> tuple[EngineResult, list[list[int]], list[list[int]]]:
    runs = trainer_runs(trained, prompts, baseline.outputs)
    stops = stops_inside_accepted_runs(baseline.outputs, runs)
    result = with_drafter(
        trained, prompts, request_params=[{"stop_token_ids": s} for s in stops]
    )
    return result, stops, runs


def test_trained_drafter_is_accepted_and_lossless(
    baseline: EngineResult,
    with_stops: tuple[EngineResult, list[list[int]], list[list[int]]],
) -> None:
    result, stops, _ = with_stops
    assert result.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    assert [len(o) for o in baseline.outputs] == [MAX_TOKENS] * len(result.outputs)
    # Greedy output equals plain decoding; stop tokens end it at the same
    # place, although they were accepted as drafts in the middle of a block.
    expected = [truncate(o, s) for o, s in zip(baseline.outputs, stops, strict=True)]
    assert result.outputs == expected
    assert all(stops[i] for i in STOPPED)
    assert all(len(expected[i]) < MAX_TOKENS for i in STOPPED)
    tau = result.acceptance_length
    assert tau is not None and tau >= 3.0, result.metrics


def test_vllm_acceptance_matches_the_trainers_estimate(
    trained: tiny.TrainedPair,
    with_stops: tuple[EngineResult, list[list[int]], list[list[int]]],
) -> None:
    """The decoding walk over the trainer's per-block results is vLLM's mean
    acceptance length: the drafter sees in training what it sees in vLLM."""
    result, stops, runs = with_stops
    cut = [
        row[: len(truncate(out, stop))]
        for row, out, stop in zip(runs, result.outputs, stops, strict=True)
    ]
    estimate = walk_acceptance(cut)
    assert result.acceptance_length == pytest.approx(estimate, rel=0.1)
    assert trained.result["heldout_acceptance"] >= 3.0


def test_native_dflash_loads_the_trained_checkpoint(
    trained: tiny.TrainedPair, prompts: list[list[int]]
) -> None:
    """vLLM's own DFlash (bf16: its CPU path fails in fp32) runs it."""
    result = run(
        EngineSpec(
            target=str(trained.target),
            drafter=str(trained.drafter),
            num_speculative_tokens=K,
            prompts=prompts[:2],
            max_tokens=16,
            dtype="bfloat16",
            env={"VLLM_DFLASH_USE_NATIVE": "1"},
        )
    )
    assert result.drafter_class is not None
    assert not result.drafter_class.startswith("vllm_dflash")
    assert [len(o) for o in result.outputs] == [16, 16]
    assert result.metrics["vllm:spec_decode_num_draft_tokens"] > 0


def test_a_scheduled_k_drafts_a_block_of_k_plus_1(
    trained: tiny.TrainedPair, prompts: list[list[int]], baseline: EngineResult
) -> None:
    """With num_speculative_tokens 15 and a schedule that verifies 3 drafts
    at every batch size, the drafter runs blocks of 4 positions, not 16: the
    same blocks, hence the same drafts and acceptance, as an engine whose
    num_speculative_tokens is 3."""
    scheduled = with_drafter(
        trained,
        prompts,
        speculative_extra={"num_speculative_tokens_per_batch_size": [(1, 4096, 3)]},
    )
    fixed = run(
        EngineSpec(
            target=str(trained.target),
            drafter=str(trained.drafter),
            num_speculative_tokens=3,
            prompts=prompts,
            max_tokens=MAX_TOKENS,
        )
    )
    assert scheduled.outputs == fixed.outputs == baseline.outputs
    stats = scheduled.proposer_stats
    assert stats is not None and stats["blocks"] > 0
    assert stats["draft_tokens"] == 3 * stats["blocks"]
    assert stats["block_tokens"] == 4 * stats["blocks"]
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        metric = f"vllm:spec_decode_{name}"
        assert scheduled.metrics[metric] == fixed.metrics[metric], metric
    tau = scheduled.acceptance_length
    assert tau is not None and tau > 2.0, scheduled.metrics


def test_adaptive_k_is_lossless_and_varies_k(
    trained: tiny.TrainedPair, prompts: list[list[int]], baseline: EngineResult
) -> None:
    """``VLLM_DFLASH_ADAPTIVE_K=1``: the scheduler asks the plugin's policy
    for K each step. It tries several K (0 included: the first choice at a
    new batch size), settles on what the measurements favour, and the greedy
    output is still plain decoding's, whatever K each step verified."""
    result = with_drafter(trained, prompts, env={"VLLM_DFLASH_ADAPTIVE_K": "1"})
    assert result.outputs == baseline.outputs
    steps = result.adaptive_k
    assert steps is not None, "the adaptive policy was not installed"
    assert set(steps) <= {0, 1, 3, 7, 15}
    assert len(steps) >= 3, steps
    # Each block was as long as its K + 1, so K below 15 drafted less.
    stats = result.proposer_stats
    assert stats is not None
    assert stats["block_tokens"] == stats["draft_tokens"] + stats["blocks"]
    assert stats["block_tokens"] < 16 * stats["blocks"]
    # Drafts were verified and accepted several at a time.
    tau = result.acceptance_length
    assert tau is not None and tau > 1.5, (result.metrics, steps)
