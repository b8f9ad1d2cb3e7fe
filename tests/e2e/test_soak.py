"""Under load nothing is lost: 200 requests (prompts of 1-400 tokens, some
sharing prefixes; outputs of 1-200 tokens) at concurrency 32, with prefix
caching, chunked prefill under a small token budget and a KV cache small
enough to force preemption. Every request completes with exactly the tokens
asked for, and greedy output equals the same engine without speculation.

Run with ``-s`` to see wall times, preemptions and prefix-cache hits."""

from __future__ import annotations

import random

import pytest

from vllm_dflash import tiny
from vllm_dflash.engine import EngineResult, EngineSpec, run

pytestmark = pytest.mark.e2e

REQUESTS, K, CONCURRENCY = 200, 7, 32
ENGINE = dict(
    max_num_seqs=CONCURRENCY,
    # Small: 32 verify steps of K+1 tokens take half, prompts are chunked.
    max_num_batched_tokens=2 * CONCURRENCY * (K + 1),
    enable_chunked_prefill=True,
    enable_prefix_caching=True,
    block_size=32,
    # 160 blocks of 32 tokens: one request fits (max_model_len), 32 do not.
    num_gpu_blocks_override=160,
    max_model_len=640,
)
# One engine thread: vLLM's CPU kernels otherwise wait on an OpenMP barrier
# for a second core that other processes hold (measured: 5 ms per kernel).
ENV = {"OMP_NUM_THREADS": "1"}


def workload(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1-400 tokens (every other one longer than 160 tokens starts
    with one of four shared prefixes) and output lengths of 1-200 tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 500) for _ in range(n)] for n in (64, 96, 128, 160)]
    prompts, max_tokens = [], []
    for i in range(REQUESTS):
        n = 400 if i == 0 else 1 if i == 1 else rng.randrange(1, 401)
        prefix = prefixes[i // 2 % 4] if i % 2 == 0 and n > 160 else []
        prompts.append(prefix + [rng.randrange(1, 500) for _ in range(n - len(prefix))])
        max_tokens.append(200 if i == 1 else 1 if i == 0 else rng.randrange(1, 201))
    return prompts, max_tokens


PROMPTS, MAX_TOKENS = workload()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EngineResult]:
    root = tmp_path_factory.mktemp("soak")
    target = tiny.build_target(root / "target", num_hidden_layers=2)
    drafter = tiny.build_drafter(
        root / "draft", target, tiny.TinyDrafter(target_layer_ids=[0, 1])
    )
    results = {}
    for name, speculation in (("none", None), ("dflash", str(drafter))):
        result = run(
            EngineSpec(
                target=str(target),
                drafter=speculation,
                num_speculative_tokens=K,
                prompts=PROMPTS,
                request_params=[{"max_tokens": n} for n in MAX_TOKENS],
                llm_kwargs=ENGINE,
                env=ENV,
            )
        )
        print(
            f"\nsoak {name}: {result.elapsed_s:.1f} s for {result.generated_tokens} "
            f"tokens, {result.metrics.get('vllm:num_preemptions', 0):.0f} "
            f"preemptions, {result.metrics.get('vllm:prefix_cache_hits', 0):.0f} "
            "prefix-cache hit tokens"
        )
        results[name] = result
    return results


def test_workload_covers_the_ranges() -> None:
    lengths = [len(p) for p in PROMPTS]
    assert min(lengths) == 1 and max(lengths) == 400
    assert min(MAX_TOKENS) == 1 and max(MAX_TOKENS) == 200


@pytest.mark.parametrize("engine", ["none", "dflash"])
def test_every_request_completes_with_the_tokens_asked_for(
    runs: dict[str, EngineResult], engine: str
) -> None:
    result = runs[engine]
    assert [len(o) for o in result.outputs] == MAX_TOKENS
    assert result.finish_reasons == ["length"] * REQUESTS


def test_greedy_output_equals_no_speculation(runs: dict[str, EngineResult]) -> None:
    assert runs["dflash"].outputs == runs["none"].outputs
    stats = runs["dflash"].proposer_stats
    assert stats is not None and stats["steps"] > 0


@pytest.mark.parametrize("engine", ["none", "dflash"])
def test_load_preempted_and_hit_the_prefix_cache(
    runs: dict[str, EngineResult], engine: str
) -> None:
    metrics = runs[engine].metrics
    assert metrics["vllm:num_preemptions"] > 0
    assert metrics["vllm:prefix_cache_hits"] > 0
