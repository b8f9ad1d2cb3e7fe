"""Tiny random models for the demo, the tests and the benchmark presets.

Targets are real ``transformers`` models saved with ``save_pretrained`` (so a
plain ``transformers`` forward can check what vLLM captured); drafters are a
``config.json`` plus a ``model.safetensors`` in the published DFlash format.
Nothing is downloaded.
"""

from __future__ import annotations

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


def _family_config(family: str, shape: dict[str, Any]) -> tuple[str, str, dict]:
    """(config class, model class, config kwargs) of a tiny target family."""
    n = shape["num_hidden_layers"]
    if family in ("qwen3", "llama"):
        name = "Qwen3" if family == "qwen3" else "Llama"
        return f"{name}Config", f"{name}ForCausalLM", shape
    # Families below have no EAGLE-3 interface in vLLM (vllm_dflash.capture).
    if family == "gemma3":
        # Sliding layers and one global, as Gemma 3 interleaves them; vLLM's
        # Gemma 3 always ties lm_head to the embeddings.
        layer_types = ["sliding_attention"] * (n - 1) + ["full_attention"]
        extra = dict(sliding_window=16, layer_types=layer_types)
        return (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {**shape, **extra, "tie_word_embeddings": True},
        )
    if family == "mixtral":
        extra = dict(num_local_experts=4, num_experts_per_tok=2)
        return "MixtralConfig", "MixtralForCausalLM", {**shape, **extra}
    if family == "gpt2":
        # Blocks at transformer.h: outside the capture's reach.
        gpt2 = dict(
            n_embd=shape["hidden_size"],
            n_layer=n,
            n_head=shape["num_attention_heads"],
            n_inner=shape["intermediate_size"],
            n_positions=shape["max_position_embeddings"],
            vocab_size=shape["vocab_size"],
            bos_token_id=0,
            eos_token_id=0,
        )
        return "GPT2Config", "GPT2LMHeadModel", gpt2
    raise ValueError(
        f"unknown tiny target family {family!r}: use qwen3, llama, gemma3, "
        "mixtral or gpt2"
    )


def build_target(
    path: Path, family: str = "qwen3", seed: int = 0, **overrides: Any
) -> Path:
    """Save a random ``family`` target at ``path`` (see ``_family_config``)."""
    import torch
    import transformers

    config_name, model_name, kwargs = _family_config(
        family, {**TINY_TARGET, **overrides}
    )
    config: Any = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


_GPT2_NAMES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
}


def drafter_config(target_dir: Path, spec: TinyDrafter) -> dict[str, Any]:
    """A published-format DFlash ``config.json`` for the target at ``target_dir``."""
    target = json.loads((target_dir / "config.json").read_text())
    for name, gpt2_name in _GPT2_NAMES.items():
        if gpt2_name in target:
            target.setdefault(name, target[gpt2_name])
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
    config.update(spec.extra)
    return config


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
