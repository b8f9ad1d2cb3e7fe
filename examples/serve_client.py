"""Talk to a vLLM server running DFlash and read acceptance from ``/metrics``.

    # against a running server (see docs/serving.md for the serve command)
    python examples/serve_client.py --url http://127.0.0.1:8000

    # offline: build tiny models, start a tiny DFlash server, query it, stop it
    python examples/serve_client.py --tiny

It sends a chat completion (streamed), a completion and a batch of concurrent
requests with the ``openai`` client, then prints the speculative-decoding
counters these requests moved: drafts, accepted tokens, the mean acceptance
length (1 + accepted / drafts) and the acceptance rate per draft position.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import openai

from vllm_dflash import serve

PROMPTS = [
    "Write a short story about speculative decoding.",
    "Explain block diffusion in three sentences.",
    "Give an example of a fast drafter.",
    "Tell me about the target model.",
]


async def concurrent(client: openai.AsyncOpenAI, model: str, n: int, max_tokens: int):
    async def one(i: int) -> str:
        r = await client.completions.create(
            model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
            temperature=0.0,
        )  # fmt: skip
        return r.choices[0].text

    return await asyncio.gather(*(one(i) for i in range(n)))


def run_client(url: str, max_tokens: int, requests: int) -> serve.SpecDecodeMetrics:
    client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    before = serve.parse_spec_metrics(_metrics(url))

    print(f"model: {model}\n--- chat (streamed)")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n--- completion")
    done = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=max_tokens, temperature=0.0
    )
    print(done.choices[0].text)
    print(f"--- {requests} concurrent completions")
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY")
    texts = asyncio.run(concurrent(aclient, model, requests, max_tokens))
    print(f"{len(texts)} answers, {sum(len(t) for t in texts)} characters")

    moved = serve.parse_spec_metrics(_metrics(url)).minus(before)
    report(moved)
    return moved


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return str(r.read().decode())


def report(m: serve.SpecDecodeMetrics) -> None:
    print("--- speculative decoding (these requests)")
    if not m.drafts:
        print("no drafts: is the server running with --speculative-config?")
        return
    print(f"drafts: {m.drafts:.0f}  draft tokens: {m.draft_tokens:.0f}  "
          f"accepted tokens: {m.accepted_tokens:.0f}")  # fmt: skip
    print(f"mean acceptance length: {m.acceptance_length:.2f}")
    rates = " ".join(f"{r:.2f}" for r in m.position_rates)
    print(f"acceptance per position: {rates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument(
        "--tiny", action="store_true", help="start a tiny offline DFlash server"
    )
    args = parser.parse_args()
    if not args.tiny:
        run_client(args.url, args.max_tokens, args.requests)
        return

    root = Path(tempfile.mkdtemp(prefix="vllm-dflash-serve-"))
    models = serve.build_tiny_models(root)
    server = serve.Server(
        models.target,
        [
            *serve.TINY_SERVER_ARGS,
            *serve.dflash_args(models.drafter, models.num_speculative_tokens),
        ],
        log_path=root / "server.log",
    )
    print(f"starting a tiny DFlash server (log: {server.log_path}) ...")
    with server:
        server.wait_ready()
        run_client(server.url, args.max_tokens, args.requests)
    print(f"server stopped cleanly: {server.stop().clean}")


if __name__ == "__main__":
    main()
