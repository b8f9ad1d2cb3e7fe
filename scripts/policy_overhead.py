"""Time the adaptive policy's host work per scheduler step, and print (and
save) it as JSON.

The scheduler calls the policy three ways each step
(``patching.patch_scheduler_adaptive``): ``observe_step_output`` as the
step's output arrives, ``observe_request`` once per request with its
accepted drafts, and ``policy[batch]`` for the next step's K. This script
feeds a steady decode at each batch size (every request runs 1 + K tokens,
acceptance drawn from the bench's decay profile, a step's time from a fixed
table with 5% noise, a third of it the host's wait for the GPU, as the
speculator reports it) and times those calls together, beside the bare
``StepClock.tick`` a fixed-K engine's scheduler pays. It measures this
machine's Python, not a GPU: compare the figure with a step's time.

    python scripts/policy_overhead.py                       # batches 1, 8, 64
    python scripts/policy_overhead.py --batches 8 --steps 50000 --out F.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The simulator's acceptance draw: one uniform per request and step against
# the bench's decay rates (P(at least i drafts accepted); 4.78 tokens a K 15
# step). It puts the repository on the path for vllm_dflash.
from simulate_adaptive import DECAY, _accepted, _survival

from vllm_dflash import adaptive

SURVIVAL = _survival(DECAY)


def step_seconds(batch: int, k: int) -> float:
    """A weight-read-bound step, as Gemma 4 at batches 1-8 on the H200 (where
    the policy runs K 15): 6 ms, plus 0.5% per draft and 0.1% per request."""
    return 0.006 * (1 + 0.005 * k) * (1 + 0.001 * batch)


def time_policy(batch: int, steps: int, k_max: int, seed: int) -> dict[str, Any]:
    """Microseconds of policy work per step at ``batch`` over ``steps``
    steady steps, the bare clock's, and the K the policy ran."""
    policy = adaptive.AdaptiveDraftLength(k_max)
    rng = random.Random(seed)
    requests = [f"req-{i}" for i in range(batch)]
    now, busy = 0.0, 0.0
    k = policy[batch]
    for _ in range(steps):
        scheduled = {r: 1 + k for r in requests}
        drafts = {r: [0] * k for r in requests}
        draws = [_accepted(rng.random(), SURVIVAL, k) for _ in requests]
        step = step_seconds(batch, k) * (1 + 0.05 * rng.random())
        now += step
        # The speculator's mark (async scheduling on a GPU): the host waited
        # for the GPU a third of the step, so the policy splits it.
        policy.clock.drafted_s = now - step / 3
        start = time.perf_counter()
        policy.observe_step_output(scheduled, drafts, k, now)
        for n in draws:
            policy.observe_request(k, n)
        k = policy[batch]
        busy += time.perf_counter() - start
    clock = adaptive.StepClock()
    start = time.perf_counter()
    for i in range(steps):
        clock.tick(i * 0.006, batch, k_max)
    bare = time.perf_counter() - start
    return {
        "batch": batch,
        "steps": steps,
        "policy_us_per_step": round(1e6 * busy / steps, 2),
        "clock_us_per_step": round(1e6 * bare / steps, 2),
        "steps_per_k": policy.steps_per_k(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,64", help="comma-separated")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--k", type=int, default=15, help="num_speculative_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also save the JSON here")
    args = parser.parse_args(argv)
    # The policy logs a summary every LOG_EVERY steps; its logger's first use
    # imports vLLM, which must not land inside a timed step.
    adaptive.log_summary(adaptive.AdaptiveDraftLength(args.k))
    rows = [
        time_policy(int(b), args.steps, args.k, args.seed)
        for b in args.batches.split(",")
    ]
    result = {
        "meta": {"python": platform.python_version(), "machine": platform.machine()},
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
