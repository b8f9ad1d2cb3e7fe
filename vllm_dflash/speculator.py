"""vllm-dflash's speculator for vLLM's V2 model runner (``vllm/v1/worker/gpu``).

The V2 runner builds its speculator in ``init_speculator`` (patched in
``patching.patch_v2_speculator``) and calls ``propose`` once per step, after
verification, with the step's target batch and captured hidden states. This
class inherits only vLLM's method-agnostic ``DraftModelSpeculator`` (buffers,
attention-group setup, draft sampling) and implements DFlash itself.

One step, for B requests, N target tokens and block length Q = K + 1 (K: the
drafts the scheduler will verify next step, ``set_draft_length``):

    eager   features   captured layers [N, n*d] -> static buffer
            slots      the target tokens' slots in each draft KV-cache group
            block      ids [B, Q] = [bonus, MASK x K] at positions p+1 .. p+Q
                       (p: last accepted position), block slots, seq lens
            metadata   the draft attention metadata (non-causal block)
    graph   context    fc + hidden_norm + every layer's K/V for the N tokens,
                       written at their slots (rows >= N carry PAD slots)
            forward    one pass of the draft layers over the block
            drafts     argmax of the target lm_head at slots 1..K -> [B, K]

The graph part is one FULL CUDA graph per (padded batch size, Q): in
steady-state decode N <= R*Q (R: padded request count), so the context
projection rides in the same graph as the block. Steps with more target
tokens than that (a prefill in the batch, or a step after a larger K) project
the context eagerly first and the graph's context rows write nothing. A step
whose K is 0 only projects the context (eagerly): nothing is drafted; the
engine's first such step (vLLM's kernel warm-up) also builds the block kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_dflash import adaptive, backend, compat, kernels
from vllm_dflash.config import DFlashConfigError
from vllm_dflash.log import get_logger
from vllm_dflash.model import DFlashDraftModel
from vllm_dflash.proposer import (
    ProposerStats,
    attach_to_target,
    prepare_draft_config,
    text_only,
    with_draft_attention,
)

logger = get_logger(__name__)

PAD_SLOT = kernels.PAD_SLOT


class DFlashSpeculator(compat.DraftModelSpeculator):
    """The plugin's DFlash speculator for vLLM's V2 model runner."""

    implementation = "vllm-dflash"

    def __init__(self, vllm_config: compat.VllmConfig, device: torch.device):
        self.draft_config = prepare_draft_config(vllm_config)
        super().__init__(vllm_config, device)
        spec = self.speculative_config
        if self.draft_logits is not None:
            raise DFlashConfigError(
                "speculative_config.draft_sample_method",
                spec.draft_sample_method,
                'vllm-dflash drafts greedily on the V2 runner; use "greedy" '
                "(the default; sampling stays lossless at any temperature).",
            )
        self.supports_mm_inputs = False
        self.stats = ProposerStats()
        self.block_len = self.num_speculative_steps + 1  # the longest block
        # Drafts the scheduler verifies next step (``set_draft_length``).
        self._num_drafts = self.num_speculative_steps
        self._block_causal = not self.draft_config.any_non_causal
        self._backend = backend.resolve(spec, needs_non_causal=not self._block_causal)

        n, width = self.max_num_tokens, self.draft_config.fc_input_size
        # Static inputs of the captured graph (see the module docstring).
        self.ctx_features = torch.zeros(n, width, dtype=self.dtype, device=device)
        self.ctx_positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.ctx_slots = torch.full((1, n), PAD_SLOT, dtype=torch.int64, device=device)
        self._graphs: Any = None
        # Whether the block kernel has run once (Triton compiles at first use).
        self._block_kernel_built = False
        self._gids: list[int] = []
        self._layer_rows: list[int] = []
        self._group_causal: dict[int, bool] = {}

    # -- construction -------------------------------------------------------
    @property
    def attn_vllm_config(self) -> compat.VllmConfig:
        return with_draft_attention(
            text_only(self.vllm_config), self._block_causal, None
        )

    def load_draft_model(
        self, target_model: torch.nn.Module, target_attn_layer_names: set[str]
    ) -> DFlashDraftModel:
        spec = self.speculative_config
        # Never the target's backend, and no multimodal-prefix flag from a
        # Gemma-4 target (it would refuse FLASH_ATTN for the drafter).
        config = with_draft_attention(
            text_only(self.vllm_config),
            self._block_causal,
            self._backend,
            inherit_backend=False,
        )
        if spec.kv_cache_dtype is not None:
            config = dataclasses.replace(
                config,
                cache_config=dataclasses.replace(
                    config.cache_config, cache_dtype=spec.kv_cache_dtype
                ),
            )
        with compat.set_model_tag("vllm_dflash_drafter"):
            model = compat.get_model(
                vllm_config=config,
                model_config=spec.draft_model_config,
                load_config=spec.draft_load_config,
            )
        return attach_to_target(model, target_model, self.num_speculative_steps)

    def set_attn(self, model_state: Any, kv_cache_config: Any, *args: Any) -> None:
        super().set_attn(model_state, kv_cache_config, *args)
        group_of = {
            name: gid
            for gid, group in enumerate(kv_cache_config.kv_cache_groups)
            for name in group.layer_names
        }
        layer_gids = [group_of[name] for name in self.model.attention_layer_names()]
        self._gids = sorted(set(layer_gids))
        self._layer_rows = [self._gids.index(gid) for gid in layer_gids]
        self._group_causal = {}
        for gid, layer in zip(layer_gids, self.draft_config.layers, strict=True):
            if self._group_causal.setdefault(gid, layer.causal) != layer.causal:
                raise DFlashConfigError(
                    "layer_types",
                    [a.causal for a in self.draft_config.layers],
                    "Causal and non-causal draft layers share one KV-cache group "
                    "here; give them different sliding windows or one causality.",
                )
        for gid, causal in self._group_causal.items():
            if not causal:
                for group in self.attn_groups[gid]:
                    backend.check_non_causal(group.backend.get_name(), group.backend)
        self.ctx_slots = torch.full(
            (len(self._gids), self.max_num_tokens),
            PAD_SLOT,
            dtype=torch.int64,
            device=self.device,
        )

    def init_cudagraph_manager(self, cudagraph_mode: Any) -> None:
        mode = compat.CUDAGraphMode
        wants_full = cudagraph_mode.decode_mode() == mode.FULL
        supports_full = (
            self.attn_cg_support.min_cg_support.value
            >= compat.AttentionCGSupport.UNIFORM_BATCH.value
        )
        if wants_full and not supports_full:
            logger.warning(
                "vllm-dflash: the drafter's attention backend (%s) cannot run in "
                "a full CUDA graph; the draft step runs eagerly.",
                self.attn_cg_support.min_cg_attn_backend,
            )
        # The block has one shape per (batch size, K), so its graphs are FULL
        # ones for uniform batches of Q = K + 1 tokens per request, one set
        # per K the scheduler may ask for (K 0 drafts nothing); no piecewise.
        chosen = mode.FULL_DECODE_ONLY if wants_full and supports_full else mode.NONE
        with compat.drafting_lengths_only(self.vllm_config):
            self._graphs = compat.CudaGraphManager(
                self.vllm_config, self.device, chosen, decode_query_len=self.block_len
            )

    def capture(self) -> None:
        if self._graphs is None or not self._graphs.needs_capture():
            return
        self.ctx_slots.fill_(PAD_SLOT)
        self._graphs.capture(
            self._capture_forward, progress_bar_desc="vllm-dflash: capturing drafter"
        )

    def _capture_forward(self, desc: Any, warmup: bool) -> Any:
        """Dummy inputs in the static buffers, then the step body to capture."""
        reqs, tokens, q = desc.num_reqs, desc.num_tokens, desc.uniform_token_count
        batch = compat.InputBatch.make_dummy(reqs, tokens, self.input_buffers)
        slots = self.block_tables.get_dummy_slot_mappings(tokens)
        metadata = compat.build_attn_metadata(
            attn_groups=self.attn_groups,
            num_reqs=reqs,
            num_tokens=tokens,
            query_start_loc_gpu=batch.query_start_loc,
            query_start_loc_cpu=torch.from_numpy(batch.query_start_loc_np),
            max_query_len=q,
            seq_lens=batch.seq_lens,
            seq_lens_cpu_upper_bound=batch.seq_lens_cpu_upper_bound,
            max_seq_len=self.max_model_len,
            block_tables=self.block_tables.get_dummy_block_tables(reqs),
            slot_mappings=slots,
            kv_cache_config=self.kv_cache_config,
            for_cudagraph_capture=True,
            causal=self._group_causal,
        )
        by_layer = compat.build_slot_mappings_by_layer(slots, self.kv_cache_config)
        return lambda cg_mode: self._draft(reqs, q, metadata, by_layer, None, cg_mode)

    # -- the step ----------------------------------------------------------
    def set_draft_length(self, num_drafts: int | None) -> None:
        """How many drafts per request the scheduler verifies next step: the
        next ``propose`` drafts that many (a block of ``num_drafts + 1``).
        ``None`` (no dynamic K) means ``num_speculative_tokens``. Called
        from the runner's ``execute_model`` (``patching.patch_v2_draft_length``)
        before the ``propose`` of the same step."""
        k = self.num_speculative_steps
        if num_drafts is not None and self.dp_size == 1:
            # Data-parallel ranks schedule apart but must run one graph shape
            # per step: they keep the longest block.
            k = max(0, min(num_drafts, k))
        self._num_drafts = k

    @torch.inference_mode()
    def propose(
        self,
        input_batch: Any,
        attn_metadata: dict[str, Any],
        slot_mappings: dict[str, torch.Tensor],
        last_hidden_states: torch.Tensor,
        aux_hidden_states: list[torch.Tensor] | None,
        num_sampled: torch.Tensor,
        num_rejected: torch.Tensor,
        last_sampled: torch.Tensor,
        next_prefill_tokens: torch.Tensor,
        temperature: torch.Tensor,
        seeds: torch.Tensor,
        num_tokens_across_dp: torch.Tensor | None = None,
        dummy_run: bool = False,
        skip_attn_for_dummy_run: bool = False,
        mm_inputs: Any = None,
        is_profile: bool = False,
    ) -> torch.Tensor:
        # aux_hidden_states: n x [>=N, d]; returns draft ids [B, K]
        num_reqs, num_ctx = input_batch.num_reqs, input_batch.num_tokens
        # Dummy runs (profiling, warm-up, DP padding) run the longest block.
        k = self.num_speculative_steps if dummy_run else self._num_drafts
        q = k + 1
        if not aux_hidden_states:
            raise RuntimeError(
                "vllm-dflash: the target returned no captured hidden states; "
                "its model class must implement vLLM's aux-hidden-state interface."
            )
        torch.cat(
            [h[:num_ctx] for h in aux_hidden_states],
            dim=-1,
            out=self.ctx_features[:num_ctx],
        )
        self.ctx_positions[:num_ctx].copy_(input_batch.positions[:num_ctx])
        self._copy_request_inputs(num_reqs, input_batch.idx_mapping, temperature, seeds)

        if dummy_run and skip_attn_for_dummy_run:
            # Memory profiling: no KV cache or block tables exist yet.
            self.model.store_context_kv(
                self.ctx_features[:num_ctx], self.ctx_positions[:num_ctx], None
            )
            self._draft(num_reqs, q, None, None, num_tokens_across_dp)
            return self.draft_tokens[:num_reqs]
        verified = (num_rejected, num_sampled, last_sampled, next_prefill_tokens)
        if k == 0:
            # Nothing is verified next step: only the context K/V, which
            # later blocks attend to.
            self._copy_context_slots(num_ctx)
            self._store_context_eagerly(num_ctx)
            if not self._block_kernel_built:
                # vLLM's kernel warm-up (``warmup_kernels``) schedules no
                # drafts: its steps carry K 0. Without this the block
                # kernel would compile at the first request, a latency
                # spike vLLM's JIT monitor reports. A one-token block on the
                # warm-up's own buffers builds it; the next step rewrites
                # those buffers before anything reads them.
                kernels.prepare_block(
                    self._block_inputs(input_batch, *verified, num_reqs, q=1)
                )
                self._block_kernel_built = True
            self.stats.context_tokens += num_ctx
            adaptive.drafted()
            return self.draft_tokens[:num_reqs]

        desc, across_dp = compat.dispatch_cg_and_sync_dp(
            self._graphs,
            num_reqs,
            num_reqs * q,
            uniform_token_count=q,
            dp_size=self.dp_size,
            dp_rank=self.dp_rank,
            need_eager=is_profile,
        )
        reqs = desc.num_reqs or num_reqs
        tokens = desc.num_tokens

        # Context slots first: the block's slots overwrite the shared buffer.
        self._copy_context_slots(num_ctx)
        if dummy_run:
            self.ctx_slots.fill_(PAD_SLOT)  # placeholder block tables
        if num_ctx > tokens:
            # More target tokens than graph rows (a prefill in the batch, or
            # K smaller than last step's): project the context eagerly; the
            # graph's context rows write nothing.
            self._store_context_eagerly(num_ctx)
            self.ctx_slots[:, :tokens].fill_(PAD_SLOT)
        else:
            self.ctx_slots[:, num_ctx:tokens].fill_(PAD_SLOT)

        kernels.prepare_block(self._block_inputs(input_batch, *verified, reqs, q=q))
        self._block_kernel_built = True
        metadata = self._block_metadata(input_batch, reqs, q)
        by_layer = compat.build_slot_mappings_by_layer(
            self.block_tables.slot_mappings[:, :tokens], self.kv_cache_config
        )
        if desc.cg_mode == compat.CUDAGraphMode.FULL:
            self._graphs.run_fullgraph(desc)
        else:
            self._draft(reqs, q, metadata, by_layer, across_dp, desc.cg_mode)
        if not dummy_run:
            self.stats.steps += 1
            self.stats.context_tokens += num_ctx
            self.stats.draft_tokens += num_reqs * k
            self.stats.blocks += num_reqs
            self.stats.block_tokens += num_reqs * q
            adaptive.drafted()
        return self.draft_tokens[:num_reqs]

    def _copy_context_slots(self, num_ctx: int) -> None:
        """The target tokens' slots in every draft KV-cache group -> ctx_slots."""
        for row, gid in enumerate(self._gids):
            self.ctx_slots[row, :num_ctx].copy_(
                self.block_tables.slot_mappings[gid, :num_ctx]
            )

    def _block_inputs(
        self,
        input_batch: Any,
        num_rejected: torch.Tensor,
        num_sampled: torch.Tensor,
        last_sampled: torch.Tensor,
        next_prefill_tokens: torch.Tensor,
        num_reqs_padded: int,
        q: int,
    ) -> kernels.BlockInputs:
        """This step's block (``num_reqs_padded`` rows of ``q`` tokens) as the
        kernel's inputs: the verified batch and the static buffers it fills."""
        return kernels.BlockInputs(
            query_start_loc=input_batch.query_start_loc,
            target_positions=input_batch.positions,
            num_rejected=num_rejected,
            num_sampled=num_sampled,
            idx_mapping=input_batch.idx_mapping,
            last_sampled=last_sampled,
            next_prefill_tokens=next_prefill_tokens,
            block_tables=[self.block_tables.input_block_tables[g] for g in self._gids],
            kernel_block_sizes=[
                self.block_tables.kernel_block_sizes[g] for g in self._gids
            ],
            slot_mappings=[self.block_tables.slot_mappings[g] for g in self._gids],
            input_ids=self.input_buffers.input_ids,
            positions=self.input_buffers.positions,
            seq_lens=self.input_buffers.seq_lens,
            block_query_start_loc=self.input_buffers.query_start_loc,
            num_reqs=input_batch.num_reqs,
            num_reqs_padded=num_reqs_padded,
            block_len=q,
            max_block_len=self.num_speculative_steps + 1,
            mask_token_id=self.draft_config.mask_token_id,
            max_model_len=self.max_model_len,
        )

    def _store_context_eagerly(self, num_ctx: int) -> None:
        """Context K/V of the first ``num_ctx`` target tokens at the slots
        already in ``ctx_slots``, outside any graph."""
        self.model.store_context_kv(
            self.ctx_features[:num_ctx],
            self.ctx_positions[:num_ctx],
            self._context_slots(num_ctx),
        )

    def _block_metadata(self, input_batch: Any, reqs: int, q: int) -> Any:
        """Attention metadata of the block: Q queries per request, attending
        to the accepted context plus the whole block."""
        num_reqs, tokens = input_batch.num_reqs, reqs * q
        # Host-side upper bounds (some backends plan with them): no sync.
        upper = torch.zeros(reqs, dtype=torch.int32)
        upper[:num_reqs] = input_batch.seq_lens_cpu_upper_bound[:num_reqs] + q
        return compat.build_attn_metadata(
            attn_groups=self.attn_groups,
            num_reqs=reqs,
            num_tokens=tokens,
            query_start_loc_gpu=self.input_buffers.query_start_loc[: reqs + 1],
            query_start_loc_cpu=self.arange[: reqs + 1].clamp(max=num_reqs) * q,
            max_query_len=q,
            seq_lens=self.input_buffers.seq_lens[:reqs],
            seq_lens_cpu_upper_bound=upper,
            max_seq_len=min(int(upper.max()), self.max_model_len),
            block_tables=[t[:reqs] for t in self.block_tables.input_block_tables],
            slot_mappings=self.block_tables.slot_mappings[:, :tokens],
            kv_cache_config=self.kv_cache_config,
            causal=self._group_causal,
        )

    def _context_slots(self, rows: int) -> list[torch.Tensor]:
        # One [rows] slot tensor per draft layer (its KV-cache group's).
        return [self.ctx_slots[r, :rows] for r in self._layer_rows]

    def _draft(
        self,
        reqs: int,
        q: int,
        attn_metadata: dict[str, Any] | None,
        slot_mappings: dict[str, torch.Tensor] | None,
        num_tokens_across_dp: torch.Tensor | None,
        cg_mode: Any = None,
    ) -> None:
        """Context K/V, the block forward (``reqs`` blocks of ``q``) and greedy
        drafts: what a graph holds."""
        tokens = reqs * q
        self.model.store_context_kv(
            self.ctx_features[:tokens],
            self.ctx_positions[:tokens],
            None if attn_metadata is None else self._context_slots(tokens),
        )
        with compat.set_forward_context(
            attn_metadata,
            self.vllm_config,
            num_tokens=tokens,
            num_tokens_across_dp=num_tokens_across_dp,
            cudagraph_runtime_mode=cg_mode or compat.CUDAGraphMode.NONE,
            slot_mapping=slot_mappings,
            batch_descriptor=compat.BatchDescriptor(num_tokens=tokens),
        ):
            hidden = self.model(
                input_ids=self.input_buffers.input_ids[:tokens],
                positions=self.input_buffers.positions[:tokens],
            )
        k = q - 1
        # [R*Q, d] -> slots 1..K of every block -> [R*K, d]
        rows = hidden.view(reqs, q, -1)[:, 1:].reshape(reqs * k, -1)
        drafts = self._greedy_sample_draft(rows)
        # Columns >= K keep stale drafts: the scheduler verifies K of them.
        self.draft_tokens[:reqs, :k].copy_(drafts.view(reqs, k))
