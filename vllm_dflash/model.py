"""The DFlash drafter as a vLLM model: ``DFlashDraftModel``.

Data flow of one draft step (shapes for B requests, block size Q = K+1,
N context tokens, n captured target layers of width d):

    target features [N, n*d] --fc--> [N, d] --hidden_norm--> c
    for every draft layer l:  K_l, V_l = k_norm(W_k c) + RoPE(ctx pos), W_v c
                              -> written into layer l's paged KV cache
    block ids [B*Q] = [last token, MASK x K] --target embed--> x
    x --layers (queries attend to cached context + the whole block)--> norm
      --target lm_head--> draft logits for slots 1..K

The drafter owns no embedding table and no lm_head: ``bind_target`` hands it
the target's. Context K/V persist in the draft KV cache across steps; only
positions the target accepted are ever attended (the proposer trims the
sequence lengths by the rejected count).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_dflash import compat, patching
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    LayerAttention,
    checkpoint_tensor_shapes,
)
from vllm_dflash.log import get_logger

logger = get_logger(__name__)

# Checkpoint tensors loaded into vLLM's fused projections: name -> (fused, shard)
_STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
# Tensors some checkpoints carry although DFlash uses the target's copies.
_TARGET_OWNED = ("embed_tokens.", "lm_head.")


def draft_config_of(vllm_config: compat.VllmConfig) -> DFlashDraftConfig:
    spec = vllm_config.speculative_config
    assert spec is not None and spec.draft_model_config is not None
    target_type = getattr(vllm_config.model_config.hf_config, "model_type", None)
    return DFlashDraftConfig.from_hf_config(
        spec.draft_model_config.hf_config, target_model_type=target_type
    )


def apply_logit_conventions(
    logits: torch.Tensor, multiplier: float, softcap: float | None
) -> torch.Tensor:
    """The drafter's own logit conventions, in the reference's order:
    multiply, then ``softcap * tanh(logits / softcap)``."""
    if multiplier != 1.0:
        logits = logits * multiplier
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def uses_target_logits(
    cfg: DFlashDraftConfig, target_softcap: float | None, target_scale: float
) -> bool:
    """Whether the target's ``compute_logits`` already applies exactly the
    drafter's logit conventions (each must be applied once: twice or not at
    all changes the draft distribution and raises nothing).

    A drafter that declares none inherits the target's processing (a Gemma
    target's soft cap of 30 included)."""
    if not cfg.has_own_logit_conventions:
        return True
    return (
        cfg.output_multiplier == 1.0
        and cfg.final_logit_softcapping == target_softcap
        and target_scale == 1.0
    )


@dataclass(frozen=True)
class ContextKeyKernels:
    """What vLLM's RMSNorm and RoPE kernels need for one layer's context keys
    (``DFlashAttention.use_context_kernels``)."""

    norm_weight: torch.Tensor  # [head_dim]
    eps: float
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim], the keys' dtype
    head_size: int
    is_neox_style: bool


class DFlashAttention(nn.Module):
    """Qwen3-style attention (per-head q/k RMSNorm, RoPE) whose KV cache also
    holds K/V projected from the fused target features (``context_kv``)."""

    def __init__(
        self,
        cfg: DFlashDraftConfig,
        hf_config: Any,
        layer: LayerAttention,
        *,
        cache_config: Any,
        prefix: str,
    ) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = compat.QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.attention_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = compat.RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            bias=False,
            prefix=f"{prefix}.o_proj",
        )
        # Sizes on this tensor-parallel rank.
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.q_norm = compat.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = compat.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.rotary_emb = compat.get_rope(**compat.rope_kwargs(hf_config, cfg.head_dim))
        self.causal = layer.causal
        self.attn = compat.Attention(
            self.num_heads,
            cfg.head_dim,
            cfg.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            per_layer_sliding_window=layer.sliding_window,
            prefix=f"{prefix}.attn",
        )
        self.context_kernels: ContextKeyKernels | None = None

    def use_context_kernels(self, dtype: torch.dtype, caches: dict[int, Any]) -> bool:
        """Finish context keys with vLLM's RMSNorm and RoPE kernels from now on,
        where they compute what ``k_norm`` and ``rotary_emb`` do. ``caches``
        (id of a cos/sin cache -> that cache in ``dtype``) is shared by the
        layers: get_rope hands them one module, whose cache can be large."""
        norm = compat.kernel_rms_norm_of(self.k_norm)
        rope = compat.kernel_rope_of(self.rotary_emb)
        if norm is None or rope is None:
            self.context_kernels = None
            return False
        cache = self.rotary_emb.cos_sin_cache
        if cache.dtype != dtype:
            if id(cache) not in caches:
                caches[id(cache)] = cache.to(dtype)
            cache = caches[id(cache)]
        self.context_kernels = ContextKeyKernels(*norm, cache, *rope)
        return True

    def _norm_heads(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # x: [T, heads * head_dim] -> per-head RMSNorm -> same shape
        return norm(x.view(*x.shape[:-1], -1, self.head_dim)).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [T, d] (T = B*Q block tokens) -> [T, d]
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self._norm_heads(q, self.q_norm)
        k = self._norm_heads(k, self.k_norm)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        out, _ = self.o_proj(out)
        return out

    def context_kv(
        self, kv: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish K/V of context tokens from their projection ``kv`` [N, 2*kv].

        Returns K, V as [N, kv_heads, head_dim], K normed and rotated at the
        context tokens' own positions (as the block's own keys are).
        """
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        shape = (-1, self.num_kv_heads, self.head_dim)
        kernels = self.context_kernels
        if kernels is None:
            k = self._norm_heads(k.contiguous(), self.k_norm)
            k, _ = self.rotary_emb(positions, k, None)
            return k.reshape(shape), v.reshape(shape)
        # Outside the compiled block forward the modules run their PyTorch
        # references (about 15 small kernels a layer, in every CUDA graph of
        # the step); vLLM's kernels do it in two.
        # [N, kv] -> [N * kv_heads, head_dim] -> normed -> [N, kv] -> RoPE
        k = compat.rms_norm_kernel(
            k.contiguous().view(-1, self.head_dim), kernels.norm_weight, kernels.eps
        ).view(-1, self.kv_size)
        compat.rope_keys_kernel(
            positions,
            k,
            kernels.cos_sin_cache,
            kernels.head_size,
            kernels.is_neox_style,
        )
        return k.view(shape), v.reshape(shape)


class DFlashMLP(nn.Module):
    """Gated MLP: SwiGLU (Qwen3 drafters) or GELU-tanh (Gemma drafters)."""

    def __init__(self, cfg: DFlashDraftConfig, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = compat.MergedColumnParallelLinear(
            cfg.hidden_size,
            [cfg.intermediate_size] * 2,
            bias=False,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = compat.RowParallelLinear(
            cfg.intermediate_size,
            cfg.hidden_size,
            bias=False,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = (
            compat.SiluAndMul()
            if cfg.hidden_act == "silu"
            else compat.GeluAndMul(approximate="tanh")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class DFlashDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: DFlashDraftConfig,
        hf_config: Any,
        index: int,
        *,
        cache_config: Any,
        attn_prefix: str,
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_layernorm = compat.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(
            cfg,
            hf_config,
            cfg.layers[index],
            cache_config=cache_config,
            prefix=attn_prefix,
        )
        self.post_attention_layernorm = compat.RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps
        )
        self.mlp = DFlashMLP(cfg, prefix=f"{prefix}.mlp")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Pre-norm block; vLLM's RMSNorm(x, residual) fuses the residual add.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


@compat.compile_drafter
class DFlashBody(nn.Module):
    """The draft layers over one block; compiled and CUDA-graphed by vLLM."""

    def __init__(self, *, vllm_config: compat.VllmConfig, prefix: str = "") -> None:
        super().__init__()
        spec = vllm_config.speculative_config
        assert spec is not None
        hf_config = spec.draft_model_config.hf_config
        cfg = draft_config_of(vllm_config)
        # vLLM's Attention falls back to cache_config.sliding_window (the
        # target's model-wide window) for a layer given no window of its own:
        # the drafter's full layers would silently become windowed.
        cache_config = copy.copy(vllm_config.cache_config)
        cache_config.sliding_window = None
        # Attention layers are named after the target's last layer so their KV
        # cache names never collide with the target's ("model.layers.{L+i}").
        first = vllm_config.model_config.get_total_num_hidden_layers()
        self.layers = nn.ModuleList(
            DFlashDecoderLayer(
                cfg,
                hf_config,
                i,
                cache_config=cache_config,
                attn_prefix=f"{prefix}.layers.{first + i}.self_attn".lstrip("."),
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = compat.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.embed_scale = cfg.embed_scale
        # The target's embedding module, bound after loading (not owned).
        self.embed_tokens: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, d]
        assert self.embed_tokens is not None, "bind_target() was not called"
        # The target's raw embedding table (vLLM's Gemma models scale in their
        # forward, not in embed_tokens): the drafter's scale applies once, here.
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            hidden = hidden * self.embed_scale
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DFlashDraftModel(nn.Module):
    """vLLM model class for ``architectures: ["DFlashDraftModel"]``."""

    def __init__(self, *, vllm_config: compat.VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if getattr(vllm_config, "use_v2_model_runner", False) and not (
            patching.v2_speculator_available()
        ):
            raise DFlashConfigError(
                "VLLM_USE_V2_MODEL_RUNNER",
                "1",
                "vllm-dflash's V2-runner speculator is written for vLLM 0.26's "
                "interface, which this release changed; set "
                "VLLM_USE_V2_MODEL_RUNNER=0 (or VLLM_DFLASH_USE_NATIVE=1 for "
                "vLLM's native DFlash on V2).",
            )
        self.dflash_config = draft_config_of(vllm_config)
        cfg = self.dflash_config
        self.model = DFlashBody(
            vllm_config=vllm_config, prefix=f"{prefix}.model".lstrip(".")
        )
        self.fc = compat.ReplicatedLinear(
            cfg.fc_input_size, cfg.hidden_size, bias=False, prefix=f"{prefix}.fc"
        )
        self.hidden_norm = compat.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self._target_logits: Any = None
        # Raw lm_head logits (no cap, no scale) for drafters whose own logit
        # conventions differ from the target's; see compute_logits.
        self._raw_logits = compat.LogitsProcessor(cfg.vocab_size)
        self._lm_head: nn.Module | None = None
        # [n_layers * 2 * kv, d]: every layer's K/V projection stacked, so the
        # context projection is one GEMM. Built lazily after weights exist.
        self._ctx_kv_weight: torch.Tensor | None = None
        self._ctx_kv_bias: torch.Tensor | None = None
        self._ctx_kv_stacked: bool | None = None
        # (weight, eps) of hidden_norm for vLLM's RMSNorm kernel; None: the
        # module. Chosen with the layers' key kernels (_prepare_context).
        self._hidden_norm_kernel: tuple[torch.Tensor, float] | None = None

    # -- wiring to the target ---------------------------------------------
    def bind_target(self, target: nn.Module) -> None:
        """Use the target language model's embeddings and logits."""
        inner = getattr(target, "model", target)
        embed = getattr(inner, "embed_tokens", None) or getattr(
            inner, "embedding", None
        )
        get_input_embeddings = getattr(inner, "get_input_embeddings", None)
        if embed is None and callable(get_input_embeddings):
            embed = get_input_embeddings()  # vLLM's Transformers backend
        if embed is None:
            raise DFlashConfigError(
                "target model",
                type(target).__name__,
                "DFlash needs the target's input embedding module "
                "(model.embed_tokens); this architecture does not expose it.",
            )
        self.model.embed_tokens = embed
        processor = getattr(target, "logits_processor", None)
        cfg = self.dflash_config
        if uses_target_logits(
            cfg,
            getattr(processor, "soft_cap", None),
            float(getattr(processor, "scale", 1.0)),
        ):
            self._target_logits = target.compute_logits
            return
        lm_head = getattr(target, "lm_head", None)
        if lm_head is None:
            raise DFlashConfigError(
                "final_logit_softcapping/output_multiplier",
                (cfg.final_logit_softcapping, cfg.output_multiplier),
                f"The drafter's own logit conventions need the target's lm_head; "
                f"{type(target).__name__} does not expose one.",
            )
        self._lm_head = lm_head

        def own_logits(hidden: torch.Tensor) -> torch.Tensor:
            raw = self._raw_logits(lm_head, hidden)
            return apply_logit_conventions(
                raw, cfg.output_multiplier, cfg.final_logit_softcapping
            )

        self._target_logits = own_logits

    @property
    def uses_own_logits(self) -> bool:
        return self._lm_head is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [M, d] -> logits [M, vocab] through the target's lm_head:
        # with the target's logits processor (its soft cap and scale) when
        # that matches the drafter's conventions, else raw logits with the
        # drafter's multiplier and soft cap (bind_target decides).
        return self._target_logits(hidden)

    # -- context K/V --------------------------------------------------------
    def _attn_layers(self) -> list[DFlashAttention]:
        layers: list[DFlashDecoderLayer] = list(self.model.layers)  # type: ignore[arg-type]
        return [layer.self_attn for layer in layers]

    def _prepare_context(self, dtype: torch.dtype) -> None:
        """Once weights exist (at the first context write, the memory-profiling
        run, before any CUDA graph is captured): stack the K/V projections and
        choose vLLM's kernels for the norms and RoPE where they compute what
        the modules do."""
        self._stack_kv_projections()
        self._hidden_norm_kernel = compat.kernel_rms_norm_of(self.hidden_norm)
        caches: dict[int, Any] = {}
        fused = [a.use_context_kernels(dtype, caches) for a in self._attn_layers()]
        logger.debug(
            "vllm-dflash: context path with vLLM's norm/RoPE kernels: hidden_norm "
            "%s, layers %s",
            self._hidden_norm_kernel is not None,
            fused,
        )

    def _stack_kv_projections(self) -> None:
        """Stack every layer's K/V projection into one weight, when the weights
        are plain matrices. Quantized or repacked weights (vLLM's CPU linear
        packs them for oneDNN, leaving ``.weight`` unusable) keep the per-layer
        path through each layer's own linear method."""
        attns = self._attn_layers()
        weights = [a.qkv_proj.weight for a in attns]
        plain = all(
            w.dim() == 2 and w.shape[0] == a.q_size + 2 * a.kv_size
            for a, w in zip(attns, weights, strict=True)
        )
        self._ctx_kv_stacked = plain
        if not plain:
            return
        self._ctx_kv_weight = torch.cat(
            [w[a.q_size :] for a, w in zip(attns, weights, strict=True)], dim=0
        )
        biases = [a.qkv_proj.bias for a in attns]
        self._ctx_kv_bias = (
            None
            if biases[0] is None
            else torch.cat(
                [b[a.q_size :] for a, b in zip(attns, biases, strict=True)], dim=0
            )
        )

    def _context_projections(self, ctx: torch.Tensor) -> list[torch.Tensor]:
        # ctx: [N, d] -> per layer [N, 2*kv] (K then V)
        attns = self._attn_layers()
        if self._ctx_kv_weight is not None:
            # One GEMM for all layers: [N, n_layers * 2 * kv]
            all_kv = torch.nn.functional.linear(
                ctx, self._ctx_kv_weight, self._ctx_kv_bias
            )
            return list(all_kv.chunk(len(attns), dim=-1))
        return [a.qkv_proj(ctx)[0][:, a.q_size :] for a in attns]

    def fuse_context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        # [N, n*d_target] -> fc -> hidden_norm -> [N, d]
        fused, _ = self.fc(target_hidden)
        if self._hidden_norm_kernel is None:
            return self.hidden_norm(fused)
        return compat.rms_norm_kernel(fused, *self._hidden_norm_kernel)

    def store_context_kv(
        self,
        target_hidden: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> None:
        """Project captured target features to every layer's K/V and write them
        into the draft KV cache at ``slot_mapping`` [N] (one tensor for all
        layers, or one per layer when the layers sit in different KV cache
        groups; None: compute only, as in memory profiling)."""
        if self._ctx_kv_stacked is None:
            self._prepare_context(target_hidden.dtype)
        attns = self._attn_layers()
        if slot_mapping is None or isinstance(slot_mapping, torch.Tensor):
            slots: Sequence[torch.Tensor | None] = [slot_mapping] * len(attns)
        else:
            slots = slot_mapping
        ctx = self.fuse_context(target_hidden)
        for attn, kv, layer_slots in zip(
            attns, self._context_projections(ctx), slots, strict=True
        ):
            k, v = attn.context_kv(kv, positions)
            if layer_slots is not None:
                compat.kv_cache_update(attn.attn, k, v, layer_slots)

    # -- weights ------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a published-format checkpoint; every tensor must be present."""
        expected = checkpoint_tensor_shapes(self.dflash_config)
        params = dict(self.named_parameters())
        seen: set[str] = set()
        ignored: list[str] = []
        for name, tensor in weights:
            if name.startswith(_TARGET_OWNED):
                ignored.append(name)
                continue
            if name not in expected:
                ignored.append(name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise DFlashConfigError(
                    f"checkpoint tensor {name}",
                    tuple(tensor.shape),
                    f"Expected shape {expected[name]} from the drafter's "
                    "config.json; the checkpoint and its config disagree.",
                )
            self._load_one(params, name, tensor)
            seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise DFlashConfigError(
                "drafter checkpoint",
                f"{len(missing)} missing tensors, e.g. {missing[:4]}",
                "The checkpoint lacks tensors its config.json implies; re-export "
                "the drafter (tensor names: fc, hidden_norm, layers.{i}.*, norm).",
            )
        if ignored:
            logger.info("vllm-dflash: ignored checkpoint tensors %s", ignored[:8])
        self._ctx_kv_weight = self._ctx_kv_bias = None
        self._ctx_kv_stacked = None
        return set(params)

    @staticmethod
    def _load_one(
        params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor
    ) -> None:
        target = name if name.startswith(("fc.", "hidden_norm.")) else "model." + name
        for part, (fused, shard) in _STACKED.items():
            if part in target:
                param = params[target.replace(part, fused)]
                param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]
                return
        param = params[target]
        loader = getattr(param, "weight_loader", compat.default_weight_loader)
        loader(param, tensor)

    # -- introspection used by the proposer --------------------------------
    def attention_layer_names(self) -> list[str]:
        return [a.attn.layer_name for a in self._attn_layers()]

    def attention_layer_causal(self) -> dict[str, bool]:
        """Each draft attention layer's causality (vLLM layer name -> causal)."""
        return {a.attn.layer_name: a.causal for a in self._attn_layers()}
