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
  exponential forgetting toward a prior, so positions the policy stopped
  verifying drift back to the prior and get tried again.
- ``T(b, K)`` is the measured wall time of a decode step whose verify pass
  read about ``b x (1 + K)`` tokens (``StepCost``, bins on a sqrt(2) grid):
  the time between consecutive outputs of the engine, which in steady state
  is one step of target verify + drafting + host work (steps that switch K
  are not samples: they draft for the other K). A bin is measured
  (``min_samples`` steps) before it is trusted, from K = 0 up and only while
  the K could still win (a bigger pass never costs less than a smaller one);
  bins are shared across batch sizes (steps without drafts are kept apart:
  the V1 runner skips the drafter then), so this is a handful of steps per
  engine. The best choice's neighbours are re-measured every
  ``refresh_every`` decisions of a batch bucket.

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

import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from vllm_dflash.log import get_logger

# A token bin is measured this many times before the policy trusts it, and
# the best choice's neighbours are re-measured every REFRESH_EVERY decisions
# of a batch bucket.
MIN_SAMPLES = 2
REFRESH_EVERY = 128
# Consecutive steps of a re-measurement: the first drafts for the new K while
# verifying the old one, so it is no sample; the next two are.
REFRESH_STEPS = 3
# A bin's cost is the median of its last WINDOW samples.
WINDOW = 8
# Steps whose outputs arrive further apart than this were not back to back
# (the engine idled): their interval says nothing about the step's cost.
MAX_STEP_GAP_S = 2.0


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


def batch_bucket(batch: int) -> int:
    """Batch sizes 1..4 are their own bucket; larger ones round up to a power
    of two (for the decision statistics and re-measurement cadence)."""
    if batch <= 4:
        return max(batch, 1)
    return 1 << (batch - 1).bit_length()


def token_bin(num_tokens: int) -> int:
    """Bins of the verify pass's token count on a sqrt(2) grid: a step's cost
    depends mostly on how many tokens the target reads, so batch 1 at K 15
    and batch 8 at K 1 share what was measured."""
    return round(2 * math.log2(max(num_tokens, 1)))


@dataclass
class AcceptanceEstimate:
    """Per-position conditional acceptance ``P(draft i accepted | drafts
    1..i-1 accepted)`` from decayed counts with a prior of ``prior_weight``
    pseudo-observations at ``prior``."""

    k_max: int
    prior: float = 0.7
    prior_weight: float = 2.0
    decay: float = 0.998
    tried: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    # Counts are stored in units that grow by 1/decay per observation, so the
    # decay of every older count is one multiplication (the scheduler calls
    # ``observe`` for every request of every step); ``_unit`` is the weight
    # of a new observation in those units.
    _unit: float = 1.0

    def __post_init__(self) -> None:
        self.tried = [0.0] * self.k_max
        self.accepted = [0.0] * self.k_max

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One verified request: ``num_drafts`` drafts, the first
        ``num_accepted`` of them accepted."""
        self._unit /= self.decay
        if self._unit > 1e12:  # rescale before the floats lose precision
            self.tried = [t / self._unit for t in self.tried]
            self.accepted = [a / self._unit for a in self.accepted]
            self._unit = 1.0
        # Positions 1..accepted were accepted; position accepted+1 (if it was
        # drafted) was tried and rejected; later ones were never looked at.
        for i in range(min(num_accepted + 1, num_drafts, self.k_max)):
            self.tried[i] += self._unit
            if i < num_accepted:
                self.accepted[i] += self._unit

    def conditional(self) -> list[float]:
        w, p, unit = self.prior_weight, self.prior, self._unit
        return [
            (a / unit + w * p) / (t / unit + w)
            for a, t in zip(self.accepted, self.tried, strict=True)
        ]

    def expected_accepted(self, k: int) -> float:
        """E[accepted drafts | K = k] = sum over i <= k of P(first i accepted)."""
        total, run = 0.0, 1.0
        for rate in self.conditional()[:k]:
            run *= rate
            total += run
        return total


@dataclass
class StepCost:
    """Decode-step seconds per token bin of the verify pass (``batch x (1 +
    K)`` tokens), apart for steps with drafts and without (K = 0: nothing is
    drafted then).

    A bin's estimate is the median of its last WINDOW samples, capped by the
    estimate of every bin over more tokens (a step never costs more for
    fewer tokens; steps with drafts cap steps without, not the reverse) and
    by linear growth from the bins over fewer tokens (``_cap_by_linear_growth``).
    Step-time noise is one-sided (a JIT compile, a host hiccup, a neighbour
    on the GPU): an outlier makes a bin look dearer, never cheaper, and
    since an unmeasured bin is bounded below by the dearest bin under it
    (``lower_bound``), one slow small bin would otherwise hide every larger
    K (seen on the H200: a 2-sample bin at 45 tokens read 14.9 ms beside
    6.9 ms at 64, and K 15 at batch 8 was never tried).

    The first step of a bin is not a sample: a shape's first run pays
    one-off costs (oneDNN primitive creation on CPU, Triton autotuning and
    JIT) that can be ten times a step, and would make that K look hopeless.
    """

    seen: Counter[tuple[int, bool]] = field(default_factory=Counter)
    recent: dict[tuple[int, bool], deque[float]] = field(default_factory=dict)
    # The capped estimates, rebuilt after a new sample (the scheduler asks
    # for them several times per step; samples arrive at most once per step).
    _table: dict[tuple[int, bool], float] | None = field(
        default=None, repr=False, compare=False
    )

    def observe(self, num_tokens: int, drafting: bool, seconds: float) -> None:
        key = (token_bin(num_tokens), drafting)
        self.seen[key] += 1
        if self.seen[key] > 1:
            self.recent.setdefault(key, deque(maxlen=WINDOW)).append(seconds)
            self._table = None

    def _estimates(self) -> dict[tuple[int, bool], float]:
        """Every measured bin's median, capped by the bins over more tokens
        and by linear growth from the bins over fewer."""
        if self._table is None:
            medians = {k: statistics.median(v) for k, v in self.recent.items() if v}
            self._table = _cap_from_above(
                _cap_by_linear_growth(_cap_from_above(medians))
            )
        return self._table

    def estimate(self, num_tokens: int, drafting: bool) -> float | None:
        return self._estimates().get((token_bin(num_tokens), drafting))

    def count(self, num_tokens: int, drafting: bool) -> int:
        return len(self.recent.get((token_bin(num_tokens), drafting), ()))

    def lower_bound(self, num_tokens: int, drafting: bool) -> float | None:
        """A floor for a step over ``num_tokens``: the dearest (capped)
        estimate over no more tokens (cost does not fall as tokens grow),
        counting steps with drafts only as floors for steps with drafts."""
        key = token_bin(num_tokens)
        below = [
            m
            for (b, d), m in self._estimates().items()
            if b <= key and (drafting or not d)
        ]
        return max(below) if below else None


Costs = dict[tuple[int, bool], float]  # (token bin, with drafts) -> seconds


def _cap_from_above(costs: Costs) -> Costs:
    """Each bin's cost capped by the cheapest bin over at least as many
    tokens: a step never costs more for fewer tokens. Steps with drafts cap
    steps with and without drafts; steps without cap only steps without."""
    table: Costs = {}
    with_drafts = any_step = math.inf
    for b in sorted({b for b, _ in costs}, reverse=True):
        if (b, True) in costs:
            with_drafts = min(with_drafts, costs[(b, True)])
            table[(b, True)] = with_drafts
            any_step = min(any_step, with_drafts)
        if (b, False) in costs:
            any_step = min(any_step, costs[(b, False)])
            table[(b, False)] = any_step
    return table


# A bin holds token counts within a factor 2 ** 0.25 of its centre, so two
# bins' true token ratio is within a factor sqrt(2) of their centres' ratio.
_BIN_SLACK = math.sqrt(2.0)


def _cap_by_linear_growth(costs: Costs) -> Costs:
    """Each bin's cost capped by the bins over fewer tokens, scaled by the
    token ratio: a step over m times the tokens costs at most m times as
    much (the work per token does not grow at these context lengths), which
    bounds a slow sample at the top of the measured range. Same rule as
    ``_cap_from_above`` for which steps bound which."""
    table: Costs = {}
    with_drafts = any_step = math.inf  # cheapest seconds per token below
    for b in sorted({b for b, _ in costs}):
        tokens = 2 ** (b / 2)
        if (b, True) in costs:
            cost = min(costs[(b, True)], with_drafts * tokens * _BIN_SLACK)
            table[(b, True)] = cost
            with_drafts = min(with_drafts, cost / tokens)
            any_step = min(any_step, with_drafts)
        if (b, False) in costs:
            cost = min(costs[(b, False)], any_step * tokens * _BIN_SLACK)
            table[(b, False)] = cost
            any_step = min(any_step, cost / tokens)
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
        refresh_every: int = REFRESH_EVERY,
        acceptance: AcceptanceEstimate | None = None,
    ) -> None:
        self.k_max = k_max
        self.ks = candidate_ks(k_max)
        self.min_samples = min_samples
        self.refresh_every = refresh_every
        self.acceptance = acceptance or AcceptanceEstimate(k_max)
        self.cost = StepCost()
        self.decisions: Counter[tuple[int, int]] = Counter()
        self.steps = 0
        self._per_bucket: Counter[int] = Counter()
        self._last_output_s: float | None = None

    # -- the decision -----------------------------------------------------
    def __getitem__(self, batch: int) -> int:
        k = self.choose(batch)
        self.decisions[(batch_bucket(batch), k)] += 1
        self.steps += 1
        if self.steps % LOG_EVERY == 0:
            log_summary(self)
        return k

    def choose(self, batch: int) -> int:
        """The K with the highest expected throughput at this batch size.

        Unmeasured choices are tried (``min_samples`` steps) only while they
        could still win: a verify pass over more tokens never costs less than
        the most expensive measured pass over fewer, which bounds what an
        unmeasured K can reach. Choices are visited from K = 0 up, so the
        costly large-K passes are tried only where they might pay.
        """
        best_k, best = 0, -1.0
        for k in self.ks:
            num_tokens = batch * (1 + k)
            if self.cost.count(num_tokens, k > 0) >= self.min_samples:
                rate = self.throughput(batch, k)
                if rate > best:
                    best_k, best = k, rate
                continue
            floor = self.cost.lower_bound(num_tokens, k > 0)
            gain = batch * (1.0 + self.acceptance.expected_accepted(k))
            if floor is None or gain / floor > best:
                return k
        bucket = batch_bucket(batch)
        self._per_bucket[bucket] += 1
        n = self._per_bucket[bucket]
        if n % self.refresh_every < REFRESH_STEPS:
            # Re-measure a neighbour of the best, alternating below and above,
            # for long enough to get steady-state samples.
            i = self.ks.index(best_k)
            j = i + 1 if (n // self.refresh_every) % 2 else i - 1
            if 0 <= j < len(self.ks):
                return self.ks[j]
        return best_k

    def throughput(self, batch: int, k: int) -> float:
        """Expected output tokens per second at this batch with K = k."""
        seconds = self.cost.estimate(batch * (1 + k), k > 0)
        if seconds is None or seconds <= 0:
            return 0.0
        return batch * (1.0 + self.acceptance.expected_accepted(k)) / seconds

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
    ) -> None:
        """Called as each step's output reaches the scheduler.

        The interval since the previous output is this step's cost: the
        verify pass over the drafts scheduled for it (K) plus the drafting of
        ``next_k`` drafts for the step after it. It is a sample of K's steady
        state only for a pure decode step (every request ran 1 + its drafts)
        with one K for all, and ``next_k == K``: a step that switches K
        drafts for the other K (the V1 runner skips the drafter when the
        next K is 0), so it stands for neither.
        """
        last, self._last_output_s = self._last_output_s, now
        if last is None or not num_scheduled_tokens:
            return
        seconds = now - last
        if not 0 < seconds < MAX_STEP_GAP_S:
            return
        ks = {len(scheduled_drafts.get(r, ())) for r in num_scheduled_tokens}
        if len(ks) != 1:
            return
        (k,) = ks
        if k not in self.ks or (next_k is not None and next_k != k):
            return
        if any(n != 1 + k for n in num_scheduled_tokens.values()):
            return  # a prefill or a request clipped at max_model_len
        self.cost.observe(len(num_scheduled_tokens) * (1 + k), k > 0, seconds)

    def steps_per_k(self) -> dict[int, int]:
        """How many steps each K was chosen for, over all batch sizes."""
        steps: Counter[int] = Counter()
        for (_, k), n in self.decisions.items():
            steps[k] += n
        return dict(sorted(steps.items()))

    def snapshot(self) -> dict[str, Any]:
        """What the policy has decided and measured so far (JSON-ready), for
        the benchmark and for debugging a choice: steps per K (all batch
        sizes, and per batch bucket), the median step time per (verify-token
        bin, drafting) in ms with its sample count, and the conditional
        acceptance per position."""
        return {
            "steps_per_k": {str(k): n for k, n in self.steps_per_k().items()},
            # "b8/K7": steps of batch bucket 8 (batches 5..8) that chose K 7.
            "steps_per_batch_k": {
                f"b{bucket}/K{k}": n
                for (bucket, k), n in sorted(self.decisions.items())
            },
            "step_ms": {
                f"{2 ** (b / 2):.0f}{'+draft' if d else ''}": [
                    round(1e3 * statistics.median(v), 3),
                    len(v),
                ]
                for (b, d), v in sorted(self.cost.recent.items())
                if v
            },
            "conditional_acceptance": [
                round(r, 3) for r in self.acceptance.conditional()
            ],
        }

    def summary(self) -> str:
        """One line: K chosen per batch bucket (most frequent) and E[accepted]."""
        by_bucket: dict[int, Counter[int]] = {}
        for (bucket, k), n in self.decisions.items():
            by_bucket.setdefault(bucket, Counter())[k] += n
        parts = [
            f"batch<={b}: K {c.most_common(1)[0][0]} ({sum(c.values())} steps)"
            for b, c in sorted(by_bucket.items())
        ]
        rates = ", ".join(f"{r:.2f}" for r in self.acceptance.conditional()[:8])
        return "; ".join(parts) + f"; conditional acceptance [{rates}, ...]"


# The policy of the last scheduler built in this process (for tests, the
# benchmark and debugging; the scheduler holds its own reference).
last_policy: AdaptiveDraftLength | None = None
# Log the decisions every this many steps.
LOG_EVERY = 4096


def install(k_max: int) -> AdaptiveDraftLength:
    """The policy for a scheduler with ``num_speculative_tokens = k_max``."""
    global last_policy
    last_policy = AdaptiveDraftLength(k_max)
    get_logger(__name__).info(
        "vllm-dflash: adaptive draft length on (VLLM_DFLASH_ADAPTIVE_K=1): "
        "K per step from %s, by measured acceptance and step time.",
        list(last_policy.ks),
    )
    return last_policy


def log_summary(policy: AdaptiveDraftLength) -> None:
    get_logger(__name__).info("vllm-dflash adaptive K: %s", policy.summary())


def expected_tokens_per_step(rates: list[float], k: int) -> float:
    """1 + E[accepted] for *unconditional* per-position rates (a benchmark's
    synthetic acceptance profile) when K = k drafts are verified."""
    return 1.0 + math.fsum(rates[:k])
