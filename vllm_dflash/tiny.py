"""Tiny random models for the demo, the tests and the benchmark presets.

Targets are real ``transformers`` models saved with ``save_pretrained`` (so a
plain ``transformers`` forward can check what vLLM captured); drafters are a
``config.json`` plus a ``model.safetensors`` in the published DFlash format.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
TINY_GEMMA4: dict[str, Any] = {
    # The tiny target's sizes (Gemma 4 takes its RoPE from its own defaults),
    **{k: v for k, v in TINY_TARGET.items() if k != "rope_theta"},
    # then what makes it Gemma 4.
    "global_head_dim": 64,
    "num_global_key_value_heads": 1,
    "attention_k_eq_v": True,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    "sliding_window": 16,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0,
    "enable_moe_block": True,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 64,
    "tie_word_embeddings": True,
}


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
    if family == "gemma4":
        return "Gemma4TextConfig", "Gemma4ForCausalLM", shape
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
        f"unknown tiny target family {family!r}: use qwen3, llama, gemma4, "
        "gemma3, mixtral or gpt2"
    )


def build_target(
    path: Path,
    family: str = "qwen3",
    seed: int = 0,
    successor_cycles: tuple[int, int] | None = None,
    embed_scale: float | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Save a random ``family`` target at ``path`` (see ``_family_config``).

    ``successor_cycles=(lo, hi)`` gives the target a toy language: a random
    permutation of the vocabulary made of cycles of lo..hi tokens, and
    ``lm_head`` rows set to the embedding rows of each token's predecessor,
    and the embeddings scaled up so the layers never overturn it: the greedy
    next token of ``x`` is its successor. Greedy text then walks one
    cycle: predictable from context, as real text is, so a drafter can learn
    it in a CPU minute. A plain random target's greedy text depends on its
    whole context in ways a tiny drafter cannot learn that fast.

    ``embed_scale`` multiplies the embeddings of a toy-language target;
    None: ``toy_embed_scale`` of its shape. ``device`` builds the weights
    there (a GPU builds a billion parameters in seconds); they are saved in
    ``dtype``.
    """
    import torch
    import transformers

    base = TINY_GEMMA4 if family == "gemma4" else TINY_TARGET
    config_name, model_name, kwargs = _family_config(family, {**base, **overrides})
    config: Any = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, model_name)(config).to(torch.float32)
    if successor_cycles is not None:
        succ = successor_permutation(config.vocab_size, successor_cycles, seed)
        pred = torch.empty_like(succ)
        pred[succ] = torch.arange(len(succ))
        with torch.no_grad():
            # Embeddings scaled up, so the residual stream keeps the current
            # token in front of what the random layers add.
            embed = model.get_input_embeddings().weight
            embed.mul_(embed_scale or toy_embed_scale(config))
            model.get_output_embeddings().weight.copy_(embed[pred.to(embed.device)])
    path.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    return path


def toy_embed_scale(config: Any) -> float:
    """Embedding gain that makes a random target's greedy next token the
    successor of the current one (``build_target(successor_cycles=...)``).

    Every decoder layer adds to the residual stream a random vector whose size
    grows with the width and, summed, with the square root of the depth,
    while the embeddings' share of a logit grows with the square root of the
    width: the gain needed grows as sqrt(hidden * layers). Measured (greedy
    text of random prompts following the successor, hidden 2048, vocabulary
    32768): 2 layers need more than 4, 6 layers more than 8; 16 gave 100% in
    both. This gives 10.9 and 18.8 there (over twice the threshold), and 4 for
    the tiny target.
    """
    layers = int(config.num_hidden_layers)
    return max(4.0, 0.12 * math.sqrt(2 * int(config.hidden_size) * layers))


_GPT2_NAMES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
}


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


# A real word-level tokenizer for the tiny targets, so an OpenAI-compatible
# server can take text prompts and chat messages. Ids: special tokens first,
# then punctuation, common words, and fillers "w<id>" up to the vocab size.
TOKENIZER_SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
TOKENIZER_WORDS = (
    ". , ? ! : ; ' - the a an and or of to in on for with is are was be it this "
    "that you i we they he she what how why when where who which write tell me "
    "about short story poem haiku list three five ten words sentence fast slow "
    "speculative decoding draft drafter target model token tokens block diffusion "
    "one two four hello world please explain give example test server plugin"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """Save a word-level ``tokenizer.json`` + ``tokenizer_config.json`` (with a
    chat template) whose ids fill ``vocab_size`` exactly, into ``path``."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    words = list(dict.fromkeys(TOKENIZER_SPECIALS + TOKENIZER_WORDS.split()))
    if len(words) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below {len(words)} words")
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in TOKENIZER_SPECIALS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


# An "echo" pair: a target that mostly repeats its last token and a drafter
# built by hand to propose exactly that, so drafts are really accepted (random
# drafters almost never are) and the acceptance counters have something to
# count. Every ordinary token's embedding has +1 in dimension 0, the mask
# token's is -1 there and 0 elsewhere; the drafter's attention reads that sign.
ECHO_MIX = 3000.0
"""Gain on the target's attention and MLP outputs against its embeddings:
at 3000 a greedy tiny target repeats its last token about 2 steps in 3."""


def build_echo_target(
    path: Path, mask_token_id: int = 511, mix: float = ECHO_MIX, seed: int = 0
) -> Path:
    """Save a Qwen3 target whose greedy output mostly repeats the last token.

    lm_head equals the embeddings (a token scores highest against itself);
    ``mix`` scales the decoder layers' outputs so that the context changes the
    next token often enough for varied text. Rows of the tokenizer's special
    ids in lm_head are zero, so the target never emits them.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_TARGET))
    vocab, hidden = TINY_TARGET["vocab_size"], TINY_TARGET["hidden_size"]
    embed = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
    embed[:, 0] = 1.0
    embed[mask_token_id] = 0.0
    embed[mask_token_id, 0] = -1.0
    head = embed.clone()
    head[: len(TOKENIZER_SPECIALS)] = 0.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(mix)
            layer.mlp.down_proj.weight.mul_(mix)
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def echo_drafter_tensors(
    cfg: DFlashDraftConfig, gain: float = 4.0, sharpness: float = 3.0
) -> dict[str, Any]:
    """Weights with which every masked slot copies the block's first token.

    In each layer the masked slots' queries point along one head dimension
    ``u`` (the RoPE pair of lowest frequency, so scores barely depend on
    position); the first slot's key points along ``+u`` (embedding dim 0 is
    +1), masked slots' keys along ``-u`` and the context's are zero (``fc`` is
    zero), so each masked slot attends to the first slot alone and adds
    ``gain`` x its embedding (dims 1..) through v/o. The target's lm_head then
    scores that token highest: the drafter proposes "repeat the last token" at
    every position. MLPs are zero.
    """
    import torch

    d, hd = cfg.hidden_size, cfg.head_dim
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    group, u = heads // kv_heads, hd // 2 - 1
    shapes = checkpoint_tensor_shapes(cfg)
    t = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name in t:
        if name.endswith("norm.weight"):
            t[name] = torch.ones(shapes[name])
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}.self_attn."
        t[p + "q_norm.weight"][u] = sharpness
        t[p + "k_norm.weight"][u] = sharpness
        for h in range(heads):
            t[p + "q_proj.weight"][h * hd + u, 0] = -1.0  # masks: dim0 < 0
        for g in range(kv_heads):
            t[p + "k_proj.weight"][g * hd + u, 0] = 1.0
            for j in range(hd):
                src = 1 + g * hd + j
                if src < d:
                    t[p + "v_proj.weight"][g * hd + j, src] = 1.0
                    t[p + "o_proj.weight"][src, g * group * hd + j] = gain
    return t


def build_echo_drafter(
    path: Path, target_dir: Path, spec: TinyDrafter | None = None
) -> Path:
    """Save an echo drafter (see :func:`echo_drafter_tensors`) for an echo
    target at ``path``."""
    from safetensors.torch import save_file

    spec = spec or TinyDrafter()
    config = drafter_config(target_dir, spec)
    tensors = echo_drafter_tensors(DFlashDraftConfig.from_hf_config(config))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors")
    )
    return path


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
