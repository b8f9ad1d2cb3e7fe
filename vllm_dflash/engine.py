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
    warmup: bool = False
    worker_hook: str | None = None
    """"module:function" called as ``function(worker, phase)`` in the worker,
    with phase "before" and "after" generation (tests record tensors so)."""
    request_params: list[dict[str, Any]] | None = None
    """Per-prompt ``SamplingParams`` fields overriding the common ones (e.g.
    ``max_tokens``, ``seed``, ``stop_token_ids``, ``ignore_eos``);
    ``structured_outputs`` is a dict of ``StructuredOutputsParams`` fields."""


@dataclass
class EngineResult:
    outputs: list[list[int]]
    elapsed_s: float
    generated_tokens: int
    metrics: dict[str, float]
    drafter_class: str | None
    proposer_stats: dict[str, int] | None
    vllm_version: str
    finish_reasons: list[str | None] = field(default_factory=list)
    adaptive_k: dict[int, int] | None = None
    """Steps per K chosen by the adaptive policy (``VLLM_DFLASH_ADAPTIVE_K=1``;
    the scheduler runs in this process)."""

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
    runner = worker.model_runner
    # V1 runner: .drafter; V2 runner: .speculator
    drafter = getattr(runner, "drafter", None) or getattr(runner, "speculator", None)
    if drafter is None:
        return None, None
    cls = type(drafter)
    stats = getattr(drafter, "stats", None)
    return f"{cls.__module__}.{cls.__qualname__}", (asdict(stats) if stats else None)


def runner_version(worker: Any) -> str:
    """ "v2" for vLLM's V2 model runner (``vllm.v1.worker.gpu``), else "v1"."""
    module = type(worker.model_runner).__module__
    return "v2" if module.startswith("vllm.v1.worker.gpu.") else "v1"


def adaptive_snapshot(worker: Any) -> dict[str, Any] | None:
    """The adaptive-K policy's ``snapshot()`` where the engine has one. Run
    through ``collective_rpc``: the worker of a single-GPU engine lives in the
    engine-core process, beside the scheduler that holds the policy. None
    where the worker has a process of its own (CPU vLLM's multiprocess
    executor; tensor parallelism)."""
    from vllm_dflash import adaptive

    policy = adaptive.last_policy
    return None if policy is None else policy.snapshot()


def step_clock_snapshot(worker: Any) -> dict[str, Any] | None:
    """The DFlash scheduler's ``StepClock.snapshot()`` (step intervals and
    stalls; the adaptive policy's clock where it has one), through
    ``collective_rpc`` as ``adaptive_snapshot``; None without one."""
    from vllm_dflash import adaptive

    clock = adaptive.last_clock
    return None if clock is None else clock.snapshot()


def host_usage(worker: Any) -> dict[str, float]:
    """The calling process's CPU seconds (user + system) and context
    switches so far (``getrusage``). Through ``collective_rpc``, the
    engine-core process's on a single GPU: the scheduler, the runner and the
    host side of every step. An involuntary switch is the kernel taking the
    core away (another thread wanted it); a voluntary one, a wait."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "voluntary_cs": usage.ru_nvcsw,
        "involuntary_cs": usage.ru_nivcsw,
    }


def keep_step_log(worker: Any) -> bool:
    """Make the DFlash scheduler's step clock keep every step's interval
    (``StepClock.keep_log``), through ``collective_rpc`` as
    ``adaptive_snapshot``; whether there was a clock to ask."""
    from vllm_dflash import adaptive

    clock = adaptive.last_clock
    if clock is not None:
        clock.keep_log()
    return clock is not None


def _call_hook(worker: Any, hook: str, phase: str) -> Any:
    import importlib

    module, _, name = hook.partition(":")
    return getattr(importlib.import_module(module), name)(worker, phase)


# Metrics read after generation: speculation, preemptions, prefix caching.
METRIC_PREFIXES = ("vllm:spec_decode", "vllm:num_preemptions", "vllm:prefix_cache")


def collect_spec_metrics(llm: Any) -> dict[str, float]:
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith(METRIC_PREFIXES):
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

    from vllm_dflash import support

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
        kwargs["speculative_config"] = support.route_draft_attention_backend(
            {
                "method": "dflash",
                "model": spec.drafter,
                "num_speculative_tokens": spec.num_speculative_tokens,
                **spec.speculative_extra,
            }
        )
    kwargs.update(spec.llm_kwargs)
    llm = LLM(**kwargs)
    params = SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        seed=spec.seed if spec.temperature > 0 else None,
        ignore_eos=spec.ignore_eos,
        detokenize=False,
    )
    inputs: Any = [{"prompt_token_ids": p} for p in spec.prompts]
    if spec.warmup:
        llm.generate(inputs[:1], params, use_tqdm=False)
    per_request: Any = params
    if spec.request_params is not None:
        per_request = [_override(params, o) for o in spec.request_params]
    if spec.worker_hook:
        llm.collective_rpc(_call_hook, args=(spec.worker_hook, "before"))
    start = time.perf_counter()
    outs = llm.generate(inputs, per_request, use_tqdm=False)
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
        finish_reasons=[o.outputs[0].finish_reason for o in outs],
        adaptive_k=_adaptive_decisions(),
    )


def _adaptive_decisions() -> dict[int, int] | None:
    from vllm_dflash import adaptive

    policy = adaptive.last_policy
    return None if policy is None else policy.steps_per_k()


def _override(params: Any, changes: dict[str, Any]) -> Any:
    """A copy of ``params`` with ``changes`` applied (one request's options)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    fields = {k: getattr(params, k) for k in _SAMPLING_FIELDS}
    fields.update(changes)
    if isinstance(fields.get("structured_outputs"), dict):
        fields["structured_outputs"] = StructuredOutputsParams(
            **fields["structured_outputs"]
        )
    return SamplingParams(**fields)


_SAMPLING_FIELDS = ("max_tokens", "temperature", "seed", "ignore_eos", "detokenize")


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
    if data.get("adaptive_k"):  # JSON object keys are strings
        data["adaptive_k"] = {int(k): n for k, n in data["adaptive_k"].items()}
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
