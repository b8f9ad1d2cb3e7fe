"""One typed, validated resolution of a DFlash drafter's ``config.json``.

Published drafters (z-lab and others) carry ``architectures:
["DFlashDraftModel"]``, Qwen3 (or Gemma) decoder fields, ``block_size``,
``num_target_layers`` and ``dflash_config: {mask_token_id,
target_layer_ids}``. Everything the drafter and the proposer need is read
here once; every bad value fails at start-up with the field, the value and the
fix (``DFlashConfigError``), never mid-request.

This module imports nothing from vLLM: it reads plain attribute bags (a
``transformers.PretrainedConfig`` or a ``SimpleNamespace``) so it can be unit
tested and used by the training and benchmark tools.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class DFlashConfigError(ValueError):
    """A drafter or engine option that cannot work, found at start-up."""

    def __init__(self, field_name: str, value: Any, fix: str) -> None:
        self.field_name = field_name
        self.value = value
        self.fix = fix
        super().__init__(f"vllm-dflash: invalid {field_name}={value!r}. {fix}")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _draft_value(hf: Any, name: str, default: Any = None) -> Any:
    """A DFlash convention, looked up as the reference reads it:
    ``dflash_config.<name>`` first, then the top-level field."""
    value = _get(_get(hf, "dflash_config") or {}, name)
    if value is None:
        value = _get(hf, name)
    return default if value is None else value


def _positive_or_none(value: Any) -> float | None:
    # The reference skips a soft cap of None or <= 0.
    return None if value is None or float(value) <= 0 else float(value)


@dataclass(frozen=True)
class LayerAttention:
    """How one draft layer attends: window (None = full) and causality."""

    sliding_window: int | None
    causal: bool


@dataclass(frozen=True)
class DFlashDraftConfig:
    """The drafter's shape and DFlash conventions, resolved and checked."""

    hidden_size: int
    """Width of the drafter; must equal the target's (shared embeddings)."""
    num_hidden_layers: int
    """Number of draft decoder layers (typically 5)."""
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    """``silu`` (Qwen3-style SwiGLU) or ``gelu_pytorch_tanh`` (Gemma drafters;
    read from ``hidden_activation`` when the config carries that Gemma name)."""
    rms_norm_eps: float
    vocab_size: int
    block_size: int
    """B: a draft block is ``[last token, MASK x (B-1)]``; K <= B-1."""
    mask_token_id: int
    """Token id embedded at the B-1 masked slots (Qwen3 151669, Gemma 4 4)."""
    target_layer_ids: tuple[int, ...]
    """Target decoder layers whose *outputs* feed the drafter (0-based)."""
    layers: tuple[LayerAttention, ...]
    attention_bias: bool = False
    num_target_layers: int | None = None
    target_hidden_size: int | None = None
    """Width of each captured target feature; defaults to ``hidden_size``."""
    embed_scale: float = 1.0
    """Multiplier on the target's raw input embeddings (Gemma: sqrt(hidden));
    see :func:`resolve_embed_scale`."""
    output_multiplier: float = 1.0
    """Multiplier on the draft logits, applied before the soft cap."""
    final_logit_softcapping: float | None = None
    """Soft cap on the draft logits, ``cap * tanh(logits / cap)`` (Gemma 4:
    30); None leaves the target's own logit processing in charge."""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived ----------------------------------------------------------
    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        """Capture indices in vLLM's aux-hidden-state interface.

        DFlash's layer id ``i`` means *the output of decoder layer i*, which
        is HF ``hidden_states[i + 1]`` and vLLM aux index ``i + 1``. Using
        ``i`` instead silently feeds the previous layer's output: nothing
        errors, acceptance just collapses (vLLM 0.20 shipped that bug).
        """
        return tuple(i + 1 for i in self.target_layer_ids)

    @property
    def fc_input_size(self) -> int:
        width = self.target_hidden_size or self.hidden_size
        return width * len(self.target_layer_ids)

    @property
    def any_non_causal(self) -> bool:
        return any(not layer.causal for layer in self.layers)

    @property
    def max_draft_tokens(self) -> int:
        return self.block_size - 1

    # -- construction -----------------------------------------------------
    @property
    def has_own_logit_conventions(self) -> bool:
        """Whether the config declares logit conventions of its own."""
        return self.output_multiplier != 1.0 or self.final_logit_softcapping is not None

    @classmethod
    def from_hf_config(
        cls, hf: Any, *, target_model_type: str | None = None
    ) -> DFlashDraftConfig:
        """Read a drafter's HF config (object or dict) into this dataclass.

        ``target_model_type`` (the target's ``model_type``) selects the
        target family's conventions where the drafter's config is silent.
        """
        dflash = _get(hf, "dflash_config") or {}
        hidden = int(_get(hf, "hidden_size"))
        heads = int(_get(hf, "num_attention_heads"))
        num_layers = int(_get(hf, "num_hidden_layers"))
        head_dim = _get(hf, "head_dim") or hidden // heads
        mask = _get(dflash, "mask_token_id", _get(hf, "mask_token_id"))
        if mask is None:
            raise DFlashConfigError(
                "dflash_config.mask_token_id",
                None,
                "Add the mask token id the drafter was trained with to the "
                "drafter's config.json (Qwen3: 151669, Qwen3.5: 248070, Gemma 4: 4).",
            )
        layer_ids = _get(dflash, "target_layer_ids")
        num_target = _get(hf, "num_target_layers")
        if layer_ids is None:
            if num_target is None:
                raise DFlashConfigError(
                    "dflash_config.target_layer_ids",
                    None,
                    "Give the target layers the drafter reads, or "
                    "num_target_layers to use the default spacing.",
                )
            layer_ids = default_target_layer_ids(int(num_target), num_layers)
        block_size = _get(hf, "block_size", _get(dflash, "block_size", 16))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(_get(hf, "num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(_get(hf, "intermediate_size")),
            # Gemma configs name it hidden_activation; a Qwen3-typed config
            # then still reports Qwen3's default hidden_act "silu", which would
            # silently run SwiGLU instead of GELU-tanh.
            hidden_act=str(
                _get(hf, "hidden_activation") or _get(hf, "hidden_act") or "silu"
            ),
            rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
            vocab_size=int(_get(hf, "vocab_size")),
            block_size=int(block_size),
            mask_token_id=int(mask),
            target_layer_ids=tuple(int(i) for i in layer_ids),
            layers=resolve_layer_attention(hf, num_layers),
            attention_bias=bool(_get(hf, "attention_bias", False)),
            num_target_layers=None if num_target is None else int(num_target),
            target_hidden_size=_get(hf, "target_hidden_size"),
            embed_scale=resolve_embed_scale(hf, hidden, target_model_type),
            output_multiplier=float(_draft_value(hf, "output_multiplier", 1.0)),
            final_logit_softcapping=_positive_or_none(
                _draft_value(hf, "final_logit_softcapping")
            ),
        )

    # -- validation -------------------------------------------------------
    def validate(
        self,
        *,
        target_hidden_size: int,
        target_vocab_size: int,
        target_num_layers: int,
        num_speculative_tokens: int,
    ) -> None:
        """Check the drafter against its target and the engine's K."""
        if self.hidden_size != target_hidden_size:
            raise DFlashConfigError(
                "hidden_size",
                self.hidden_size,
                f"The target's hidden_size is {target_hidden_size}; DFlash shares "
                "the target's embeddings and lm_head, so the drafter must match. "
                "Use the drafter trained for this target.",
            )
        if self.vocab_size != target_vocab_size:
            raise DFlashConfigError(
                "vocab_size",
                self.vocab_size,
                f"The target's vocabulary has {target_vocab_size} entries; use the "
                "drafter trained for this target (or correct vocab_size).",
            )
        self._validate_layer_ids(target_num_layers)
        if not 0 <= self.mask_token_id < target_vocab_size:
            raise DFlashConfigError(
                "dflash_config.mask_token_id",
                self.mask_token_id,
                f"It must be a token id of the target's vocabulary "
                f"[0, {target_vocab_size}).",
            )
        if self.block_size < 2:
            raise DFlashConfigError(
                "block_size", self.block_size, "A DFlash block needs at least 2 slots."
            )
        if not 1 <= num_speculative_tokens <= self.max_draft_tokens:
            raise DFlashConfigError(
                "num_speculative_tokens",
                num_speculative_tokens,
                f"This drafter's block_size is {self.block_size}, so it drafts "
                f"1..{self.max_draft_tokens} tokens per step; set "
                f"num_speculative_tokens in that range "
                f"(usually {self.max_draft_tokens}).",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise DFlashConfigError(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"It must divide num_attention_heads={self.num_attention_heads}.",
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise DFlashConfigError(
                "hidden_act",
                self.hidden_act,
                f"Supported: {', '.join(sorted(SUPPORTED_ACTIVATIONS))}.",
            )

    def _validate_layer_ids(self, target_num_layers: int) -> None:
        ids = self.target_layer_ids
        if not ids:
            raise DFlashConfigError(
                "dflash_config.target_layer_ids",
                list(ids),
                "List at least one target layer (e.g. evenly spaced from 1 to L-3).",
            )
        bad = [i for i in ids if not 0 <= i < target_num_layers]
        if bad:
            raise DFlashConfigError(
                "dflash_config.target_layer_ids",
                list(ids),
                f"Layer ids {bad} do not exist: the target has {target_num_layers} "
                f"decoder layers (valid ids 0..{target_num_layers - 1}). Is this "
                "drafter meant for another target?",
            )
        if len(set(ids)) != len(ids):
            raise DFlashConfigError(
                "dflash_config.target_layer_ids",
                list(ids),
                "Each target layer may appear once; remove the duplicates.",
            )


SUPPORTED_ACTIVATIONS = {"silu", "gelu_pytorch_tanh", "gelu_tanh"}


def default_target_layer_ids(
    num_target_layers: int, num_draft_layers: int
) -> list[int]:
    """Evenly spaced from layer 1 to L-3, one per draft layer.

    Qwen3-8B (36 layers, 5 draft layers) gives [1, 9, 17, 25, 33].
    """
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    step = (end - start) / (num_draft_layers - 1)
    return [round(start + i * step) for i in range(num_draft_layers)]


def resolve_layer_attention(hf: Any, num_layers: int) -> tuple[LayerAttention, ...]:
    """Resolve each draft layer's window and causality from its config.

    ===========================  ==========================================
    config                       effect on draft layer ``i``
    ===========================  ==========================================
    ``layer_types[i]`` sliding   window = ``swa_window_size`` or
                                 ``sliding_window``; causal (z-lab Gemma)
    ``layer_types[i]`` full      no window; non-causal (the DFlash block)
    no ``layer_types``           every layer full and non-causal, unless
                                 ``dflash_config.use_swa`` makes all sliding
    ``dflash_config.causal``     overrides causality of every layer
    ``is_causal`` (top level)    overrides it too (the reference reads it)
    ===========================  ==========================================

    Getting causality wrong is silent: drafts still verify, acceptance drops.
    """
    dflash = _get(hf, "dflash_config") or {}
    layer_types: Sequence[str] | None = _get(hf, "layer_types")
    if layer_types is not None and len(layer_types) != num_layers:
        raise DFlashConfigError(
            "layer_types",
            list(layer_types),
            f"It must list one type per draft layer ({num_layers}); got "
            f"{len(layer_types)}.",
        )
    use_swa = bool(_get(dflash, "use_swa", False))
    causal_override = _get(hf, "is_causal")
    if causal_override is None:
        causal_override = _get(dflash, "causal")
    window = _get(dflash, "swa_window_size", _get(hf, "sliding_window"))
    resolved = []
    for i in range(num_layers):
        sliding = use_swa if layer_types is None else layer_types[i] == SLIDING
        if sliding and window is None:
            raise DFlashConfigError(
                "sliding_window",
                None,
                f"Draft layer {i} is sliding-window; give its window in "
                "sliding_window or dflash_config.swa_window_size (a "
                'model_type "qwen3" config also needs use_sliding_window: '
                "true, or transformers drops sliding_window on load).",
            )
        causal = sliding and layer_types is not None
        if causal_override is not None:
            causal = bool(causal_override)
        resolved.append(LayerAttention(int(window) if sliding else None, causal))
    return tuple(resolved)


def gemma_embed_scale(hidden_size: int) -> float:
    """Gemma targets scale input embeddings by sqrt(hidden_size)."""
    return math.sqrt(hidden_size)


def is_gemma(model_type: Any) -> bool:
    return str(model_type or "").startswith("gemma")


def resolve_embed_scale(
    hf: Any, hidden_size: int, target_model_type: str | None
) -> float:
    """The multiplier on the block's input embeddings.

    ====================================  ===============================
    config                                scale
    ====================================  ===============================
    ``input_embedding_scale`` (dflash_    that value
    config or top level)
    Gemma target or Gemma-typed drafter   sqrt(hidden_size)
    otherwise                             1.0
    ====================================  ===============================

    The drafter embeds with the target's *raw* table (vLLM's Gemma models
    apply their sqrt(hidden) normalizer in the model forward, not in
    ``embed_tokens``), so this is the one place the scale is applied. A
    missing or doubled scale raises nothing: acceptance just collapses.
    """
    given = _draft_value(hf, "input_embedding_scale")
    if given is not None:
        return float(given)
    if is_gemma(target_model_type) or is_gemma(_get(hf, "model_type")):
        return gemma_embed_scale(hidden_size)
    return 1.0


def validate_token_budget(
    max_num_batched_tokens: int, max_num_seqs: int, num_speculative_tokens: int
) -> None:
    """A verify step schedules K+1 tokens for each running sequence."""
    need = max_num_seqs * (num_speculative_tokens + 1)
    if max_num_batched_tokens < need:
        raise DFlashConfigError(
            "max_num_batched_tokens",
            max_num_batched_tokens,
            f"With max_num_seqs={max_num_seqs} and num_speculative_tokens="
            f"{num_speculative_tokens}, a step needs {need} tokens: raise "
            f"--max-num-batched-tokens to >= {need} or lower --max-num-seqs to "
            f"<= {max_num_batched_tokens // (num_speculative_tokens + 1)}.",
        )


def checkpoint_tensor_shapes(cfg: DFlashDraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a published-format DFlash checkpoint, with its shape.

    The drafter owns no embedding table or lm_head: those are the target's.
    """
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv, ffn = (
        cfg.num_attention_heads * hd,
        cfg.num_key_value_heads * hd,
        (cfg.intermediate_size),
    )
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (d, cfg.fc_input_size),
        "hidden_norm.weight": (d,),
        "norm.weight": (d,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (ffn, d),
            p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
        }
        if cfg.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return shapes
