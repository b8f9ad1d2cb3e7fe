"""``vllm-dflash`` command line: ``demo``, ``train`` (see ``train.py``) and
``bench`` (see ``bench.py``).

``vllm-dflash demo`` uses a tiny random target and a drafter trained for it
(``tiny.TINY_RECIPE``; built once, about a minute on two CPU cores, then
cached under ``$VLLM_DFLASH_CACHE_DIR`` or ``~/.cache/vllm-dflash``; nothing
is downloaded), runs vLLM on the same prompts without speculation and with the
plugin's DFlash, each in its own process, and prints whether the outputs are
identical, the mean acceptance length and tokens/s of both. It exits non-zero
if the outputs differ.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vllm_dflash import __version__, envs, tiny
from vllm_dflash.bench import add_arguments as add_bench_arguments
from vllm_dflash.bench import bench_command
from vllm_dflash.engine import EngineResult, EngineSpec, run
from vllm_dflash.train import add_arguments as add_train_arguments
from vllm_dflash.train import train_command


@contextmanager
def progress(label: str) -> Iterator[None]:
    """A one-line spinner with elapsed seconds while an engine starts and runs."""
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        frames = "|/-\\"
        i = 0
        while not done.wait(0.5):
            elapsed = time.perf_counter() - start
            print(f"\r  {frames[i % 4]} {label} ({elapsed:.0f}s)", end="", flush=True)
            i += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"\r  done: {label} ({time.perf_counter() - start:.0f}s)   ", flush=True)


def _demo(args: argparse.Namespace) -> int:
    prompts = tiny.prompts(args.num_prompts, min_len=4, max_len=64, seed=11)
    print(f"vllm-dflash {__version__} demo")
    pair = tiny.trained_pair(envs.cache_dir())
    k = args.k
    print(
        f"  tiny target and trained drafter in {pair.target.parent} "
        f"(held-out acceptance length at training: "
        f"{pair.result['heldout_acceptance']:.2f})"
    )
    common = dict(target=str(pair.target), prompts=prompts, max_tokens=args.max_tokens)
    with progress("vLLM without speculation"):
        plain = run(EngineSpec(**common, warmup=True))  # type: ignore[arg-type]
    with progress(f"vLLM with the plugin's DFlash (K={k})"):
        spec = EngineSpec(
            **common,  # type: ignore[arg-type]
            drafter=str(pair.drafter),
            num_speculative_tokens=k,
            warmup=True,
        )
        dflash = run(spec)
    same = plain.outputs == dflash.outputs
    _report(plain, dflash, same)
    return 0 if same else 1


def _report(plain: EngineResult, dflash: EngineResult, same: bool) -> None:
    tau = dflash.acceptance_length
    print()
    print(f"  vLLM {dflash.vllm_version}, drafter class {dflash.drafter_class}")
    print(f"  outputs identical to plain decoding: {'yes' if same else 'NO'}")
    print(f"  mean acceptance length: {tau:.2f}" if tau else "  no drafts were made")
    print(f"  plain decoding : {plain.tokens_per_s:8.1f} tok/s")
    print(f"  DFlash (plugin): {dflash.tokens_per_s:8.1f} tok/s")
    print(
        "  (tiny models on CPU: tokens/s mostly measures per-step overheads; "
        "see docs/benchmarks for GPU figures)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-dflash", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="plain decoding vs DFlash on tiny models")
    demo.add_argument(
        "--k",
        type=int,
        default=7,
        help="draft tokens per step (1..7 for the tiny drafter)",
    )
    demo.add_argument("--num-prompts", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train a DFlash drafter for a HF target")
    add_train_arguments(train)
    train.set_defaults(func=train_command)
    bench = sub.add_parser(
        "bench", help="none vs native DFlash vs plugin, side by side (JSON + PNG)"
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
