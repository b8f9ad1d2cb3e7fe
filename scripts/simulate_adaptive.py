"""Simulate the adaptive draft-length policy against engines whose step cost
and acceptance are known, beside every fixed K, and print (and save) the
ratio to the best fixed K per scenario.

The figures docs/adaptive-measurements.md quotes as "simulated" come from
this script.
A simulated step: the scheduler decides the next K before the step reports
(as under async scheduling), the step verifies the previous decision's K,
costs its table's time times the scenario's phase and a uniform noise, and
every request draws its accepted drafts from the scenario's conditional
acceptance: one uniform draw per request and step, shared by every engine of
a seed, so that the acceptance a stage happened to draw (at batch 1 over 400
steps it spreads a fixed engine by about 5% between seeds) falls on the
policy and the fixed K alike.

    python scripts/simulate_adaptive.py                  # this checkout
    python scripts/simulate_adaptive.py --compare HEAD~3 # beside an older one
    python scripts/simulate_adaptive.py --only h200-qwen3-8b-order --seeds 16
    python scripts/simulate_adaptive.py --only h200-gemma-b8 \
        --replay docs/benchmarks/RUN.json   # a run taken with --step-log
    python scripts/simulate_adaptive.py --only h200-gemma-passes \
        --replay-passes docs/benchmarks/RUN.json   # its passes, one by one
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_dflash import adaptive  # noqa: E402
from vllm_dflash.bench import DECAY_RATES  # noqa: E402

# Conditional acceptance P(draft i accepted | drafts before it accepted).
DECAY = [DECAY_RATES[0]] + [b / a for a, b in itertools.pairwise(DECAY_RATES)]
DECAYING = [0.75, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2, 0.2]
HIGH = [0.95] * 15
LOW = [0.2] * 15
KS = (0, 1, 3, 7, 15)

# Qwen3-8B's decode step (ms) per batch and K on the H200, from the sixth
# session's fixed engines (docs/benchmarks/qwen3-8b-h200-confirm-all-modes.json:
# batch x tau / tok/s; K 1 interpolated).
QWEN3_8B_H200_MS = {
    64: {0: 6.78, 1: 9.0, 3: 13.4, 7: 21.2, 15: 36.1},
    32: {0: 5.84, 1: 7.5, 3: 9.04, 7: 12.24, 15: 19.2},
    8: {0: 5.36, 1: 6.5, 3: 7.19, 7: 7.78, 15: 8.88},
    1: {0: 4.98, 1: 6.3, 3: 6.58, 7: 7.2, 15: 7.6},
}

# The same engine's decode steps as the policy timed them (the steps between
# two outputs, pure decode: step_samples_ms of the adaptive rows there; K 15 at
# batch 64, never sampled, scaled from K 7 as the fixed engines' ratio).
QWEN3_8B_H200_STEP_MS = {
    64: {0: 6.59, 1: 8.31, 3: 10.18, 7: 16.22, 15: 27.6},
    32: {0: 5.85, 1: 7.2, 3: 7.51, 7: 9.35, 15: 15.06},
    8: {0: 5.35, 1: 6.27, 3: 6.37, 7: 6.48, 15: 6.89},
    1: {0: 5.08, 1: 6.14, 3: 6.28, 7: 6.36, 15: 6.18},
}

# Gemma-4-26B-A4B's decode step (ms, drafter included) per batch and K on the
# H200, rounded: K 15 and K 7 at batch 8 from the ninth session's fixed
# engines and re-measurements (a K 15 step about 1.13x a K 7 one), the rest
# interpolated. With DECAY's acceptance, K 15 leads K 7 by 2.8% at batch 8.
# There the policy ran K 7 in a third of the steps (docs/adaptive.md).
GEMMA4_H200_STEP_MS = {
    8: {0: 5.5, 1: 6.2, 3: 6.5, 7: 7.0, 15: 7.9},
    1: {0: 4.9, 1: 5.3, 3: 5.4, 7: 5.4, 15: 5.8},
}


# Gemma-4-26B-A4B's decode step (ms, drafter included) on the H200 by exact
# batch at K 15: the fixed engine's steps inside runs of one batch in the
# eleventh session's step log (gemma4-26b-a4b-h200-step-log-k15-b64-b8-b1.json;
# batch 7 dearer than 8). Other K scale it: at batches 2-8 by batch 8's K 3 /
# K 7 / K 15 steps there (6.81 / 7.31 / 7.45 ms), at batch 1 by its K 7 / K
# 15 (5.61 / 5.66 ms); K 0 and K 1 as in GEMMA4_H200_STEP_MS, K 3 at batch 1
# interpolated.
GEMMA4_H200_K15_BY_BATCH_MS = {
    8: 7.45, 7: 10.18, 6: 7.99, 5: 7.87, 4: 7.01, 3: 7.29, 2: 6.57, 1: 5.66,
}  # fmt: skip
GEMMA4_H200_K_SCALE = {
    8: {0: 0.70, 1: 0.78, 3: 0.914, 7: 0.981, 15: 1.0},
    1: {0: 0.845, 1: 0.914, 3: 0.96, 7: 0.991, 15: 1.0},
}
# A benchmark pass's first decode steps, right after its prompts' prefill:
# on the H200 (Gemma 4, batch 8) the first two read 7.7-13.6 ms where the
# pass's median was 7.2-9.1 ms (eleventh session), in every engine.
PASS_START_STEPS = 2
PASS_START_SLOW = 1.3
PREFILL_MS = 20.0


# Gemma-4-26B-A4B's batch-64 decode step (ms) on the H200 in its fast state
# (thirteenth session: K 7's fast steps 15.1, K 15's steps 25.1; K 0 and K 1
# from the adaptive engine's 10.0-11.1 ms samples, K 3 interpolated), and the
# floor its slow state puts under every step: K 7's slow steps, 23.4 ms, on
# the same SM clock with the GPU less busy, as a host-side wait would
# (``_HostStates``).
GEMMA4_H200_B64_STEP_MS = {0: 10.0, 1: 10.5, 3: 12.5, 7: 15.1, 15: 25.1}
GEMMA4_H200_B64_SLOW_FLOOR_MS = 23.4
# The host's part of those steps in the fast state: about 14 ms at K 7 and K
# 15 (fourteenth session, async scheduling off: K 7 29.29 and K 15 38.85 ms,
# each about 14 ms over its fast-state step). The small K's steps took
# 10-12.5 ms, so their host part is below that: put at 85-88% of the step
# (not measured). The slow state's host is its floor.
GEMMA4_H200_B64_HOST_MS = {0: 8.5, 1: 9.0, 3: 11.0, 7: 14.0, 15: 14.0}
# The same step on the H200 on 2026-12-05 (docs/benchmarks/
# gemma4-26b-a4b-h200-one-host-level-b64.json): the GPU's part (K 0 and K 1
# from adaptive's few samples, K 3 its host-bound steps, K 7 the fixed
# engine's median step, K 15 adaptive's GPU-bound steps'); the host's part
# in the fast state (medians of the GPU-bound steps' interval less wait: K
# 7 12.82, K 15 15.75 ms; K 3 its host-bound steps; K 0 and K 1 below their
# steps, not measured) and in the slow one (host-bound steps: K 7's over 18
# ms 21.2, K 15's 24.09; K 0-3 scaled from the fast state by K 7's 21.2 /
# 12.82, not measured).
GEMMA4_H200_B64_DEC5_GPU_MS = {0: 8.0, 1: 8.5, 3: 12.3, 7: 15.1, 15: 24.9}
GEMMA4_H200_B64_DEC5_HOST_MS = {0: 7.5, 1: 8.0, 3: 12.06, 7: 12.82, 15: 15.75}
GEMMA4_H200_B64_DEC5_SLOW_HOST_MS = {
    **{k: ms * 21.2 / 12.82 for k, ms in GEMMA4_H200_B64_DEC5_HOST_MS.items()},
    7: 21.2,
    15: 24.09,
}
# The slow state's turns: a fast step turns slow with HOST_SLOW_ENTER, a slow
# one fast with HOST_SLOW_LEAVE: a third of the steps fast, in stretches of 8
# steps on average, the slow ones of 16 (K 7's steps there: 34% fast, fast
# stretches of 1-31 steps, slow ones of 1-54).
HOST_SLOW_ENTER = 1 / 8
HOST_SLOW_LEAVE = 1 / 16


def _gemma_pass_ms(batch: int, k: int) -> float:
    scale = GEMMA4_H200_K_SCALE[1 if batch == 1 else 8]
    return GEMMA4_H200_K15_BY_BATCH_MS[batch] * scale[k]


@dataclass(frozen=True)
class Scenario:
    """``stages``: (batch, steps) in turn; ``verify_ms(batch, k)``: a step
    verifying k drafts per request; ``draft_ms``: added where the step
    drafts for the next (the next K is not 0). With ``pass_tokens``, a
    stage is (batch, passes) of benchmark passes instead (``run_passes``)."""

    stages: tuple[tuple[int, int], ...]
    conditional: list[float]
    verify_ms: Callable[[int, int], float]
    draft_ms: float = 0.0
    pass_tokens: int = 0
    slow_floor_ms: float = 0.0
    """Where set, the engine has a slow state (``_HostStates``) that makes
    every step cost at least this: it slows a cheap K and leaves a dear one
    alone."""
    host_ms: Callable[[int, int], float] | None = None
    """The host's part of a step (the slow state's floor replaces it there):
    the step takes the longer of it and the GPU's part (``verify_ms``, and
    ``draft_ms``; a regime's phase slows this part only), and the policy's
    clock is told how long the host waited for the GPU, as the engine's
    drafter tells it (``StepClock.wait_s``). None: the clock is told
    nothing, unless ``--host-fraction`` sets it."""
    slow_host_ms: Callable[[int, int], float] | None = None
    """The host's part of a step in the slow state, where it grows with K
    (the slow state then needs no ``slow_floor_ms``)."""


def _linear(base_ms: float, per_token_ms: float) -> Callable[[int, int], float]:
    return lambda b, k: base_ms + per_token_ms * b * (1 + k)


SCENARIOS = {
    "b1-gemma": Scenario(((1, 1200),), DECAY, _linear(5.85, 0.05), 0.5),
    "b1-high": Scenario(((1, 1200),), HIGH, _linear(10.0, 0.02), 2.0),
    "b1-decaying": Scenario(((1, 1200),), DECAYING, _linear(10.0, 0.02), 2.0),
    "b8-decaying": Scenario(((8, 1200),), DECAYING, _linear(10.0, 0.2), 2.0),
    "b8-decay": Scenario(((8, 1200),), DECAY, _linear(7.5, 0.02), 1.0),
    "b64-decaying": Scenario(((64, 1200),), DECAYING, _linear(10.0, 0.4), 2.0),
    "b64-low": Scenario(((64, 1200),), LOW, _linear(10.0, 0.4), 2.0),
    "b64-decay": Scenario(((64, 1200),), DECAY, _linear(8.0, 0.04), 1.0),
    # The benchmark's order on the H200: each batch for 400 steps in turn
    # (the table includes the drafter).
    "h200-qwen3-8b-order": Scenario(
        tuple((b, 400) for b in (64, 32, 8, 1)),
        DECAY,
        lambda b, k: QWEN3_8B_H200_MS[b][k],
    ),
    "h200-qwen3-8b-order-steps": Scenario(
        tuple((b, 400) for b in (64, 32, 8, 1)),
        DECAY,
        lambda b, k: QWEN3_8B_H200_STEP_MS[b][k],
    ),
    # A load that rises (batches 1, 8, 32, 64), as a server's does after a
    # restart.
    "h200-qwen3-8b-rising-steps": Scenario(
        tuple((b, 400) for b in (1, 8, 32, 64)),
        DECAY,
        lambda b, k: QWEN3_8B_H200_STEP_MS[b][k],
    ),
    "h200-gemma-b8": Scenario(
        ((8, 1200),), DECAY, lambda b, k: GEMMA4_H200_STEP_MS[b][k]
    ),
    "h200-gemma-b1": Scenario(
        ((1, 1200),), DECAY, lambda b, k: GEMMA4_H200_STEP_MS[b][k]
    ),
    # Batch 64 with its two states: K 7 best on average (1.05x of K 15), K 15
    # best in the slow state (1.08x of K 7).
    "h200-gemma-b64-states": Scenario(
        ((64, 1200),),
        DECAY,
        lambda b, k: GEMMA4_H200_B64_STEP_MS[k],
        slow_floor_ms=GEMMA4_H200_B64_SLOW_FLOOR_MS,
        host_ms=lambda b, k: GEMMA4_H200_B64_HOST_MS[k],
    ),
    # The same batch as measured on 2026-12-05: the host's part grows with
    # K, in the slow state more than in the fast.
    "h200-gemma-b64-dec5": Scenario(
        ((64, 1200),),
        DECAY,
        lambda b, k: GEMMA4_H200_B64_DEC5_GPU_MS[k],
        host_ms=lambda b, k: GEMMA4_H200_B64_DEC5_HOST_MS[k],
        slow_host_ms=lambda b, k: GEMMA4_H200_B64_DEC5_SLOW_HOST_MS[k],
    ),
    # The benchmark's Gemma passes at batches 8 then 1 (256 tokens each):
    # the prefill, two slow first steps, and a tail whose batch-7 steps are
    # dearer than batch 8's.
    "h200-gemma-passes": Scenario(
        ((8, 12), (1, 12)), DECAY, _gemma_pass_ms, pass_tokens=256
    ),
}
# (noise, phase): uniform noise of +-noise per step; "1.8x64": every other
# stretch of 64 steps 1.8x slower (a drift that slows every K alike);
# "stretch": short slow stretches (``_Stretches``), as the H200 showed at
# Gemma 4 batch 8 (step time up 25-35% for 10-20 steps at a time).
REGIMES = (
    (0.0, "none"),
    (0.1, "none"),
    (0.2, "none"),
    (0.3, "1.8x64"),
    (0.1, "stretch"),
)
# "stretch": a step outside a slow stretch starts one with this probability;
# it lasts a uniform STRETCH_STEPS steps and slows every step of it by a
# uniform STRETCH_SLOW factor drawn once per stretch.
STRETCH_P = 1 / 40
STRETCH_STEPS = (8, 20)
STRETCH_SLOW = (1.25, 1.35)
# "replay" (``--replay``): the slow-down of each step is a fixed-K engine's
# recorded step time over its median, step after step, from an offset that
# depends on the seed.
REPLAY_OFFSET = 97
# Benchmark passes (``Scenario.pass_tokens``) carry their own slow steps
# (pass starts, tails): noise on top, and in "passes" a level of each pass:
# every step of it slowed by a factor drawn once per pass, uniform within
# +-PASS_LEVEL_SPREAD. On the H200 (Gemma 4, twelfth session) a fixed K 15
# engine's pass medians spread 0.93-1.16x of their median at batch 1 and
# 0.91-1.18x at batch 8 in runs of three batch sizes.
PASS_REGIMES = ((0.0, "none"), (0.05, "none"), (0.1, "none"), (0.05, "passes"))
PASS_LEVEL_SPREAD = 0.08
# "replay" of passes (``--replay-passes``): every simulated pass takes the
# step times of one recorded pass (``pass_series``), chosen by the seed, and
# runs them in order, cycling where the policy takes more steps than the
# recording had. A recorded pass of fewer steps than this is left out.
MIN_REPLAY_STEPS = 20


def _logged_rows(bench: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """``mode``'s rows of a ``--step-log`` run at its main output length
    (not the ``--long-output-len`` ones)."""
    return [
        row
        for row in bench["rows"]
        if row["mode"] == mode and row.get("output_len") == bench["meta"]["output_len"]
    ]


def replay_factors(
    bench: dict[str, Any], mode: str = "plugin"
) -> dict[int, list[float]]:
    """Per batch, ``mode``'s recorded steps (a ``vllm-dflash bench
    --step-log`` run's ``pass_clock`` logs) at that batch and its K, each
    over their median, in the order they ran: how the real engine's step
    time moved while its work stayed the same. A pass's first two steps
    (on the H200 its stalls gathered there, after the prefill) and steps of
    a smaller batch (requests finished) are left out."""
    factors = {}
    for row in _logged_rows(bench, mode):
        ms = [
            entry[3]
            for clock in row["pass_clock"]
            for entry in clock.get("log", [])[2:]
            if entry[1] == row["batch"] and entry[2] == row["k"]
        ]
        if ms:
            median = statistics.median(ms)
            factors[row["batch"]] = [m / median for m in ms]
    return factors


def pass_series(
    bench: dict[str, Any], scenario: Scenario, mode: str = "plugin"
) -> dict[int, list[list[float]]]:
    """Per batch, each of ``mode``'s recorded passes (a ``--step-log`` run)
    as the series of its steps at that batch, in ms, each over its K's cost
    relative to K 15 in ``scenario`` (so a series reads as K 15 steps):
    how one real pass moved from its first decode step to its last, slow
    starts and slow passes included; rows of the scenario's stage batches
    only. The pass's last output is left out (an output that reports late
    leaves it a short interval: 1.0-1.8 ms among Gemma batch 1's 6 ms), and
    so are passes of fewer than ``MIN_REPLAY_STEPS`` such steps."""
    series: dict[int, list[list[float]]] = {}
    batches = {batch for batch, _ in scenario.stages}
    for row in _logged_rows(bench, mode):
        batch = row["batch"]
        if batch not in batches:
            continue
        k15 = scenario.verify_ms(batch, 15)
        for clock in row["pass_clock"]:
            steps = [
                entry[3] * k15 / scenario.verify_ms(batch, entry[2])
                for entry in clock.get("log", [])
                if entry[1] == batch
            ][:-1]
            if len(steps) >= MIN_REPLAY_STEPS:
                series.setdefault(batch, []).append(steps)
    return series


def _survival(conditional: list[float]) -> list[float]:
    """P(at least i drafts accepted) for i = 1, 2, ...: the running products."""
    return list(itertools.accumulate(conditional, lambda a, b: a * b))


def _accepted(u: float, survival: list[float], k: int) -> int:
    """Accepted drafts of a request whose uniform draw is ``u``, with k drafts:
    one draw per request and step, so engines at different K stay on the same
    random stream and a K 7 step accepts min(what K 15 would, 7)."""
    n = 0
    while n < k and u < survival[n]:
        n += 1
    return n


class _Stretches:
    """The "stretch" phase's slow-down per step: from its own RNG and drawn
    whatever the step's K, so every engine of a seed meets the same slow
    stretches at the same step index (an error of a measurement taken in one
    lasts as long as the stretch: 8-20 steps, not one)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed + 200)
        self.left, self.slow = 0, 1.0

    def next(self) -> float:
        u = self.rng.random()
        if self.left == 0 and u < STRETCH_P:
            self.left = self.rng.randint(*STRETCH_STEPS)
            self.slow = self.rng.uniform(*STRETCH_SLOW)
        if self.left == 0:
            return 1.0
        self.left -= 1
        return self.slow


class _HostStates:
    """Whether each step falls in the engine's slow state (a two-state
    Markov chain: HOST_SLOW_ENTER, HOST_SLOW_LEAVE), from its own RNG and
    whatever the step's K, so every engine of a seed meets the same states
    at the same step index."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed + 300)
        self.slow = True

    def next(self) -> bool:
        u = self.rng.random()
        self.slow = u >= HOST_SLOW_LEAVE if self.slow else u < HOST_SLOW_ENTER
        return self.slow


def _report(
    policy: Any,
    scheduled: dict[str, int],
    k: int,
    k_next: int,
    clock: float,
    wait_s: float | None,
) -> None:
    """A step's output to the policy, at ``clock``; with the host's wait for
    the GPU before it, as the engine's drafter marks it (``drafted``)."""
    if wait_s is not None:
        policy.clock.drafted_s = clock - wait_s
    drafts = {r: [-1] * k for r in scheduled} if k else {}
    policy.observe_step_output(scheduled, drafts, k_next, clock)


def host_model(
    scenario: Scenario, fraction: float | None
) -> Callable[[int, int], float] | None:
    """The scenario's host part of a step; where it has none and
    ``fraction`` is given, that fraction of its K 0 step at the batch (a
    GPU-bound engine that reports its waits)."""
    if scenario.host_ms is not None or fraction is None:
        return scenario.host_ms
    return lambda b, k: fraction * scenario.verify_ms(b, 0)


def run(
    policy: Any,
    scenario: Scenario,
    seed: int,
    noise: float,
    phase: str,
    replay: dict[int, list[float]] | None = None,
    host: Callable[[int, int], float] | None = None,
) -> dict[int, float]:
    """Output tokens per simulated second of each stage. ``policy``: a fixed
    K or an ``AdaptiveDraftLength``; ``replay``: the "replay" phase's
    factors per batch (``replay_factors``); ``host``: the host's part of a
    step (``host_model``), whose wait the policy is then told."""
    fixed = isinstance(policy, int)
    rng, noise_rng = random.Random(seed), random.Random(seed + 100)
    survival = _survival(scenario.conditional)
    stretches, states = _Stretches(seed), _HostStates(seed)
    clock, k, step, rates = 0.0, 0, 0, {}
    for batch, steps in scenario.stages:
        tokens, start = 0, clock
        recorded = (replay or {}).get(batch, [1.0])
        for i in range(steps):
            k_next = policy if fixed else policy[batch]
            slow = 1.8 if phase == "1.8x64" and step // 64 % 2 else 1.0
            slow *= stretches.next() if phase == "stretch" else 1.0
            if phase == "replay":
                slow *= recorded[(seed * REPLAY_OFFSET + i) % len(recorded)]
            jitter = 1.0 + noise_rng.uniform(-noise, noise)
            ms = scenario.verify_ms(batch, k) + (scenario.draft_ms if k_next else 0.0)
            host_ms = None if host is None else host(batch, k)
            if scenario.slow_host_ms is not None and host is not None:
                if states.next():
                    host_ms = scenario.slow_host_ms(batch, k)
            elif scenario.slow_floor_ms and states.next():
                if host_ms is None:
                    ms = max(ms, scenario.slow_floor_ms)
                else:
                    host_ms = scenario.slow_floor_ms
            wait = None
            if host_ms is None:
                clock += ms * slow * jitter / 1e3
            else:
                # The phase slows the GPU's part (every K alike); the host's
                # part is the host's. The jitter is the whole step's.
                step_ms = max(ms * slow, host_ms)
                clock += step_ms * jitter / 1e3
                wait = (step_ms - host_ms) * jitter / 1e3
            for _ in range(batch):
                accepted = _accepted(rng.random(), survival, k)
                tokens += 1 + accepted
                if not fixed:
                    policy.observe_request(k, accepted)
            if not fixed:
                scheduled = {f"r{i}": 1 + k for i in range(batch)}
                _report(policy, scheduled, k, k_next, clock, wait)
            k, step = k_next, step + 1
        rates[batch] = tokens / (clock - start)
    return rates


def run_passes(
    policy: Any,
    scenario: Scenario,
    seed: int,
    noise: float,
    phase: str = "none",
    recorded: dict[int, list[list[float]]] | None = None,
    host: Callable[[int, int], float] | None = None,
) -> dict[int, float]:
    """Output tokens per simulated second of each stage of benchmark passes:
    every request of a pass prefills in one step (no cost sample), then
    decodes until it has ``pass_tokens`` tokens and leaves, so a pass ends
    in a tail of smaller batches; its first PASS_START_STEPS decode steps
    cost PASS_START_SLOW times more. The engine idles between passes, and
    the idle time is not counted. Steps cost ``verify_ms`` at the exact
    batch, times a uniform noise of +-``noise`` and, in phase "passes", the
    pass's level (``PASS_LEVEL_SPREAD``). With ``recorded`` (phase
    "replay", ``pass_series``) a step costs its recorded pass's step instead,
    times its K's cost relative to K 15 (and, in the tail, its batch's
    relative to the stage's), with no slow start or noise added: the
    recording has its own. Each stage's first pass is the benchmark's
    warm-up: run, not timed. ``host``: as in ``run``, a step's host part
    (no noise), its wait told to the policy."""
    fixed = isinstance(policy, int)
    rng, noise_rng = random.Random(seed), random.Random(seed + 100)
    level_rng = random.Random(seed + 200)
    survival = _survival(scenario.conditional)
    clock, k, rates = 0.0, 0, {}
    for batch, passes in scenario.stages:
        busy = 0.0
        for pass_index in range(1 + passes):
            if pass_index == 1:
                busy = 0.0  # the warm-up pass is over
            clock += 10.0  # the idle gap between passes
            level = 1.0
            if phase == "passes":
                level += level_rng.uniform(-PASS_LEVEL_SPREAD, PASS_LEVEL_SPREAD)
            series = None
            if recorded is not None:
                passes_at = recorded[batch]
                series = passes_at[(seed * REPLAY_OFFSET + pass_index) % len(passes_at)]
            if not fixed:
                policy.clock.idle()
            made = {f"r{i}": 1 for i in range(batch)}  # the prefill's token
            k = policy if fixed else policy[batch]
            clock += PREFILL_MS / 1e3
            busy += PREFILL_MS / 1e3
            if not fixed:
                policy.observe_step_output(dict.fromkeys(made, 128), {}, k, clock)
            step = 0
            while made:
                k_next = policy if fixed else policy[len(made)]
                ms = scenario.verify_ms(len(made), k)
                if series is not None:
                    ms *= series[step % len(series)] / scenario.verify_ms(batch, 15)
                else:
                    slow = PASS_START_SLOW if step < PASS_START_STEPS else 1.0
                    ms *= slow * (1.0 + noise_rng.uniform(-noise, noise)) * level
                host_ms = None if host is None else host(len(made), k)
                if host_ms is not None:
                    ms = max(ms, host_ms)
                seconds = ms / 1e3
                clock += seconds
                busy += seconds
                scheduled = dict.fromkeys(made, 1 + k)
                for r in list(made):
                    accepted = _accepted(rng.random(), survival, k)
                    made[r] += 1 + accepted
                    if not fixed:
                        policy.observe_request(k, accepted)
                if not fixed:
                    wait = None if host_ms is None else (ms - host_ms) / 1e3
                    _report(policy, scheduled, k, k_next, clock, wait)
                made = {r: n for r, n in made.items() if n < scenario.pass_tokens}
                k, step = k_next, step + 1
        rates[batch] = passes * batch * scenario.pass_tokens / busy
    return rates


def _run_one(
    policy: Any,
    scenario: Scenario,
    seed: int,
    noise: float,
    phase: str,
    replay: dict[int, list[float]] | None,
    recorded: dict[int, list[list[float]]] | None = None,
    host: Callable[[int, int], float] | None = None,
) -> dict[int, float]:
    if scenario.pass_tokens:
        return run_passes(policy, scenario, seed, noise, phase, recorded, host)
    return run(policy, scenario, seed, noise, phase, replay, host)


def load_policy(ref: str | None) -> ModuleType:
    """``vllm_dflash.adaptive`` of this checkout, or of git ``ref``."""
    if ref is None:
        return adaptive
    source = subprocess.run(
        ["git", "show", f"{ref}:vllm_dflash/adaptive.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = ModuleType(f"adaptive_at_{ref}")
    sys.modules[module.__name__] = module  # its dataclasses look it up
    exec(compile(source, f"{ref}:vllm_dflash/adaptive.py", "exec"), module.__dict__)
    return module


def simulate(
    policies: dict[str, ModuleType],
    names: list[str],
    seeds: int,
    replay: dict[int, list[float]] | None = None,
    pass_runs: list[dict[str, Any]] | None = None,
    replay_mode: str = "plugin",
    host_fraction: float | None = None,
) -> list[dict[str, Any]]:
    """One row per (scenario, regime, stage batch, policy): the mean and the
    worst over seeds of the policy's rate over the best fixed K's. With
    ``replay``, the regimes are "replay" alone, for scenarios whose every
    stage's batch it has; with ``pass_runs`` (``--step-log`` runs), "replay"
    alone for the pass scenarios whose every stage's batch has passes of
    ``replay_mode`` in them (``pass_series``). ``host_fraction``: the
    host's part of a step where a scenario has none (``host_model``)."""
    rows = []
    for name in names:
        scenario = SCENARIOS[name]
        host = host_model(scenario, host_fraction)
        regimes: tuple[tuple[float, str], ...] = REGIMES
        recorded = None
        if pass_runs is not None:
            if not scenario.pass_tokens:
                continue
            recorded = {}
            for run_json in pass_runs:
                for batch, series in pass_series(
                    run_json, scenario, replay_mode
                ).items():
                    recorded.setdefault(batch, []).extend(series)
            if not all(batch in recorded for batch, _ in scenario.stages):
                continue
            regimes = ((0.0, "replay"),)
        elif scenario.pass_tokens:
            if replay is not None:
                continue
            regimes = PASS_REGIMES
        if replay is not None:
            if not all(batch in replay for batch, _ in scenario.stages):
                continue
            regimes = ((0.0, "replay"),)
        for noise, phase in regimes:
            ratios: dict[tuple[str, int], list[float]] = {}
            best_k: dict[int, int] = {}
            for seed in range(seeds):
                fixed = {
                    k: _run_one(k, scenario, seed, noise, phase, replay, recorded, host)
                    for k in KS
                }
                for batch, _ in scenario.stages:
                    best_k[batch] = max(KS, key=lambda k: fixed[k][batch])
                for label, module in policies.items():
                    got = _run_one(
                        module.AdaptiveDraftLength(15),
                        scenario,
                        seed,
                        noise,
                        phase,
                        replay,
                        recorded,
                        host,
                    )
                    for batch, rate in got.items():
                        best = fixed[best_k[batch]][batch]
                        ratios.setdefault((label, batch), []).append(rate / best)
            for (label, batch), values in ratios.items():
                rows.append({
                    "scenario": name, "noise": noise, "phase": phase,
                    "batch": batch, "best_fixed_k": best_k[batch],
                    "policy": label, "mean": statistics.mean(values),
                    "worst": min(values), "seeds": seeds,
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", action="append", default=[], metavar="GIT_REF",
                   help="also simulate adaptive.py at this git ref")  # fmt: skip
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                   help="scenarios to run (default: all)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--replay", type=Path, metavar="BENCH_JSON",
                   help="a vllm-dflash bench --step-log run: slow every step "
                   "as its fixed-K engine's recorded steps (the 'replay' "
                   "regime, alone) in the scenarios whose batches it has")  # fmt: skip
    p.add_argument("--replay-passes", type=Path, action="append",
                   metavar="BENCH_JSON",
                   help="--step-log runs: every simulated pass of the pass "
                   "scenarios takes one recorded pass's steps (the 'replay' "
                   "regime, alone); repeat to pool runs")  # fmt: skip
    p.add_argument("--replay-mode", default="plugin",
                   help="the run's fixed-K mode whose steps are replayed")  # fmt: skip
    p.add_argument("--host-fraction", type=float, metavar="F",
                   help="where a scenario has no host part, give its steps "
                   "one of F times its K 0 step, and tell the policy the "
                   "host's waits (an engine that reports them)")  # fmt: skip
    args = p.parse_args(argv)
    policies = {"this": load_policy(None)}
    policies.update({ref: load_policy(ref) for ref in args.compare})
    replay = None
    if args.replay:
        replay = replay_factors(json.loads(args.replay.read_text()), args.replay_mode)
        if not replay:
            p.error(f"--replay {args.replay}: no {args.replay_mode} row has a step "
                    "log (take the run with --step-log)")  # fmt: skip
    pass_runs = None
    if args.replay_passes:
        if args.replay:
            p.error("--replay and --replay-passes: one at a time")
        pass_runs = [json.loads(path.read_text()) for path in args.replay_passes]
    rows = simulate(
        policies, args.only or list(SCENARIOS), args.seeds, replay, pass_runs,
        args.replay_mode, args.host_fraction,
    )  # fmt: skip
    if pass_runs is not None and not rows:
        p.error("--replay-passes: no pass scenario chosen has passes of "
                f"{args.replay_mode} at every one of its batches in these "
                "runs (take them with --step-log)")  # fmt: skip
    for r in rows:
        print(
            f"{r['scenario']:20s} noise {r['noise']:.2f} {r['phase']:6s} "
            f"batch {r['batch']:3d} best K {r['best_fixed_k']:2d}  "
            f"{r['policy']:>10s}: mean {r['mean']:.3f} worst {r['worst']:.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
