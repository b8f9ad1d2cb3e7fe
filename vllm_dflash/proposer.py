"""vllm-dflash's proposer: one non-causal block forward per decoding step.

The V1 model runner builds its drafter from the module-level name
``DFlashProposer`` (``registration`` points that name here) and then drives it
through the generic speculative-decoding interface. This class inherits only
vLLM's method-agnostic machinery (``SpecDecodeBaseProposer``: buffers, CUDA
graph dispatch, attention-group setup, next-token bookkeeping) and implements
DFlash itself: context K/V injection, the block, and greedy drafting.

Per step, for B requests with K drafts (block length Q = K + 1; K is what
the scheduler asked for this step, at most ``num_speculative_tokens``):

    1. context   fused target features of every scheduled token -> K/V
                 written into every draft layer's cache at those tokens' slots
    2. block     ids [B, Q] = [next token, MASK x K] at positions
                 p+1 .. p+Q, where p is the last *accepted* position
    3. forward   one pass; queries see cached context (trimmed to the accepted
                 length) plus the whole block (non-causal)
    4. drafts    argmax of the target lm_head at slots 1..K -> [B, K]

Draft layers that sit in different KV cache groups (sliding-window layers
beside full ones: Gemma-4 drafters) get metadata per group, each with its
block table, slots and causality; see ``initialize_attn_backend``.

Nothing here synchronises with the host: every index is computed on device.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch.profiler import record_function

from vllm_dflash import adaptive, backend, capture, compat, patching, startup
from vllm_dflash.config import DFlashConfigError, DFlashDraftConfig
from vllm_dflash.log import get_logger
from vllm_dflash.model import DFlashDraftModel

logger = get_logger(__name__)


@dataclasses.dataclass
class _DraftGroup:
    """Draft layers that share one attention-metadata build: the same KV
    cache group (block table, slot mapping), backend and causality."""

    attn: Any  # vLLM's AttentionGroup
    kv_group: int
    causal: bool


@dataclasses.dataclass
class ProposerStats:
    """Counters of what this proposer did; read by tests and benchmarks."""

    steps: int = 0
    draft_tokens: int = 0
    context_tokens: int = 0
    # Blocks drafted (one per request per step) and the positions run
    # through the drafter for them (B x Q summed over steps): K drafts per
    # request cost K + 1 positions, whatever num_speculative_tokens.
    blocks: int = 0
    block_tokens: int = 0


class DFlashProposer(compat.SpecDecodeBaseProposer):
    """The plugin's DFlash proposer (a drop-in for vLLM's V1 runner)."""

    implementation = "vllm-dflash"
    draft_attn_groups: list[Any]  # set by initialize_attn_backend

    def __init__(
        self, vllm_config: compat.VllmConfig, device: torch.device, runner: Any = None
    ):
        spec = vllm_config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        self.draft_config = prepare_draft_config(vllm_config)
        super().__init__(
            vllm_config=vllm_config,
            device=device,
            pass_hidden_states_to_model=True,
            runner=runner,
        )
        self.stats = ProposerStats()
        self.block_len = self.num_speculative_tokens + 1  # the longest block
        self._offsets = torch.arange(self.block_len, device=device, dtype=torch.int64)
        self._block_causal = not self.draft_config.any_non_causal
        self._backend = backend.resolve(spec, needs_non_causal=not self._block_causal)
        self._runner = runner
        # None: every draft layer in one KV cache group with one mask (the
        # base class's single attention group). Otherwise one entry per
        # (KV cache group, backend, causality); see initialize_attn_backend.
        self._groups: list[_DraftGroup] | None = None
        self._group_slot_buffers: dict[int, torch.Tensor] = {}

    # -- construction -------------------------------------------------------
    def _create_draft_vllm_config(self) -> compat.VllmConfig:
        # Never the target's backend: vLLM 0.20's base config keeps it (a
        # TRITON_ATTN target would give a drafter that cannot run the block).
        return with_draft_attention(
            text_only(super()._create_draft_vllm_config()),
            self._block_causal,
            self._backend,
            inherit_backend=False,
        )

    def _raise_if_multimodal(self) -> None:
        # vLLM 0.20's base refuses multimodal targets (Gemma 4) for drafters
        # with extra input slots; the plugin drafts from text tokens only.
        pass

    def load_model(self, target_model: torch.nn.Module) -> None:
        layers_of = compat.get_layers_from_vllm_config
        base_cls = compat.AttentionLayerBase
        target_layers = set(layers_of(self.vllm_config, base_cls))  # type: ignore[type-abstract]
        with patching.drafter_attention(non_causal=not self._block_causal):
            self.model = self._get_model()
        attach_to_target(self.model, target_model, self.num_speculative_tokens)
        all_layers = layers_of(self.vllm_config, base_cls)  # type: ignore[type-abstract]
        self._draft_attn_layer_names = {
            name
            for name in set(all_layers) - target_layers
            if all_layers[name].get_kv_cache_spec(self.vllm_config) is not None
        }

    def initialize_attn_backend(
        self, kv_cache_config: Any, kernel_block_sizes: Any = None
    ) -> None:
        causal_of = self.model.attention_layer_causal()
        gid_of = compat.kv_cache_group_ids(kv_cache_config, causal_of)
        if len(set(gid_of.values())) <= 1 and len(set(causal_of.values())) <= 1:
            # The common case: one KV cache group, one mask for every layer.
            self._groups = None
            super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
            if not self._block_causal:
                for group in self.draft_attn_groups:
                    backend.check_non_causal(group.backend.get_name(), group.backend)
            return
        # Per-group block tables and slots are read from the runner's batch.
        assert self._runner is not None, "DFlashProposer needs its model runner"
        self._groups = self._build_groups(
            kv_cache_config, kernel_block_sizes, gid_of, causal_of
        )
        self.draft_attn_groups = [g.attn for g in self._groups]
        # The runner hands propose() the attention metadata of this group.
        self.kv_cache_gid = self._groups[0].kv_group
        self.block_size = self._groups[0].attn.kv_cache_spec.block_size
        for group in self._groups:
            if not group.causal:
                name = group.attn.backend.get_name()
                backend.check_non_causal(name, group.attn.backend)
            self._group_slot_buffers.setdefault(
                group.kv_group, torch.zeros_like(self._slot_mapping_buffer)
            )
        logger.info(
            "vllm-dflash: draft layers span %d attention groups "
            "(KV cache group, causal): %s",
            len(self._groups),
            [(g.kv_group, g.causal) for g in self._groups],
        )

    def _build_groups(
        self,
        kv_cache_config: Any,
        kernel_block_sizes: Any,
        gid_of: dict[str, int],
        causal_of: dict[str, bool],
    ) -> list[_DraftGroup]:
        """One attention group per (KV cache group, backend, causality).

        Sliding-window draft layers have their own KV cache spec, so the
        hybrid KV cache manager puts them in other groups than the full
        layers (own block table, own slot mapping); with that manager off
        they share a group but still differ in causality. Either way each
        layer's metadata must carry its own block table and mask: a wrong
        mask or table raises nothing, acceptance just drops.
        """
        layers = compat.get_layers_from_vllm_config(
            self.vllm_config,
            compat.AttentionLayerBase,  # type: ignore[type-abstract]
        )
        buckets: dict[tuple[int, str, bool], list[str]] = {}
        for name in sorted(causal_of):  # sorted: same order in every process
            key = (
                gid_of[name],
                layers[name].get_attn_backend().full_cls_name(),
                causal_of[name],
            )
            buckets.setdefault(key, []).append(name)
        return [
            _DraftGroup(
                attn=compat.make_attention_group(
                    self.vllm_config,
                    self.device,
                    layers[names[0]].get_attn_backend(),
                    names,
                    kv_cache_config,
                    gid,
                    kernel_block_sizes,
                ),
                kv_group=gid,
                causal=causal,
            )
            for (gid, _, causal), names in sorted(buckets.items())
        ]

    # -- the step ----------------------------------------------------------
    @torch.inference_mode()
    def propose(
        self,
        num_speculative_tokens: int | None = None,  # absent in vLLM 0.20's call
        *,
        target_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: compat.CommonAttentionMetadata,
        sampling_metadata: Any,
        mm_embed_inputs: Any = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings: Any = None,
    ) -> torch.Tensor:
        # target_hidden_states: [N, n*d] concatenated captured layers
        # next_token_ids: [B]; returns draft ids [B, k]
        cad = common_attn_metadata
        num_ctx = target_hidden_states.shape[0]
        positions = (
            target_positions if target_positions.dim() == 1 else target_positions[0]
        )
        self.model.store_context_kv(
            target_hidden_states, positions[:num_ctx], self._context_slots(cad, num_ctx)
        )
        self.stats.context_tokens += num_ctx
        batch = cad.num_reqs
        k = self.block_len - 1
        if num_speculative_tokens is not None:
            k = min(num_speculative_tokens, k)
        self._last_draft_probs = None
        if k == 0:
            adaptive.drafted()
            return torch.empty(batch, 0, dtype=torch.int64, device=self.device)

        # K drafts need a block of K + 1 positions, not the longest block:
        # with a dynamic K (adaptive or a per-batch-size schedule) a shorter
        # block is what makes a smaller K cheaper for the drafter too.
        q = k + 1
        num_block = batch * q
        mode, num_padded, across_dp = self._determine_batch_execution_and_padding(
            num_block
        )
        with record_function("dflash.prepare_block"):
            block_cad, pos = self._prepare_block(
                cad, next_token_ids, num_rejected_tokens_gpu, q
            )
            if self._groups is None:
                _, per_layer = self.build_per_group_and_layer_attn_metadata(block_cad)
                slot_mapping = self._get_slot_mapping(
                    num_padded, block_cad.slot_mapping
                )
            else:
                per_layer = self._group_attn_metadata(block_cad, pos, num_padded)
                slot_mapping = self._get_slot_mapping(num_padded)
        with (
            record_function("dflash.block_forward"),
            compat.set_forward_context(
                per_layer,
                self.vllm_config,
                num_tokens=num_padded,
                num_tokens_across_dp=across_dp,
                cudagraph_runtime_mode=mode,
                slot_mapping=slot_mapping,
            ),
        ):
            hidden = self.model(
                input_ids=self.input_ids[:num_padded],
                positions=self.positions[:num_padded],
            )
        # [B*Q, d] -> slots 1..k of every block -> [B*k, d]
        hidden = hidden[:num_block].view(batch, q, -1)[:, 1:]
        with record_function("dflash.sample"):
            drafts, probs = compat.sample_draft_tokens(
                self, hidden.reshape(batch * k, -1), sampling_metadata
            )
        if probs is not None:
            self._last_draft_probs = probs.view(batch, k, -1).contiguous()
        self.stats.steps += 1
        self.stats.draft_tokens += batch * k
        self.stats.blocks += batch
        self.stats.block_tokens += num_block
        adaptive.drafted()
        return drafts.view(batch, k)

    def _prepare_block(
        self,
        cad: compat.CommonAttentionMetadata,
        next_token_ids: torch.Tensor,
        num_rejected: torch.Tensor | None,
        q: int,
    ) -> tuple[compat.CommonAttentionMetadata, torch.Tensor]:
        """Fill the buffers with ``q``-position blocks' ids and positions;
        return their metadata (for the KV cache group of ``cad``) and the
        block positions [B, q]."""
        batch = cad.num_reqs
        # First block position = accepted length of each request: the
        # scheduled tokens the target rejected are excluded here and from
        # what the block attends to.
        accepted = cad.seq_lens[:batch].to(torch.int64)
        if num_rejected is not None:
            accepted = accepted - num_rejected[:batch]
        accepted = accepted.clamp_(min=0)
        pos = accepted[:, None] + self._offsets[:q]  # [B, q]

        ids = self.input_ids[: batch * q].view(batch, q)
        ids.fill_(self.draft_config.mask_token_id)
        ids[:, 0] = next_token_ids[:batch]
        self.positions[: batch * q] = pos.view(-1)

        upper = getattr(cad, "seq_lens_cpu_upper_bound", None)
        starts_cpu = torch.arange(batch + 1, dtype=torch.int32) * q
        block_cad = compat.with_block_metadata(
            cad,
            query_start_loc=self.arange[: batch + 1] * q,  # on device: no H2D copy
            query_start_loc_cpu=starts_cpu,
            seq_lens=(accepted + q).to(cad.seq_lens.dtype),
            seq_lens_cpu_upper_bound=None if upper is None else upper + q,
            num_actual_tokens=batch * q,
            max_query_len=q,
            max_seq_len=cad.max_seq_len + q,
            slot_mapping=block_slots(cad.block_table_tensor, self.block_size, pos),
            causal=self._block_causal,
        )
        return block_cad, pos

    # -- drafters whose layers span several KV cache groups ------------------
    def _context_slots(
        self, cad: compat.CommonAttentionMetadata, num_ctx: int
    ) -> torch.Tensor | list[torch.Tensor]:
        """Where the context tokens' K/V go: ``cad``'s slots for one group,
        else each layer's own group's slots (the runner computed them for
        every group when it scheduled these tokens)."""
        if self._groups is None:
            return cad.slot_mapping[:num_ctx]
        gid_of = {n: g.kv_group for g in self._groups for n in g.attn.layer_names}
        slots: dict[int, torch.Tensor] = {}
        for gid in set(gid_of.values()):
            _, _, group_slots = compat.runner_block_table(self._runner, gid, 0)
            slots[gid] = group_slots[:num_ctx]
        return [slots[gid_of[name]] for name in self.model.attention_layer_names()]

    def _group_attn_metadata(
        self,
        block_cad: compat.CommonAttentionMetadata,
        pos: torch.Tensor,
        num_padded: int,
    ) -> dict[str, Any]:
        """Per-layer metadata of the block for every draft group: its KV cache
        group's block table and slots, its own causality. Also fills each
        group's persistent slot buffer (padded with PADDING_SLOT_ID)."""
        assert self._groups is not None
        batch, n = block_cad.num_reqs, block_cad.num_actual_tokens
        per_layer: dict[str, Any] = {}
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in self._groups:
            gid = group.kv_group
            if gid not in tables:
                table, block_size, _ = compat.runner_block_table(
                    self._runner, gid, batch
                )
                slots = block_slots(table, block_size, pos)
                buffer = self._group_slot_buffers[gid]
                buffer[:n].copy_(slots)
                buffer[n:num_padded].fill_(compat.PADDING_SLOT_ID)
                tables[gid] = (table, buffer[:n])
            group_cad = copy.copy(block_cad)
            group_cad.block_table_tensor, group_cad.slot_mapping = tables[gid]
            group_cad.causal = group.causal
            metadata = compat.build_for_drafting(group.attn, group_cad)
            for name in group.attn.layer_names:
                per_layer[name] = metadata
        return per_layer

    def _get_slot_mapping(
        self, num_tokens: int, slot_mapping: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if self._groups is None:
            return super()._get_slot_mapping(num_tokens, slot_mapping)
        # Persistent per-group buffers (stable addresses for CUDA graphs).
        return {
            name: self._group_slot_buffers[group.kv_group][:num_tokens]
            for group in self._groups
            for name in group.attn.layer_names
        }

    # -- profiling and CUDA-graph capture ----------------------------------
    @torch.inference_mode()
    def dummy_run(
        self,
        num_tokens: int,
        use_cudagraphs: bool = True,
        is_graph_capturing: bool = False,
        slot_mappings: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """One block forward (and, when profiling, the context projection)."""
        num_block = min(num_tokens, self.max_batch_size * self.block_len)
        mode, num_padded, across_dp = self._determine_batch_execution_and_padding(
            num_block, use_cudagraphs=use_cudagraphs
        )
        if not is_graph_capturing:
            width = self.draft_config.fc_input_size
            features = torch.zeros(
                num_tokens, width, dtype=self.dtype, device=self.device
            )
            self.model.store_context_kv(features, self.positions[:num_tokens], None)
        names = self._draft_attn_layer_names
        if names and slot_mappings is not None and next(iter(names)) in slot_mappings:
            slot_mapping = self._get_slot_mapping(num_padded)
        else:
            slot_mapping = slot_mappings or {}
        with compat.set_forward_context(
            None,
            self.vllm_config,
            num_tokens=num_padded,
            num_tokens_across_dp=across_dp,
            cudagraph_runtime_mode=mode,
            slot_mapping=slot_mapping,
        ):
            self.model(
                input_ids=self.input_ids[:num_padded],
                positions=self.positions[:num_padded],
            )


def block_slots(
    table: torch.Tensor, block_size: int, pos: torch.Tensor
) -> torch.Tensor:
    """KV cache slots [B*Q] of block positions ``pos`` [B, Q] in the paged
    cache that ``table`` [>=B, blocks] (in units of ``block_size`` tokens)
    describes."""
    table = table[: pos.shape[0]]
    block_idx = (pos // block_size).clamp_(max=table.shape[1] - 1)
    slots = table.gather(1, block_idx).to(torch.int64) * block_size
    return (slots + pos % block_size).view(-1)


def prepare_draft_config(vllm_config: compat.VllmConfig) -> DFlashDraftConfig:
    """The start-up checks (``startup.prepare_draft_config``) plus those that
    need vLLM's model classes, which only the worker imports."""
    capture.check_target(vllm_config)
    return startup.prepare_draft_config(vllm_config)


def with_draft_attention(
    draft_vllm_config: compat.VllmConfig,
    block_causal: bool,
    backend_name: str | None,
    *,
    inherit_backend: bool = True,
) -> compat.VllmConfig:
    """The drafter's config: attention chosen for the block, not the target.

    With no ``backend_name``, ``inherit_backend=False`` lets vLLM choose the
    drafter's backend instead of keeping the one in ``draft_vllm_config``.
    """
    changes: dict[str, Any] = {}
    if backend_name is not None or not inherit_backend:
        changes["backend"] = (
            None if backend_name is None else backend.backend_enum(backend_name)
        )
    fields = {f.name for f in dataclasses.fields(draft_vllm_config.attention_config)}
    if "use_non_causal" in fields:
        # Makes vLLM's selector pick a backend that can run the block (vLLM
        # 0.20 lacks the field: ``patching.patch_attention_selector``).
        changes["use_non_causal"] = not block_causal
    if not changes:
        return draft_vllm_config
    return dataclasses.replace(
        draft_vllm_config,
        attention_config=dataclasses.replace(
            draft_vllm_config.attention_config, **changes
        ),
    )


def text_only(draft_vllm_config: compat.VllmConfig) -> compat.VllmConfig:
    """The drafter's config without the target's multimodal-prefix flag.

    A target whose text attends bidirectionally over image tokens (Gemma 4:
    ``use_bidirectional_attention: "vision"``) makes every attention layer
    built under its model config ask for "mm prefix" support, which
    FLASH_ATTN lacks before FA4: the drafter, which never sees image spans,
    would be refused FLASH_ATTN. The target's own model config is not touched.
    """
    model_config = draft_vllm_config.model_config
    arch: Any = getattr(model_config, "model_arch_config", None)
    if not getattr(arch, "is_mm_prefix_lm", False):
        return draft_vllm_config
    text_model_config = copy.copy(model_config)
    text_model_config.model_arch_config = dataclasses.replace(
        arch, is_mm_prefix_lm=False
    )
    return dataclasses.replace(draft_vllm_config, model_config=text_model_config)


def attach_to_target(
    model: torch.nn.Module, target_model: torch.nn.Module, k: int
) -> DFlashDraftModel:
    """Check the built drafter and share the target's embeddings and logits."""
    if not isinstance(model, DFlashDraftModel):
        raise DFlashConfigError(
            "draft architectures",
            type(model).__name__,
            "vLLM built another class for the drafter; make sure its "
            'config.json says architectures: ["DFlashDraftModel"].',
        )
    language_model = target_model
    get_language_model = getattr(target_model, "get_language_model", None)
    if callable(get_language_model):
        language_model = get_language_model()
    model.bind_target(language_model)
    if language_model is not target_model and not model.uses_own_logits:
        # Multimodal wrappers own compute_logits; keep their conventions.
        model._target_logits = target_model.compute_logits
    cfg = model.dflash_config
    logger.info(
        "vllm-dflash: drafter loaded (%d layers, block %d, K=%d, target layers %s)",
        cfg.num_hidden_layers,
        cfg.block_size,
        k,
        list(cfg.target_layer_ids),
    )
    return model
