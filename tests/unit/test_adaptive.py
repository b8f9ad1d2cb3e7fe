"""The adaptive draft-length policy (``vllm_dflash.adaptive``), driven by a
simulated engine whose step cost and acceptance are known, so the best K is
known too; and its hand-over to vLLM (schedule, config injection)."""

from __future__ import annotations

import json
import random
from collections import deque

import pytest

from vllm_dflash import adaptive, patching
from vllm_dflash.adaptive import AcceptanceEstimate, AdaptiveDraftLength


def test_candidates_and_capture_schedule_cover_every_k() -> None:
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    assert adaptive.candidate_ks(15) == (0, 1, 3, 7, 15)
    assert adaptive.candidate_ks(5) == (0, 1, 3, 5)
    assert adaptive.candidate_ks(1) == (0, 1)
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        adaptive.candidate_ks(0)
    for k_max, max_seqs in ((15, 256), (7, 3), (1, 1)):
        dense = build_dynamic_sd_schedule_lookup(
            adaptive.capture_schedule(k_max),
            vllm_max_batch_size=max_seqs,
            vllm_num_speculative_tokens=k_max,
        )
        # vLLM accepts it; and the schedule names every candidate (what the
        # V2 runner captures graphs for).
        assert len(dense) == max_seqs + 1
        named = {k for _, _, k in adaptive.capture_schedule(k_max)}
        assert named == set(adaptive.candidate_ks(k_max))


def draw_accepted(rng: random.Random, conditional: list[float], k: int) -> int:
    n = 0
    while n < k and rng.random() < conditional[n]:
        n += 1
    return n


def test_acceptance_estimate_learns_conditional_rates() -> None:
    truth = [0.9, 0.8, 0.6, 0.5, 0.3, 0.3, 0.2]
    est = AcceptanceEstimate(k_max=7, prior=0.7, decay=1.0)
    rng = random.Random(0)
    for _ in range(20000):
        est.observe(5, draw_accepted(rng, truth, 5))
    got = est.conditional()
    for i in range(5):
        assert got[i] == pytest.approx(truth[i], abs=0.03), (i, got)
    # Positions 6 and 7 were never verified: the prior.
    assert got[5:] == [0.7, 0.7]
    expected = 0.9 + 0.9 * 0.8 + 0.9 * 0.8 * 0.6
    assert est.expected_accepted(3) == pytest.approx(expected, abs=0.05)


def test_unverified_positions_return_to_the_prior() -> None:
    est = AcceptanceEstimate(k_max=3, prior=0.7, decay=0.99)
    for _ in range(500):
        est.observe(3, 0)  # position 1 always rejected: 2 and 3 never tried
    assert est.conditional()[0] < 0.05
    for _ in range(2000):
        est.observe(1, 1)  # only position 1 verified from now on
    rates = est.conditional()
    assert rates[0] > 0.95
    assert rates[1] == pytest.approx(0.7, abs=0.01)


def simulate(
    policy_or_k: AdaptiveDraftLength | int,
    *,
    batch: int,
    conditional: list[float],
    seconds: object,
    steps: int = 600,
    seed: int = 0,
) -> float:
    """Output tokens per simulated second of a decode loop at ``batch``;
    ``seconds(num_tokens)`` is the cost of a verify pass, DRAFT_S the
    drafter's."""
    rng = random.Random(seed)
    clock = 0.0
    tokens = 0
    k = 0  # the first step has no drafts yet
    for _ in range(steps):
        # The scheduler picks the next step's K before this step runs; the
        # step verifies its k drafts and drafts k_next for the next one (the
        # drafter is skipped when k_next is 0, as on the V1 runner).
        if isinstance(policy_or_k, AdaptiveDraftLength):
            k_next = policy_or_k[batch]
        else:
            k_next = policy_or_k
        clock += seconds(batch * (1 + k)) + (DRAFT_S if k_next else 0.0)  # type: ignore[operator]
        for _ in range(batch):
            accepted = draw_accepted(rng, conditional, k)
            tokens += 1 + accepted
            if isinstance(policy_or_k, AdaptiveDraftLength):
                policy_or_k.observe_request(k, accepted)
        if isinstance(policy_or_k, AdaptiveDraftLength):
            scheduled = {f"r{i}": 1 + k for i in range(batch)}
            drafts = {f"r{i}": [-1] * k for i in range(batch)} if k else {}
            policy_or_k.observe_step_output(scheduled, drafts, k_next, clock)
        k = k_next
    return tokens / clock


DRAFT_S = 0.002
DENSE_SMALL_BATCH = dict(batch=1, seconds=lambda n: 0.010 + 0.00002 * n)
COMPUTE_BOUND = dict(batch=64, seconds=lambda n: 0.010 + 0.0004 * n)
HIGH = [0.95] * 15
DECAYING = [0.75, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2, 0.2]
LOW = [0.2] * 15


@pytest.mark.parametrize(
    ("load", "conditional"),
    [
        (DENSE_SMALL_BATCH, HIGH),
        (DENSE_SMALL_BATCH, DECAYING),
        (COMPUTE_BOUND, DECAYING),
        (COMPUTE_BOUND, LOW),
        (dict(batch=8, seconds=lambda n: 0.010 + 0.0002 * n), DECAYING),
    ],
    ids=["b1-high", "b1-decaying", "b64-decaying", "b64-low", "b8-decaying"],
)
def test_adaptive_matches_the_best_fixed_k(
    load: dict[str, object], conditional: list[float]
) -> None:
    fixed = {
        k: simulate(k, conditional=conditional, **load)  # type: ignore[arg-type]
        for k in adaptive.candidate_ks(15)
    }
    best = max(fixed.values())
    policy = AdaptiveDraftLength(15)
    got = simulate(policy, conditional=conditional, **load)  # type: ignore[arg-type]
    assert got >= 0.95 * best, (got, fixed, policy.summary())
    # Never materially slower than no drafting (exploration and the periodic
    # re-measurement cost about 1-2% where K = 0 is best).
    assert got >= fixed[0] * 0.98


def test_low_acceptance_at_a_compute_bound_batch_stops_drafting() -> None:
    policy = AdaptiveDraftLength(15)
    simulate(policy, conditional=LOW, **COMPUTE_BOUND)  # type: ignore[arg-type]
    assert policy.choose(64) == 0
    policy = AdaptiveDraftLength(15)
    simulate(policy, conditional=HIGH, **DENSE_SMALL_BATCH)  # type: ignore[arg-type]
    assert policy.choose(1) == 15


def test_step_output_filter() -> None:
    policy = AdaptiveDraftLength(7)
    decode = {"a": 4, "b": 4}
    drafts = {"a": [1, 2, 3], "b": [4, 5, 6]}
    policy.observe_step_output(decode, drafts, 3, 1.00)  # first: no interval
    policy.observe_step_output(decode, drafts, 3, 1.50)  # a bin's first: warm-up
    policy.observe_step_output(decode, drafts, 3, 1.51)
    assert policy.cost.count(8, drafting=True) == 1  # 2 requests x (1 + 3)
    assert policy.cost.estimate(8, drafting=True) == pytest.approx(0.01)
    assert policy.cost.count(8, drafting=False) == 0
    # A prefill in the step, mixed draft counts, an idle gap, a switch of K
    # (the step drafted for the other K): not cost samples.
    policy.observe_step_output({"a": 4, "c": 30}, {"a": [1, 2, 3]}, 3, 1.52)
    policy.observe_step_output({"a": 4, "b": 2}, {"a": [1, 2, 3], "b": [9]}, 3, 1.53)
    policy.observe_step_output(decode, drafts, 3, 9.0)
    policy.observe_step_output(decode, drafts, 0, 9.01)
    assert sum(policy.cost.seen.values()) == 2
    # K = 0 steps (no drafts at all) are samples too.
    policy.observe_step_output({"a": 1, "b": 1}, {}, 0, 9.012)
    policy.observe_step_output({"a": 1, "b": 1}, {}, 0, 9.014)
    assert policy.cost.count(2, drafting=False) == 1


def test_a_slow_first_run_of_a_shape_does_not_rule_k_out() -> None:
    """The first step of a token bin (one-off warm-up) is no sample, and one
    outlier later moves the median, not the estimate's scale."""
    policy = AdaptiveDraftLength(7)
    decode, drafts = {"a": 8}, {"a": [0] * 7}
    clock = 0.0
    for seconds in (0.0, 0.5, 0.01, 0.01, 0.2, 0.01, 0.01):
        clock += seconds
        policy.observe_step_output(decode, drafts, 7, clock)
    assert policy.cost.estimate(8, drafting=True) == pytest.approx(0.01)


def test_injection_only_for_dflash_with_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {"method": "dflash", "model": "d", "num_speculative_tokens": 15}
    monkeypatch.delenv("VLLM_DFLASH_ADAPTIVE_K", raising=False)
    assert patching.inject_adaptive_schedule(dict(spec)) == "off"
    monkeypatch.setenv("VLLM_DFLASH_ADAPTIVE_K", "1")
    on = dict(spec)
    assert patching.inject_adaptive_schedule(on) is None
    assert on["num_speculative_tokens_per_batch_size"] == adaptive.capture_schedule(15)
    own = {**spec, "num_speculative_tokens_per_batch_size": [(1, 8, 15), (9, 64, 3)]}
    assert "num_speculative_tokens_per_batch_size" in str(
        patching.inject_adaptive_schedule(own)
    )
    assert own["num_speculative_tokens_per_batch_size"] == [(1, 8, 15), (9, 64, 3)]
    eagle = {**spec, "method": "eagle3"}
    assert patching.inject_adaptive_schedule(eagle) == "off"
    monkeypatch.setenv("VLLM_DFLASH_ADAPTIVE_K", "maybe")
    with pytest.raises(ValueError, match="VLLM_DFLASH_ADAPTIVE_K='maybe'"):
        patching.inject_adaptive_schedule(dict(spec))


def test_drafter_graphs_are_planned_for_every_drafting_k() -> None:
    """vLLM plans decode graphs per scheduled K when a dynamic schedule is
    set: the drafter's manager sees every K > 0 of it (a block of K + 1 per K;
    K 0 drafts nothing), and the full schedule is back afterwards, also when
    building fails."""
    from types import SimpleNamespace

    from vllm_dflash import compat

    schedule = adaptive.capture_schedule(15)
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(
            num_speculative_tokens_per_batch_size=schedule
        )
    )
    spec = config.speculative_config
    with compat.drafting_lengths_only(config):
        seen = spec.num_speculative_tokens_per_batch_size
        assert sorted(k for _, _, k in seen) == [1, 3, 7, 15]
    assert spec.num_speculative_tokens_per_batch_size == schedule
    with pytest.raises(RuntimeError), compat.drafting_lengths_only(config):
        raise RuntimeError("capture failed")
    assert spec.num_speculative_tokens_per_batch_size == schedule
    spec.num_speculative_tokens_per_batch_size = [(1, 1 << 20, 0)]
    with compat.drafting_lengths_only(config):
        assert spec.num_speculative_tokens_per_batch_size is None
    with compat.drafting_lengths_only(SimpleNamespace(speculative_config=None)):
        pass


def test_lazy_decay_equals_decaying_every_count() -> None:
    """The estimate's one-multiplication decay gives what decaying every count
    at every observation gives, across its rescaling point (~14k requests)."""
    est = AcceptanceEstimate(k_max=4, decay=0.998)
    tried, accepted = [0.0] * 4, [0.0] * 4
    rng = random.Random(1)
    for _ in range(20000):
        drafts = rng.choice((1, 3, 4))
        n = draw_accepted(rng, [0.9, 0.7, 0.5, 0.3], drafts)
        est.observe(drafts, n)
        tried = [t * 0.998 for t in tried]
        accepted = [a * 0.998 for a in accepted]
        for i in range(min(n + 1, drafts)):
            tried[i] += 1.0
            accepted[i] += 1.0 if i < n else 0.0
    eager = [(a + 2.0 * 0.7) / (t + 2.0) for a, t in zip(accepted, tried, strict=True)]
    assert est.conditional() == pytest.approx(eager, rel=1e-9)


def test_snapshot_reports_decisions_costs_and_acceptance() -> None:
    policy = AdaptiveDraftLength(7, min_samples=1)
    policy.observe_request(7, 3)
    for step in range(4):
        k = policy[4]
        drafts = {f"r{i}": [0] * k for i in range(4)}
        policy.observe_step_output(
            {r: 1 + k for r in drafts}, drafts, k, 0.01 * (step + 1)
        )
    snap = policy.snapshot()
    assert sum(snap["steps_per_k"].values()) == 4
    assert sum(snap["steps_per_batch_k"].values()) == 4
    assert {key.split("/")[0] for key in snap["steps_per_batch_k"]} == {"b4"}
    assert set(snap["steps_per_k"]) <= {"0", "1", "3", "7"}
    assert len(snap["conditional_acceptance"]) == 7
    for ms, n in snap["step_ms"].values():
        assert ms == pytest.approx(10.0) and n >= 1
    json.dumps(snap)  # JSON-ready: the benchmark stores it


def test_policy_delta_counts_only_the_timed_run() -> None:
    from vllm_dflash.bench import _policy_delta

    before = {"steps_per_k": {"0": 3, "3": 5}, "steps_per_batch_k": {"b8/K3": 5}}
    after = {
        "steps_per_k": {"0": 3, "3": 9, "7": 2},
        "steps_per_batch_k": {"b8/K3": 6, "b16/K3": 3, "b16/K7": 2},
        "step_ms": {},
    }
    delta = _policy_delta(before, after)
    assert delta is not None
    assert delta["steps_per_k"] == {"3": 4, "7": 2}
    assert delta["steps_per_batch_k"] == {"b8/K3": 1, "b16/K3": 3, "b16/K7": 2}
    assert _policy_delta(None, after)["steps_per_k"] == after["steps_per_k"]
    assert _policy_delta(None, None) is None


# The policy's table at batch 8 on the H200 (Qwen3-8B shape, decaying
# acceptance; docs/benchmarks/qwen3-8b-h200-adaptive-decay.json): step ms and
# sample count per verify-token bin, and the conditional acceptance.
H200_QWEN_B8_STEP_MS = {
    "1": (7.021, 3),
    "2": (6.46, 3),
    "2+draft": (6.577, 4),
    "3": (5.748, 3),
    "4": (5.198, 3),
    "4+draft": (6.487, 5),
    "6": (9.747, 3),
    "8": (6.621, 3),
    "8+draft": (7.931, 3),
    "11+draft": (5.027, 3),
    "16+draft": (6.61, 8),
    "32+draft": (5.941, 6),
    "45+draft": (14.924, 2),
    "64+draft": (6.926, 8),
}
H200_QWEN_B8_ACCEPTANCE = [
    0.745, 0.831, 0.796, 0.815, 0.816, 0.767, 0.752, 0.808,
    0.806, 0.69, 0.765, 0.806, 0.8, 0.757, 0.776,
]  # fmt: skip


def test_a_slow_small_bin_does_not_hide_a_larger_k() -> None:
    """On the H200 one slow bin (45 tokens: 14.9 ms, two samples) sat under
    cheaper bigger ones (64 tokens: 6.9 ms). As the floor of every unmeasured
    bigger step it made K 15 at batch 8 look slower than K 7, so K 15 (the
    best fixed K there: 4133 vs 3851 tok/s) was never tried. Capped by the
    bins above it, the slow bin no longer rules K 15 out."""
    policy = AdaptiveDraftLength(15)
    for label, (ms, n) in H200_QWEN_B8_STEP_MS.items():
        tokens = int(label.removesuffix("+draft"))
        key = (adaptive.token_bin(tokens), label.endswith("+draft"))
        policy.cost.recent[key] = deque([ms / 1e3] * n)
    policy.acceptance.tried = [1e6] * 15
    policy.acceptance.accepted = [r * 1e6 for r in H200_QWEN_B8_ACCEPTANCE]
    assert policy.cost.estimate(45, drafting=True) == pytest.approx(6.926e-3)
    assert policy.cost.lower_bound(128, drafting=True) == pytest.approx(6.926e-3)
    assert policy.choose(8) == 15  # explored: it may win
    # Bins without drafts are capped by dearer steps with drafts too, and
    # never cap them.
    assert policy.cost.estimate(6, drafting=False) == pytest.approx(5.027e-3)
    assert policy.cost.estimate(8, drafting=True) == pytest.approx(5.027e-3)
    assert policy.cost.estimate(2, drafting=True) == pytest.approx(5.027e-3)


def test_a_slow_top_bin_is_bounded_by_linear_growth() -> None:
    """Nothing caps the largest measured bin from above. On the H200 the
    512-token bin read 79.7 ms (two samples) beside 14.6 ms at 256 tokens,
    and that K was written off at batch 64. Twice the tokens cost at most
    twice the time (with a bin's width as slack), so the bin is bounded by
    the one below it."""
    cost = adaptive.StepCost()
    for tokens, drafting, ms, n in (
        (256, True, 14.641, 8),
        (512, True, 79.734, 2),
        (64, False, 7.0, 3),
        (512, False, 60.0, 3),
    ):
        cost.recent[(adaptive.token_bin(tokens), drafting)] = deque([ms / 1e3] * n)
    bound = 14.641e-3 * 2 * 2**0.5
    assert cost.estimate(512, drafting=True) == pytest.approx(bound)
    # 60 ms without drafts: bounded by 8 x the 64-token bin (79 ms) and,
    # tighter, by the same bin with drafts.
    assert cost.estimate(512, drafting=False) == pytest.approx(bound)
    assert cost.estimate(64, drafting=False) == pytest.approx(7.0e-3)
    assert cost.estimate(256, drafting=True) == pytest.approx(14.641e-3)
    # Medians at or under the bound stay as measured.
    cost.recent[(adaptive.token_bin(512), True)] = deque([0.02] * 3)
    cost._table = None
    assert cost.estimate(512, drafting=True) == pytest.approx(0.02)
