"""The plugin through vLLM's OpenAI-compatible server, over real HTTP.

Two servers on 127.0.0.1, one after the other (module-scoped): a reference
without speculation and with the plugin excluded by ``VLLM_PLUGINS`` (stock
vLLM), then a DFlash server with the plugin installed. The server starts an
API-server, an engine-core and a worker process; the plugin must load in the
processes that run the model. Greedy text in fp32 must be identical.

The tiny target mostly repeats its last token and the tiny drafter proposes
exactly that (``tiny.build_echo_*``), so drafts are accepted for real: the
comparison covers accepted drafts, not only rejected ones.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from vllm_dflash import serve

pytestmark = pytest.mark.e2e

PLUGIN_LINE = "vllm-dflash 0.1.0: the plugin's DFlash implementation is active"
MAX_TOKENS = 24
GREEDY: dict[str, Any] = dict(
    max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}
)
PROMPTS = [
    "Write a short story about speculative decoding.",
    "Explain block diffusion in three sentences, please.",
    "What is a drafter? Give an example.",
    "Tell me a haiku about the target model.",
    "hello world",
    "List five fast words: one, two, three, four, five.",
    "why is the server fast?",
    "a",
]
CHAT = [
    {"role": "system", "content": "You write short poems."},
    {"role": "user", "content": "Write a poem about tokens and blocks."},
]
CONCURRENT = 16
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_client.py"


def complete(client: openai.OpenAI, prompt: str, stream: bool) -> str:
    model = client.models.list().data[0].id
    if not stream:
        r = client.completions.create(model=model, prompt=prompt, **GREEDY)
        assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
        return r.choices[0].text
    chunks = client.completions.create(
        model=model, prompt=prompt, stream=True, **GREEDY
    )
    return "".join(c.choices[0].text for c in chunks if c.choices)


def chat(client: openai.OpenAI, stream: bool) -> str:
    model = client.models.list().data[0].id
    if not stream:
        r = client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
        assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS
        return r.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=model, messages=CHAT, stream=True, **GREEDY
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def concurrent(base_url: str) -> list[str]:
    """CONCURRENT requests in flight at once (completions and chats)."""

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=300)
        model = (await client.models.list()).data[0].id

        async def one(i: int) -> str:
            prompt = f"{PROMPTS[i % len(PROMPTS)]} w{100 + i}"  # all distinct
            if i % 4 == 3:
                msg = [{"role": "user", "content": prompt}]
                r = await client.chat.completions.create(
                    model=model, messages=msg, **GREEDY
                )
                return r.choices[0].message.content or ""
            c = await client.completions.create(model=model, prompt=prompt, **GREEDY)
            return c.choices[0].text

        return list(await asyncio.gather(*(one(i) for i in range(CONCURRENT))))

    return asyncio.run(run())


def client_of(server: serve.Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=300)


@dataclass
class Reference:
    texts: dict[str, Any]
    log: str
    stopped: serve.StopReport


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> serve.TinyModels:
    return serve.build_tiny_models(tmp_path_factory.mktemp("serve-models"))


@pytest.fixture(scope="module")
def reference(tiny_models: serve.TinyModels, tmp_path_factory: pytest.TempPathFactory):
    """Stock vLLM: plugin excluded, no speculation. Recorded, then stopped."""
    server = serve.Server(
        tiny_models.target,
        serve.TINY_SERVER_ARGS,
        env={"VLLM_PLUGINS": "some_other_plugin"},
        log_path=tmp_path_factory.mktemp("reference") / "server.log",
    )
    with server:
        server.wait_ready()
        client = client_of(server)
        texts: dict[str, Any] = {
            f"complete-{stream}-{i}": complete(client, p, stream)
            for stream in (False, True)
            for i, p in enumerate(PROMPTS[:2])
        }
        texts |= {f"chat-{stream}": chat(client, stream) for stream in (False, True)}
        texts["concurrent"] = concurrent(server.base_url)
    return Reference(texts=texts, log=server.log(), stopped=server.stop())


@pytest.fixture(scope="module")
def dflash(
    reference: Reference,  # runs (and stops) first: one server at a time
    tiny_models: serve.TinyModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[serve.Server]:
    server = serve.Server(
        tiny_models.target,
        [
            *serve.TINY_SERVER_ARGS,
            *serve.dflash_args(tiny_models.drafter, tiny_models.num_speculative_tokens),
        ],
        env={"VLLM_PLUGINS": None},  # unset: every installed plugin loads
        log_path=tmp_path_factory.mktemp("dflash") / "server.log",
    )
    with server:
        server.wait_ready()
        yield server


def test_plugin_is_active_in_the_engine_processes(dflash: serve.Server) -> None:
    log = dflash.log()
    lines = [line for line in log.splitlines() if PLUGIN_LINE in line]
    # The API server loads plugins too, but while it builds its argument
    # parser, before vLLM configures logging: its INFO line is not printed.
    assert any(line.startswith("(EngineCore") for line in lines), lines
    assert any("Worker" in line.split(" ", 1)[0] for line in lines), lines
    assert "vllm-dflash: drafter loaded (2 layers, block 8, K=7" in log


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_plain_server(
    dflash: serve.Server, reference: Reference, stream: bool
) -> None:
    client = client_of(dflash)
    for i, prompt in enumerate(PROMPTS[:2]):
        text = complete(client, prompt, stream)
        assert text.strip(), "empty completion"
        assert text == reference.texts[f"complete-{stream}-{i}"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_completions_equal_plain_server(
    dflash: serve.Server, reference: Reference, stream: bool
) -> None:
    text = chat(client_of(dflash), stream)
    assert text.strip(), "empty chat answer"
    assert text == reference.texts[f"chat-{stream}"]


def test_concurrent_requests_equal_plain_server_and_accept_drafts(
    dflash: serve.Server, reference: Reference
) -> None:
    before = dflash.spec_metrics()
    texts = concurrent(dflash.base_url)
    moved = dflash.spec_metrics().minus(before)

    assert len(set(texts)) > 1, "all answers alike: the comparison proves little"
    assert texts == reference.texts["concurrent"]
    k = 7
    assert moved.drafts > 0
    assert 0 < moved.draft_tokens <= moved.drafts * k
    assert moved.accepted_tokens > 0
    assert len(moved.accepted_per_position) == k
    assert sum(moved.accepted_per_position) == moved.accepted_tokens
    assert moved.accepted_per_position[0] > 0
    # A draft at position i is accepted only if the one before it was.
    rates = moved.position_rates
    assert all(a >= b for a, b in itertools.pairwise(rates)), rates
    # The echo drafter guesses right about 2 steps in 3 (measured: 2.4 - 4).
    tau = moved.acceptance_length
    assert tau is not None and tau > 1.5, moved


def test_plugin_off_server_is_stock_vllm(reference: Reference) -> None:
    assert "vllm-dflash" not in reference.log
    assert "vllm_dflash" not in reference.log
    assert all(t.strip() for t in reference.texts["concurrent"])
    assert reference.stopped.clean, reference.stopped


def test_example_client_reads_acceptance(dflash: serve.Server) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", dflash.url, "--max-tokens", "16",
         "--requests", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mean acceptance length: " in proc.stdout
    tau = float(proc.stdout.split("mean acceptance length: ")[1].split()[0])
    assert tau > 1.0
    assert "acceptance per position: " in proc.stdout


def test_server_shuts_down_cleanly(dflash: serve.Server) -> None:
    """Last in the module: SIGTERM stops the API server and its children."""
    children = dflash.children()
    assert len(children) >= 2, children  # engine core and worker at least
    report = dflash.stop(timeout=60)
    assert not report.forced, "SIGTERM did not stop the server"
    assert report.leftover == [], f"processes left behind: {report.leftover}"
    assert report.port_free
    assert not any(c.is_running() for c in children)
