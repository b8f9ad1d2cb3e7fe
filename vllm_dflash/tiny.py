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


def build_target(
    path: Path,
    family: str = "qwen3",
    seed: int = 0,
    successor_cycles: tuple[int, int] | None = None,
    **overrides: Any,
) -> Path:
    """Save a random ``family`` ("qwen3" or "llama") target at ``path``.

    ``successor_cycles=(lo, hi)`` gives the target a toy language: a random
    permutation of the vocabulary made of cycles of lo..hi tokens, and
    ``lm_head`` rows set to the embedding rows of each token's predecessor,
    and the embeddings scaled up so the layers never overturn it: the greedy
    next token of ``x`` is its successor. Greedy text then walks one
    cycle: predictable from context, as real text is, so a drafter can learn
    it in a CPU minute. A plain random target's greedy text depends on its
    whole context in ways a tiny drafter cannot learn that fast.
    """
    import torch
    import transformers

    shape = {**TINY_TARGET, **overrides}
    if family == "qwen3":
        config: Any = transformers.Qwen3Config(**shape)
        cls: Any = transformers.Qwen3ForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(**shape)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny target family {family!r}: use qwen3 or llama")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    if successor_cycles is not None:
        succ = successor_permutation(shape["vocab_size"], successor_cycles, seed)
        pred = torch.empty_like(succ)
        pred[succ] = torch.arange(len(succ))
        with torch.no_grad():
            # Embeddings 4x the init scale, so the residual stream keeps the
            # current token in front of what the random layers add.
            embed = model.get_input_embeddings().weight
            embed.mul_(4.0)
            model.get_output_embeddings().weight.copy_(embed[pred])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def successor_permutation(vocab: int, cycle_lengths: tuple[int, int], seed: int) -> Any:
    """succ[x]: a random permutation of range(vocab) made of cycles whose
    lengths are drawn from ``cycle_lengths`` (inclusive)."""
    import random

    import torch

    rng = random.Random(seed)
    order = list(range(vocab))
    rng.shuffle(order)
    succ = torch.empty(vocab, dtype=torch.long)
    start = 0
    while start < vocab:
        cycle = order[start : start + rng.randint(*cycle_lengths)]
        for i, token in enumerate(cycle):
            succ[token] = cycle[(i + 1) % len(cycle)]
        start += len(cycle)
    return succ


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


# The tiny trained drafter (the demo's and the tests'): its target has a toy
# language of successor cycles (see build_target), and the recipe is small
# enough to train on two CPU cores in about a minute.
TINY_CYCLES = (8, 12)
# Part of the cache key: bump when the code that builds the pair changes.
TINY_REVISION = 1
TINY_RECIPE: dict[str, Any] = dict(
    num_layers=2,
    block_size=8,
    intermediate_size=256,
    steps=300,
    lr=3e-3,
    batch_size=16,
    blocks_per_seq=16,
    num_prompts=256,
    new_tokens=96,
    prompt_len=(2, 96),
    eval_every=100,
    seed=0,
)


@dataclass
class TrainedPair:
    target: Path
    drafter: Path
    result: dict[str, Any]
    """``TrainResult`` fields of the run that built the drafter."""


def trained_pair(cache: Path, progress: bool = True) -> TrainedPair:
    """The tiny Qwen3 target (with ``TINY_CYCLES``) and a drafter trained for
    it with ``TINY_RECIPE``, built once under ``cache`` (keyed by the recipe,
    the target's shape and the versions that shape the result) and reused."""
    import hashlib
    import os
    import shutil
    import tempfile

    import torch
    import transformers

    from vllm_dflash import __version__
    from vllm_dflash.train import RESULT_FILE, TrainConfig, train

    key = json.dumps(
        [
            TINY_RECIPE,
            TINY_TARGET,
            TINY_CYCLES,
            TINY_REVISION,
            __version__,
            torch.__version__,
            transformers.__version__,
        ],
        sort_keys=True,
        default=str,
    )
    final = cache / f"tiny-trained-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (final / "drafter" / RESULT_FILE).exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
        try:
            target = build_target(
                work / "target", family="qwen3", successor_cycles=TINY_CYCLES
            )
            train(
                TrainConfig(
                    target=str(target),
                    output=str(work / "drafter"),
                    progress=progress,
                    **TINY_RECIPE,
                )
            )
            try:
                os.replace(work, final)  # atomic; another builder may have won
            except OSError:
                if not (final / "drafter" / RESULT_FILE).exists():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = json.loads((final / "drafter" / RESULT_FILE).read_text())["result"]
    return TrainedPair(final / "target", final / "drafter", result)
