"""``vllm-dflash bench``: no speculation vs vLLM's native DFlash vs this plugin.

Each mode runs in its own process on identical inputs (random prompt ids,
``ignore_eos``), with dummy weights and, by default, synthetic acceptance
(``rejection_sample_method: synthetic``) so every mode verifies the same
number of tokens per step and the figures compare implementations, not
drafters. Prints a table, writes ``bench.json`` and ``bench.png``.

    vllm-dflash bench --preset qwen3-8b --batch-sizes 1,8,32 --output-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_dflash.engine import collect_spec_metrics, runner_version

MODES = ("none", "native", "plugin")

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
    skip_tokenizer_init: bool = True
    profile_path: str | None = None
    """Write a torch-profiler table of a batch-1 run here (in-process engine)."""


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


def _spec_metrics(llm: Any) -> tuple[float, float]:
    """(drafts, accepted tokens) so far, from vLLM's spec-decode counters."""
    totals = collect_spec_metrics(llm)
    return (
        totals.get("vllm:spec_decode_num_drafts", 0.0),
        totals.get("vllm:spec_decode_num_accepted_tokens", 0.0),
    )


def _memory_utilization() -> float:
    """0.85 of a GPU; on CPU vLLM sizes the KV cache from host memory: 0.15."""
    import torch

    return 0.85 if torch.cuda.is_available() else 0.15


def _worker(spec: BenchSpec) -> list[BenchRow]:
    """Run every batch size of one mode in this process."""
    import random

    from vllm import LLM, SamplingParams

    from vllm_dflash import support

    kwargs: dict[str, Any] = dict(
        model=spec.target,
        dtype=spec.dtype,
        load_format=spec.load_format,
        skip_tokenizer_init=spec.skip_tokenizer_init,
        enforce_eager=spec.enforce_eager,
        max_model_len=spec.max_model_len,
        max_num_seqs=max(spec.batch_sizes),
        gpu_memory_utilization=_memory_utilization(),
        disable_log_stats=False,
    )
    if spec.attention_backend:
        kwargs["attention_backend"] = spec.attention_backend
    if not spec.enforce_eager:
        # Capture only the graph sizes these batches use (b tokens without
        # speculation, b*(K+1) verify/draft tokens with it), the same for
        # every mode: full default capture takes minutes per engine.
        sizes = {b for b in spec.batch_sizes} | {
            b * (spec.k + 1) for b in spec.batch_sizes
        }
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": sorted(sizes)}
    if spec.mode != "none":
        speculative: dict[str, Any] = {
            "method": "dflash",
            "model": spec.drafter,
            "num_speculative_tokens": spec.k,
        }
        if spec.tau is not None:
            speculative["rejection_sample_method"] = "synthetic"
            speculative["synthetic_acceptance_length"] = spec.tau
        if spec.draft_attention_backend:
            speculative["attention_backend"] = spec.draft_attention_backend
        kwargs["speculative_config"] = support.route_draft_attention_backend(
            speculative
        )
        kwargs["max_num_batched_tokens"] = max(
            8192, max(spec.batch_sizes) * (spec.k + 1)
        )
    llm = LLM(**kwargs)
    runner = llm.collective_rpc(runner_version)[0]
    rng = random.Random(0)
    vocab = json.loads(Path(spec.target, "config.json").read_text())["vocab_size"]
    low, high = min(1000, vocab // 4), min(30000, vocab // 2)
    params = SamplingParams(
        max_tokens=spec.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    rows = []
    for batch in spec.batch_sizes:
        prompts: Any = [
            {
                "prompt_token_ids": [
                    rng.randrange(low, high) for _ in range(spec.prompt_len)
                ]
            }
            for _ in range(batch)
        ]
        llm.generate(prompts[: min(batch, 2)], params, use_tqdm=False)  # warm-up
        before = _spec_metrics(llm)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = _spec_metrics(llm)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        drafts = after[0] - before[0]
        tau = 1 + (after[1] - before[1]) / drafts if drafts else None
        rows.append(
            BenchRow(spec.mode, batch, tokens, seconds, tokens / seconds, tau, runner)
        )
        print(
            f"[bench] {spec.mode:>6} ({runner}) batch {batch:>3}: "
            f"{tokens / seconds:9.1f} tok/s" + (f"  tau {tau:.2f}" if tau else ""),
            file=sys.stderr,
            flush=True,
        )
    if spec.profile_path:
        _profile(llm, prompts[:1], spec.profile_path)
    return rows


def _profile(llm: Any, prompts: Any, path: str) -> None:
    """Profile one short generation; needs VLLM_ENABLE_V1_MULTIPROCESSING=0."""
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
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=60))


def run_mode(spec: BenchSpec, log: Path) -> list[BenchRow]:
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **spec.env}
    if spec.profile_path:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.mode == "native":
        env["VLLM_DFLASH_USE_NATIVE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "rows.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [
            sys.executable,
            "-m",
            "vllm_dflash.bench",
            "--worker",
            str(spec_path),
            str(out_path),
        ]
        with open(log, "w") as sink:
            proc = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out_path.exists():
            tail = log.read_text()[-3000:]
            print(f"[bench] mode {spec.mode} failed (exit {proc.returncode}):\n{tail}")
            return []
        return [BenchRow(**r) for r in json.loads(out_path.read_text())]


def write_preset(name: str, root: Path) -> tuple[Path, Path]:
    preset = PRESETS[name]
    paths = []
    for part in ("target", "drafter"):
        path = root / f"{name}-{part}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(preset[part], indent=2))
        paths.append(path)
    return paths[0], paths[1]


def print_table(rows: list[BenchRow]) -> None:
    base = {r.batch: r.tok_per_s for r in rows if r.mode == "none"}
    native = {r.batch: r.tok_per_s for r in rows if r.mode == "native"}
    print(
        f"{'mode':>8} {'runner':>6} {'batch':>6} {'tok/s':>10} {'tau':>6} "
        f"{'vs none':>8} {'vs native':>9}"
    )
    for r in sorted(rows, key=lambda r: (r.batch, MODES.index(r.mode))):
        speedup = f"{r.tok_per_s / base[r.batch]:.2f}x" if r.batch in base else "-"
        vs_native = (
            f"{r.tok_per_s / native[r.batch]:.2f}x" if r.batch in native else "-"
        )
        tau = f"{r.acceptance_length:.2f}" if r.acceptance_length else "-"
        print(
            f"{r.mode:>8} {r.runner:>6} {r.batch:>6} {r.tok_per_s:>10.1f} "
            f"{tau:>6} {speedup:>8} {vs_native:>9}"
        )


def plot(rows: list[BenchRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = {r.batch: r.tok_per_s for r in rows if r.mode == "none"}
    for mode in MODES:
        mine = sorted((r for r in rows if r.mode == mode), key=lambda r: r.batch)
        if not mine:
            continue
        batches = [r.batch for r in mine]
        ax1.plot(batches, [r.tok_per_s for r in mine], marker="o", label=mode)
        speedups = [
            (r.batch, r.tok_per_s / base[r.batch]) for r in mine if r.batch in base
        ]
        if mode != "none" and speedups:
            ax2.plot(*zip(*speedups, strict=True), marker="o", label=mode)
    for ax, label in ((ax1, "output tokens/s"), (ax2, "speedup over none")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-8b")
    p.add_argument("--target", help="target config folder (overrides the preset)")
    p.add_argument("--drafter", help="drafter config folder (overrides the preset)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--k", type=int, default=15)
    p.add_argument(
        "--tau",
        type=float,
        default=7.8,
        help="synthetic acceptance length (CUDA only); 0: the drafter's real one",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--attention-backend", help="target attention backend")
    p.add_argument("--draft-attention-backend", help="drafter attention backend")
    p.add_argument("--out", default="bench-results", help="folder for JSON, PNG, logs")
    p.add_argument(
        "--profile", action="store_true", help="torch-profiler table per DFlash mode"
    )


def bench_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, drafter = (
        (Path(args.target), Path(args.drafter))
        if args.target
        else (write_preset(args.preset, out / "models"))
    )
    preset_target_backend, preset_draft_backend = (
        (None, None) if args.target else PRESET_BACKENDS.get(args.preset, (None, None))
    )
    attention_backend = args.attention_backend or preset_target_backend
    draft_attention_backend = args.draft_attention_backend or preset_draft_backend
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[BenchRow] = []
    failed: list[str] = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
        print(
            f"[bench] starting mode {mode} (engine start can take minutes)", flush=True
        )
        spec = BenchSpec(
            mode=mode,
            target=str(target),
            drafter=None if mode == "none" else str(drafter),
            batch_sizes=batches,
            k=args.k,
            tau=args.tau or None,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            load_format=args.load_format,
            max_model_len=args.prompt_len + args.output_len + 64,
            attention_backend=attention_backend,
            draft_attention_backend=draft_attention_backend,
            profile_path=(
                str(out / f"profile-{mode}.txt")
                if args.profile and mode != "none"
                else None
            ),
        )
        mode_rows = run_mode(spec, out / f"{mode}.log")
        rows += mode_rows
        if not mode_rows:
            failed.append(mode)
    print_table(rows)
    meta = {
        "preset": None if args.target else args.preset,
        "k": args.k,
        "tau": args.tau or None,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "dtype": args.dtype,
        "runners": {r.mode: r.runner for r in rows},
        "attention_backend": attention_backend,
        "draft_attention_backend": draft_attention_backend,
        "enforce_eager": args.enforce_eager,
    }
    (out / "bench.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    if rows:
        plot(
            rows,
            out / "bench.png",
            f"DFlash K={args.k} tau={args.tau} "
            f"({', '.join(f'{m} {r}' for m, r in meta['runners'].items())})",
        )
    print(f"[bench] wrote {out / 'bench.json'}")
    if failed:
        print(f"[bench] failed modes: {', '.join(failed)} (logs in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        spec = BenchSpec(**json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps([asdict(r) for r in _worker(spec)]))
