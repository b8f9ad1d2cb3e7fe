"""The drafter config: published fields read right, every bad value refused
with the field, the value and the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.hf_edits import edited
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    checkpoint_tensor_shapes,
    default_target_layer_ids,
    resolve_layer_attention,
    validate_token_budget,
)

# The z-lab Qwen3-8B drafter's published shape.
QWEN3_8B_DRAFTER: dict[str, Any] = {
    "architectures": ["DFlashDraftModel"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 5,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "block_size": 16,
    "num_target_layers": 36,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
}
TARGET = dict(target_hidden_size=4096, target_vocab_size=151936, target_num_layers=36)


def resolve(**changes: Any) -> DFlashDraftConfig:
    return DFlashDraftConfig.from_hf_config(edited(QWEN3_8B_DRAFTER, **changes))


def check(cfg: DFlashDraftConfig, k: int = 15, **target: int) -> None:
    cfg.validate(**{**TARGET, **target}, num_speculative_tokens=k)


def test_published_fields_are_read() -> None:
    cfg = resolve()
    assert cfg.block_size == 16 and cfg.max_draft_tokens == 15
    assert cfg.mask_token_id == 151669
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)
    assert cfg.fc_input_size == 5 * 4096
    assert all(
        not layer.causal and layer.sliding_window is None for layer in cfg.layers
    )
    check(cfg)


def test_layer_ids_are_shifted_by_one_for_capture() -> None:
    # Layer id i is the output of decoder layer i = vLLM aux index i + 1.
    assert resolve().aux_layer_ids == (2, 10, 18, 26, 34)


def test_default_layer_ids_match_published_spacing() -> None:
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    cfg = resolve(dflash_target_layer_ids=None)
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)


@pytest.mark.parametrize(
    ("changes", "target", "k", "field"),
    [
        ({"hidden_size": 2048}, {}, 15, "hidden_size"),
        ({}, {"target_hidden_size": 2048}, 15, "hidden_size"),
        ({"vocab_size": 32000}, {}, 15, "vocab_size"),
        ({"dflash_target_layer_ids": []}, {}, 15, "dflash_config.target_layer_ids"),
        (
            {"dflash_target_layer_ids": [-1, 3]},
            {},
            15,
            "dflash_config.target_layer_ids",
        ),
        ({"dflash_target_layer_ids": [1, 1]}, {}, 15, "dflash_config.target_layer_ids"),
        (
            {"dflash_target_layer_ids": [1, 36]},
            {},
            15,
            "dflash_config.target_layer_ids",
        ),
        ({"dflash_mask_token_id": 151936}, {}, 15, "dflash_config.mask_token_id"),
        ({}, {}, 16, "num_speculative_tokens"),
        ({}, {}, 0, "num_speculative_tokens"),
        ({"hidden_act": "relu"}, {}, 15, "hidden_act"),
        ({"num_key_value_heads": 5}, {}, 15, "num_key_value_heads"),
    ],
)
def test_bad_values_name_field_value_and_fix(
    changes: dict[str, Any], target: dict[str, int], k: int, field: str
) -> None:
    with pytest.raises(DFlashConfigError) as info:
        check(resolve(**changes), k=k, **target)
    err = info.value
    assert err.field_name == field
    assert field in str(err) and repr(err.value) in str(err)
    assert len(err.fix) > 20


def test_missing_mask_token_is_refused() -> None:
    hf = copy.deepcopy(QWEN3_8B_DRAFTER)
    del hf["dflash_config"]["mask_token_id"]
    with pytest.raises(DFlashConfigError, match="mask_token_id"):
        DFlashDraftConfig.from_hf_config(hf)


def test_layer_types_length_must_match() -> None:
    with pytest.raises(DFlashConfigError, match="layer_types"):
        resolve(layer_types=["full_attention"] * 4)


def test_layer_attention_table() -> None:
    gemma_like = {
        "layer_types": ["sliding_attention"] * 4 + ["full_attention"],
        "sliding_window": 2048,
        "dflash_config": {},
    }
    layers = resolve_layer_attention(gemma_like, 5)
    assert [(x.sliding_window, x.causal) for x in layers] == [(2048, True)] * 4 + [
        (None, False)
    ]
    forced = {**gemma_like, "dflash_config": {"causal": False}}
    assert not any(x.causal for x in resolve_layer_attention(forced, 5))
    all_swa = {"dflash_config": {"use_swa": True, "swa_window_size": 512}}
    assert [
        (x.sliding_window, x.causal) for x in resolve_layer_attention(all_swa, 2)
    ] == [(512, False)] * 2
    with pytest.raises(DFlashConfigError, match="sliding_window"):
        resolve_layer_attention({"dflash_config": {"use_swa": True}}, 2)


def test_token_budget() -> None:
    validate_token_budget(2048, 128, 15)
    with pytest.raises(DFlashConfigError) as info:
        validate_token_budget(1024, 128, 15)
    assert info.value.field_name == "max_num_batched_tokens"
    assert "2048" in str(info.value)


def test_checkpoint_shapes_cover_published_names() -> None:
    shapes = checkpoint_tensor_shapes(resolve())
    assert shapes["fc.weight"] == (4096, 5 * 4096)
    assert shapes["layers.4.self_attn.k_proj.weight"] == (8 * 128, 4096)
    assert shapes["layers.0.mlp.down_proj.weight"] == (4096, 12288)
    assert {"hidden_norm.weight", "norm.weight"} <= set(shapes)
    assert not any("embed_tokens" in n or "lm_head" in n for n in shapes)
    assert len(shapes) == 3 + 5 * 11


def test_draft_tensor_parallel_size_must_follow_the_target() -> None:
    from vllm_dflash.startup import validate_draft_tp

    validate_draft_tp(None, 2)
    validate_draft_tp(2, 2)
    with pytest.raises(DFlashConfigError) as err:
        validate_draft_tp(1, 2)
    assert "draft_tensor_parallel_size" in str(err.value)
    assert "tensor_parallel_size=2" in str(err.value)
