"""Run one vLLM engine in a fresh process and report what it produced.

Each engine (no speculation, native DFlash, this plugin) gets its own process,
as vLLM's own plugin tests do: plugins load per process and an engine cannot
be torn down cleanly in place. Used by the demo, the benchmark and the tests.

    python -m vllm_dflash.engine SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EngineSpec:
    target: str
    prompts: list[list[int]]
    max_tokens: int = 32
    drafter: str | None = None
    num_speculative_tokens: int = 7
    dtype: str = "float32"
    temperature: float = 0.0
    seed: int = 0
    speculative_extra: dict[str, Any] = field(default_factory=dict)
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ignore_eos: bool = True
    stop_token_ids: list[list[int]] | None = None
    """Per prompt: token ids that end that prompt's output (kept in it)."""
    warmup: bool = False
    worker_hook: str | None = None
    """"module:function" called as ``function(worker, phase)`` in the worker,
    with phase "before" and "after" generation (tests record tensors so)."""


@dataclass
class EngineResult:
    outputs: list[list[int]]
    elapsed_s: float
    generated_tokens: int
    metrics: dict[str, float]
    drafter_class: str | None
    proposer_stats: dict[str, int] | None
    vllm_version: str

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def acceptance_length(self) -> float | None:
        """Mean tokens per verify step (accepted drafts + the bonus token)."""
        drafts = self.metrics.get("vllm:spec_decode_num_drafts", 0.0)
        if not drafts:
            return None
        return (
            1.0 + self.metrics.get("vllm:spec_decode_num_accepted_tokens", 0.0) / drafts
        )


def _drafter_info(worker: Any) -> tuple[str | None, dict[str, int] | None]:
    drafter = getattr(worker.model_runner, "drafter", None)
    if drafter is None:
        return None, None
    cls = type(drafter)
    stats = getattr(drafter, "stats", None)
    return f"{cls.__module__}.{cls.__qualname__}", (asdict(stats) if stats else None)


def _call_hook(worker: Any, hook: str, phase: str) -> Any:
    import importlib

    module, _, name = hook.partition(":")
    return getattr(importlib.import_module(module), name)(worker, phase)


def collect_spec_metrics(llm: Any) -> dict[str, float]:
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:spec_decode"):
            continue
        value = getattr(metric, "value", None)
        if isinstance(value, (int, float)):
            totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
        values = getattr(metric, "values", None)
        if isinstance(values, list):
            for i, v in enumerate(values):
                key = f"{metric.name}[{i}]"
                totals[key] = totals.get(key, 0.0) + float(v)
    return totals


def run_in_process(spec: EngineSpec) -> EngineResult:
    """Start the engine here; call only in a process of its own."""
    import vllm
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=spec.target,
        dtype=spec.dtype,
        skip_tokenizer_init=True,
        enforce_eager=True,
        gpu_memory_utilization=0.15,
        max_model_len=1024,
        max_num_seqs=16,
        seed=spec.seed,
        disable_log_stats=False,
    )
    if spec.drafter is not None:
        kwargs["speculative_config"] = {
            "method": "dflash",
            "model": spec.drafter,
            "num_speculative_tokens": spec.num_speculative_tokens,
            **spec.speculative_extra,
        }
    kwargs.update(spec.llm_kwargs)
    llm = LLM(**kwargs)
    stops = spec.stop_token_ids or [[] for _ in spec.prompts]
    params = [
        SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed if spec.temperature > 0 else None,
            ignore_eos=spec.ignore_eos,
            stop_token_ids=stop,
            detokenize=False,
        )
        for stop in stops
    ]
    inputs: Any = [{"prompt_token_ids": p} for p in spec.prompts]
    if spec.warmup:
        llm.generate(inputs[:1], params[:1], use_tqdm=False)
    if spec.worker_hook:
        llm.collective_rpc(_call_hook, args=(spec.worker_hook, "before"))
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if spec.worker_hook:
        llm.collective_rpc(_call_hook, args=(spec.worker_hook, "after"))
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    info = llm.collective_rpc(_drafter_info)[0]
    return EngineResult(
        outputs=tokens,
        elapsed_s=elapsed,
        generated_tokens=sum(len(t) for t in tokens),
        metrics=collect_spec_metrics(llm),
        drafter_class=info[0],
        proposer_stats=info[1],
        vllm_version=vllm.__version__,
    )


def run(
    spec: EngineSpec, *, timeout: float = 900, log: Path | None = None
) -> EngineResult:
    """Run ``spec`` in a fresh Python process and return its result."""
    with tempfile.TemporaryDirectory(prefix="vllm-dflash-engine-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            **spec.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "vllm_dflash.engine",
            str(spec_path),
            str(out_path),
        ]
        with open(log or Path(tmp, "engine.log"), "w") as sink:
            proc = subprocess.run(
                cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
            )
        if proc.returncode != 0 or not out_path.exists():
            text = Path(log or Path(tmp, "engine.log")).read_text()
            raise EngineFailed(proc.returncode, text)
        data = json.loads(out_path.read_text())
    return EngineResult(**data)


class EngineFailed(RuntimeError):
    def __init__(self, returncode: int, log: str) -> None:
        self.returncode = returncode
        self.log = log
        super().__init__(
            f"engine exited with {returncode}; last output:\n{log[-4000:]}"
        )


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    spec = EngineSpec(**json.loads(Path(args[0]).read_text()))
    result = run_in_process(spec)
    Path(args[1]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
