"""Drive the adaptive policy through a fixed sequence of K in a real engine and
record what the scheduler reports back (run as a script by
``test_adaptive_engine``).

    python adaptive_probe.py TARGET DRAFTER RESULT.json

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set by the test), so the scheduler's policy object is patched here: its
decisions follow ``SCRIPT`` and every step output it sees is recorded with
whether the cost table timed it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# K per decision: a steady K 3, a three-decision switch to K 7 (a refresh's
# shape), back to K 3, the same with K 1, then K 3 to the end.
SCRIPT = [3] * 8 + [7] * 3 + [3] * 8 + [1] * 3 + [3] * 8


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dflash import adaptive

    target, drafter, result = sys.argv[1:4]
    decisions: list[int] = []
    outputs: list[dict[str, Any]] = []
    observe = adaptive.AdaptiveDraftLength.observe_step_output

    def scripted(self: adaptive.AdaptiveDraftLength, batch: int) -> int:
        k = SCRIPT[len(decisions)] if len(decisions) < len(SCRIPT) else 3
        decisions.append(k)
        return k

    def recorded(self: adaptive.AdaptiveDraftLength, *args: Any, **kwargs: Any) -> None:
        scheduled, drafts, next_k, _ = args
        seen = dict(self.cost.seen)
        observe(self, *args, **kwargs)
        timed = [key for key, n in self.cost.seen.items() if n > seen.get(key, 0)]
        outputs.append(
            {
                "drafts": sorted({len(drafts.get(r, ())) for r in scheduled}),
                "next_k": next_k,
                "tokens": sorted(set(scheduled.values())),
                # The step's interval reached the cost table; it is a sample
                # unless it was its key's first (``StepCost.observe``).
                "timed": bool(timed),
                "sampled": any(self.cost.seen[key] > 1 for key in timed),
                # No structured outputs here: no step waited before drafting.
                "blocked_earlier": kwargs.get("blocked_earlier"),
            }
        )

    adaptive.AdaptiveDraftLength.__getitem__ = scripted  # type: ignore[method-assign]
    adaptive.AdaptiveDraftLength.observe_step_output = recorded  # type: ignore[method-assign]
    llm = LLM(
        model=target,
        speculative_config={
            "method": "dflash",
            "model": drafter,
            "num_speculative_tokens": 7,
        },
        max_model_len=512,
        max_num_seqs=2,
        skip_tokenizer_init=True,
        enforce_eager=True,
        # On CPU, the share of host memory held for the KV cache. The
        # default (0.92) fails at start-up where the test run already holds
        # more than 8% of it (on a 2026-12-03 CI machine: 7.25 of 9.34 GiB
        # free). The other test engines use 0.15 (``vllm_dflash.engine``).
        gpu_memory_utilization=0.15,
    )
    prompts = [{"prompt_token_ids": list(range(10 + i, 42 + i))} for i in range(2)]
    params = SamplingParams(
        max_tokens=160, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llm.generate(prompts, params, use_tqdm=False)
    Path(result).write_text(json.dumps({"decisions": decisions, "outputs": outputs}))


if __name__ == "__main__":
    main()
