"""Tiny random models for the demo, the tests and the benchmark presets.

Targets are real ``transformers`` models saved with ``save_pretrained`` (so a
plain ``transformers`` forward can check what vLLM captured); drafters are a
``config.json`` plus a ``model.safetensors`` in the published DFlash format.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_dflash.config import DFlashDraftConfig, checkpoint_tensor_shapes

# Shapes CPU attention supports (head_dim 32) and small enough to load fast.
TINY_TARGET: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

# Gemma-4 shape in miniature: sliding layers (head_dim 32) and a global layer
# with another head_dim (64) and k=v, a small MoE beside the dense MLP, tied
# embeddings scaled by sqrt(hidden) in the model, final logit soft cap 30.
TINY_GEMMA4: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    layer_types=["sliding_attention"] * 3 + ["full_attention"],
    sliding_window=16,
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=64,
    vocab_size=512,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


@dataclass
class TinyDrafter:
    """Shape of a tiny DFlash drafter for a tiny target."""

    num_hidden_layers: int = 2
    block_size: int = 8
    target_layer_ids: list[int] = field(default_factory=lambda: [0, 2])
    mask_token_id: int = 511
    intermediate_size: int = 256
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_target(
    path: Path, family: str = "qwen3", seed: int = 0, **overrides: Any
) -> Path:
    """Save a random ``family`` ("qwen3", "llama" or "gemma4") target at
    ``path``."""
    import torch
    import transformers

    shape = {**(TINY_GEMMA4 if family == "gemma4" else TINY_TARGET), **overrides}
    if family == "qwen3":
        config: Any = transformers.Qwen3Config(**shape)
        cls: Any = transformers.Qwen3ForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(**shape)
        cls = transformers.LlamaForCausalLM
    elif family == "gemma4":
        config = transformers.Gemma4TextConfig(**shape)
        cls = transformers.Gemma4ForCausalLM
    else:
        raise ValueError(
            f"unknown tiny target family {family!r}: use qwen3, llama or gemma4"
        )
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def drafter_config(target_dir: Path, spec: TinyDrafter) -> dict[str, Any]:
    """A published-format DFlash ``config.json`` for the target at ``target_dir``."""
    target = json.loads((target_dir / "config.json").read_text())
    heads = target["num_attention_heads"]
    config: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target["hidden_size"],
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": target.get("num_key_value_heads", heads),
        "head_dim": target.get("head_dim") or target["hidden_size"] // heads,
        "hidden_act": "silu",
        "rms_norm_eps": target.get("rms_norm_eps", 1e-6),
        "vocab_size": target["vocab_size"],
        "max_position_embeddings": target.get("max_position_embeddings", 2048),
        "rope_theta": target.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "block_size": spec.block_size,
        "num_target_layers": target["num_hidden_layers"],
        "torch_dtype": "float32",
        "dflash_config": {
            "mask_token_id": spec.mask_token_id,
            "target_layer_ids": list(spec.target_layer_ids),
        },
    }
    if spec.layer_types is not None:
        config["layer_types"] = list(spec.layer_types)
        config["sliding_window"] = spec.sliding_window
        # model_type "qwen3" configs drop sliding_window on load without it.
        config["use_sliding_window"] = spec.sliding_window is not None
    config.update(spec.extra)
    return config


def gemma_drafter(**changes: Any) -> TinyDrafter:
    """A tiny drafter with the Gemma-4 DFlash conventions: sliding-window
    causal layers and a final full non-causal layer, mask id 4, GELU-tanh MLP
    (named the Gemma way, ``hidden_activation``), and its own logit
    conventions. The embedding scale is not given: a Gemma target implies
    sqrt(hidden). The soft cap and multiplier are chosen so that forgetting
    either changes the logits visibly (tiny random logits are far below
    Gemma's real cap of 30)."""
    spec = TinyDrafter(
        num_hidden_layers=3,
        block_size=8,
        target_layer_ids=[0, 2],
        mask_token_id=4,
        layer_types=["sliding_attention"] * 2 + ["full_attention"],
        sliding_window=8,
        extra={
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 2.0,
            "output_multiplier": 8.0,
        },
    )
    return dataclasses.replace(spec, **changes)


def build_drafter(
    path: Path, target_dir: Path, spec: TinyDrafter | None = None, seed: int = 1
) -> Path:
    """Save a random drafter for ``target_dir`` at ``path``."""
    import torch
    from safetensors.torch import save_file

    spec = spec or TinyDrafter()
    config = drafter_config(target_dir, spec)
    shapes = checkpoint_tensor_shapes(DFlashDraftConfig.from_hf_config(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = 0.05 * torch.randn(shape, generator=gen)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors")
    )
    return path


def prompts(
    n: int, vocab: int = 500, seed: int = 0, min_len: int = 3, max_len: int = 40
) -> list[list[int]]:
    """``n`` token-id prompts of different lengths (ids below the mask id)."""
    import random

    rng = random.Random(seed)
    lengths = [min_len + (max_len - min_len) * i // max(1, n - 1) for i in range(n)]
    return [[rng.randrange(1, vocab) for _ in range(length)] for length in lengths]
