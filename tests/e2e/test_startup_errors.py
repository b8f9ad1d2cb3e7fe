"""Every bad configuration stops the start-up with a message naming the field,
the value and the fix, as the last lines of the output, before any worker
starts and before any request is accepted.

Two tiers: every case goes through vLLM's own config builder (``EngineArgs.
create_engine_config``, what ``LLM(...)`` and ``vllm serve`` call) in one
process; a representative set starts real engines, with the engine core in
its own process as ``vllm serve`` runs it, and reads their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_dflash import tiny
from vllm_dflash.engine import EngineFailed, EngineSpec, run

pytestmark = pytest.mark.e2e

PROBE = Path(__file__).with_name("startup_probe.py")


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "model.safetensors"))

    return edit


@dataclass
class Case:
    expect: list[str]
    """Substrings of the final message: field and value, then the fix."""
    drafter: tiny.TinyDrafter = field(default_factory=tiny.TinyDrafter)
    edit: Callable[[Path], None] | None = None
    k: int = 7
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    speculative_extra: dict[str, Any] = field(default_factory=dict)


T = tiny.TinyDrafter  # the target: 4 layers, hidden 128, vocab 512
CASES: dict[str, Case] = {
    "hidden-size": Case(
        ["invalid hidden_size=64.", "The target's hidden_size is 128"],
        T(extra={"hidden_size": 64}),
    ),
    "vocab-size": Case(
        ["invalid vocab_size=256.", "vocabulary has 512 entries"],
        T(extra={"vocab_size": 256}, mask_token_id=255),
    ),
    "layer-ids-empty": Case(
        ["invalid dflash_config.target_layer_ids=[].", "List at least one"],
        T(target_layer_ids=[]),
    ),
    "layer-ids-negative": Case(
        ["target_layer_ids=[-1, 2].", "valid ids 0..3"], T(target_layer_ids=[-1, 2])
    ),
    "layer-ids-duplicated": Case(
        ["target_layer_ids=[2, 2].", "remove the duplicates"],
        T(target_layer_ids=[2, 2]),
    ),
    "layer-ids-beyond-target": Case(
        ["target_layer_ids=[0, 4].", "valid ids 0..3"], T(target_layer_ids=[0, 4])
    ),
    "mask-missing": Case(
        ["invalid dflash_config.mask_token_id=None.", "Add the mask token id"],
        edit=_edit_config(lambda c: c["dflash_config"].pop("mask_token_id")),
    ),
    "mask-out-of-vocab": Case(
        ["invalid dflash_config.mask_token_id=512.", "[0, 512)"],
        T(mask_token_id=512),
    ),
    "k-beyond-block": Case(
        ["invalid num_speculative_tokens=8.", "drafts 1..7 tokens per step"], k=8
    ),
    # vLLM's own pydantic check answers first, naming field and bound.
    "k-zero": Case(["num_speculative_tokens", "greater than 0"], k=0),
    "causal-only-backend": Case(
        ["invalid speculative_config.attention_backend='FLASHMLA'.", "CPU_ATTN"],
        speculative_extra={"attention_backend": "FLASHMLA"},
    ),
    "token-budget": Case(
        ["invalid max_num_batched_tokens=96.", "--max-num-batched-tokens to >= 128"],
        llm_kwargs={"max_num_batched_tokens": 96},
    ),
    "tensor-missing": Case(
        ["invalid drafter checkpoint=", "layers.1.mlp.up_proj.weight", "re-export"],
        edit=_edit_tensors(lambda t: t.pop("layers.1.mlp.up_proj.weight")),
    ),
    "tensor-misshapen": Case(
        [
            "invalid checkpoint tensor layers.0.self_attn.k_proj.weight=(32, 128).",
            "Expected shape (64, 128)",
        ],
        edit=_edit_tensors(
            lambda t: t.update(
                {"layers.0.self_attn.k_proj.weight": torch.zeros(32, 128)}
            )
        ),
    ),
    # transformers refuses it while vLLM reads the drafter's config.json.
    "layer-types-length": Case(
        ["num_hidden_layers", "(2)", "layer_types", "(3)"],
        edit=_edit_config(lambda c: c.update(layer_types=["full_attention"] * 3)),
    ),
}
# Real engine starts: one per kind of check (drafter vs target, engine option,
# checkpoint); the unsupported-vLLM start is its own test.
REAL_STARTS = ["hidden-size", "token-budget", "tensor-misshapen"]


@pytest.fixture(scope="module")
def drafters(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-drafters")
    target = models["qwen3-target"]
    out = {}
    for name, case in CASES.items():
        path = tiny.build_drafter(root / name, target, case.drafter)
        if case.edit is not None:
            case.edit(path)
        out[name] = path
    out["ok"] = models["qwen3-draft-a"]
    return out


def _spec(models: dict[str, Path], drafter: Path, case: Case) -> EngineSpec:
    return EngineSpec(
        target=str(models["qwen3-target"]),
        drafter=str(drafter),
        num_speculative_tokens=case.k,
        prompts=tiny.prompts(1),
        max_tokens=4,
        llm_kwargs=case.llm_kwargs,
        speculative_extra=case.speculative_extra,
        # The engine core in its own process, as `vllm serve` runs it.
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )


def test_every_bad_config_is_refused_while_the_config_is_built(
    models: dict[str, Path], drafters: dict[str, Path], tmp_path: Path
) -> None:
    cases = dict(CASES, ok=Case([]))
    engine_args = {}
    for name, case in cases.items():
        spec = _spec(models, drafters[name], case)
        engine_args[name] = dict(
            model=spec.target,
            dtype=spec.dtype,
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=1024,
            max_num_seqs=16,
            speculative_config={
                "method": "dflash",
                "model": spec.drafter,
                "num_speculative_tokens": spec.num_speculative_tokens,
                **spec.speculative_extra,
            },
            **spec.llm_kwargs,
        )
    (tmp_path / "cases.json").write_text(json.dumps(engine_args))
    subprocess.run(
        [sys.executable, str(PROBE), tmp_path / "cases.json", tmp_path / "out.json"],
        check=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    raised = json.loads((tmp_path / "out.json").read_text())
    assert raised.pop("ok") is None  # the control: a good drafter passes
    for name, case in CASES.items():
        message = raised[name]
        assert message is not None, f"{name}: the config was accepted"
        if name not in ("k-zero", "layer-types-length"):
            assert message.startswith("DFlashConfigError: vllm-dflash: invalid"), (
                name,
                message,
            )
        missing = [s for s in case.expect if s not in message]
        assert not missing, f"{name}: {missing} not in {message!r}"


def _last_lines(log: str, n: int = 3) -> str:
    return "\n".join([line for line in log.splitlines() if line.strip()][-n:])


@pytest.mark.parametrize("name", REAL_STARTS)
def test_real_start_ends_with_the_plugins_message(
    models: dict[str, Path], drafters: dict[str, Path], name: str
) -> None:
    case = CASES[name]
    with pytest.raises(EngineFailed) as info:
        run(_spec(models, drafters[name], case), timeout=300)
    assert info.value.returncode != 0
    tail = _last_lines(info.value.log)
    for expected in case.expect:
        assert expected in tail, f"{expected!r} not in the last lines:\n{tail}"
    # Refused before any engine process started.
    assert "EngineCore" not in info.value.log


def test_unsupported_vllm_is_refused_at_start(
    models: dict[str, Path], tmp_path: Path
) -> None:
    # vLLM reports itself as 0.19.1 (older than supported) in the engine's process.
    (tmp_path / "sitecustomize.py").write_text(
        "import vllm\nvllm.__version__ = '0.19.1'\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    spec = _spec(models, models["qwen3-draft-a"], Case([]))
    spec.env["PYTHONPATH"] = path
    with pytest.raises(EngineFailed) as info:
        run(spec, timeout=300)
    assert info.value.returncode != 0
    tail = _last_lines(info.value.log)
    assert "the installed vLLM is 0.19.1 (too old)" in tail
    assert "Install a supported vLLM" in tail
