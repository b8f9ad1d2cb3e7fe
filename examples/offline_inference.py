"""Offline generation with the plugin's DFlash through ``vllm.LLM``, then the
acceptance it reached, read from vLLM's metrics.

    python examples/offline_inference.py                 # Qwen3-8B + z-lab drafter
    python examples/offline_inference.py --tiny          # tiny models, CPU, offline

With ``vllm-dflash`` installed nothing else is needed: ``method: "dflash"``
runs the plugin's implementation (the log says "vllm-dflash ... is active").
``--tiny`` builds a tiny target that mostly repeats its last token and a
drafter that proposes exactly that, so drafts are really accepted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any


def spec_decode_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters (``vllm:spec_decode_*``)."""
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if metric.name.startswith("vllm:spec_decode") and value is not None:
            totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="Qwen/Qwen3-8B")
    parser.add_argument("--drafter", default="z-lab/Qwen3-8B-DFlash-b16")
    parser.add_argument("--k", type=int, default=15, help="draft tokens per step")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="tiny models, CPU")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    extra: dict[str, Any] = {}
    prompts: list[Any] = ["Write a haiku about speculative decoding."]
    if args.tiny:
        from vllm_dflash import tiny

        root = Path(tempfile.mkdtemp(prefix="vllm-dflash-example-"))
        target = tiny.build_echo_target(root / "target")
        tiny.build_tokenizer(target)  # a word-level tokenizer beside it
        drafter = tiny.build_echo_drafter(
            root / "drafter", target, tiny.TinyDrafter(block_size=8)
        )
        args.target, args.drafter, args.k = str(target), str(drafter), 7
        # fp32, no CUDA graphs, a small KV cache: CPU settings.
        extra = dict(
            enforce_eager=True,
            dtype="float32",
            max_model_len=512,
            max_num_seqs=8,
            gpu_memory_utilization=0.15,
        )
        prompts = ["Tell me about the fast drafter.", "hello world"]

    llm = LLM(
        model=args.target,
        speculative_config={
            "method": "dflash",
            "model": args.drafter,
            "num_speculative_tokens": args.k,
        },
        disable_log_stats=False,  # keep the counters get_metrics() reads
        **extra,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for out in llm.generate(prompts, params):
        print("output:", repr(out.outputs[0].text))

    counters = spec_decode_counters(llm)
    drafts = counters.get("vllm:spec_decode_num_drafts", 0.0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    if drafts:
        # One verify step per draft: the accepted drafts plus one bonus token.
        print(f"mean acceptance length: {1.0 + accepted / drafts:.2f} (K={args.k})")
    else:
        print("no drafts counted: is speculative decoding on?")


if __name__ == "__main__":
    main()
