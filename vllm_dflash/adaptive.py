"""Adaptive draft length: the number of drafts verified per step, chosen each step.

A DFlash drafter proposes a whole block in one forward pass, so its own cost
barely depends on K; what K changes is the target's verify pass, which reads
``batch x (1 + K)`` tokens. At batch 1 that pass is bound by weight reads and
16 tokens cost about as much as 1; at batch 32 (or on an MoE target, where
more tokens wake more experts) it is compute-bound and every rejected draft
token is paid for. A fixed K is right for one load only.

The policy here picks ``K`` from a small candidate set (``candidate_ks``) to
maximise expected output tokens per second:

    throughput(b, K) = b * (1 + E[accepted | K]) / T(b, K)

- ``E[accepted | K]`` comes from per-position *conditional* acceptance rates
  (``AcceptanceEstimate``), counted from every verified request with
  exponential forgetting per position; a position the policy stopped
  verifying keeps its estimate until a re-measurement verifies it again.
- ``T(b, K)`` is the measured wall time of a decode step at batch ``b``
  with K drafts per request (``StepCost``, keyed by batch on a sqrt(2) grid
  and by K itself): the time between consecutive outputs of the engine,
  which in steady state is one step of target verify + drafting + host work
  (steps that switch K are not samples: they draft for the other K). Each
  batch bucket that stays loaded measures its candidates (``min_samples``
  steps; first the K of the nearest measured bucket, then from K = 0 up,
  skipping a K below a bigger measured bucket's best and a K whose floor
  already rules it out), then re-measures its rivals one at a time, the
  closest to the best first: soon after the first
  measurement, then at doubling intervals up to every ``refresh_every``
  decisions, each followed by as many steps of the best K. A rival that
  beats the best K is measured once more before the bucket switches to it
  (the two measurements pooled): one re-measurement of three samples is
  within the noise of a close pair. A key's
  samples are only as good as the phase they were taken in: on the H200 a
  Gemma 4 batch-64 bucket measured K 3 once (19.1 ms), ran K 15 from then
  on, re-measured only K 15's neighbour K 7, and reached 0.76x of fixed K 3.
  A re-measurement replaces the key's samples, and a key's cost is kept
  relative to the steps around its measurement, times a level that follows
  the bucket's steps since: a drift that slows every K alike (the content,
  the context, another tenant on the GPU) does not change the choice. Costs are
  not shared across batch sizes or K through a token count: the same number
  of verified tokens costs different times at different batch sizes
  (attention reads every request's context; the drafter's context grows
  with the batch), and on the H200 one 256-token bin shared by batch 32 K 7
  and batch 64 K 3 read 9.4 ms in one run and 14.6 ms in another.
- Under async scheduling on the V2 runner, where the drafter runs in the
  scheduler's process, the step clock also times how long the host waited
  for the GPU before each output, and a step splits into a host part
  (interval less wait) and, where the GPU held it up, a GPU part: ``T(b, K)``
  is then max(host part of K now, GPU time of K)
  (``AdaptiveDraftLength.seconds``; ``patching.host_waits_once`` says why
  not on the V1 runner). A host that slows or speeds up moves the cheap,
  host-bound K and leaves the dear, GPU-bound one alone, as the H200 showed
  at Gemma 4 batch 64; the host's part itself grows with K
  (``AdaptiveDraftLength.host_level``).

K = 0 (no drafting) is a candidate, so at a load where drafts cannot pay
the policy stops verifying them (the engine's DFlash bookkeeping, hidden-state
capture and context K/V, still runs: K = 0 is not a plain engine). The choice
is lossless whatever it is: vLLM verifies whatever was drafted.

The scheduler consults the policy through vLLM's dynamic speculative decoding
hook (``Scheduler.dynamic_sd_lookup[batch_size]``), see
``patching.patch_scheduler_adaptive``; the V2 runner captures a CUDA graph per
candidate K from the schedule ``capture_schedule`` writes into the speculative
config.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from vllm_dflash.log import get_logger

# Every (batch bucket, K) is measured this many times before the policy
# trusts its table. A measured bucket re-measures one rival of its best K
# REFRESH_FIRST decisions later, then at intervals that double up to
# REFRESH_EVERY: a bucket's first steps are the likeliest to be unusual (the
# engine's first batch of a shape), and a re-measurement costs its
# MIN_SAMPLES + 1 steps at a K that is probably worse.
MIN_SAMPLES = 3
REFRESH_FIRST = 32
REFRESH_EVERY = 128
# Rivals are the best K's neighbours (so that a K a floor ruled out gets
# measured once its neighbour is best) and every measured K whose expected
# throughput is at least this fraction of the best's.
RIVAL_FRACTION = 0.5
# A batch bucket runs the K of the nearest measured bucket until it has been
# chosen EXPLORE_AFTER times in its recent decisions (its visits, each
# forgotten by a factor 1 - 1/EXPLORE_HORIZON per decision of any bucket),
# and only then measures its own candidates: exploring costs about 5 steps
# per K, which pays only where a load stays. A load that stays in a bucket
# gets there in about 18 decisions, one that shares its time evenly between
# two buckets in about 44; a benchmark pass's tail (requests finishing one
# by one) and a passing burst never do. Counting visits without forgetting
# them, the tails of repeated passes added up: on the H200 (Qwen3-8B shape,
# batch 8) tail buckets 1, 3 and 4 spent 30 steps on K 0 and K 1 over five
# passes, 0.96x of fixed K 15.
EXPLORE_AFTER = 16
EXPLORE_HORIZON = 64
# The YOUNG_STEPS step outputs after requests prefilled are no cost samples
# where those requests are half the batch or more: on the H200 (Gemma 4,
# batch 8) the first two decode steps of each pass took 7.7-13.6 ms where
# the pass's median was 7.2-9.1 ms, in fixed and adaptive engines alike,
# and a K 15 re-measured on them read 1.24x of K 7 where it costs about
# 1.08x (docs/adaptive-measurements.md, eleventh session). A request joining a
# larger batch leaves its steps samples.
YOUNG_STEPS = 2
# A re-measured rival waits at most this many decisions for the steps of
# the best K that bracket its measurement (async scheduling: one or two;
# more where the bucket's steps are not samples, e.g. a request joins every
# step), then is judged on the level before it alone.
BRACKET_WAIT = 16
# A batch bucket's level (StepCost) is the median of its last WINDOW steps.
# A key keeps its last WINDOW samples: their count says whether it is
# measured, their median is its cost while it is being measured, and the
# snapshot shows them.
WINDOW = 8
# Runs of equal decisions kept for ``snapshot()["trace"]`` (the order of
# choices, which the per-key counts lose).
TRACE_RUNS = 512
# Steps whose outputs arrive further apart than this were not back to back
# (the engine idled): their interval says nothing about the step's cost.
MAX_STEP_GAP_S = 2.0
# A step that takes STALL_FACTOR times the median of the last STALL_WINDOW
# intervals is kept in ``StepClock.stalls`` (the last STALLS_KEPT): on the
# H200 a Gemma 4 batch-64 K 0 step took 600 ms among 13 ms ones, and
# adaptive's batch-64 passes there spread more than a fixed K's while
# running its K (docs/adaptive-measurements.md, seventh session).
STALL_FACTOR = 3.0
STALL_WINDOW = 32
STALLS_KEPT = 64
# Measurements (a key's relative cost set or bracketed) kept for
# ``snapshot()["measurements"]``: the samples behind a choice are gone once
# the key is re-measured, and on the H200 (Qwen3-8B, batch 8) the first
# comparison of K 7 and K 15 went to K 7 for a reason the snapshot no
# longer showed (docs/adaptive-measurements.md, seventh session).
MEASUREMENTS_KEPT = 128
# A step whose host waited for the GPU (``StepClock.wait_s``) more than this
# fraction of its interval was held up by the GPU: its interval is the GPU's
# time for the step. One that waited less was held up by the host, and says
# only that the GPU needed no more. Where the GPU is done first, the host
# still runs the end of its step after the drafter's launch (the runner's
# draft-token bookkeeping, the engine core's queue) before it asks: 0.1-0.4
# ms in this repository's 2-core CPU engines, against H200 steps of 6 ms and
# more on a faster host. A misread is mild either way: a host-bound step
# read as GPU-bound gives its interval as its GPU time (the estimate without
# the split), and a GPU-bound one read as host-bound took about its host's
# time.
GPU_BOUND_WAIT = 0.05
# The host level (``AdaptiveDraftLength.host_level``) is the median of a
# bucket's last HOST_WINDOW steps' host parts, each over its K's ratio
# (below): on the H200 (Gemma 4, batch 64) the host's slow and fast
# stretches lasted 1-54 steps, a third of them fast, and a level that lags
# them runs the wrong K for the lag at every turn (K 15 through a fast
# stretch is 0.70x of K 7). Simulated with those stretches
# (scripts/simulate_adaptive.py, h200-gemma-b64-states, no noise), the
# median of the last 8 made 0.986x of fixed K 7, of 5 0.990x, of 3 0.996x,
# of 2 1.003x and the last step alone 1.005x (under a GPU drift with noise
# 0.3: 0.953, 0.947, 0.952, 0.955, 0.945). 3 is the shortest that rejects a
# lone outlier (a stall; an output that reports late).
HOST_WINDOW = 3
# A K's host part is the bucket's host level times the K's ratio to it
# (``host_level``), learned where the bucket's steps switch from one K to
# another within HOST_PAIR_GAP steps: the new K's first host part over the
# old K's last ones moves the two ratios' quotient HOST_RATIO_STEP of the way
# to it (a few switches' worth, as the host's state may turn at one).
HOST_PAIR_GAP = 3
HOST_RATIO_STEP = 0.25
# Steps kept by a clock asked to log them (``StepClock.keep_log``): a
# benchmark reads the log after every pass, and its longest passes (batch 1,
# a few thousand output tokens) take fewer steps than this.
STEP_LOG_KEPT = 8192


@dataclass
class StepClock:
    """The intervals between a scheduler's consecutive step outputs: in a
    steady decode, one step's wall time (verify, drafting, host work).

    ``tick`` returns a step's interval, or None for an output that follows
    an idle engine: the first one after ``idle`` (the scheduler ran out of
    requests, so the interval holds the wait for the next ones) and one
    more than MAX_STEP_GAP_S after the output before. In an interleaved
    benchmark every engine waits out the others' passes with no request, and
    each of its passes' first intervals held that wait. The clock counts the
    intervals and their seconds, and keeps the stalls: intervals over
    STALL_FACTOR times the median of the last STALL_WINDOW (any K, prefills
    and switches included) as ``[interval count, batch, K, ms, wait ms]``
    (the wait: below). It costs
    about half a microsecond a step. Asked to (``keep_log``), it also keeps
    every interval in ``log``, in the same form: how a fixed-K engine's
    step time moves from step to step, which pass means hide.

    Each entry also carries the step's host wait, where the drafter runs in
    the scheduler's process (one GPU, vLLM's in-process executor): the time
    from the worker's last ``drafted`` (it had launched the newest step's
    drafting, the last host work of a step) to this output, which the
    engine spent blocked on the GPU. A step the host holds up waits about
    0 ms; one the GPU holds up waits for the rest of its GPU time, so its
    interval minus its wait is the host's part. On the H200 a Gemma 4
    batch-64 step read like host work at K 7 and like GPU work at K 15
    (docs/adaptive-measurements.md, fourteenth session); the wait tells them
    apart step by step. None where no drafting was launched since the last
    output (a worker in another process). A kept log adds the process's CPU
    time over the interval in ms (``time.process_time``: every thread of the
    engine)."""

    steps: int = 0
    busy_s: float = 0.0
    stalls: deque[list[float | None]] = field(
        default_factory=lambda: deque(maxlen=STALLS_KEPT)
    )
    log: deque[list[float | None]] | None = None
    drafted_s: float | None = None
    """When the worker last launched a step's drafting (``drafted``)."""
    wait_s_last: float | None = None
    """The host wait of the step ``tick`` last returned (``wait_s``)."""
    _last_s: float | None = field(default=None, repr=False)
    _last_cpu_s: float = field(default=0.0, repr=False)
    _intervals: deque[float] = field(
        default_factory=lambda: deque(maxlen=STALL_WINDOW), repr=False
    )

    def tick(
        self, now: float, batch: int, k: int, *, blocked_earlier: bool = False
    ) -> float | None:
        """An output at ``now`` of a step over ``batch`` requests, the
        largest with ``k`` drafts (batch 0: an output with nothing
        scheduled, which only moves the clock); its interval or None.

        ``blocked_earlier``: the host also waited on the GPU before it
        launched the step's drafting, so the wait after the launch is not
        the GPU's share, and the step has none (None). vLLM samples a step
        with structured-output requests only once the output before it and
        that step's drafts are on the host
        (``pending_structured_output_tokens``)."""
        last, self._last_s = self._last_s, now
        self.wait_s_last = None
        if last is None or batch == 0:
            return None
        seconds = now - last
        if not 0 < seconds < MAX_STEP_GAP_S:
            return None
        self.steps += 1
        wait = None if blocked_earlier else self.wait_s(now, last)
        self.wait_s_last = wait
        self.busy_s += seconds
        recent = sorted(self._intervals)
        stall = (
            len(recent) == STALL_WINDOW
            and seconds > STALL_FACTOR * recent[STALL_WINDOW // 2]
        )
        if stall or self.log is not None:
            # Built only where kept: this runs on the scheduler every step.
            entry = [
                self.steps,
                batch,
                k,
                round(1e3 * seconds, 3),
                None if wait is None else round(1e3 * wait, 3),
            ]
            if stall:
                self.stalls.append(entry)
            if self.log is not None:
                cpu, self._last_cpu_s = self._last_cpu_s, time.process_time()
                self.log.append([*entry, round(1e3 * (self._last_cpu_s - cpu), 3)])
        self._intervals.append(seconds)
        return seconds

    def wait_s(self, now: float, last: float) -> float | None:
        """The host's wait for the GPU before the output at ``now`` (the one
        before it at ``last``): since the newest ``drafted``, or None if
        none came between the two outputs."""
        drafted = self.drafted_s
        if drafted is None or not last <= drafted <= now:
            return None
        return now - drafted

    def keep_log(self, steps: int = STEP_LOG_KEPT) -> None:
        """From now on keep every interval (the last ``steps``) in ``log``."""
        if self.log is None:
            self.log = deque(maxlen=steps)
            self._last_cpu_s = time.process_time()

    def idle(self) -> None:
        """The scheduler has no request left: the next interval is no step."""
        self._last_s = None

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "busy_s": round(self.busy_s, 6),
            "stalls": [list(stall) for stall in self.stalls],
        }
        if self.log is not None:
            out["log"] = [list(entry) for entry in self.log]
        return out


# The step clock of the last DFlash scheduler built in this process (the
# adaptive policy's own where it has one), for the benchmark.
last_clock: StepClock | None = None


def drafted() -> None:
    """The worker has launched a step's drafting (the end of the proposer's
    host work for the step): the scheduler's clock in this process, if any,
    times its wait for the GPU from here (``StepClock.wait_s``). A no-op in
    a worker process without a scheduler."""
    clock = last_clock
    if clock is not None:
        clock.drafted_s = time.perf_counter()


def candidate_ks(k_max: int) -> tuple[int, ...]:
    """K values the policy chooses from: 0, 1, 3, 7, 15, ... up to ``k_max``,
    and ``k_max`` itself (a CUDA graph is captured for each)."""
    if k_max < 1:
        raise ValueError(f"num_speculative_tokens={k_max}: adaptive K needs >= 1.")
    ks = {0, k_max}
    k = 1
    while k < k_max:
        ks.add(k)
        k = 2 * k + 1
    return tuple(sorted(ks))


def capture_schedule(k_max: int) -> list[tuple[int, int, int]]:
    """A ``num_speculative_tokens_per_batch_size`` value that names every
    candidate K, so that vLLM's runner captures a graph for each. The batch
    ranges are placeholders: ``patch_scheduler_adaptive`` replaces the lookup
    the scheduler builds from them with the policy."""
    ks = sorted(candidate_ks(k_max), reverse=True)
    schedule = [(i + 1, i + 1, k) for i, k in enumerate(ks[:-1])]
    schedule.append((len(ks), 1 << 20, ks[-1]))
    return schedule


@functools.cache
def batch_bucket(batch: int) -> int:
    """The batch size's bucket on a sqrt(2) grid (1, 2, 3, 4, 6, 8, 11, 16,
    23, 32, 45, 64, ...), named by its centre: batches within about 19% of
    each other share decision statistics and step costs."""
    return round(2 ** (round(2 * math.log2(max(batch, 1))) / 2))


@dataclass
class AcceptanceEstimate:
    """Per-position conditional acceptance ``P(draft i accepted | drafts
    1..i-1 accepted)`` from decayed counts, each with a prior of
    ``prior_weight`` pseudo-observations: at ``prior`` for position 1, at
    the estimate of the position before it for every later one.

    Each position forgets in its own observations (``decay`` per time it is
    tried), not in wall time or in requests: a position the policy stopped
    verifying keeps its last estimate until a re-measurement tries it again.
    Forgetting in requests pulled such positions back to the prior, and a
    fixed prior (0.7) is below what DFlash drafters show past the first
    position (about 0.8 conditional in the published profiles): the longer a
    short K ran, the worse every longer K looked. A position is tried only
    where every draft before it was accepted, so the positions past the K a
    bucket runs have few tries, and with a fixed prior they stay near it
    and can hide every longer K: one of two suspects where, on the H200
    (Qwen3-8B, batch 1 after batches 64, 32 and 8 had run K 3 and K 7), the
    bucket ran K 7 in 198 of 325 steps with fixed K 15 10% faster (0.92x;
    docs/adaptive-measurements.md). DFlash's conditional rates are about flat
    past the first position, so a position with few tries now reads like
    the one before it. Where they do fall with the position, that prior is
    optimistic, and running the longer K corrects it; a pessimistic one was
    never corrected, since the longer K was not run.
    """

    k_max: int
    prior: float = 0.7
    prior_weight: float = 2.0
    decay: float = 0.998
    tried: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    # E[accepted | K = k] for every k, rebuilt after an observation (the
    # scheduler asks for it per candidate K several times per step): the
    # counts change through ``observe`` only.
    _expected: list[float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tried = [0.0] * self.k_max
        self.accepted = [0.0] * self.k_max

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One verified request: ``num_drafts`` drafts, the first
        ``num_accepted`` of them accepted."""
        # Positions 1..accepted were accepted; position accepted+1 (if it was
        # drafted) was tried and rejected; later ones were never looked at.
        d = self.decay
        self._expected = None
        for i in range(min(num_accepted + 1, num_drafts, self.k_max)):
            self.tried[i] = self.tried[i] * d + 1.0
            self.accepted[i] = self.accepted[i] * d + (i < num_accepted)

    def conditional(self) -> list[float]:
        rates, prior = [], self.prior
        for a, t in zip(self.accepted, self.tried, strict=True):
            prior = (a + self.prior_weight * prior) / (t + self.prior_weight)
            rates.append(prior)
        return rates

    def expected_accepted(self, k: int) -> float:
        """E[accepted drafts | K = k] = sum over i <= k of P(first i accepted)."""
        if self._expected is None:
            total, run, self._expected = 0.0, 1.0, [0.0]
            for rate in self.conditional():
                run *= rate
                total += run
                self._expected.append(total)
        return self._expected[min(k, self.k_max)]


Key = tuple[int, int]  # (batch bucket, K)
Sample = tuple[int, float]  # (batch, seconds) of a bucket's level


def _level_around(
    before: list[Sample], after: list[Sample], batch: int, n: int
) -> float:
    """The median of the last ``n`` level samples ``before`` a measurement at
    ``batch`` and the first ``n`` ``after`` it, those at its batch; where
    none is, those at any batch."""
    same = [s for b, s in before if b == batch][-n:]
    same += [s for b, s in after if b == batch][:n]
    if not same:
        same = [s for _, s in before][-n:] + [s for _, s in after][:n]
    return statistics.median(same)


@dataclass
class StepCost:
    """Decode-step seconds per (batch bucket, K), as a level that follows the
    bucket's steps and each K's cost relative to it.

    Step time drifts by more than K changes it: on the H200 a Gemma 4
    batch-64 bucket's K 7 steps read 24-27 ms and, a few steps later in the
    same pass (requests finishing, the batch still in the bucket), 13.5-15.3
    ms, and one engine's benchmark passes spread by up to 2.3x. Keys measured
    at different times are therefore not compared by their seconds. A key's
    first ``min_samples`` samples (after it is new or forgotten for a
    re-measurement) measure it against the bucket's level just before: its
    ``relative`` cost is their median over the level's. Its later samples,
    as the K the bucket runs, move the level (each sample over its key's
    relative cost; the median of the last WINDOW). A key's estimate is its
    relative cost times the current level, so a drift that slows every K
    alike leaves the choice alone, and the choice between two K rests on
    steps taken back to back. A drift that slows one K and not another is
    not handled here: at Gemma 4 batch 64 K 7's steps move between two
    states (medians 15.1 and 23.4 ms, same clock, same text) while K 15's
    stay at 25.1, so the better of the two is the state's, and a
    measurement holds the state it fell in (docs/adaptive-measurements.md,
    thirteenth session). That drift is the host's, and under async
    scheduling the policy splits it off (``AdaptiveDraftLength.seconds``).
    Where the next ``min_samples`` level samples come from other keys (the
    policy goes back to its best K after re-measuring a rival), the
    relative cost is taken over the level both before and after the
    measurement: a drift in the middle of it then biases it by half as
    much. The first key of a bucket sets the scale
    (relative cost 1). A key still being measured is estimated by its
    samples' median.

    Estimates are then capped (``_capped``): a step costs no more than any
    step of its bucket with as many or more drafts (the cheapest of them
    bounds it), nor more than a smaller K with drafts scaled by the verified
    tokens. Step-time noise is mostly one-sided (a JIT compile, a host
    hiccup, a neighbour on the GPU): such an outlier makes a key look
    dearer, and the caps bound it by what was measured around it. An output
    that reports late makes the next interval short (on the H200, one 2.0 ms
    sample among Gemma batch 1's 6-7 ms); the medians absorb a single one.

    The first step of a key is not a sample: a shape's first run pays
    one-off costs (oneDNN primitive creation on CPU, Triton autotuning and
    JIT) that can be ten times a step, and would make that K look hopeless.
    """

    min_samples: int = MIN_SAMPLES
    seen: Counter[Key] = field(default_factory=Counter)
    recent: dict[Key, deque[float]] = field(default_factory=dict)
    # Per measured key: its cost over its bucket's level.
    relative: dict[Key, float] = field(default_factory=dict)
    # Per batch bucket: recent steps as (batch, seconds over their key's
    # relative cost).
    level: dict[int, deque[Sample]] = field(default_factory=dict)
    # Per key just measured: the median of its samples, the batch of its last
    # sample, and the bucket's level samples (batch, seconds) before it (the
    # last WINDOW) and since (until ``_bracket_level`` has enough).
    _bracket: dict[Key, tuple[float, int, list[Sample], list[Sample]]] = field(
        default_factory=dict, repr=False
    )
    # Per key measured again to confirm it (``confirm``): its relative cost
    # from the measurement before, pooled with the new one.
    _earlier: dict[Key, float] = field(default_factory=dict, repr=False)
    # The capped estimates, rebuilt after a new sample (the scheduler asks
    # for them several times per step; samples arrive at most once per step).
    _table: dict[Key, float] | None = field(default=None, repr=False, compare=False)
    # Each relative cost set, in order: [step, bucket, K, its samples' median
    # ms, the level's median ms it was divided by, relative cost, 1 if the
    # level spans the steps after it too (else 0: before only)].
    measurements: deque[list[float]] = field(
        default_factory=lambda: deque(maxlen=MEASUREMENTS_KEPT)
    )
    _now: int = field(default=0, repr=False)

    def observe(self, batch: int, k: int, seconds: float, step: int = 0) -> None:
        """A sample of a step at ``batch`` with ``k`` drafts; ``step`` (the
        policy's decision count) only labels ``measurements``."""
        self._now = step
        key = (batch_bucket(batch), k)
        self.seen[key] += 1
        if self.seen[key] == 1:
            return
        samples = self.recent.setdefault(key, deque(maxlen=WINDOW))
        samples.append(seconds)
        self._table = None
        level = self.level.setdefault(key[0], deque(maxlen=WINDOW))
        relative = self.relative.get(key)
        if relative is None and level:
            self._measure(key, samples, batch)
        else:
            if relative is None:  # the bucket's first key sets the scale
                relative = self.relative[key] = 1.0
            self._step(key, batch, seconds / relative)

    def _measure(self, key: Key, samples: deque[float], batch: int) -> None:
        """A sample of a key being measured at ``batch``: with ``min_samples``
        of them, its cost over the level of the bucket's steps just before
        (``_step`` brackets it with the steps after), those at this batch
        where there are any (``_level_around``)."""
        if len(samples) < self.min_samples:
            return
        own = statistics.median(samples)
        before = list(self.level[key[0]])
        level = _level_around(before, [], batch, self.min_samples)
        self._set_relative(key, own, level, bracketed=False)
        self._bracket[key] = (own, batch, before, [])

    def _set_relative(
        self, key: Key, own: float, level: float, *, bracketed: bool
    ) -> None:
        relative = self.relative[key] = self._pooled(key, own / level)
        self.measurements.append(
            [
                self._now,
                *key,
                round(1e3 * own, 3),
                round(1e3 * level, 3),
                round(relative, 4),
                int(bracketed),
            ]
        )

    def _pooled(self, key: Key, relative: float) -> float:
        """A key's new relative cost; where the key is being confirmed, the
        geometric mean of it and the one it had."""
        earlier = self._earlier.get(key)
        return relative if earlier is None else math.sqrt(earlier * relative)

    def _step(self, key: Key, batch: int, level_s: float) -> None:
        """A step of a measured key at ``batch``, at ``level_s`` seconds of
        the level: it moves its bucket's level and completes the brackets of
        the keys measured before it. A key's own steps say nothing about the
        level around its measurement: they drop its bracket."""
        self.level[key[0]].append((batch, level_s))
        self._bracket.pop(key, None)
        self._earlier.pop(key, None)
        for other, (own, at, before, after) in list(self._bracket.items()):
            if other[0] != key[0]:
                continue
            after.append((batch, level_s))
            level = self._bracket_level(at, before, after)
            if level is not None:
                self._set_relative(other, own, level, bracketed=True)
                del self._bracket[other]
                self._earlier.pop(other, None)

    def _bracket_level(
        self, batch: int, before: list[Sample], after: list[Sample]
    ) -> float | None:
        """The level a key measured at ``batch`` is divided by once the steps
        after it have come in (``_level_around``); None until ``min_samples``
        after it are at its batch or WINDOW are at any.

        Batches of one bucket can cost differently at one K, and not alike at
        every K: on the H200 (Gemma 4, V2 runner) batch 7 at K 15 took 10.2
        ms where batch 8 took 7.45 ms, steady over the up to 15 batch-7 steps
        of a pass's tail. A rival re-measured at the next pass's batch 8 against
        those steps read 0.64-0.75 of K 15, and batch 8 ran K 7 in 21-92% of
        its steps, 0.95-0.99x of fixed K 15 (docs/adaptive-measurements.md,
        tenth and eleventh sessions)."""
        n = self.min_samples
        if sum(b == batch for b, _ in after) < n and len(after) < WINDOW:
            return None
        return _level_around(before, after, batch, n)

    def bound(self, batch: int, k: int, seconds: float) -> None:
        """A step of a measured key that took at most ``seconds``: where the
        key's cost now is more, the level moves down to it, else it holds.

        For the GPU's part of steps the host held up (``seconds``: the
        interval, which the GPU needed no more than). Without these the
        level would hold a slower phase's GPU time through a host-bound
        stretch, and a key measured after it would be measured against that
        level. Simulated with a host at 1-1.5x the K 0 step and a GPU whose
        every step slows 1.8x for 64 steps in turn (scripts/simulate_adaptive.py
        --host-fraction), K 0 and K 1 at low acceptance read alike and the
        policy made 0.85x of the best fixed K where one level made 0.98x."""
        key = (batch_bucket(batch), k)
        relative, level = self.relative.get(key), self.level.get(key[0])
        if relative is None or not level:
            return
        now = relative * statistics.median(s for _, s in level)
        self._step(key, batch, min(seconds, now) / relative)
        self._table = None

    def forget(self, batch: int, k: int) -> None:
        """Drop a key's samples and relative cost before it is re-measured:
        the new ones replace them rather than mix with another phase's."""
        key = (batch_bucket(batch), k)
        self.relative.pop(key, None)
        self._bracket.pop(key, None)
        self._earlier.pop(key, None)
        if self.recent.pop(key, None) is not None:
            self._table = None

    def confirm(self, batch: int, k: int) -> None:
        """Measure a key again, to pool its new relative cost with the one it
        has (``_pooled``): its samples go, as in ``forget``."""
        key = (batch_bucket(batch), k)
        relative = self.relative.get(key)
        self.forget(batch, k)
        if relative is not None:
            self._earlier[key] = relative

    def bracketing(self, batch: int, k: int) -> bool:
        """Whether the key is measured and waits for the level after it."""
        return (batch_bucket(batch), k) in self._bracket

    def current(self) -> dict[Key, float]:
        """Each key's seconds now, before the caps: its relative cost times
        its bucket's level, or (while it is being measured, or where samples
        were set directly) its samples' median."""
        levels = {
            b: statistics.median(s for _, s in v) for b, v in self.level.items() if v
        }
        current = {}
        for key, samples in self.recent.items():
            relative, level = self.relative.get(key), levels.get(key[0])
            if relative is not None and level is not None:
                current[key] = relative * level
            elif samples:
                current[key] = statistics.median(samples)
        return current

    def _estimates(self) -> dict[Key, float]:
        if self._table is None:
            self._table = _capped(self.current())
        return self._table

    def estimate(self, batch: int, k: int) -> float | None:
        return self._estimates().get((batch_bucket(batch), k))

    def lower_bound(self, batch: int, k: int) -> float | None:
        """A floor for a step with ``k`` drafts at this batch from the other
        measured keys; None where none applies.

        - Less work never takes longer: a key with no more requests (this
          bucket or a smaller one) and no more drafts bounds it from below.
          K 0 stands only for K 0: on the V2 runner a K 0 step writes the
          drafter's context outside any graph and can read slower than K 1.
        - Step time is convex in the verified tokens (flat while weight reads
          dominate, then linear): past the two largest measured K >= 1 of the
          bucket it grows at least at their slope.
        """
        bucket = batch_bucket(batch)
        table = self._estimates()
        floors = [
            t
            for (b2, k2), t in table.items()
            if b2 <= bucket
            and (k2 == k == 0 or 1 <= k2 <= k)
            and (b2, k2) != (bucket, k)
        ]
        below = sorted(
            (k2, t) for (b2, k2), t in table.items() if b2 == bucket and 1 <= k2 < k
        )
        if len(below) >= 2:
            (k0, t0), (k1, t1) = below[-2:]
            floors.append(t1 + max(0.0, (t1 - t0) / (k1 - k0)) * (k - k1))
        return max(floors, default=None)

    def count(self, batch: int, k: int) -> int:
        return len(self.recent.get((batch_bucket(batch), k), ()))


def _capped(medians: dict[Key, float]) -> dict[Key, float]:
    """Each key's median capped by the keys of its own batch bucket:

    - every key with at least as many drafts (a step never costs less for
      more drafts; a K 0 step is capped by steps with drafts too: on the V1
      runner it skips the drafter, and on V2, where it still writes the
      drafter's context and can read slower than K 1, K 1 beats it anyway),
      and
    - every smaller K' >= 1, scaled by the verified tokens
      ``(1 + K) / (1 + K')``: the work per token does not grow with K.

    Other buckets do not cap a key. Fewer requests do not always cost less:
    on the H200 (Gemma 4, V2 runner) a batch-7 step at K 15 took 10.2 ms
    against 7.45 ms at batch 8, and batch 63 27.9 ms against 25.0 ms at 64.
    And the cap of a key by every bigger bucket was the least of many
    readings, taken in other phases (pass tails) and often from two samples:
    one batch-2 K 7 reading of 4.1 ms capped batch 1's K 7 (5.8 ms measured)
    below K 15, and the bucket ran K 7 in 387 of 399 steps, 0.87x of fixed
    K 15 paired (docs/adaptive-measurements.md, eleventh session).
    """
    rows: dict[int, list[tuple[int, float]]] = {}  # bucket: (K, median), K up
    for (b, k), m in sorted(medians.items()):
        rows.setdefault(b, []).append((k, m))
    table: dict[Key, float] = {}
    for b, row in rows.items():
        per_token = math.inf  # min over 1 <= K' < K of median / (1 + K')
        for i, (k, m) in enumerate(row):
            table[(b, k)] = min(min(m2 for _, m2 in row[i:]), per_token * (1 + k))
            if k >= 1:
                per_token = min(per_token, m / (1 + k))
    return table


class AdaptiveDraftLength:
    """Chooses K per step; used by the scheduler as ``dynamic_sd_lookup``.

    ``policy[batch_size]`` returns the number of drafts to propose for the
    next step. ``observe_request`` and ``observe_step_output`` feed it what the
    scheduler sees of each verified step.
    """

    def __init__(
        self,
        k_max: int,
        *,
        min_samples: int = MIN_SAMPLES,
        refresh_first: int = REFRESH_FIRST,
        refresh_every: int = REFRESH_EVERY,
        explore_after: int = EXPLORE_AFTER,
        explore_horizon: float = EXPLORE_HORIZON,
        acceptance: AcceptanceEstimate | None = None,
        overlapped: bool = True,
    ) -> None:
        self.k_max = k_max
        # Whether the engine schedules a step while the one before runs and
        # its host waits for the GPU only at a step's output (async
        # scheduling on the V2 runner, ``patching.host_waits_once``): only
        # then is a step the longer of its host and GPU parts, and the
        # host's wait used (``seconds``).
        self.overlapped = overlapped
        self.ks = candidate_ks(k_max)
        self.min_samples = min_samples
        self.refresh_first = refresh_first
        self.refresh_every = refresh_every
        self.explore_after = explore_after
        self.explore_horizon = explore_horizon
        self.acceptance = acceptance or AcceptanceEstimate(k_max)
        self.cost = StepCost(min_samples)
        # Where the clock times the host's wait (the drafter runs in the
        # scheduler's process), a step's two parts (``seconds``): per key
        # (batch bucket, K), the host's part of its last HOST_WINDOW steps
        # (interval less wait) and the GPU's, from the steps the GPU held up
        # (GPU_BOUND_WAIT).
        self.host: dict[tuple[int, int], deque[float]] = {}
        # Per bucket: the host's level (the median of its last HOST_WINDOW
        # host parts, each over its K's ratio), the log of each K's ratio to
        # it, and the K and step of its last host part (``host_level``).
        self._host_recent: dict[int, deque[float]] = {}
        self._host_level: dict[int, float] = {}
        self._host_log_ratio: dict[int, dict[int, float]] = {}
        self._host_last: dict[int, tuple[int, int]] = {}
        self.gpu = StepCost(min_samples)
        # The buckets with a K measured GPU-bound (``min_samples`` steps).
        self._gpu_bound: set[int] = set()
        self.decisions: Counter[tuple[int, int]] = Counter()
        self.steps = 0
        # Run-length decisions in order: [first step, batch bucket, K, steps].
        self.trace: deque[list[int]] = deque(maxlen=TRACE_RUNS)
        # Per batch bucket: its recent visits (``_visit``) as of a step.
        self._visits: dict[int, tuple[float, int]] = {}
        self._measured: set[int] = set()  # buckets past their exploration
        self._since_measured: Counter[int] = Counter()  # choices since then
        # Per measured bucket: the choice count of its next re-measurement and
        # the interval before it; the K of its next steps while it re-measures
        # a rival (the rival's, then the best K's).
        self._next_refresh: dict[int, tuple[int, int]] = {}
        self._refreshing: dict[int, deque[int]] = {}
        # Per measured bucket: the best K of its current round of
        # re-measurements and the rivals re-measured in that round.
        self._round: dict[int, tuple[int, set[int]]] = {}
        # Per measured bucket: the rival of its last re-measurement until it
        # is judged, whether it is being confirmed, and the decisions it has
        # waited for its bracket.
        self._challenger: dict[int, tuple[int, bool, int]] = {}
        self.clock = StepClock()
        # Per output of the last YOUNG_STEPS: its requests that prefilled.
        self._joined: deque[int] = deque(maxlen=YOUNG_STEPS)

    # -- the decision -----------------------------------------------------
    def __getitem__(self, batch: int) -> int:
        k = self.choose(batch)
        bucket = batch_bucket(batch)
        self.decisions[(bucket, k)] += 1
        last = self.trace[-1] if self.trace else None
        if last is not None and last[1:3] == [bucket, k]:
            last[3] += 1
        else:
            self.trace.append([self.steps, bucket, k, 1])
        self.steps += 1
        if self.steps % LOG_EVERY == 0:
            log_summary(self)
        return k

    def choose(self, batch: int) -> int:
        """The K with the highest expected throughput at this batch size.

        A new batch bucket first runs the K the nearest measured bucket
        would run, until it has ``explore_after`` recent visits (``_visit``;
        the first bucket of all has no such K and measures at once). It then
        measures its candidates (``min_samples`` steps each), that K first
        and then from K = 0 up, none below the best K of the nearest bigger
        measured bucket (``_least_k``), each only while it could still win:
        its expected tokens over the floor of its step time
        (``StepCost.lower_bound``: what less work cost here or at smaller
        batches, and the slope in K) must beat the best measured K; a K with
        samples but too few is measured to the end whatever its floor. Once
        measured, the bucket runs the best K and now and then re-measures a
        rival (``_refresh``), so the table follows costs that drift (longer
        contexts, another tenant on the GPU, a first batch slower than the
        rest) and a K ruled out by a floor (or by ``_least_k``) gets measured
        once its neighbour is best.
        """
        bucket = batch_bucket(batch)
        donor = self._donor(bucket)
        if donor is not None:
            # Only a bucket that has a donor counts its visits: the others
            # measure (the first bucket) or are measured.
            visits = self._visit(bucket)
            if visits <= self.explore_after:
                return donor
        plan = self._refreshing.get(bucket)
        if plan:
            k = plan.popleft()
            if not plan:
                del self._refreshing[bucket]
            return k
        best_k, best = self._best_measured(batch)
        challenger = self._challenger.get(bucket)
        if challenger is not None:
            waiting = self._judge(batch, challenger, best_k)
            if waiting is not None:
                return waiting
        # The donor's K first: once it is measured, the floors of the others
        # (mostly from smaller buckets) rule out those that cannot beat it.
        order = self.ks if donor is None else (donor, *self.ks)
        least = self._least_k(bucket)
        for k in order:
            count = self.cost.count(batch, k)
            if count >= self.min_samples or (count == 0 and k < least):
                continue
            if count > 0:
                # Begun and not finished: a re-measured rival the bucket had
                # never run (its first step is no sample), or a key whose
                # steps stopped being samples. Its floor would leave it
                # with too few samples to count until the next
                # re-measurement.
                return k
            floor = self.cost.lower_bound(batch, k)
            gain = batch * (1.0 + self.acceptance.expected_accepted(k))
            if floor is None or gain / floor > best:
                return k
        self._measured.add(bucket)
        self._since_measured[bucket] += 1
        return self._refresh(batch, best_k, best)

    def _refresh(self, batch: int, best_k: int, best: float) -> int:
        """``best_k``, or at the bucket's next re-measurement a rival: its
        samples forgotten, then ``min_samples + 1`` steps of it (the first
        drafts for it while verifying the previous K, so it is no sample)
        and as many of ``best_k`` whatever the rival's new cost, so that
        ``StepCost`` brackets it by the level before and after.

        Rivals are re-measured in rounds, one per re-measurement: the
        closest to the best in expected throughput first, each once, and a
        new round when the round is done or the best K changes. The closest
        rival is the one a cost sampled in a slow phase most likely hides
        (docs/adaptive-measurements.md: Gemma 4 at batch 8). A neighbour never
        measured (a floor ruled it out) has no expected throughput and goes
        last in its round."""
        bucket = batch_bucket(batch)
        n = self._since_measured[bucket]
        due, gap = self._next_refresh.setdefault(
            bucket, (self.refresh_first, self.refresh_first)
        )
        if n < due:
            return best_k
        gap = min(2 * gap, self.refresh_every)
        self._next_refresh[bucket] = (n + gap, gap)
        i = self.ks.index(best_k)
        rivals = [
            k
            for j, k in enumerate(self.ks)
            if abs(j - i) == 1
            or (k != best_k and self.throughput(batch, k) >= RIVAL_FRACTION * best)
        ]
        if not rivals:
            return best_k
        round_k, done = self._round.get(bucket, (best_k, set()))
        if round_k != best_k or done >= set(rivals):
            done = set()
        k = max(
            (k for k in rivals if k not in done),
            key=lambda k: (self.throughput(batch, k), -k),
        )
        self._round[bucket] = (best_k, done | {k})
        self.cost.forget(batch, k)
        self.gpu.forget(batch, k)
        self._challenger[bucket] = (k, False, 0)
        return self._measure_beside(bucket, k, best_k)

    def _measure_beside(self, bucket: int, k: int, best_k: int) -> int:
        """Plan ``min_samples + 1`` steps of ``k`` (its first drafts for it
        while verifying the previous K: no sample) and as many of ``best_k``
        (the level after it), and return the first."""
        self._refreshing[bucket] = deque(
            [k] * self.min_samples + [best_k] * (self.min_samples + 1)
        )
        return k

    def _judge(
        self, batch: int, challenger: tuple[int, bool, int], best_k: int
    ) -> int | None:
        """The K to run while a re-measured rival waits for its verdict, or
        None to choose as usual.

        Until the bucket's steps after the rival's have bracketed its
        measurement (at most ``BRACKET_WAIT`` decisions), the K it was
        measured beside: under async scheduling the decision after the
        planned steps comes before the last of them reports, and a rival
        judged then is judged on the level before it alone. A rival that
        beats that K is then measured once more, and the two measurements
        pooled, before the bucket switches to it. At batch 1 on the H200
        (Gemma 4) steps of one K spread by about 10%: three samples of a
        re-measured K 7 read cheaper than K 15 by more than K 15's 16% more
        accepted tokens, and the bucket ran K 7 in a third of its steps where
        fixed K 15 was faster (docs/adaptive-measurements.md). Confirming costs
        2 x (min_samples + 1) steps, and only where a re-measurement would
        change the choice."""
        bucket = batch_bucket(batch)
        k, confirming, waited = challenger
        incumbent = self._round[bucket][0]
        if self.cost.bracketing(batch, k) and waited < BRACKET_WAIT:
            self._challenger[bucket] = (k, confirming, waited + 1)
            return incumbent
        if self.cost.count(batch, k) < self.min_samples:
            return None  # its steps were not samples: measured as usual
        del self._challenger[bucket]
        if confirming or best_k != k:
            return None
        self.cost.confirm(batch, k)
        self.gpu.confirm(batch, k)
        self._challenger[bucket] = (k, True, 0)
        return self._measure_beside(bucket, k, incumbent)

    def _visit(self, bucket: int) -> float:
        """Count this decision as a visit of ``bucket``; return its recent
        visits, each forgotten by ``1 - 1 / explore_horizon`` per decision
        since (of any bucket)."""
        visits, step = self._visits.get(bucket, (0.0, self.steps))
        visits = visits * (1.0 - 1.0 / self.explore_horizon) ** (self.steps - step)
        self._visits[bucket] = (visits + 1.0, self.steps)
        return visits + 1.0

    def _donor(self, bucket: int) -> int | None:
        """The K the nearest measured bucket runs (None before any bucket is
        measured, and for a measured bucket itself)."""
        if bucket in self._measured:
            return None
        nearest = min(
            self._measured, key=lambda b: abs(math.log(b / bucket)), default=None
        )
        return None if nearest is None else self._best_measured(nearest)[0]

    def _least_k(self, bucket: int) -> int:
        """The smallest K the bucket measures unasked: the best K of the
        nearest bigger measured bucket (0 where there is none).

        A draft costs a smaller share of the step at a smaller batch (the
        verify pass is further from compute-bound) and is accepted as often,
        so the best K does not fall as the batch shrinks: on the H200 it was
        K 3, 7, 15, 15 (Qwen3-8B) and K 7, 7, 15, 15 (Gemma 4) at batches
        64, 32, 8, 1. In the benchmark's order, largest batch first, every
        new bucket still measured K 0 and K 1 (5 steps each at under half
        the best K's throughput), and with them the slope floor could rule
        out the K above its donor's. Simulated on Qwen3-8B's H200 step costs
        in that order (``scripts/simulate_adaptive.py``, no noise), batch 8
        goes from 0.980x to 0.993x of its best fixed K and batch 1 from
        0.978x to 0.991x. A K skipped here is still measured as a neighbour
        of the best (``_refresh``). The other direction (no K above a
        smaller bucket's best) is not used: with a load rising from batch 1
        under heavy noise, batch 1's best K read too low and batch 8's worst
        seed fell from 0.91x to 0.82x."""
        bigger = [b for b in self._measured if b > bucket]
        return self._best_measured(min(bigger))[0] if bigger else 0

    def _best_measured(self, batch: int) -> tuple[int, float]:
        """The measured K (``min_samples`` steps) with the highest expected
        throughput at this batch, and that throughput; (0, -1) if none."""
        rates = [
            (self.throughput(batch, k), k)
            for k in self.ks
            if self.cost.count(batch, k) >= self.min_samples
        ]
        # The smallest K among equal rates, as a first-maximum scan gives.
        rate, k = max(rates, key=lambda r: (r[0], -r[1]), default=(-1.0, 0))
        return k, rate

    def throughput(self, batch: int, k: int) -> float:
        """Expected output tokens per second at this batch with K = k."""
        seconds = self.seconds(batch, k)
        if seconds is None or seconds <= 0:
            return 0.0
        return batch * (1.0 + self.acceptance.expected_accepted(k)) / seconds

    def seconds(self, batch: int, k: int) -> float | None:
        """A step's seconds at this batch with K = k now.

        Under async scheduling the host prepares the next step while the GPU
        runs this one, so a step takes the longer of the two: max(host, GPU).
        Where the clock times the host's wait, the estimate is that max of
        the K's host part now (``host_level``: the bucket's host level, which
        follows the host whatever K runs, times the K's ratio to it) and the
        K's GPU time (``gpu``: a ``StepCost`` of the steps the GPU held up,
        so its level follows the GPU alone; the host-bound steps only bound
        it, ``StepCost.bound``). On the H200 (Gemma 4, batch 64) K 7's steps
        moved between 15 and 23 ms with the host while K 15's stayed at 25
        (GPU-bound), so one level scaled from whichever K ran mispriced the
        other: K 15 looked dear after a fast stretch of K 7 and K 7 cheap
        after a slow one, until a re-measurement
        (docs/adaptive-measurements.md, fourteenth session). A K the GPU
        never held up is estimated by its host part alone (its GPU time was
        below its host's).

        The intervals (``cost``) estimate a K whose steps reported no wait
        (the drafter in another process, a K 0 step on the V1 runner, which
        launches no drafting) and every K of a bucket that has no K measured
        GPU-bound: there the split says nothing (a CPU engine runs its model
        in the host's own time, so every step reads host-bound) and the
        estimate would be the host parts alone. So does an engine without
        async scheduling, where a step is the sum of the two parts, and one on
        the V1 runner, whose host also waits on the GPU before the drafter's
        launch (``overlapped`` False for both)."""
        interval = self.cost.estimate(batch, k)
        bucket = batch_bucket(batch)
        level = self.host_level(bucket, k)
        if interval is None or level is None or bucket not in self._gpu_bound:
            return interval
        gpu = self.gpu.estimate(batch, k)
        return level if gpu is None else max(level, gpu)

    def host_level(self, bucket: int, k: int) -> float | None:
        """The host's part of a ``bucket`` step at K = k now (seconds): the
        bucket's host level times the K's ratio to it; None where no K-k
        step of the bucket reported a wait.

        The host's work grows with the tokens it schedules, verifies and
        drafts, and so does its slowing. On the H200 (Gemma 4, batch 64,
        2026-12-05) K 15's host part read 1.23x K 7's in the host's fast
        state (15.75 against 12.82 ms) and 1.14x in its slow one (24.09
        against 21.2). With one level for every K, K 15's slow 22-27 ms made
        K 7 look no cheaper than K 15, and the policy ran K 15 in stretches
        that outlasted the slow state.
        A level per K alone would keep each K in the state of its own last
        steps, so a host that slowed during K 7's steps would leave K 3 and
        K 15 priced in the fast state. So every K's host part feeds one
        level, over the K's ratio, and the ratios come from the switches
        (``_observe_host``)."""
        log_ratio = self._host_log_ratio.get(bucket, {}).get(k)
        if log_ratio is None:
            return None
        return self._host_level[bucket] * math.exp(log_ratio)

    def _observe_host(self, bucket: int, k: int, host_s: float) -> None:
        """A K-k step of ``bucket`` whose host part took ``host_s``.

        Where the bucket's last host part came from another K (J) at most
        HOST_PAIR_GAP steps before, the two are a pair in one host state:
        host_s over J's recent host parts is a reading of K's ratio over
        J's, and moves the two ratios' quotient HOST_RATIO_STEP of the way
        to it, half on each. A K first seen starts at the mean of the
        others' ratios (where none is known, every K takes the same host
        part: one level, as before the ratios). Set from its first pair
        instead, a ratio read as the host turned (K 7 at 2.7x K 0, in a
        simulation of the H200's two states) kept that K out for hundreds
        of steps. Within a run of one K the ratios stay and the level
        follows the host."""
        if host_s <= 0:
            return
        logs = self._host_log_ratio.setdefault(bucket, {})
        other, other_step = self._host_last.get(bucket, (k, -HOST_PAIR_GAP - 1))
        self._host_last[bucket] = (k, self.steps)
        if k not in logs:
            logs[k] = statistics.fmean(logs.values()) if logs else 0.0
        if other != k and self.steps - other_step <= HOST_PAIR_GAP:
            reading = math.log(host_s / statistics.median(self.host[bucket, other]))
            error = reading - (logs[k] - logs[other])
            logs[k] += HOST_RATIO_STEP * error / 2
            logs[other] -= HOST_RATIO_STEP * error / 2
        self.host.setdefault((bucket, k), deque(maxlen=HOST_WINDOW)).append(host_s)
        recent = self._host_recent.setdefault(bucket, deque(maxlen=HOST_WINDOW))
        recent.append(host_s / math.exp(logs[k]))
        self._host_level[bucket] = statistics.median(recent)

    # -- what the scheduler reports --------------------------------------
    def observe_request(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts > 0:
            self.acceptance.observe(num_drafts, num_accepted)

    def observe_step_output(
        self,
        num_scheduled_tokens: dict[str, int],
        scheduled_drafts: dict[str, list[int]],
        next_k: int | None,
        now: float,
        *,
        blocked_earlier: bool = False,
    ) -> None:
        """Called as each step's output reaches the scheduler.

        The interval since the previous output is this step's cost: the
        verify pass over the drafts scheduled for it (K) plus the drafting of
        ``next_k`` drafts for the step after it. It is a sample of K's steady
        state only for a pure decode step (every request ran 1 + its drafts)
        with one K for all, and ``next_k == K``: a step that switches K
        drafts for the other K (the V1 runner skips the drafter when the
        next K is 0), so it stands for neither. Nor is a step taken soon
        after half its batch or more prefilled (``YOUNG_STEPS``). A sample
        whose host wait the clock timed also gives the host level and, by
        its wait, the K's GPU time or a bound on it (``seconds``);
        ``blocked_earlier`` as in ``StepClock.tick``.
        """
        ks = {len(scheduled_drafts.get(r, ())) for r in num_scheduled_tokens}
        seconds = self.clock.tick(
            now,
            len(num_scheduled_tokens),
            max(ks, default=0),
            blocked_earlier=blocked_earlier,
        )
        # Requests that did not run 1 + their drafts: a prefill, or a request
        # clipped at max_model_len.
        irregular = sum(
            n != 1 + len(scheduled_drafts.get(r, ()))
            for r, n in num_scheduled_tokens.items()
        )
        young = sum(self._joined)
        self._joined.append(irregular)
        if seconds is None or len(ks) != 1 or irregular:
            return
        if 2 * young >= len(num_scheduled_tokens):
            return
        (k,) = ks
        if k not in self.ks or (next_k is not None and next_k != k):
            return
        batch = len(num_scheduled_tokens)
        self.cost.observe(batch, k, seconds, self.steps)
        wait = self.clock.wait_s_last if self.overlapped else None
        if wait is not None:
            bucket = batch_bucket(batch)
            self._observe_host(bucket, k, seconds - wait)
            if wait > GPU_BOUND_WAIT * seconds:
                self.gpu.observe(batch, k, seconds, self.steps)
                if self.gpu.count(batch, k) >= self.min_samples:
                    self._gpu_bound.add(bucket)
            else:
                self.gpu.bound(batch, k, seconds)

    def steps_per_k(self) -> dict[int, int]:
        """How many steps each K was chosen for, over all batch sizes."""
        steps: Counter[int] = Counter()
        for (_, k), n in self.decisions.items():
            steps[k] += n
        return dict(sorted(steps.items()))

    def snapshot(self) -> dict[str, Any]:
        """What the policy has decided and measured so far (JSON-ready), for
        the benchmark and for debugging a choice: steps per K (all batch
        sizes, and per batch bucket), the median step time per (batch bucket,
        K) in ms with its sample count and the samples, the conditional
        acceptance per position, the last TRACE_RUNS runs of equal
        decisions in order, the last MEASUREMENTS_KEPT measurements, and the
        step clock's (``StepClock.snapshot``)."""
        return {
            "steps": self.steps,
            # Whether the engine schedules with async scheduling, and the
            # batch buckets where the policy splits a step into host and GPU
            # parts (``seconds``).
            "overlapped": self.overlapped,
            "gpu_bound_buckets": sorted(self._gpu_bound),
            "steps_per_k": {str(k): n for k, n in self.steps_per_k().items()},
            # "b8/K7": steps of batch bucket 8 (batches 7..9) that chose K 7.
            "steps_per_batch_k": {
                f"b{bucket}/K{k}": n
                for (bucket, k), n in sorted(self.decisions.items())
            },
            # "b8/K7": ms of a batch bucket 8 step at K 7 now (before the
            # caps; StepCost.current) and its sample count.
            "step_ms": _ms_table(self.cost),
            # "b8/K7": the host's part of a batch bucket 8 step at K 7 now
            # (``host_level``) and the GPU's, where the clock times the
            # host's wait (``seconds``).
            "step_host_ms": {
                f"b{bucket}/K{k}": [
                    round(1e3 * level, 3),
                    len(self.host[bucket, k]),
                ]
                for (bucket, k) in sorted(self.host)
                if (level := self.host_level(bucket, k)) is not None
            },
            "step_gpu_ms": _ms_table(self.gpu),
            # "b8/K7": K 7's cost over batch bucket 8's level, as measured.
            "step_relative": {
                f"b{bucket}/K{k}": round(r, 4)
                for (bucket, k), r in sorted(self.cost.relative.items())
            },
            # "b8/K7": the samples behind it, oldest first (ms), to tell a
            # steady cost from a bimodal one that the median hides.
            "step_samples_ms": {
                f"b{bucket}/K{k}": [round(1e3 * x, 3) for x in v]
                for (bucket, k), v in sorted(self.cost.recent.items())
                if v
            },
            "conditional_acceptance": [
                round(r, 3) for r in self.acceptance.conditional()
            ],
            # [first step, batch bucket, K, steps]: e.g. [120, 32, 3, 40] is
            # steps 120..159, batch bucket 32, K 3.
            "trace": [list(run) for run in self.trace],
            # [step, batch bucket, K, samples' ms, level ms, relative cost,
            # bracketed] of the last MEASUREMENTS_KEPT measurements.
            "measurements": [list(m) for m in self.cost.measurements],
            # Intervals counted, their seconds, and the stalls among them.
            "clock": self.clock.snapshot(),
        }

    def summary(self) -> str:
        """One line: K chosen per batch bucket (most frequent) and E[accepted]."""
        by_bucket: dict[int, Counter[int]] = {}
        for (bucket, k), n in self.decisions.items():
            by_bucket.setdefault(bucket, Counter())[k] += n
        parts = [
            f"batch~{b}: K {c.most_common(1)[0][0]} ({sum(c.values())} steps)"
            for b, c in sorted(by_bucket.items())
        ]
        rates = ", ".join(f"{r:.2f}" for r in self.acceptance.conditional()[:8])
        return "; ".join(parts) + f"; conditional acceptance [{rates}, ...]"


def _ms_table(cost: StepCost) -> dict[str, list[float]]:
    """``{"b8/K7": [ms now, samples]}`` for a snapshot."""
    return {
        f"b{bucket}/K{k}": [round(1e3 * seconds, 3), len(cost.recent[(bucket, k)])]
        for (bucket, k), seconds in sorted(cost.current().items())
    }


# The policy of the last scheduler built in this process (for tests, the
# benchmark and debugging; the scheduler holds its own reference).
last_policy: AdaptiveDraftLength | None = None
# Log the decisions every this many steps.
LOG_EVERY = 4096


def install(k_max: int, *, overlapped: bool = True) -> AdaptiveDraftLength:
    """The policy for a scheduler with ``num_speculative_tokens = k_max``;
    ``overlapped``: whether a step is the longer of its host and GPU parts
    and the host's wait is the GPU's share (``patching.host_waits_once``)."""
    global last_policy, last_clock
    last_policy = AdaptiveDraftLength(k_max, overlapped=overlapped)
    last_clock = last_policy.clock
    get_logger(__name__).info(
        "vllm-dflash: adaptive draft length on (VLLM_DFLASH_ADAPTIVE_K=1): "
        "K per step from %s, by measured acceptance and step time.",
        list(last_policy.ks),
    )
    return last_policy


def install_clock() -> StepClock:
    """The step clock of a DFlash scheduler without the policy."""
    global last_clock
    last_clock = StepClock()
    return last_clock


def log_summary(policy: AdaptiveDraftLength) -> None:
    get_logger(__name__).info("vllm-dflash adaptive K: %s", policy.summary())


def expected_tokens_per_step(rates: list[float], k: int) -> float:
    """1 + E[accepted] for *unconditional* per-position rates (a benchmark's
    synthetic acceptance profile) when K = k drafts are verified."""
    return 1.0 + math.fsum(rates[:k])
