"""Every import of a vLLM internal lives here.

Anything beyond vLLM's documented plugin API (``ModelRegistry``, the
``vllm.general_plugins`` entry point) is imported in this module and nowhere
else, so a vLLM upgrade touches one file. Shims test for a feature (a class,
an argument, a dataclass field), never a version string.

This module is heavy (it imports vLLM's layers and spec-decode machinery):
only the worker process imports it, through ``model`` and ``proposer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

# --- configuration and context -------------------------------------------
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger

# --- layers used by the drafter --------------------------------------------
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, get_rope
from vllm.model_executor.model_loader.utils import get_model_architecture
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

# --- vLLM's own RMSNorm and RoPE kernels (CUDA and CPU builds) -------------
try:
    from vllm import _custom_ops as _ops

    HAS_NORM_ROPE_KERNELS = hasattr(_ops, "rms_norm") and hasattr(
        _ops, "rotary_embedding"
    )
except ImportError:  # pragma: no cover - a build without compiled ops
    _ops = None
    HAS_NORM_ROPE_KERNELS = False

# --- target models: the EAGLE-3 aux-hidden-state interface ------------------
from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

# --- Triton (a placeholder module on CPU builds) ----------------------------
from vllm.triton_utils import HAS_TRITON, tl, triton

# --- attention backends and metadata ---------------------------------------
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum

# --- KV cache groups (drafters whose layers span several groups) ----------
from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

# --- spec-decode machinery the proposer builds on (method-agnostic) --------
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID
from vllm.v1.worker.utils import AttentionGroup

try:  # vLLM >= 0.26 spells the compile decorator's module like this
    from vllm.compilation.decorators import support_torch_compile
except ImportError:  # pragma: no cover - every supported release has it
    support_torch_compile = None  # type: ignore[assignment]

try:
    from vllm.config import get_layers_from_vllm_config
except ImportError:  # pragma: no cover
    from vllm.config.vllm import get_layers_from_vllm_config  # type: ignore

# --- the V2 model runner (vllm/v1/worker/gpu/) -----------------------------
# Its speculator interface changes between releases; the plugin's V2
# speculator is written against the 0.26 shape, checked by
# ``patching.v2_speculator_available`` (a feature test, not a version string).
try:
    from vllm.compilation.backends import set_model_tag
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor
    from vllm.model_executor.model_loader import get_model
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.worker.gpu.attn_utils import (
        build_attn_metadata,
        build_slot_mappings_by_layer,
    )
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
    from vllm.v1.worker.gpu.dp_utils import dispatch_cg_and_sync_dp
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator
except ImportError:  # pragma: no cover - releases without the V2 runner
    DraftModelSpeculator = object  # type: ignore[assignment,misc]

__all__ = [
    "HAS_NORM_ROPE_KERNELS",
    "HAS_TRITON",
    "PADDING_SLOT_ID",
    "Attention",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionLayerBase",
    "BatchDescriptor",
    "CUDAGraphMode",
    "CommonAttentionMetadata",
    "CudaGraphManager",
    "DraftModelSpeculator",
    "GeluAndMul",
    "InputBatch",
    "LogitsProcessor",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RowParallelLinear",
    "SiluAndMul",
    "SpecDecodeBaseProposer",
    "SupportsEagle3",
    "VllmConfig",
    "build_attn_metadata",
    "build_slot_mappings_by_layer",
    "compile_drafter",
    "default_weight_loader",
    "dispatch_cg_and_sync_dp",
    "get_current_vllm_config",
    "get_layers_from_vllm_config",
    "get_model",
    "get_model_architecture",
    "get_rope",
    "init_logger",
    "kernel_rms_norm_of",
    "kernel_rope_of",
    "kv_cache_update",
    "rms_norm_kernel",
    "rope_keys_kernel",
    "rope_kwargs",
    "sample_draft_tokens",
    "set_forward_context",
    "set_model_tag",
    "supports_eagle3",
    "tl",
    "triton",
    "with_block_metadata",
]


def compile_drafter(cls: type) -> type:
    """Apply vLLM's ``support_torch_compile`` so CUDA graphs can capture the
    drafter's block forward (vLLM's drafter graphs are piecewise: they need
    the compiled graph)."""
    if support_torch_compile is None:  # pragma: no cover
        return cls
    # Explicit dims: string annotations hide the tensor types from inference.
    return support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})(cls)


def rope_kwargs(hf_config: Any, head_dim: int) -> dict[str, Any]:
    """Arguments for ``get_rope`` (vLLM >= 0.26 takes ``rope_parameters``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    params.setdefault("rope_type", "default")
    params["rope_theta"] = 1_000_000.0 if theta is None else float(theta)
    max_pos = int(getattr(hf_config, "max_position_embeddings", 32768))
    return dict(head_size=head_dim, max_position=max_pos, rope_parameters=params)


def kernel_rms_norm_of(norm: Any) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an ``RMSNorm`` that vLLM's ``rms_norm`` kernel computes
    exactly (a weight, the variance over the whole row); None otherwise."""
    if not HAS_NORM_ROPE_KERNELS or type(norm) is not RMSNorm:
        return None
    if not getattr(norm, "has_weight", True):
        return None
    if getattr(norm, "variance_size_override", None) is not None:
        return None
    return norm.weight, float(norm.variance_epsilon)


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's fused RMSNorm over the last dim of a contiguous ``x``: one
    kernel, where the ``RMSNorm`` module outside a compiled graph runs its
    PyTorch reference (about six kernels)."""
    assert _ops is not None
    x = x.contiguous()
    out = torch.empty_like(x)
    _ops.rms_norm(out, x, weight, eps)
    return out


def kernel_rope_of(rope: Any) -> tuple[int, bool] | None:
    """(head_size, is_neox_style) of a rotary embedding that vLLM's
    ``rotary_embedding`` kernel computes exactly: the base ``RotaryEmbedding``
    forward over its cos/sin cache (scaled variants such as YaRN, Llama 3 or
    Gemma 4's proportional RoPE only change that cache); None for classes with
    their own forward (M-RoPE and the like) or with FlashInfer's RoPE."""
    if not HAS_NORM_ROPE_KERNELS or not isinstance(rope, RotaryEmbedding):
        return None
    cls = type(rope)
    for name in ("forward_static", "forward_native", "forward_cuda", "forward_cpu"):
        if getattr(cls, name, None) is not getattr(RotaryEmbedding, name, None):
            return None
    if getattr(rope, "use_flashinfer", False):
        return None
    return int(rope.head_size), bool(rope.is_neox_style)


def rope_keys_kernel(
    positions: torch.Tensor,
    keys: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox_style: bool,
) -> None:
    """Rotate ``keys`` [N, heads * head_size] in place at ``positions`` [N]
    (int64) with vLLM's RoPE kernel; ``cos_sin_cache`` in ``keys``' dtype.
    Keys are passed as the kernel's query (its key argument is None), and as
    a 2-D tensor: the CPU kernel reads the head count from the last dim."""
    assert _ops is not None
    _ops.rotary_embedding(
        positions, keys, None, head_size, cos_sin_cache, is_neox_style
    )


def with_block_metadata(
    cad: CommonAttentionMetadata, **changes: Any
) -> CommonAttentionMetadata:
    """New attention metadata for a draft block, built from the target's.

    Required fields not in ``changes`` (the block table) are kept; optional
    ones not in ``changes`` fall back to their defaults, because they describe
    the target's tokens (CPU mirrors of sequence lengths, prefill flags).
    Fields in ``changes`` that this release lacks are dropped.
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cad):
        if not f.init:
            continue
        if f.name in changes:
            kwargs[f.name] = changes[f.name]
        elif f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        ):
            kwargs[f.name] = getattr(cad, f.name)
    return type(cad)(**kwargs)


def kv_cache_update(
    attn: Any, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value`` [N, kv_heads, head_dim] into one attention
    layer's paged KV cache at ``slot_mapping`` [N] (negative slots skipped)."""
    attn.impl.do_kv_cache_update(attn, key, value, attn.kv_cache, slot_mapping)


# --- several draft KV cache groups -------------------------------------------
# A drafter whose layers mix sliding-window and full attention lands in
# several KV cache groups (each with its own block table and slot mapping);
# vLLM's base proposer assumes one. These helpers are the whole interface the
# plugin uses for that case.


def kv_cache_group_ids(kv_cache_config: Any, layer_names: Any) -> dict[str, int]:
    """Layer name -> index of its group in ``kv_cache_config.kv_cache_groups``."""
    wanted = set(layer_names)
    return {
        name: gid
        for gid, group in enumerate(kv_cache_config.kv_cache_groups)
        for name in group.layer_names
        if name in wanted
    }


def make_attention_group(
    vllm_config: VllmConfig,
    device: torch.device,
    backend: type,
    layer_names: list[str],
    kv_cache_config: Any,
    gid: int,
    kernel_block_sizes: list[int] | None,
) -> AttentionGroup:
    """An attention group (one metadata builder) for draft layers of KV cache
    group ``gid``, as the runner builds them for the target's layers."""
    spec = kv_cache_config.kv_cache_groups[gid].kv_cache_spec
    if isinstance(spec, UniformTypeKVCacheSpecs):
        spec = spec.kv_cache_specs[layer_names[0]]
    group = AttentionGroup(
        backend=backend,
        layer_names=list(layer_names),
        kv_cache_spec=spec,
        kv_cache_group_id=gid,
    )
    kernel_block_size = (
        kernel_block_sizes[gid]
        if kernel_block_sizes is not None and gid < len(kernel_block_sizes)
        else None
    )
    group.create_metadata_builders(
        vllm_config, device, kernel_block_size=kernel_block_size
    )
    return group


def build_for_drafting(group: AttentionGroup, cad: CommonAttentionMetadata) -> Any:
    """Attention metadata of one draft forward for ``group``."""
    build = getattr(group, "build_metadata_for_drafting", None)
    if build is not None:  # newer releases (0.32): maps kernel block tables too
        return build(cad, 0)
    return group.get_metadata_builder().build_for_drafting(
        common_attn_metadata=cad, draft_index=0
    )


def runner_block_table(
    runner: Any, gid: int, num_reqs: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """KV cache group ``gid``'s block table in the V1 runner's input batch:
    (device table [num_reqs, blocks], tokens per table entry, slot mapping
    buffer whose first N entries are this step's N scheduled tokens). Slots
    are computed in the table's own unit, ``block_size`` (kernel blocks on
    0.26, allocation blocks on 0.32)."""
    table = runner.input_batch.block_table[gid]
    return (
        table.get_device_tensor(num_reqs),
        int(table.block_size),
        table.slot_mapping.gpu,
    )


def sample_draft_tokens(
    proposer: Any, hidden: torch.Tensor, sampling_metadata: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft ids [M] for ``hidden`` [M, d], and their probabilities [M, vocab]
    when vLLM samples drafts probabilistically (None: greedy drafts).

    vLLM 0.20's ``SpecDecodeBaseProposer`` has no ``_sample_draft_tokens``
    and always drafts greedily (``_greedy_sample``).
    """
    sample = getattr(proposer, "_sample_draft_tokens", None)
    if sample is None:
        return proposer._greedy_sample(hidden), None
    drafts, probs = sample(hidden, sampling_metadata)
    return drafts, probs


@contextlib.contextmanager
def drafting_lengths_only(vllm_config: Any) -> Iterator[None]:
    """Keep only the K > 0 entries of a dynamic-K schedule
    (``num_speculative_tokens_per_batch_size``) while the drafter's CUDA-graph
    manager is built. vLLM 0.26's manager plans decode graphs for every K the
    schedule names (query length K + 1), which is what the drafter needs: its
    block for K drafts is K + 1 long. A step with K = 0 drafts nothing, so it
    needs no graph (a schedule of only zeros plans the longest block)."""
    spec: Any = getattr(vllm_config, "speculative_config", None)
    schedule = getattr(spec, "num_speculative_tokens_per_batch_size", None)
    if schedule is None:
        yield
        return
    spec.num_speculative_tokens_per_batch_size = [
        entry for entry in schedule if entry[2] > 0
    ] or None
    try:
        yield
    finally:
        spec.num_speculative_tokens_per_batch_size = schedule
