"""``vllm-dflash bench``: no speculation vs vLLM's native DFlash vs this plugin.

Each mode runs in its own process on identical inputs (random prompt ids,
``ignore_eos``), with dummy weights and, by default, synthetic acceptance
(``rejection_sample_method: synthetic``) so every mode verifies the same
number of tokens per step and the figures compare implementations, not
drafters. Prints a table, writes ``bench.json`` and ``bench.png``.

    vllm-dflash bench --preset qwen3-8b --batch-sizes 1,8,32 --output-len 256

Modes (``--modes``, see ``parse_mode``) name an implementation and a K:
``plugin-k3`` is the plugin at three drafts per step, ``adaptive`` the plugin
choosing K per step (``vllm_dflash.adaptive``) up to ``--k``, ``dynamic-k3``
the plugin on vLLM's dynamic-K path (as adaptive runs) held at three drafts:
adaptive against it is what the policy's choices gain or cost, it against
``plugin-k3`` what the dynamic-K path costs at one K. Every mode of a
run captures the same CUDA-graph sizes (``capture_sizes``), so the figures
differ by what the mode does, not by which graphs it has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

from vllm_dflash.adaptive import GPU_BOUND_WAIT, candidate_ks
from vllm_dflash.config import DFlashConfigError
from vllm_dflash.engine import (
    adaptive_snapshot,
    collect_spec_metrics,
    host_usage,
    keep_step_log,
    runner_version,
    step_clock_snapshot,
)
from vllm_dflash.envs import ADAPTIVE_K

T = TypeVar("T")

MODES = ("none", "native", "plugin")
"""The default ``--modes``."""
MODE_GRAMMAR = (
    "none, native, plugin (K = --k), native-kN, plugin-kN (K = N >= 1), "
    "adaptive (the plugin choosing K per step, at most --k) or dynamic-kN "
    "(the plugin on the dynamic-K path as adaptive, held at K = N <= --k)"
)
# A batch size no engine reaches: dynamic-kN's schedule names adaptive's
# other candidate K beyond it, so that their CUDA graphs are captured but
# never chosen.
_UNREACHED_BATCH = 1 << 20
# Unconditional per-position acceptance P(drafts 1..i all accepted), shaped
# like the per-position figures published for DFlash drafters: about 0.75 at
# position 1, below 0.20 by position 8. Expected tokens per step
# 1 + sum(rates[:K]): 2.88 at K 3, 4.12 at K 7, 4.78 at K 15
# (adaptive.expected_tokens_per_step).
DECAY_RATES: tuple[float, ...] = (
    0.75, 0.62, 0.51, 0.42, 0.34, 0.27, 0.21, 0.17,
    0.13, 0.10, 0.08, 0.06, 0.05, 0.04, 0.03,
)  # fmt: skip
ACCEPTANCE_GRAMMAR = "flat, decay or R1,R2,... (non-increasing rates in [0, 1])"


@dataclass(frozen=True)
class Mode:
    """One ``--modes`` entry: which implementation, at which K."""

    name: str
    impl: str
    """"none", "native" or "plugin"."""
    k: int
    """num_speculative_tokens (0 for none; the maximum for adaptive and
    dynamic-kN)."""
    adaptive: bool = False
    held_k: int | None = None
    """dynamic-kN: the K every step verifies (N)."""

    @property
    def ks(self) -> tuple[int, ...]:
        """Every K this mode's engine captures graphs for."""
        dynamic = self.adaptive or self.held_k is not None
        return candidate_ks(self.k) if dynamic else (self.k,)

    @property
    def draft_schedule(self) -> list[tuple[int, int, int]] | None:
        """dynamic-kN's ``num_speculative_tokens_per_batch_size``: N at every
        batch size an engine runs, and every other candidate K of adaptive
        past them (graphs captured as adaptive's are, never used)."""
        if self.held_k is None:
            return None
        others = [k for k in self.ks if k != self.held_k]
        return [(1, _UNREACHED_BATCH, self.held_k)] + [
            (_UNREACHED_BATCH + 1 + i, _UNREACHED_BATCH + 1 + i, k)
            for i, k in enumerate(others)
        ]

    @property
    def env(self) -> dict[str, str]:
        """Set explicitly, so a variable in the caller's shell cannot turn
        one mode into another."""
        if self.impl == "none":
            return {}
        return {
            "VLLM_DFLASH_USE_NATIVE": "1" if self.impl == "native" else "0",
            ADAPTIVE_K: "1" if self.adaptive else "0",
        }


def parse_mode(name: str, k: int) -> Mode:
    """``none``, ``native``, ``plugin``, ``native-kN``, ``plugin-kN``,
    ``adaptive`` or ``dynamic-kN``; ``k`` is ``--k``."""
    if name == "none":
        return Mode(name, "none", 0)
    if name in ("native", "plugin"):
        return Mode(name, name, k)
    if name == "adaptive":
        return Mode(name, "plugin", k, adaptive=True)
    impl, sep, n = name.partition("-k")
    if sep and impl in ("native", "plugin") and n.isdigit() and int(n) >= 1:
        return Mode(name, impl, int(n))
    if sep and impl == "dynamic" and n.isdigit() and 1 <= int(n) <= k:
        return Mode(name, "plugin", k, held_k=int(n))
    raise DFlashConfigError("--modes", name, f"Modes are {MODE_GRAMMAR}.")


def parse_modes(text: str, k: int) -> list[Mode]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise DFlashConfigError("--modes", text, f"Name one of {MODE_GRAMMAR}.")
    if len(set(names)) != len(names):
        raise DFlashConfigError("--modes", text, "Name each mode once.")
    return [parse_mode(name, k) for name in names]


def mode_sort_key(name: str, k: int) -> tuple[int, int, str]:
    """none, native*, plugin*, dynamic*, adaptive; by K within each."""
    groups = ("none", "native", "plugin", "dynamic", "adaptive")
    return groups.index(name.split("-k")[0]), k, name


def capture_sizes(batch_sizes: list[int], modes: list[Mode]) -> list[int]:
    """CUDA-graph sizes for every mode of a run: b tokens (no speculation,
    K = 0) and b x (K + 1) for each K any mode may verify with."""
    ks = {0} | {k for mode in modes for k in mode.ks}
    return sorted({b * (k + 1) for b in batch_sizes for k in ks})


def validate_rates(rates: list[float], option: str = "--acceptance") -> list[float]:
    if (
        not rates
        or not all(0.0 <= r <= 1.0 for r in rates)
        or any(b > a for a, b in pairwise(rates))
    ):
        raise DFlashConfigError(
            option,
            ",".join(f"{r:g}" for r in rates),
            "Per-position acceptance rates are unconditional, so they must be "
            "non-increasing and in [0, 1], e.g. 0.8,0.6,0.4.",
        )
    return rates


def parse_acceptance(text: str) -> tuple[str, list[float] | None]:
    """(profile name, per-position rates); flat has none (``--tau`` sets it)."""
    if text == "flat":
        return "flat", None
    if text == "decay":
        return "decay", list(DECAY_RATES)
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError as e:
        raise DFlashConfigError(
            "--acceptance", text, f"Use {ACCEPTANCE_GRAMMAR}."
        ) from e
    return "custom", validate_rates(rates)


def flat_rates(tau: float, k: int) -> list[float]:
    """The rates vLLM derives from ``synthetic_acceptance_length`` tau at K:
    every draft accepted up to tau - 1, then the fraction, then none."""
    if not 1.0 <= tau <= k + 1:
        raise DFlashConfigError(
            "--tau",
            tau,
            f"Synthetic tau is in [1, K + 1 = {k + 1}]; --tau 0 runs real acceptance.",
        )
    full = int(tau - 1)
    return ([1.0] * full + [tau - 1 - full] + [0.0] * k)[:k]


def rates_for_k(rates: list[float], k: int) -> list[float]:
    """The first K rates; past the end of the profile, its last rate."""
    validate_rates(rates)
    return rates[:k] + [rates[-1]] * max(0, k - len(rates))


# Qwen3-8B shape, and the z-lab Qwen3-8B DFlash drafter: same width, 5 layers.
_QWEN3_8B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3-8b": {
        "target": _QWEN3_8B,
        "drafter": {
            **_QWEN3_8B,
            "architectures": ["DFlashDraftModel"],
            "num_hidden_layers": 5,
            "block_size": 16,
            "num_target_layers": 36,
            "dflash_config": {
                "mask_token_id": 151669,
                "target_layer_ids": [1, 9, 17, 25, 33],
            },
        },
    },
}

# google/gemma-4-26B-A4B-it's text decoder (public shape; the text-only class,
# which runs the same decoder for text prompts without a vision tower or a
# processor that a config-only folder lacks): 30 layers, 5 x (5 sliding + 1
# global), sliding head_dim 256 / window 1024, global head_dim 512 with 2 KV
# heads and k=v, MoE 128 experts top-8 (FFN 704) beside a dense FFN of 2112,
# sqrt(hidden)-scaled tied embeddings, final logit soft cap 30. Mixed head
# sizes make vLLM force TRITON_ATTN for the target.
_GEMMA4_26B_A4B: dict[str, Any] = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "num_hidden_layers": 30,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "sliding_window": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    # vLLM 0.26 reads these two; transformers >= 5.x turns them into
    # per_layer_config for the global layers (what vLLM 0.32 reads).
    "global_head_dim": 512,
    "num_global_key_value_heads": 2,
    "attention_k_eq_v": True,
    "enable_moe_block": True,
    "num_experts": 128,
    "top_k_experts": 8,
    "moe_intermediate_size": 704,
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
    "vocab_size": 262144,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    "tie_word_embeddings": True,
    "allow_global_per_layer_attribute_access": True,
    "torch_dtype": "bfloat16",
}
# z-lab/gemma-4-26B-A4B-it-DFlash: target layers [1, 6, 11, 17, 22, 27], four
# sliding-window layers (window 2048, causal) and a final full non-causal
# layer, mask id 4, GELU-tanh MLP, soft cap 30; embeddings scaled by
# sqrt(hidden) because the target is Gemma. Attention widths are an estimate
# (32 x 128 query heads, 8 KV heads, FFN 5632: about 0.43 B parameters).
_GEMMA4_26B_A4B_DRAFTER: dict[str, Any] = {
    "architectures": ["DFlashDraftModel"],
    "model_type": "qwen3",
    "hidden_size": 2816,
    "intermediate_size": 5632,
    "num_hidden_layers": 5,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "vocab_size": 262144,
    "max_position_embeddings": 262144,
    "rope_theta": 1000000.0,
    "layer_types": ["sliding_attention"] * 4 + ["full_attention"],
    "sliding_window": 2048,
    "use_sliding_window": True,
    "final_logit_softcapping": 30.0,
    "block_size": 16,
    "num_target_layers": 30,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "dflash_config": {"mask_token_id": 4, "target_layer_ids": [1, 6, 11, 17, 22, 27]},
}
PRESETS["gemma4-26b-a4b"] = {
    "target": _GEMMA4_26B_A4B,
    "drafter": _GEMMA4_26B_A4B_DRAFTER,
}
# Attention backends a preset runs with unless --attention-backend /
# --draft-attention-backend say otherwise: (target, drafter). The Gemma-4
# drafter's authors run the target on TRITON_ATTN, the drafter on FLASH_ATTN.
PRESET_BACKENDS: dict[str, tuple[str | None, str | None]] = {
    "gemma4-26b-a4b": ("TRITON_ATTN", "FLASH_ATTN"),
}


def _tiny_preset() -> dict[str, dict[str, Any]]:
    from vllm_dflash.tiny import TINY_TARGET

    target = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **TINY_TARGET,
    }
    drafter = {
        **target,
        "architectures": ["DFlashDraftModel"],
        "num_hidden_layers": 2,
        "block_size": 16,
        "num_target_layers": TINY_TARGET["num_hidden_layers"],
        "dflash_config": {"mask_token_id": 511, "target_layer_ids": [0, 2]},
    }
    return {"target": target, "drafter": drafter}


PRESETS["tiny"] = _tiny_preset()


@dataclass
class BenchSpec:
    mode: str
    target: str
    drafter: str | None
    batch_sizes: list[int]
    k: int = 15
    tau: float | None = 7.8
    prompt_len: int = 128
    output_len: int = 256
    dtype: str = "bfloat16"
    enforce_eager: bool = False
    load_format: str = "dummy"
    max_model_len: int = 2048
    attention_backend: str | None = None
    draft_attention_backend: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    acceptance_rates: list[float] | None = None
    """Synthetic per-position rates, exactly ``k`` of them; None: ``tau``."""
    draft_schedule: list[tuple[int, int, int]] | None = None
    """``num_speculative_tokens_per_batch_size`` (dynamic-kN), else None."""
    capture_sizes: list[int] | None = None
    """CUDA-graph sizes (the run's union); None: this mode's own."""
    max_num_batched_tokens: int | None = None
    skip_tokenizer_init: bool = True
    profile_path: str | None = None
    """Write a torch-profiler table of a batch-1 run here (in-process engine)."""
    long_output_len: int = 0
    """After the batches, one request of this many output tokens (0: none)."""
    repeats: int = 3
    """Timed passes per batch (fresh prompts each); the row's rate is the
    median pass's. The long request runs once."""
    memory_share: float = 1.0
    """This engine's share of the device (``--interleave``: 1 / modes)."""
    start_position: int = 0
    """Where this engine started in its round (``--rounds``; 0: first)."""
    round_index: int = 0
    """This engine's round (``--rounds``; 0: the first)."""
    step_log: bool = False
    """Keep every decode step's interval in ``pass_clock`` (``--step-log``)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """More ``LLM(...)`` arguments (``--engine-arg``), none the bench sets."""


@dataclass
class BenchRow:
    mode: str
    batch: int
    tokens: int
    seconds: float
    tok_per_s: float
    acceptance_length: float | None
    runner: str = ""
    """Model runner the engine used: "v1" or "v2"."""
    k: int = 0
    """num_speculative_tokens of the mode (the maximum for adaptive)."""
    output_len: int = 0
    """Output tokens per request; rows of ``--long-output-len`` differ."""
    adaptive: dict[str, Any] | None = None
    """Adaptive mode: steps per K in this row's timed run, and the policy's
    step-time and acceptance estimates after it (``AdaptiveDraftLength.snapshot``)."""
    warmup_tok_per_s: float | None = None
    """The untimed warm-up run at the same batch before it (other prompts):
    what a freshly started engine delivers at this batch the first time."""
    pass_tok_per_s: list[float] = field(default_factory=list)
    """Each timed pass's rate, in order; ``tok_per_s`` is their median, and
    ``tokens`` / ``seconds`` / the acceptance length / the adaptive steps are
    over all of them."""
    pass_start_s: list[float] = field(default_factory=list)
    """Wall-clock start of each timed pass (Unix seconds): with
    ``--interleave`` it shows the modes' passes alternating."""
    drafts_per_request_step: float | None = None
    """Draft tokens verified per request and step over the timed passes (the
    K the steps ran; adaptive's average); None without drafts."""
    pass_output_digest: list[str] = field(default_factory=list)
    """Each timed pass's ``output_digest``: with ``--interleave`` (the same
    prompts in every engine) it says which engines' passes generated the
    same tokens."""
    pass_clock: list[dict[str, Any]] = field(default_factory=list)
    """Each timed pass's step clock (plugin DFlash modes; ``StepClock``): its
    steps, their seconds ``busy_s`` (the pass's time less its first step,
    which follows the idle engine, and its host work around the steps), and
    its stalls, ``[step in the pass, batch, K, ms, host wait ms]``; with
    ``--step-log`` every step in that form too, plus the engine process's CPU
    ms over the step (``log``)."""
    pass_start_position: list[int] = field(default_factory=list)
    """Each timed pass's engine: where it started in its round (``--rounds``;
    0: first), the others' engines already up beside it."""
    pass_round: list[int] = field(default_factory=list)
    """Each timed pass's round (``--rounds``; 0: first). ``--merge`` numbers
    each run's rounds on from the runs before it."""
    pass_host: list[dict[str, float]] = field(default_factory=list)
    """Each timed pass's host usage (``_usage_delta``): CPU seconds and
    voluntary and involuntary context switches of the engine-core process
    (``engine_*``) and of the process holding the ``LLM``, its front end
    (``front_*``). A pass whose steps ran slow on an idle GPU shows here
    whether the host did more work, or was kept off its core."""
    spec_counts: list[float] | None = None
    """vLLM's spec-decode counters over the timed passes: drafts (one
    request's drafts in one step), accepted tokens and draft tokens; what
    ``merge_rows`` pools the acceptance length from."""
    jit_compiles: dict[str, int] | None = None
    """Kernels vLLM's JIT monitor saw compiling after the engine's warm-up,
    by name, logged while this row's batch ran (its untimed warm-up pass
    included): a latency spike a server's first requests would pay. None
    where the engine's log never showed the monitor starting. vLLM logs a
    kernel's first compile only, unless ``--engine-arg
    jit_monitor_verbose=true``."""


def _acceptance(counts: list[float]) -> tuple[float | None, float | None]:
    """(acceptance length, drafts verified per request and step) from
    ``spec_counts``; (None, None) without drafts."""
    drafts, accepted, draft_tokens = counts
    if not drafts:
        return None, None
    return 1 + accepted / drafts, draft_tokens / drafts


def merge_rows(a: BenchRow, b: BenchRow) -> BenchRow:
    """One mode's row of a batch over two rounds (``--rounds``, ``--merge``):
    their passes in order, tokens and seconds summed, the median pass's
    rate, the acceptance from the summed counters (None where a round has
    none: rows written before ``spec_counts``), the first round's warm-up,
    and the adaptive policy's step counts summed and its traces and
    measurements joined (its estimates are the last round's)."""
    rates = a.pass_tok_per_s + b.pass_tok_per_s
    counts = (
        [x + y for x, y in zip(a.spec_counts, b.spec_counts, strict=True)]
        if a.spec_counts is not None and b.spec_counts is not None
        else None
    )
    tau, k_mean = _acceptance(counts) if counts else (None, None)
    return replace(
        a,
        tokens=a.tokens + b.tokens,
        seconds=a.seconds + b.seconds,
        tok_per_s=statistics.median(rates),
        acceptance_length=tau,
        drafts_per_request_step=k_mean,
        adaptive=_merge_policy(a.adaptive, b.adaptive),
        pass_tok_per_s=rates,
        pass_start_s=a.pass_start_s + b.pass_start_s,
        pass_output_digest=a.pass_output_digest + b.pass_output_digest,
        pass_clock=a.pass_clock + b.pass_clock,
        pass_host=a.pass_host + b.pass_host,
        pass_start_position=a.pass_start_position + b.pass_start_position,
        pass_round=a.pass_round + b.pass_round,
        spec_counts=counts,
        jit_compiles=(
            None
            if a.jit_compiles is None and b.jit_compiles is None
            else _sum_counts(a.jit_compiles or {}, b.jit_compiles or {})
        ),
    )


def _sum_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Two tables of counts added key by key (``a``'s keys first)."""
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return total


def _add_row(rows: list[BenchRow], row: BenchRow) -> None:
    """Append ``row``, or merge it into the row of its mode and batch (a
    later round's, ``merge_rows``)."""
    for i, r in enumerate(rows):
        if (r.mode, r.batch) == (row.mode, row.batch):
            rows[i] = merge_rows(r, row)
            return
    rows.append(row)


def _merge_policy(
    a: dict[str, Any] | None, b: dict[str, Any] | None
) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    merged = dict(b)
    for name in ("steps_per_k", "steps_per_batch_k"):
        merged[name] = _sum_counts(a.get(name, {}), b.get(name, {}))
    for name in ("trace", "measurements"):
        merged[name] = a.get(name, []) + b.get(name, [])
    return merged


def _spec_metrics(llm: Any) -> tuple[float, float, float]:
    """(drafts, accepted tokens, draft tokens) so far, from vLLM's
    spec-decode counters; a draft is one request's drafts in one step."""
    totals = collect_spec_metrics(llm)
    return (
        totals.get("vllm:spec_decode_num_drafts", 0.0),
        totals.get("vllm:spec_decode_num_accepted_tokens", 0.0),
        totals.get("vllm:spec_decode_num_draft_tokens", 0.0),
    )


def _timed_generate(llm: Any, prompts: Any, params: Any) -> tuple[int, float, str]:
    """(output tokens, seconds, ``output_digest``) of one ``generate`` over
    ``prompts``."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    return sum(map(len, token_ids)), seconds, output_digest(token_ids)


def output_digest(token_ids: list[list[int]]) -> str:
    """A short digest of a pass's output tokens, request by request in prompt
    order: two engines' same passes with equal digests generated the same
    tokens (greedy, real acceptance: lossless; synthetic acceptance keeps
    draft tokens the target would not have chosen, so only engines drawing
    the same acceptance and drafts agree)."""
    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()[:16]


def _usage_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float]:
    """One pass's host usage from ``_Engine._host_usage`` before and after
    it: ``{process}_{counter}`` for each process and counter."""
    return {
        f"{process}_{name}": round(after[process][name] - value, 6)
        for process, counters in before.items()
        for name, value in counters.items()
    }


def _clock_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A pass's step clock: its steps, their seconds, its stalls and (where
    the clock keeps one) its step log, each step counted from the pass's
    first."""
    start = before["steps"]
    delta = {
        "steps": after["steps"] - start,
        "busy_s": round(after["busy_s"] - before["busy_s"], 6),
    }
    for name in ("stalls", "log"):
        if name in after:
            delta[name] = [[s[0] - start, *s[1:]] for s in after[name] if s[0] > start]
    return delta


def _policy_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The policy's snapshot after a timed run, its step counts (per K, per
    batch bucket and K), its decision trace and its measurements over that
    run only (its step clock is in the row's ``pass_clock``)."""
    if after is None:
        return None
    delta = dict(after)
    delta.pop("clock", None)
    for name in ("steps_per_k", "steps_per_batch_k"):
        old = (before or {}).get(name, {})
        steps = {k: n - old.get(k, 0) for k, n in after.get(name, {}).items()}
        delta[name] = {k: n for k, n in steps.items() if n}
    start = (before or {}).get("steps", 0)
    delta["trace"] = [
        [max(first, start), bucket, k, first + n - max(first, start)]
        for first, bucket, k, n in after.get("trace", [])
        if first + n > start
    ]
    delta["measurements"] = [m for m in after.get("measurements", []) if m[0] >= start]
    return delta


def _memory_utilization(share: float = 1.0) -> float:
    """This engine's share of 0.85 of a GPU (0.9 when engines share one: each
    holds the whole model, and a smaller KV cache would limit the batch).

    On CPU, vLLM gives each engine process a KV cache of this fraction of
    the host's memory less what the process already holds, so engines do
    not divide one pool: every engine gets 0.15. Divided among three
    interleaved engines (0.05), it came to less than a process's own
    footprint on a CI machine whose memory node read 9.34 GiB, and the
    engine refused to start ("requested memory for kv (-0.29/0.47 GiB)")."""
    import torch

    if not torch.cuda.is_available():
        return 0.15
    return (0.85 if share == 1.0 else 0.9) * share


class _Engine:
    """One mode's engine, timed batch by batch: ``begin`` (the untimed
    warm-up), ``timed_pass`` (one pass over fresh prompts, as often as the run
    asks) and ``end`` (the row), in a worker process (``_serve``). Every
    mode's engine takes the same commands in the same order, so every mode of
    a run draws the same prompts: identical inputs."""

    def __init__(self, spec: BenchSpec) -> None:
        import random

        from vllm import LLM

        self.spec = spec
        self.llm = LLM(**_engine_kwargs(spec))
        if spec.step_log:
            self.llm.collective_rpc(keep_step_log)
        self.runner: str = self.llm.collective_rpc(runner_version)[0]
        self.rng = random.Random(0)
        vocab = json.loads(Path(spec.target, "config.json").read_text())["vocab_size"]
        self.token_range = (min(1000, vocab // 4), min(30000, vocab // 2))
        self._batch = 0
        self._output_len = 0
        self._warm_tok_per_s = 0.0
        self._metrics_before = (0.0, 0.0, 0.0)
        self._policy_before: dict[str, Any] | None = None
        self._passes: list[tuple[int, float]] = []
        self._pass_starts: list[float] = []
        self._digests: list[str] = []
        self._clock: dict[str, Any] | None = None
        self._pass_clock: list[dict[str, Any]] = []
        self._pass_host: list[dict[str, float]] = []
        self.last_prompts: Any = None

    def _prompts(self, n: int) -> Any:
        low, high = self.token_range
        return [
            {
                "prompt_token_ids": [
                    self.rng.randrange(low, high) for _ in range(self.spec.prompt_len)
                ]
            }
            for _ in range(n)
        ]

    def _params(self, max_tokens: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )

    def begin(self, batch: int, output_len: int) -> None:
        """Warm up on the whole batch (other prompts, so no prefix-cache hits
        later): kernels JIT-compiled for this batch's shapes, and the
        adaptive policy's first measurements at this batch, belong to an
        engine's start, not to its steady state. The warm-up's own rate is
        kept in the row."""
        self._batch, self._output_len = batch, output_len
        warmup = self._params(min(output_len, self.spec.output_len))
        tokens, seconds, _ = _timed_generate(self.llm, self._prompts(batch), warmup)
        self._warm_tok_per_s = tokens / seconds
        self._metrics_before = _spec_metrics(self.llm)
        self._policy_before = self.llm.collective_rpc(adaptive_snapshot)[0]
        self._clock = self.llm.collective_rpc(step_clock_snapshot)[0]
        self._passes, self._pass_starts, self._digests = [], [], []
        self._pass_clock, self._pass_host = [], []

    def _host_usage(self) -> dict[str, dict[str, float]]:
        """``host_usage`` of the engine-core process and of this one."""
        return {
            "engine": self.llm.collective_rpc(host_usage)[0],
            "front": host_usage(None),
        }

    def timed_pass(self) -> float:
        """One timed pass of the current batch over fresh prompts; its tok/s."""
        self.last_prompts = self._prompts(self._batch)
        usage = self._host_usage()
        self._pass_starts.append(time.time())
        tokens, seconds, digest = _timed_generate(
            self.llm, self.last_prompts, self._params(self._output_len)
        )
        self._pass_host.append(_usage_delta(usage, self._host_usage()))
        self._passes.append((tokens, seconds))
        self._digests.append(digest)
        clock = self.llm.collective_rpc(step_clock_snapshot)[0]
        if clock is not None and self._clock is not None:
            self._pass_clock.append(_clock_delta(self._clock, clock))
        self._clock = clock
        return tokens / seconds

    def end(self) -> BenchRow:
        """The row of the current batch: its passes' median rate, tokens,
        seconds, tau and the policy's decisions over all of them."""
        passes = self._passes
        tokens = sum(n for n, _ in passes)
        seconds = sum(t for _, t in passes)
        rates = [n / t for n, t in passes]
        rate = statistics.median(rates)
        after = _spec_metrics(self.llm)
        counts = [a - b for a, b in zip(after, self._metrics_before, strict=True)]
        tau, k_mean = _acceptance(counts)
        policy = _policy_delta(
            self._policy_before, self.llm.collective_rpc(adaptive_snapshot)[0]
        )
        spread = f", passes {min(rates):.1f}-{max(rates):.1f}" if len(rates) > 1 else ""
        print(
            f"[bench] {self.spec.mode:>10} ({self.runner}) batch {self._batch:>3} "
            f"x {self._output_len} tokens: {rate:9.1f} tok/s ({seconds:.2f} s{spread})"
            + (f"  tau {tau:.2f}" if tau else "")
            + (f"  steps per K {policy['steps_per_k']}" if policy else ""),
            file=sys.stderr,
            flush=True,
        )
        return BenchRow(
            mode=self.spec.mode,
            batch=self._batch,
            tokens=tokens,
            seconds=seconds,
            tok_per_s=rate,
            acceptance_length=tau,
            runner=self.runner,
            k=self.spec.k,
            output_len=self._output_len,
            adaptive=policy,
            warmup_tok_per_s=self._warm_tok_per_s,
            pass_tok_per_s=rates,
            pass_start_s=self._pass_starts,
            drafts_per_request_step=k_mean,
            pass_output_digest=self._digests,
            pass_clock=self._pass_clock,
            pass_host=self._pass_host,
            pass_start_position=[self.spec.start_position] * len(rates),
            pass_round=[self.spec.round_index] * len(rates),
            spec_counts=counts,
        )


def _engine_kwargs(spec: BenchSpec) -> dict[str, Any]:
    """``LLM(...)`` arguments of a mode."""
    from vllm_dflash import support

    kwargs: dict[str, Any] = dict(
        model=spec.target,
        dtype=spec.dtype,
        load_format=spec.load_format,
        skip_tokenizer_init=spec.skip_tokenizer_init,
        enforce_eager=spec.enforce_eager,
        max_model_len=spec.max_model_len,
        max_num_seqs=max(spec.batch_sizes),
        gpu_memory_utilization=_memory_utilization(spec.memory_share),
        disable_log_stats=False,
    )
    if spec.attention_backend:
        kwargs["attention_backend"] = spec.attention_backend
    if not spec.enforce_eager:
        # Capture only the graph sizes these batches use (b tokens without
        # speculation, b*(K+1) verify/draft tokens with it), the same for
        # every mode: full default capture takes minutes per engine.
        sizes = spec.capture_sizes or capture_sizes(
            spec.batch_sizes, [Mode(spec.mode, "plugin", spec.k)]
        )
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    if spec.mode != "none":
        speculative: dict[str, Any] = {
            "method": "dflash",
            "model": spec.drafter,
            "num_speculative_tokens": spec.k,
        }
        if spec.tau is not None:
            speculative["rejection_sample_method"] = "synthetic"
            if spec.acceptance_rates is not None:
                speculative["synthetic_acceptance_rates"] = spec.acceptance_rates
            else:
                speculative["synthetic_acceptance_length"] = spec.tau
        if spec.draft_attention_backend:
            speculative["attention_backend"] = spec.draft_attention_backend
        if spec.draft_schedule:
            speculative["num_speculative_tokens_per_batch_size"] = [
                list(entry) for entry in spec.draft_schedule
            ]
        kwargs["speculative_config"] = support.route_draft_attention_backend(
            speculative
        )
        kwargs["max_num_batched_tokens"] = spec.max_num_batched_tokens or max(
            8192, max(spec.batch_sizes) * (spec.k + 1)
        )
    return {**kwargs, **spec.engine_args}


# ``LLM(...)`` arguments ``_engine_kwargs`` sets from the bench's own options.
BENCH_ENGINE_ARGS = (
    "model", "dtype", "load_format", "skip_tokenizer_init", "enforce_eager",
    "max_model_len", "max_num_seqs", "gpu_memory_utilization",
    "disable_log_stats", "attention_backend", "compilation_config",
    "speculative_config", "max_num_batched_tokens",
)  # fmt: skip


def parse_engine_args(
    items: list[str], known: set[str] | None = None
) -> dict[str, Any]:
    """``--engine-arg KEY=VALUE`` options as ``LLM(...)`` arguments: VALUE
    read as JSON where it parses (``true``, ``0``, ``{"a": 1}``), else as
    a string. ``known``: the arguments this vLLM takes (None: unchecked)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DFlashConfigError(
                "--engine-arg",
                item,
                "Write it as KEY=VALUE, e.g. async_scheduling=false.",
            )
        if key in BENCH_ENGINE_ARGS:
            raise DFlashConfigError(
                "--engine-arg",
                item,
                f"{key} is set from the bench's own options (--preset/--target, "
                "--dtype, --enforce-eager, --attention-backend, --k, ...); use those.",
            )
        if known is not None and key not in known:
            raise DFlashConfigError(
                "--engine-arg",
                item,
                f"this vLLM's engine takes no argument {key!r}; see "
                "`vllm serve --help` for the ones it takes.",
            )
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def engine_arg_names() -> set[str]:
    """The ``EngineArgs`` fields of the installed vLLM."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def _runs(spec: BenchSpec) -> list[tuple[int, int]]:
    """(batch, output tokens) of every row a mode produces, in order; the long
    request (one timed pass) last."""
    runs = [(batch, spec.output_len) for batch in spec.batch_sizes]
    if spec.long_output_len:
        runs.append((1, spec.long_output_len))
    return runs


def _num_passes(spec: BenchSpec, output_len: int) -> int:
    return spec.repeats if output_len == spec.output_len else 1


def _profile(llm: Any, prompts: Any, path: str) -> None:
    """Profile one short generation of ``prompts`` (the last timed pass's,
    so at the batch under study); needs VLLM_ENABLE_V1_MULTIPROCESSING=0.
    Writes the kernel table at ``path`` (by CUDA time, then by the host's
    own time per operator) and the timeline beside it
    (``.trace.json.gz``, for chrome://tracing or Perfetto): the table sums
    over the run, the timeline shows where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False
    )
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    table = prof.key_averages()
    # The host's side second: where the GPU waits on it (a large batch at a
    # small K), the CUDA-time table does not say what the host did.
    sorts = ["self_cpu_time_total"]
    if torch.cuda.is_available():
        sorts.insert(0, "cuda_time_total")
    Path(path).write_text(
        "\n\n".join(
            f"sorted by {sort}:\n{table.table(sort_by=sort, row_limit=60)}"
            for sort in sorts
        )
    )
    # The profiler gzips a path ending in .gz itself.
    prof.export_chrome_trace(str(Path(path).with_suffix(".trace.json.gz")))


def _worker_env(spec: BenchSpec) -> dict[str, str]:
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **spec.env}
    if spec.profile_path:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


# -- engines in worker processes --------------------------------------------
#
# Every mode's engine runs in a worker process of its own (``_serve``), driven
# by commands. One after another by default; with ``--interleave`` all at
# once, each with a share of the device, their passes taken in turn (A B,
# B A, A B, ...). Modes run one after another are minutes apart, and on the
# H200 one engine's passes at one batch spread by up to 2x: a comparison of
# two modes then says as much about when each ran as about the mode.
# Interleaved, what moves every engine's same pass falls on all of them alike.


class _WorkerDied(RuntimeError):
    pass


# What vLLM logs when an engine's share of the device leaves no KV cache.
NO_KV_MEMORY = "No available memory for the cache blocks"


def _failure_hint(log_text: str, memory_share: float) -> str:
    """A line on what to change where a shared device caused the failure:
    ``--interleave`` gives every engine its share of the device and each
    holds the whole model. On the H200 three Gemma-4-26B-A4B engines at a
    third each (48 GiB of weights apiece) had -8.8 GiB left for the KV
    cache, after every engine had compiled its graphs (eleventh session)."""
    if NO_KV_MEMORY not in log_text or memory_share >= 1.0:
        return ""
    engines = round(1.0 / memory_share)
    return (
        f"\n[bench] --interleave gave each of {engines} engines "
        f"{_memory_utilization(memory_share):.2f} of the device "
        "(gpu_memory_utilization), and each holds the whole model: run fewer "
        "--modes at once, or leave out --interleave."
    )


_JIT_MONITOR_ON = "Kernel JIT monitor activated"
_JIT_COMPILE = re.compile(r"JIT compilation during inference: (\w+)")


def jit_compiles(log: str, since: int = 0) -> dict[str, int] | None:
    """The kernels an engine's log shows compiling after warm-up (vLLM's JIT
    monitor), counted by name from character ``since`` on; None where the
    monitor never started (no Triton, an eager engine, an older vLLM)."""
    if _JIT_MONITOR_ON not in log:
        return None
    return dict(Counter(_JIT_COMPILE.findall(log, since)))


class _RemoteEngine:
    """An ``_Engine`` in a worker process (``_serve``), one command at a
    time: JSON lines on its stdin, replies on a pipe of their own (vLLM
    writes its logs to stdout)."""

    def __init__(self, spec: BenchSpec, log: Path) -> None:
        self.mode = spec.mode
        self.log = log
        self.memory_share = spec.memory_share
        self.profiles = spec.profile_path is not None
        self._log_read = 0  # how far ``new_jit_compiles`` has read the log
        read_fd, write_fd = os.pipe()
        # Beside the log: what this engine ran, kept with the results.
        spec_path = log.with_suffix(".spec.json")
        spec_path.write_text(json.dumps(asdict(spec), indent=2))
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vllm_dflash.bench",
                    "--serve",
                    str(spec_path),
                    str(write_fd),
                ],
                env=_worker_env(spec),
                stdin=subprocess.PIPE,
                stdout=sink,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                text=True,
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self.runner = self._reply()  # the engine is up

    def _reply(self) -> Any:
        line = self.replies.readline()
        if not line:
            self.proc.wait()
            text = self.log.read_text()
            raise _WorkerDied(
                f"[bench] mode {self.mode} failed (exit {self.proc.returncode}):\n"
                + text[-3000:]
                + _failure_hint(text, self.memory_share)
            )
        return json.loads(line)

    def call(self, *command: Any) -> Any:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _reply reports the exit and the log
        return self._reply()

    def new_jit_compiles(self) -> dict[str, int] | None:
        """``jit_compiles`` of the log written since the last call."""
        text = self.log.read_text(errors="replace")
        compiles = jit_compiles(text, self._log_read)
        self._log_read = len(text)
        return compiles

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # _serve returns on end of input
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.replies.close()


def _serve(spec: BenchSpec, reply_fd: int) -> None:
    """A bench worker: start the engine, say so, then run ``begin`` /
    ``pass`` / ``end`` / ``profile`` commands from stdin until it closes."""
    with os.fdopen(reply_fd, "w") as replies:

        def reply(value: Any) -> None:
            replies.write(json.dumps(value) + "\n")
            replies.flush()

        engine = _Engine(spec)
        reply(engine.runner)
        for line in sys.stdin:
            op, *args = json.loads(line)
            if op == "begin":
                engine.begin(*args)
                reply(None)
            elif op == "pass":
                reply(engine.timed_pass())
            elif op == "end":
                reply(asdict(engine.end()))
            elif op == "profile":
                if spec.profile_path:
                    _profile(engine.llm, engine.last_prompts, spec.profile_path)
                reply(None)
            else:
                raise ValueError(f"vllm-dflash bench worker: unknown command {op!r}")


def pass_order(modes: list[T], index: int) -> list[T]:
    """The order in which the modes run their ``index``-th timed pass (and
    start their engines in round ``index``): each starts one mode later than
    the one before (A B C, B C A, C A B), so no mode always runs first after
    a warm-up or right after another."""
    shift = index % len(modes) if modes else 0
    return modes[shift:] + modes[:shift]


def run_engines(
    specs: list[BenchSpec],
    out: Path,
    on_batch: Callable[[list[BenchRow]], None] | None = None,
    log_suffix: str = "",
) -> list[str]:
    """Run the modes' engines at once (one spec: one engine alone), started
    in the specs' order, each batch's passes taken in turn (``pass_order``),
    and each engine's ``--profile`` table at the end. Calls
    ``on_batch(rows)`` with each batch's rows (so a run cut short keeps
    them); returns the modes that failed. Engine logs are
    ``{mode}{log_suffix}.log`` in ``out``."""
    engines: list[_RemoteEngine] = []
    failed: list[str] = []
    # One engine starts at a time: vLLM sizes its KV cache from the memory it
    # finds free after profiling, which another engine starting would skew.
    for spec in specs:
        print(
            f"[bench] starting mode {spec.mode} (engine start can take minutes)",
            flush=True,
        )
        try:
            engines.append(_RemoteEngine(spec, out / f"{spec.mode}{log_suffix}.log"))
        except _WorkerDied as e:
            print(e, flush=True)
            failed.append(spec.mode)

    def each(engines_now: list[_RemoteEngine], *command: Any) -> dict[str, Any]:
        results = {}
        for engine in engines_now:
            try:
                results[engine.mode] = engine.call(*command)
            except _WorkerDied as e:
                print(e, flush=True)
                failed.append(engine.mode)
                engines.remove(engine)
                engine.close()
        return results

    try:
        for batch, output_len in _runs(specs[0]):
            each(list(engines), "begin", batch, output_len)
            for i in range(_num_passes(specs[0], output_len)):
                by_mode = {e.mode: e for e in engines}
                order = pass_order(list(by_mode), i)
                each([by_mode[m] for m in order], "pass")
            by_mode = {e.mode: e for e in engines}
            rows = [
                BenchRow(**{**r, "jit_compiles": by_mode[mode].new_jit_compiles()})
                for mode, r in each(list(engines), "end").items()
            ]
            if on_batch is not None:
                on_batch(rows)
        each([e for e in engines if e.profiles], "profile")
    finally:
        for engine in engines:
            engine.close()
    return failed


def write_preset(name: str, root: Path) -> tuple[Path, Path]:
    preset = PRESETS[name]
    paths = []
    for part in ("target", "drafter"):
        path = root / f"{name}-{part}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(preset[part], indent=2))
        paths.append(path)
    return paths[0], paths[1]


def _sorted(rows: list[BenchRow]) -> list[BenchRow]:
    return sorted(rows, key=lambda r: (r.batch, *mode_sort_key(r.mode, r.k)))


def _native_reference(rows: list[BenchRow], k: int) -> dict[int, float]:
    """tok/s of native DFlash per batch: the ``native`` row, else ``native-k{k}``."""
    ref = {r.batch: r.tok_per_s for r in rows if r.mode == f"native-k{k}"}
    ref.update({r.batch: r.tok_per_s for r in rows if r.mode == "native"})
    return ref


def paired_ratio(a: BenchRow, b: BenchRow) -> float | None:
    """The geometric mean over passes of ``a``'s pass / ``b``'s same pass,
    where the two were interleaved (``--interleave``: pass i of both ran
    before pass i + 1 of either); None otherwise. Two engines' same passes
    often move together (on the H200 one engine's passes at one batch spread
    by up to 2x), and the ratio of the same pass then removes what the ratio
    of medians carries; where they do not, ``paired_error`` shows it."""
    logs = _paired_logs(a, b)
    return None if logs is None else math.exp(statistics.fmean(logs))


def paired_error(a: BenchRow, b: BenchRow) -> float | None:
    """The standard error of ``paired_ratio``'s logarithm (0.05: about 5% of
    the ratio either way): the pass ratios' spread over the square root of
    their number. None where the passes were not interleaved or are fewer
    than two. It is what "within noise" is measured against: on the H200 a
    Gemma 4 batch-64 pair at one K read 0.68-1.35x pass by pass."""
    logs = _paired_logs(a, b)
    if logs is None or len(logs) < 2:
        return None
    return statistics.stdev(logs) / math.sqrt(len(logs))


def all_passes_ratio(a: BenchRow, b: BenchRow) -> float | None:
    """``a``'s throughput over ``b``'s across every timed pass (each row's
    ``tokens`` over its ``seconds``): what a server would have served over
    the run, its slow passes included, which the median pass leaves out. On
    the H200 (Gemma 4, batch 64, 2026-12-05) adaptive read 1.01x of fixed K
    7 by medians and 0.975x over all passes. None where a row timed
    nothing."""
    if min(a.tokens, b.tokens) <= 0 or min(a.seconds, b.seconds) <= 0:
        return None
    return (a.tokens / a.seconds) / (b.tokens / b.seconds)


def _paired_logs(a: BenchRow, b: BenchRow) -> list[float] | None:
    """log(a's pass / b's same pass) per pass, or None (``paired_ratio``).

    The pairs are checked in the order they started, not in list order: the
    rows of ``--merge`` hold the runs in the order they were named, and a run
    taken first may be named last."""
    n = len(a.pass_tok_per_s)
    if (
        n == 0
        or len(b.pass_tok_per_s) != n
        or len(a.pass_start_s) != n
        or len(b.pass_start_s) != n
    ):
        return None
    rounds = sorted(zip(a.pass_start_s, b.pass_start_s, strict=True), key=min)
    if any(max(now) >= min(later) for now, later in pairwise(rounds)):
        return None
    return [
        math.log(x / y) for x, y in zip(a.pass_tok_per_s, b.pass_tok_per_s, strict=True)
    ]


def _round_rows(row: BenchRow) -> dict[int, BenchRow] | None:
    """``row``'s passes of each round as rows of their own; None where a
    pass's round is not known (rows written before ``pass_round``)."""
    n = len(row.pass_tok_per_s)
    if n == 0 or len(row.pass_round) != n or len(row.pass_start_s) != n:
        return None
    out = {}
    for round_ in sorted(set(row.pass_round)):
        passes = [i for i, r in enumerate(row.pass_round) if r == round_]
        out[round_] = replace(
            row,
            pass_tok_per_s=[row.pass_tok_per_s[i] for i in passes],
            pass_start_s=[row.pass_start_s[i] for i in passes],
            pass_round=[round_] * len(passes),
        )
    return out


def paired_ratio_by_round(a: BenchRow, b: BenchRow) -> list[float] | None:
    """``paired_ratio`` of ``a`` to ``b`` in each round, in round order;
    None with one round, or where the rounds or pairs are not known. On the
    H200 two rounds of one run read 0.94x and 0.99x (Gemma 4, batch 1),
    which the pooled ratio hides."""
    by_a, by_b = _round_rows(a), _round_rows(b)
    if by_a is None or by_b is None or by_a.keys() != by_b.keys() or len(by_a) < 2:
        return None
    ratios = [paired_ratio(by_a[r], by_b[r]) for r in by_a]
    return None if None in ratios else [r for r in ratios if r is not None]


def summarize(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Per batch: the fastest fixed-K plugin mode, and adaptive against it
    (by median passes, by all passes' tokens over their seconds, and pass by
    pass where the two were interleaved, over all passes and per round) and
    against no speculation (None where a mode is missing)."""
    out = []
    for batch in sorted({r.batch for r in rows}):
        mine = [r for r in rows if r.batch == batch]
        fixed = [r for r in mine if r.mode.split("-k")[0] == "plugin"]
        best = max(fixed, key=lambda r: r.tok_per_s, default=None)
        adaptive = next((r for r in mine if r.mode == "adaptive"), None)
        none = next((r for r in mine if r.mode == "none"), None)
        out.append(
            {
                "batch": batch,
                "best_fixed": best.mode if best else None,
                "best_fixed_tok_per_s": best.tok_per_s if best else None,
                "adaptive_vs_best_fixed": (
                    adaptive.tok_per_s / best.tok_per_s if adaptive and best else None
                ),
                "adaptive_vs_best_fixed_all_passes": (
                    all_passes_ratio(adaptive, best) if adaptive and best else None
                ),
                "adaptive_vs_best_fixed_paired": (
                    paired_ratio(adaptive, best) if adaptive and best else None
                ),
                "adaptive_vs_best_fixed_paired_error": (
                    paired_error(adaptive, best) if adaptive and best else None
                ),
                "adaptive_vs_best_fixed_paired_by_round": (
                    paired_ratio_by_round(adaptive, best) if adaptive and best else None
                ),
                "adaptive_vs_none": (
                    adaptive.tok_per_s / none.tok_per_s if adaptive and none else None
                ),
            }
        )
    return out


def step_split(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Where each fixed-batch step's time went (``--step-log``): per mode,
    batch and K, the logged steps at the row's batch (a pass's tail, at
    smaller batches, is left out) and their median interval (``ms``). Where
    the clock timed the host's wait for the GPU (``StepClock.wait_s``), also
    the median wait, the host's part (interval less wait) and the share of
    steps the GPU held up (a wait over GPU_BOUND_WAIT of the interval, the
    adaptive policy's test); ``cpu_ms``: the engine process's CPU time per
    step. Under async scheduling on the V2 runner a step takes the longer of
    its host and GPU parts: a step that waited about 0 ms was the host's.
    Logs of older runs (``[step, batch, K, ms]``) give intervals only."""
    out = []
    for row in _sorted(rows):
        by_k: dict[int, list[list[Any]]] = {}
        for clock in row.pass_clock:
            for entry in clock.get("log", ()):
                if entry[1] == row.batch:
                    by_k.setdefault(entry[2], []).append(entry)
        for k, steps in sorted(by_k.items()):
            waited = [(e[3], e[4]) for e in steps if len(e) > 4 and e[4] is not None]
            cpu = [e[5] for e in steps if len(e) > 5 and e[5] is not None]
            out.append(
                {
                    "mode": row.mode,
                    "batch": row.batch,
                    "k": k,
                    "steps": len(steps),
                    "ms": statistics.median(e[3] for e in steps),
                    "waited_steps": len(waited),
                    "wait_ms": _median_or_none(w for _, w in waited),
                    "host_ms": _median_or_none(ms - w for ms, w in waited),
                    "gpu_bound": (
                        sum(w > GPU_BOUND_WAIT * ms for ms, w in waited) / len(waited)
                        if waited
                        else None
                    ),
                    "cpu_ms": _median_or_none(cpu),
                }
            )
    return out


def _median_or_none(values: Any) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def print_step_split(split: list[dict[str, Any]]) -> None:
    """``step_split``'s table: one line per mode, batch and K."""
    if not split:
        return
    width = max([10, *(len(s["mode"]) for s in split)])
    print(
        f"{'mode':>{width}} {'batch':>6} {'K':>3} {'steps':>6} {'step ms':>8} "
        f"{'wait ms':>8} {'host ms':>8} {'GPU-bound':>9} {'CPU ms':>7}"
    )

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for s in split:
        share = "-" if s["gpu_bound"] is None else f"{100 * s['gpu_bound']:.0f}%"
        print(
            f"{s['mode']:>{width}} {s['batch']:>6} {s['k']:>3} {s['steps']:>6} "
            f"{ms(s['ms']):>8} {ms(s['wait_ms']):>8} {ms(s['host_ms']):>8} "
            f"{share:>9} {ms(s['cpu_ms']):>7}"
        )


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"±{100 * x:.1f}%"


def print_long(rows: list[BenchRow]) -> None:
    """The single long request (``--long-output-len``): seconds and speedup."""
    base = next((r for r in rows if r.mode == "none"), None)
    print(
        f"{'mode':>12} {'output':>7} {'seconds':>8} {'tok/s':>9} {'tau':>6} "
        f"{'vs none':>8}"
    )
    for r in rows:
        tau = f"{r.acceptance_length:.2f}" if r.acceptance_length else "-"
        vs = f"{r.tok_per_s / base.tok_per_s:.2f}x" if base else "-"
        print(
            f"{r.mode:>12} {r.output_len:>7} {r.seconds:>8.2f} {r.tok_per_s:>9.1f} "
            f"{tau:>6} {vs:>8}"
        )


def print_table(rows: list[BenchRow], k: int) -> None:
    """One line per mode and batch; ``k`` (--k) picks the native reference
    where only ``native-kN`` ran. Then a summary per batch if it says anything."""
    base = {r.batch: r.tok_per_s for r in rows if r.mode == "none"}
    native = _native_reference(rows, k)
    width = max([10, *(len(r.mode) for r in rows)])
    print(
        f"{'mode':>{width}} {'K':>3} {'runner':>6} {'batch':>6} {'tok/s':>10} "
        f"{'tau':>6} {'vs none':>8} {'vs native':>9}"
    )
    for r in _sorted(rows):
        speedup = _ratio(r.tok_per_s / base[r.batch] if r.batch in base else None)
        vs_native = _ratio(r.tok_per_s / native[r.batch] if r.batch in native else None)
        tau = f"{r.acceptance_length:.2f}" if r.acceptance_length else "-"
        print(
            f"{r.mode:>{width}} {r.k:>3} {r.runner:>6} {r.batch:>6} "
            f"{r.tok_per_s:>10.1f} {tau:>6} {speedup:>8} {vs_native:>9}"
        )
    summary = summarize(rows)
    if any(s["best_fixed"] for s in summary) and any(
        r.mode == "adaptive" for r in rows
    ):
        # "paired": pass by pass, where the passes were interleaved.
        paired = any(s["adaptive_vs_best_fixed_paired"] for s in summary)
        by_round = any(s["adaptive_vs_best_fixed_paired_by_round"] for s in summary)
        print(
            f"{'batch':>6} {'best fixed K':>{width}} {'tok/s':>10} "
            f"{'adaptive/best':>13} {'all passes':>10} {'adaptive/none':>13}"
            + (f" {'paired':>7} {'error':>7}" if paired else "")
            + ("  paired by round" if by_round else "")
        )
        for s in summary:
            tok_s = s["best_fixed_tok_per_s"]
            print(
                f"{s['batch']:>6} {s['best_fixed'] or '-':>{width}} "
                f"{'-' if tok_s is None else f'{tok_s:.1f}':>10} "
                f"{_ratio(s['adaptive_vs_best_fixed']):>13} "
                f"{_ratio(s['adaptive_vs_best_fixed_all_passes']):>10} "
                f"{_ratio(s['adaptive_vs_none']):>13}"
                + (
                    f" {_ratio(s['adaptive_vs_best_fixed_paired']):>7}"
                    f" {_percent(s['adaptive_vs_best_fixed_paired_error']):>7}"
                    if paired
                    else ""
                )
                + (
                    "  "
                    + " ".join(
                        _ratio(x)
                        for x in s["adaptive_vs_best_fixed_paired_by_round"] or [None]
                    )
                    if by_round
                    else ""
                )
            )


def plot(rows: list[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = {r.batch: r.tok_per_s for r in rows if r.mode == "none"}
    modes = sorted({(r.mode, r.k) for r in rows}, key=lambda m: mode_sort_key(*m))
    for i, (mode, _) in enumerate(modes):
        mine = sorted((r for r in rows if r.mode == mode), key=lambda r: r.batch)
        batches = [r.batch for r in mine]
        style = dict(
            color=f"C{i % 10}", ls="--" if mode == "adaptive" else "-", marker="o"
        )
        ax1.plot(batches, [r.tok_per_s for r in mine], label=mode, **style)
        speedups = [
            (r.batch, r.tok_per_s / base[r.batch]) for r in mine if r.batch in base
        ]
        if mode != "none" and speedups:
            ax2.plot(*zip(*speedups, strict=True), label=mode, **style)
    for ax, label in ((ax1, "output tokens/s"), (ax2, "speedup over none")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:  # no speedups without `none`
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-8b")
    p.add_argument("--target", help="target config folder (overrides the preset)")
    p.add_argument("--drafter", help="drafter config folder (overrides the preset)")
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma list of: {MODE_GRAMMAR}"
    )
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument(
        "--k", type=int, default=15, help="K of native/plugin; adaptive's maximum"
    )
    p.add_argument(
        "--tau",
        type=float,
        default=7.8,
        help="synthetic acceptance length of the flat profile (CUDA only: vLLM's "
        "CPU rejection kernels have no synthetic mode); 0: the drafter's real one",
    )
    p.add_argument(
        "--acceptance",
        default="flat",
        help="synthetic acceptance profile: flat (every draft accepted up to "
        "--tau), decay (DECAY_RATES, per-position rates like published DFlash "
        "figures) or R1,R2,... (unconditional per-position rates, non-increasing; "
        "cut to each mode's K, padded with the last); ignored with --tau 0",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed passes per batch after the warm-up, fresh prompts each; "
        "a row's tok/s is the median pass's (all are in the JSON)",
    )
    p.add_argument(
        "--long-output-len",
        type=int,
        default=0,
        help="also time one request of this many output tokens in each engine "
        "(e.g. 4096: the Gemma 4 reference scenario)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--attention-backend", help="target attention backend")
    p.add_argument("--draft-attention-backend", help="drafter attention backend")
    p.add_argument("--out", default="bench-results", help="folder for JSON, PNG, logs")
    p.add_argument(
        "--profile", action="store_true", help="torch-profiler table per DFlash mode"
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more LLM(...) argument for every engine, VALUE as JSON where "
        "it parses (repeatable), e.g. async_scheduling=false or "
        "jit_monitor_verbose=true; not one the bench sets itself",
    )
    p.add_argument(
        "--step-log",
        action="store_true",
        help="keep every decode step's interval of the DFlash engines' timed "
        "passes (pass_clock's log: [step, batch, K, ms, host wait ms, CPU "
        "ms]), e.g. for "
        "scripts/simulate_adaptive.py --replay",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every mode's engine at once (each with an equal share of the "
        "device) and time their passes in turn, so drift over the run falls on "
        "every mode alike; every engine must fit beside the others",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN",
        help="run nothing: merge finished runs (their folders or bench.json) of "
        "the same modes and settings into one bench.json in --out, each mode's "
        "passes pooled as --rounds pools rounds (e.g. the two orders of --modes, "
        "each in a command of its own)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times, every engine restarted, each round "
        "starting the modes one later (A B, then B A); rows pool the rounds' "
        "passes (--repeats per round). On the H200 the engine started second ran "
        "Gemma 4 batch 64 about 8%% faster than the first, whatever its mode",
    )


def mode_rates(
    mode: Mode, profile: list[float] | None, tau: float | None, k: int
) -> list[float] | None:
    """The synthetic rates a mode's engine gets: None for no speculation,
    real acceptance (tau None) and the flat profile at K = --k (vLLM derives
    them from tau); else the profile (flat: at K = --k) cut or padded to the
    mode's K, so every K sees the same drafter."""
    if mode.impl == "none" or tau is None:
        return None
    if profile is None:
        return None if mode.k == k else rates_for_k(flat_rates(tau, k), mode.k)
    return rates_for_k(profile, mode.k)


def _backends(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(target, drafter) attention backends: the options, else the preset's."""
    preset_target, preset_draft = (
        (None, None) if args.target else PRESET_BACKENDS.get(args.preset, (None, None))
    )
    return (
        args.attention_backend or preset_target,
        args.draft_attention_backend or preset_draft,
    )


# Variables that change which kernels an engine compiles or how it tunes
# them at start. On the H200 two fixed K 15 engines read 2% apart at Gemma 4
# batch 8 on the same step time, and 13% at batch 64 on the same outputs
# (in two runs), and one Inductor kernel was tuned apart between an engine
# that compiled and one that loaded the compile cache
# (docs/adaptive-measurements.md). A run records those its engines inherited.
COMPILE_ENV_PREFIXES = ("TORCHINDUCTOR_",)
COMPILE_ENV_NAMES = (
    "VLLM_DISABLE_COMPILE_CACHE",
    "VLLM_ENABLE_INDUCTOR_MAX_AUTOTUNE",
    "VLLM_ENABLE_INDUCTOR_COORDINATE_DESCENT_TUNING",
)


def compile_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's, which every
    engine inherits) that change compiling or kernel tuning, sorted."""
    environ = dict(os.environ) if environ is None else environ
    return {
        name: value
        for name, value in sorted(environ.items())
        if name.startswith(COMPILE_ENV_PREFIXES) or name in COMPILE_ENV_NAMES
    }


def _meta(
    args: argparse.Namespace,
    modes: list[Mode],
    sizes: list[int],
    tau: float | None,
    profile_name: str,
    profile: list[float] | None,
    rows: list[BenchRow],
    engine_args: dict[str, Any],
) -> dict[str, Any]:
    attention_backend, draft_attention_backend = _backends(args)
    return {
        "preset": None if args.target else args.preset,
        "k": args.k,
        "tau": tau,
        "acceptance": profile_name,
        "acceptance_rates": profile,
        "synthetic": tau is not None,
        "modes": {
            m.name: {"impl": m.impl, "k": m.k, "ks": m.ks, "held_k": m.held_k}
            for m in modes
        },
        "capture_sizes": sizes,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "long_output_len": args.long_output_len,
        "repeats": args.repeats,
        "dtype": args.dtype,
        "runners": {r.mode: r.runner for r in rows},
        "attention_backend": attention_backend,
        "draft_attention_backend": draft_attention_backend,
        "enforce_eager": args.enforce_eager,
        "interleave": args.interleave,
        "rounds": args.rounds,
        "compile_env": compile_env(),
        "engine_args": engine_args,
    }


def write_json(
    out: Path,
    meta: dict[str, Any],
    rows: list[BenchRow],
    long_rows: list[BenchRow],
    *,
    done: bool,
) -> None:
    """bench.json; ``complete`` is false while modes are still to run."""
    (out / "bench.json").write_text(
        json.dumps(
            {
                "meta": {**meta, "complete": done},
                "rows": [asdict(r) for r in _sorted(rows)],
                "summary": summarize(rows),
                "step_split": step_split(rows),
                "long_rows": [asdict(r) for r in long_rows],
            },
            indent=2,
        )
    )


# What runs merged by ``--merge`` must share (``meta`` keys).
# What the engines of runs to merge must share beyond MERGE_KEYS, and the fix.
ENGINE_MERGE_KEYS = {
    "compile_env": "Merge only runs whose engines compiled and tuned kernels alike.",
    "engine_args": "Merge only runs of the same --engine-arg options.",
}
MERGE_KEYS = (
    "preset",
    "k",
    "tau",
    "acceptance",
    "acceptance_rates",
    "modes",
    "capture_sizes",
    "prompt_len",
    "output_len",
    "long_output_len",
    "dtype",
    "attention_backend",
    "draft_attention_backend",
    "enforce_eager",
    "interleave",
)


def _rounds_after(row: BenchRow, rounds_before: int) -> BenchRow:
    """``row`` of a merged run, its passes' rounds numbered after the
    ``rounds_before`` of the runs merged before it."""
    return replace(row, pass_round=[r + rounds_before for r in row.pass_round])


def merge_runs(paths: list[Path], out: Path) -> int:
    """``--merge``: one ``bench.json`` (and plot) from runs of the same modes
    and settings taken apart, every mode's rows pooled in the runs' order as
    ``--rounds`` pools rounds. For the rounds of a run too long for one
    command: the H200 lent here allows 10 minutes a command, and five
    Qwen3-8B engines at four batches took about 8 of them with vLLM's
    install, so each order of the engines (``--modes A,B,C`` then
    ``--modes C,B,A``) is a run of its own."""
    runs = []
    for path in paths:
        path = path / "bench.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not {"meta", "rows"} <= data.keys():
                raise ValueError("no meta and rows")
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"invalid --merge={path}: not a bench.json ({e}). Pass the "
                "folders (or bench.json files) of finished `vllm-dflash bench` runs."
            ) from e
        runs.append((path, data))
    first_path, first = runs[0]
    for path, run in runs[1:]:
        for key in MERGE_KEYS:
            if run["meta"].get(key) != first["meta"].get(key):
                raise SystemExit(
                    f"invalid --merge={path}: its {key} is "
                    f"{run['meta'].get(key)!r}, {first_path}'s "
                    f"{first['meta'].get(key)!r}. Merge runs of the same modes "
                    "and settings only (the order of --modes may differ)."
                )
        for key, fix in ENGINE_MERGE_KEYS.items():
            # Runs from before the key was recorded read as taken with none set.
            theirs, ours = (r["meta"].get(key) or {} for r in (run, first))
            if theirs != ours:
                raise SystemExit(
                    f"invalid --merge={path}: its engines' {key} is {theirs!r}, "
                    f"{first_path}'s {ours!r}. {fix}"
                )
    rows: list[BenchRow] = []
    long_rows: list[BenchRow] = []
    rounds_before = 0
    for _, run in runs:
        for row in run["rows"]:
            _add_row(rows, _rounds_after(BenchRow(**row), rounds_before))
        for row in run.get("long_rows", []):
            _add_row(long_rows, _rounds_after(BenchRow(**row), rounds_before))
        rounds_before += run["meta"].get("rounds", 1)
    meta = {
        **first["meta"],
        "rounds": sum(run["meta"].get("rounds", 1) for _, run in runs),
        "merged_from": [str(path) for path, _ in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    done = all(run["meta"].get("complete", False) for _, run in runs)
    write_json(out, meta, rows, long_rows, done=done)
    print_table(rows, meta["k"])
    if rows:
        plot(rows, out / "bench.png", f"DFlash K={meta['k']}, {len(runs)} runs merged")
    print(f"[bench] wrote {out / 'bench.json'}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    if args.merge:
        return merge_runs([Path(p) for p in args.merge], Path(args.out))
    try:
        modes = parse_modes(args.modes, args.k)
        profile_name, profile = parse_acceptance(args.acceptance)
        tau = args.tau or None
        if args.repeats < 1:
            raise DFlashConfigError(
                "--repeats", args.repeats, "Time at least one pass per batch."
            )
        if tau is not None and profile is None and any(m.impl != "none" for m in modes):
            flat_rates(tau, args.k)  # validates tau against --k
        if args.rounds < 1:
            raise DFlashConfigError(
                "--rounds", args.rounds, "Run at least one round (1: no restart)."
            )
        if args.interleave and args.profile:
            raise DFlashConfigError(
                "--interleave",
                True,
                "--profile runs the engine in the bench's worker process, one "
                "mode at a time; drop one of the two options.",
            )
        engine_args = (
            parse_engine_args(args.engine_arg, engine_arg_names())
            if args.engine_arg
            else {}
        )
    except DFlashConfigError as e:
        raise SystemExit(str(e)) from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, drafter = (
        (Path(args.target), Path(args.drafter))
        if args.target
        else (write_preset(args.preset, out / "models"))
    )
    attention_backend, draft_attention_backend = _backends(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    sizes = capture_sizes(batches, modes)
    max_k = max(k for mode in modes for k in mode.ks)
    specs = [
        BenchSpec(
            mode=mode.name,
            target=str(target),
            drafter=None if mode.impl == "none" else str(drafter),
            batch_sizes=batches,
            k=mode.k,
            tau=tau,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            load_format=args.load_format,
            max_model_len=args.prompt_len
            + max(args.output_len, args.long_output_len)
            + 64,
            long_output_len=args.long_output_len,
            repeats=args.repeats,
            attention_backend=attention_backend,
            draft_attention_backend=draft_attention_backend,
            env=mode.env,
            acceptance_rates=mode_rates(mode, profile, tau, args.k),
            draft_schedule=mode.draft_schedule,
            capture_sizes=sizes,
            max_num_batched_tokens=max(8192, max(batches) * (max_k + 1)),
            profile_path=(
                str(out / f"profile-{mode.name}.txt")
                if args.profile and mode.impl != "none"
                else None
            ),
            memory_share=1.0 / len(modes) if args.interleave else 1.0,
            step_log=args.step_log,
            engine_args=engine_args,
        )
        for mode in modes
    ]
    rows: list[BenchRow] = []
    long_rows: list[BenchRow] = []

    def add(new_rows: list[BenchRow], done: bool) -> None:
        # After every batch, so a run cut short by a time limit keeps its rows.
        for row in new_rows:
            _add_row(long_rows if row.output_len != args.output_len else rows, row)
        meta = _meta(args, modes, sizes, tau, profile_name, profile, rows, engine_args)
        write_json(out, meta, rows, long_rows, done=done)

    failed = []
    for round_ in range(args.rounds):
        order = [
            replace(
                spec,
                start_position=i if args.interleave else 0,
                round_index=round_,
            )
            for i, spec in enumerate(pass_order(specs, round_))
        ]
        groups = [order] if args.interleave else [[spec] for spec in order]
        suffix = f"-round{round_ + 1}" if round_ else ""
        for group in groups:
            failed += run_engines(
                group, out, lambda batch_rows: add(batch_rows, False), suffix
            )
    add([], True)
    print_table(rows, args.k)
    print_step_split(step_split(rows))
    if long_rows:
        print_long(long_rows)
    if rows:
        acceptance = f"tau={tau}" if profile is None else f"acceptance={profile_name}"
        runners = {r.mode: r.runner for r in rows}
        plot(
            rows,
            out / "bench.png",
            f"DFlash K={args.k} {acceptance if tau else 'real acceptance'} "
            f"({', '.join(f'{m} {r}' for m, r in runners.items())})",
        )
    print(f"[bench] wrote {out / 'bench.json'}")
    if failed:
        print(
            f"[bench] failed modes: {', '.join(dict.fromkeys(failed))} (logs in {out})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        spec = BenchSpec(**json.loads(Path(sys.argv[2]).read_text()))
        _serve(spec, int(sys.argv[3]))
