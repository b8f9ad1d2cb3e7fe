"""Gemma-4 drafter conventions, resolved from config alone: per-layer window
and causality, embedding scale, logit multiplier and soft cap, GELU-tanh, and
the ``gemma4-26b-a4b`` bench preset passing the plugin's validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.unit.hf_edits import edited
from vllm_dflash.bench import PRESET_BACKENDS, PRESETS
from vllm_dflash.config import DFlashConfigError, DFlashDraftConfig

PRESET = PRESETS["gemma4-26b-a4b"]


def drafter(**changes: Any) -> dict[str, Any]:
    return edited(PRESET["drafter"], **changes)


def resolve(
    target_type: str | None = "gemma4_text", **changes: Any
) -> DFlashDraftConfig:
    return DFlashDraftConfig.from_hf_config(
        drafter(**changes), target_model_type=target_type
    )


def test_preset_drafter_passes_validation_with_gemma_conventions() -> None:
    cfg = resolve()
    cfg.validate(
        target_hidden_size=PRESET["target"]["hidden_size"],
        target_vocab_size=PRESET["target"]["vocab_size"],
        target_num_layers=PRESET["target"]["num_hidden_layers"],
        num_speculative_tokens=15,
    )
    assert [(x.sliding_window, x.causal) for x in cfg.layers] == [(2048, True)] * 4 + [
        (None, False)
    ]
    assert cfg.mask_token_id == 4
    assert cfg.aux_layer_ids == (2, 7, 12, 18, 23, 28)
    assert cfg.embed_scale == pytest.approx(math.sqrt(2816))
    assert (cfg.final_logit_softcapping, cfg.output_multiplier) == (30.0, 1.0)
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    assert PRESET_BACKENDS["gemma4-26b-a4b"] == ("TRITON_ATTN", "FLASH_ATTN")


def test_preset_target_is_the_gemma4_26b_a4b_shape() -> None:
    import transformers

    target = {k: v for k, v in PRESET["target"].items() if k != "model_type"}
    config = transformers.Gemma4TextConfig(**target)
    types = config.layer_types
    assert (types.count("sliding_attention"), types.count("full_attention")) == (25, 5)
    layers = config.per_layer_config
    full = types.index("full_attention")
    assert (layers[0].head_dim, layers[0].num_key_value_heads) == (256, 8)
    assert (layers[full].head_dim, layers[full].num_key_value_heads) == (512, 2)
    assert config.final_logit_softcapping == 30.0


@pytest.mark.parametrize(
    ("target_type", "changes", "scale"),
    [
        ("gemma4_text", {}, math.sqrt(2816)),  # Gemma target: sqrt(hidden)
        ("gemma4", {}, math.sqrt(2816)),  # the multimodal Gemma 4 config
        ("qwen3", {}, 1.0),  # other targets: none
        ("qwen3", {"model_type": "gemma4_text"}, math.sqrt(2816)),  # Gemma drafter
        ("gemma4_text", {"dflash_input_embedding_scale": 7.0}, 7.0),  # given wins
        ("gemma4_text", {"input_embedding_scale": 1.0}, 1.0),
    ],
)
def test_embedding_scale(target_type: str, changes: dict, scale: float) -> None:
    assert resolve(target_type, **changes).embed_scale == pytest.approx(scale)


def test_logit_conventions_are_read_like_the_reference() -> None:
    cfg = resolve(final_logit_softcapping=None, dflash_final_logit_softcapping=20.0)
    assert cfg.final_logit_softcapping == 20.0  # dflash_config first
    cfg = resolve(final_logit_softcapping=0.0, output_multiplier=0.5)
    assert (cfg.final_logit_softcapping, cfg.output_multiplier) == (None, 0.5)


def test_gemma_activation_name_wins_over_qwen3_default() -> None:
    # Loaded as a Qwen3Config, a Gemma drafter reports Qwen3's default
    # hidden_act "silu" beside its own hidden_activation.
    import transformers

    hf = transformers.Qwen3Config(
        **drafter(hidden_act=None, hidden_activation="gelu_pytorch_tanh")
    )
    assert hf.hidden_act == "silu"
    assert DFlashDraftConfig.from_hf_config(hf).hidden_act == "gelu_pytorch_tanh"


def test_qwen3_typed_config_without_use_sliding_window_is_refused() -> None:
    # transformers drops sliding_window from a Qwen3Config unless
    # use_sliding_window is true: fail loudly rather than run full attention.
    import transformers

    hf = transformers.Qwen3Config(**drafter(use_sliding_window=None))
    assert hf.sliding_window is None
    with pytest.raises(DFlashConfigError, match="use_sliding_window"):
        DFlashDraftConfig.from_hf_config(hf)


def test_top_level_is_causal_overrides_every_layer() -> None:
    assert not any(layer.causal for layer in resolve(is_causal=False).layers)
    assert all(layer.causal for layer in resolve(is_causal=True).layers)


def test_logits_go_through_the_target_only_when_it_applies_the_same() -> None:
    from vllm_dflash.model import apply_logit_conventions, uses_target_logits

    gemma = resolve()  # soft cap 30, multiplier 1
    assert uses_target_logits(gemma, target_softcap=30.0, target_scale=1.0)
    assert not uses_target_logits(gemma, target_softcap=None, target_scale=1.0)
    assert not uses_target_logits(gemma, target_softcap=30.0, target_scale=2.0)
    plain = resolve(final_logit_softcapping=None)  # declares nothing
    assert uses_target_logits(plain, target_softcap=30.0, target_scale=1.0)
    scaled = resolve(output_multiplier=2.0)
    assert not uses_target_logits(scaled, target_softcap=30.0, target_scale=1.0)

    logits = torch.tensor([[-40.0, 0.0, 5.0, 100.0]])
    out = apply_logit_conventions(logits, 2.0, 30.0)
    torch.testing.assert_close(out, 30.0 * torch.tanh(logits * 2.0 / 30.0))
    assert out.abs().max() < 30.0
    torch.testing.assert_close(apply_logit_conventions(logits, 1.0, None), logits)
