"""Offline generation with the plugin's DFlash through ``vllm.LLM``.

    python examples/offline_inference.py                 # Qwen3-8B + z-lab drafter
    python examples/offline_inference.py --tiny          # tiny random models, offline

With ``vllm-dflash`` installed nothing else is needed: ``method: "dflash"``
runs the plugin's implementation (the log says "vllm-dflash ... is active").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="Qwen/Qwen3-8B")
    parser.add_argument("--drafter", default="z-lab/Qwen3-8B-DFlash-b16")
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="tiny random models")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    extra: dict = {}
    prompts: list = ["Write a haiku about speculative decoding."]
    if args.tiny:
        from vllm_dflash import tiny

        root = Path(tempfile.mkdtemp(prefix="vllm-dflash-example-"))
        args.target = str(tiny.build_target(root / "target"))
        args.drafter = str(tiny.build_drafter(root / "drafter", Path(args.target)))
        args.k = 7
        extra = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=512)
        prompts = [{"prompt_token_ids": p} for p in tiny.prompts(2)]

    llm = LLM(
        model=args.target,
        speculative_config={
            "method": "dflash",
            "model": args.drafter,
            "num_speculative_tokens": args.k,
        },
        **extra,
    )
    params = SamplingParams(temperature=0.0, max_tokens=32, detokenize=not args.tiny)
    for out in llm.generate(prompts, params):
        print(out.outputs[0].text if not args.tiny else out.outputs[0].token_ids)


if __name__ == "__main__":
    main()
