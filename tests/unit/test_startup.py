"""Start-up checks that run where the engine config is built: the drafter's
checkpoint read from safetensors headers, the vLLM support policy, and the
wrap of vLLM's config builder."""

from __future__ import annotations

import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from vllm_dflash import patching, startup, support
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    checkpoint_tensor_shapes,
)
from vllm_dflash.unsupported import UnsupportedVLLMError

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 100,
    "block_size": 4,
    "dflash_config": {"mask_token_id": 99, "target_layer_ids": [0, 1]},
}


def write_checkpoint(path: Path, **changes: Any) -> DFlashDraftConfig:
    """Save the tensors TINY implies, with ``changes`` (None drops a tensor)."""
    cfg = DFlashDraftConfig.from_hf_config(TINY)
    tensors = {n: torch.zeros(s) for n, s in checkpoint_tensor_shapes(cfg).items()}
    tensors["embed_tokens.weight"] = torch.zeros(100, 64)  # target-owned: ignored
    for name, shape in changes.items():
        name = name.replace("__", ".")
        if shape is None:
            del tensors[name]
        else:
            tensors[name] = torch.zeros(shape)
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return cfg


def test_complete_checkpoint_passes(tmp_path: Path) -> None:
    cfg = write_checkpoint(tmp_path)
    startup.check_checkpoint(tmp_path, cfg)
    # Not a directory (a hub id): left to the worker's load-time check.
    startup.check_checkpoint(tmp_path / "org" / "model", cfg)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    cfg = write_checkpoint(tmp_path, layers__1__mlp__up_proj__weight=None)
    with pytest.raises(DFlashConfigError) as info:
        startup.check_checkpoint(tmp_path, cfg)
    assert info.value.field_name == "drafter checkpoint"
    assert "layers.1.mlp.up_proj.weight" in str(info.value)
    assert "re-export" in str(info.value)


def test_misshapen_tensor_is_named(tmp_path: Path) -> None:
    cfg = write_checkpoint(tmp_path, fc__weight=(64, 64))
    with pytest.raises(DFlashConfigError) as info:
        startup.check_checkpoint(tmp_path, cfg)
    assert info.value.field_name == "checkpoint tensor fc.weight"
    assert info.value.value == (64, 64)
    assert "(64, 128)" in str(info.value)


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(
        b"\x05\x00\x00\x00\x00\x00\x00\x00{bad"
    )
    cfg = DFlashDraftConfig.from_hf_config(TINY)
    with pytest.raises(DFlashConfigError, match="not a readable safetensors"):
        startup.check_checkpoint(tmp_path, cfg)


def test_other_methods_are_not_checked() -> None:
    startup.check_engine_config(SimpleNamespace(speculative_config=None))
    eagle = SimpleNamespace(speculative_config=SimpleNamespace(method="eagle3"))
    startup.check_engine_config(eagle)


def test_unsupported_vllm_is_refused_when_dflash_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(support, "vllm_version", lambda: "0.19.1")
    reason = support.unsupported_reason()
    assert reason is not None
    assert "0.19.1" in reason and ">= 0.20" in reason and "VLLM_PLUGINS" in reason
    dflash = SimpleNamespace(speculative_config=SimpleNamespace(method="dflash"))
    with pytest.raises(UnsupportedVLLMError, match=r"installed vLLM is 0\.19\.1"):
        startup.check_engine_config(dflash)


def test_support_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "vllm_version", lambda: "0.32.0")
    assert support.unsupported_reason() is None
    assert not support.newer_than_tested()
    monkeypatch.setattr(support, "vllm_version", lambda: "0.40.1")
    assert support.newer_than_tested()
    missing = "vllm.v1.spec_decode.not_a_module"
    monkeypatch.setattr(support, "REQUIRED_MODULES", (missing,))
    assert missing in (support.unsupported_reason() or "")


def test_engine_config_builder_is_wrapped_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []

    class EngineArgs:
        def create_engine_config(self, usage_context: Any = None) -> Any:
            return SimpleNamespace(speculative_config=None, usage=usage_context)

    module = types.ModuleType("fake_arg_utils")
    module.EngineArgs = EngineArgs  # type: ignore[attr-defined]
    monkeypatch.setattr(startup, "check_engine_config", seen.append)
    patching.patch_engine_config_check(module)
    patching.patch_engine_config_check(module)  # idempotent
    config = EngineArgs().create_engine_config("ctx")
    assert config.usage == "ctx"
    assert seen == [config]


def test_adaptive_schedule_reaches_vllm_not_the_callers_dict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With VLLM_DFLASH_ADAPTIVE_K=1 the wrapped builder hands vLLM a DFlash
    config with the placeholder schedule; the user's own dict is untouched."""
    from vllm_dflash import adaptive

    built: list[Any] = []

    class EngineArgs:
        def __init__(self, speculative_config: dict[str, Any]) -> None:
            self.speculative_config = speculative_config

        def create_engine_config(self) -> Any:
            built.append(self.speculative_config)
            return SimpleNamespace(speculative_config=None)

    module = types.ModuleType("fake_arg_utils_adaptive")
    module.EngineArgs = EngineArgs  # type: ignore[attr-defined]
    monkeypatch.setattr(startup, "check_engine_config", lambda config: None)
    monkeypatch.setenv("VLLM_DFLASH_ADAPTIVE_K", "1")
    patching.patch_engine_config_check(module)
    mine = {"method": "dflash", "model": "d", "num_speculative_tokens": 7}
    EngineArgs(mine).create_engine_config()
    assert "num_speculative_tokens_per_batch_size" not in mine
    assert built[0]["num_speculative_tokens_per_batch_size"] == (
        adaptive.capture_schedule(7)
    )
