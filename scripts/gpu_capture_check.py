"""The plugin's hidden-state capture on CUDA (torch.compile + CUDA graphs).

    python scripts/gpu_capture_check.py OUT_DIR [gemma3] [mixtral]

For each family (default: gemma3), a tiny random target whose vLLM class has no
EAGLE-3 interface, in float32 with FLEX_ATTENTION for target and drafter:

1. greedy output with the plugin equals output without speculation;
2. the states captured in the first step equal a plain ``transformers``
   forward's ``hidden_states[i+1]`` (the +1 convention);
3. a second plugin engine, on the default runner (V2 on vLLM 0.26; the first
   runs V1, where the recorder can wrap the proposer) with vLLM's compile
   cache now warm (the compiled target is loaded, not traced), gives the same
   output again.

Then, for the first family, ``VLLM_DFLASH_CAPTURE=0`` must stop at start-up
naming the architecture. Writes ``gpu_capture_check.json``; exits non-zero if
any check fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from vllm_dflash import tiny
from vllm_dflash.engine import EngineFailed, EngineResult, EngineSpec, run

REPO = Path(__file__).resolve().parents[1]
LAYER_IDS = [0, 2]
SHAPE = dict(hidden_size=512, intermediate_size=1024, head_dim=128, vocab_size=4096)
PROMPTS = tiny.prompts(6, vocab=4000, min_len=4, max_len=120, seed=5)
FLEX = "FLEX_ATTENTION"


def engine(
    target: Path,
    drafter: Path | None,
    env: dict[str, str] | None = None,
    record: Path | None = None,
) -> EngineResult:
    """``record``: save the first DFlash step there (V1 runner: the recorder
    wraps the V1 proposer's ``propose``)."""
    if record is not None:
        env = {**(env or {}), "DFLASH_RECORD_PATH": str(record)}
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return run(
        EngineSpec(
            target=str(target),
            drafter=None if drafter is None else str(drafter),
            num_speculative_tokens=15,
            prompts=PROMPTS,
            max_tokens=64,
            dtype="float32",
            llm_kwargs={
                "enforce_eager": False,
                # A fixed KV cache skips vLLM's memory profiling, which fails
                # when engines sharing the GPU free memory meanwhile
                # (`gpu_session.sh correctness` runs this beside others).
                "kv_cache_memory_bytes": 2 << 30,
                "attention_backend": FLEX,
            },
            speculative_extra={} if drafter is None else {"attention_backend": FLEX},
            worker_hook=None
            if record is None
            else "tests.e2e.recorder:record_first_step",
            env={
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO), os.environ.get("PYTHONPATH", "")]
                ),
                **(env or {}),
            },
        )
    )


def capture_error(target: Path, record: Path) -> float:
    """Largest |captured - HF hidden_states[i+1]| over the first step."""
    import transformers

    features = torch.load(record)["target_hidden_states"].float()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        target, dtype=torch.float32
    )
    worst, start = 0.0, 0
    for prompt in PROMPTS:
        with torch.no_grad():
            hidden = model(torch.tensor([prompt]), output_hidden_states=True)
        mine = features[start : start + len(prompt)]
        start += len(prompt)
        d = hidden.hidden_states[0].shape[-1]
        for j, layer in enumerate(LAYER_IDS):
            ref = hidden.hidden_states[layer + 1][0]
            worst = max(worst, (mine[:, j * d : (j + 1) * d] - ref).abs().max().item())
    return worst


def check_family(out: Path, family: str) -> tuple[bool, dict[str, object]]:
    target = tiny.build_target(out / f"{family}-target", family=family, **SHAPE)
    drafter = tiny.build_drafter(
        out / f"{family}-drafter",
        target,
        tiny.TinyDrafter(block_size=16, target_layer_ids=LAYER_IDS, mask_token_id=4095),
    )
    plain = engine(target, None)
    record = out / f"{family}-first-step.pt"
    plugin = engine(target, drafter, record=record)  # V1 runner
    err = capture_error(target, record)
    again = engine(target, drafter)  # the default (V2) runner, warm compile cache
    report: dict[str, object] = {
        "identical_v1": plugin.outputs == plain.outputs,
        "identical_v2_second_run": again.outputs == plain.outputs,
        "capture_max_abs_error": err,
        "plugin_class_v1": plugin.drafter_class,
        "plugin_class_v2": again.drafter_class,
        "acceptance_length": plugin.acceptance_length,
    }
    ok = bool(
        report["identical_v1"]
        and report["identical_v2_second_run"]
        and err < 1e-2
        and plugin.drafter_class == "vllm_dflash.proposer.DFlashProposer"
    )
    return ok, report


def main(out_dir: str, families: list[str]) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {}
    ok = True
    for family in families:
        try:
            passed, report[family] = check_family(out, family)
        except EngineFailed as e:
            passed, report[family] = False, {"engine_failed": e.log[-3000:]}
        ok &= passed
        print(family, json.dumps(report[family], indent=2), flush=True)
    try:
        target = out / f"{families[0]}-target"
        engine(target, out / f"{families[0]}-drafter", {"VLLM_DFLASH_CAPTURE": "0"})
        report["capture_off_refused"] = False
        ok = False
    except EngineFailed as e:
        refused = "invalid target architecture=" in e.log
        report["capture_off_refused"] = refused
        ok &= refused
    (out / "gpu_capture_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items()}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0] if args else "gpu-capture", args[1:] or ["gemma3"]))
