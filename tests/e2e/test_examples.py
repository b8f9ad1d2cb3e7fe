"""The examples run as documented, offline, on tiny models (CPU).

Two engines in all: the offline example and the benchmark example (plugin
mode only; ``vllm-dflash bench`` itself is covered by ``test_bench.py``). The
Gemma 4 serve script is checked without a server: its command goes through
vLLM's own server argument parser, and the tiny variant's through vLLM's
engine configuration. ``examples/serve_client.py`` talks to a live DFlash
server in ``tests/e2e/test_serve.py::test_example_client_reads_acceptance``;
its ``--tiny`` mode (about 80 s of server start) is not run here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ACTIVE = "vllm-dflash 0.1.0: the plugin's DFlash implementation is active"


def run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_offline_example_generates_and_reports_acceptance() -> None:
    proc = run(
        [sys.executable, str(EXAMPLES / "offline_inference.py"), "--tiny"],
        timeout=600,
    )
    texts = [x for x in proc.stdout.splitlines() if x.startswith("output: ")]
    assert len(texts) == 2, proc.stdout[-2000:]
    assert all(len(t) > len("output: ''") for t in texts), texts
    tau = re.search(r"mean acceptance length: ([\d.]+) \(K=7\)", proc.stdout)
    assert tau, proc.stdout[-2000:]
    # The echo pair's drafts are really accepted: more than the bonus token.
    assert 1.0 < float(tau.group(1)) <= 8.0
    assert ACTIVE in proc.stdout + proc.stderr


def test_benchmark_example_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = ["bash", str(EXAMPLES / "benchmark.sh"), "--tiny", "--modes", "plugin"]
    proc = run([*cmd, "--batch-sizes", "2"], timeout=600, OUT=str(out))
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("plugin", 2)]
    # Three timed passes by default (--repeats), 2 requests x 16 tokens each.
    assert len(rows[0]["pass_tok_per_s"]) == 3
    assert rows[0]["tokens"] == 3 * 2 * 16 and rows[0]["tok_per_s"] > 0
    assert rows[0]["acceptance_length"] >= 1.0
    assert (out / "bench.png").exists()
    assert "[bench] wrote" in proc.stdout


def serve_command(*args: str) -> list[str]:
    proc = run(["bash", str(EXAMPLES / "serve_gemma4.sh"), "--print", *args], 300)
    argv = proc.stdout.splitlines()
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return argv[3:]


def server_parser():  # type: ignore[no-untyped-def]
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # earlier releases
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser())


def test_gemma4_serve_command_is_the_reference_launch() -> None:
    """Every flag exists in vLLM's server parser and the speculative config
    holds only SpeculativeConfig fields; the values are the authors' launch,
    as docs/serving.md gives it."""
    from vllm.config import SpeculativeConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    ns = server_parser().parse_args(serve_command("--port", "8001"))
    assert ns.model == "google/gemma-4-26B-A4B-it"
    assert ns.attention_backend == "TRITON_ATTN"
    assert ns.max_num_batched_tokens == 32768 and ns.port == 8001
    spec = ns.speculative_config
    assert spec == {
        "method": "dflash",
        "model": "z-lab/gemma-4-26B-A4B-it-DFlash",
        "num_speculative_tokens": 15,
        "attention_backend": "FLASH_ATTN",
    }
    fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    assert set(spec) <= fields
    assert AttentionBackendEnum[spec["attention_backend"]].name == "FLASH_ATTN"
    serving = (ROOT / "docs" / "serving.md").read_text()
    for value in ("z-lab/gemma-4-26B-A4B-it-DFlash", "TRITON_ATTN", "32768"):
        assert value in serving
    assert "examples/serve_gemma4.sh" in serving


TINY_CONFIG = textwrap.dedent(
    """
    import sys
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser

    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    config = AsyncEngineArgs.from_cli_args(ns).create_engine_config()
    spec = config.speculative_config
    print("RESULT", spec.method, spec.num_speculative_tokens,
          spec.draft_model_config.hf_config.layer_types,
          config.scheduler_config.max_num_batched_tokens)
    """
)


def test_gemma4_serve_tiny_variant_builds_an_engine_config() -> None:
    argv = serve_command("--tiny")
    proc = run([sys.executable, "-c", TINY_CONFIG, *argv], timeout=300)
    result = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert result, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result[-1].startswith("RESULT dflash 7 ")
    assert "'sliding_attention', 'sliding_attention', 'full_attention'" in result[-1]
    assert result[-1].endswith(" 32768")
