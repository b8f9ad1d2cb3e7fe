"""vllm-dflash's proposer: one non-causal block forward per decoding step.

The V1 model runner builds its drafter from the module-level name
``DFlashProposer`` (``registration`` points that name here) and then drives it
through the generic speculative-decoding interface. This class inherits only
vLLM's method-agnostic machinery (``SpecDecodeBaseProposer``: buffers, CUDA
graph dispatch, attention-group setup, next-token bookkeeping) and implements
DFlash itself: context K/V injection, the block, and greedy drafting.

Per step, for B requests with K drafts (block length Q = K + 1):

    1. context   fused target features of every scheduled token -> K/V
                 written into every draft layer's cache at those tokens' slots
    2. block     ids [B, Q] = [next token, MASK x K] at positions
                 p+1 .. p+Q, where p is the last *accepted* position
    3. forward   one pass; queries see cached context (trimmed to the accepted
                 length) plus the whole block (non-causal)
    4. drafts    argmax of the target lm_head at slots 1..K -> [B, K]

Nothing here synchronises with the host: every index is computed on device.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch.profiler import record_function

from vllm_dflash import backend, compat, patching
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    validate_token_budget,
)
from vllm_dflash.log import get_logger
from vllm_dflash.model import DFlashDraftModel

logger = get_logger(__name__)


@dataclasses.dataclass
class ProposerStats:
    """Counters of what this proposer did; read by tests and benchmarks."""

    steps: int = 0
    draft_tokens: int = 0
    context_tokens: int = 0


class DFlashProposer(compat.SpecDecodeBaseProposer):
    """The plugin's DFlash proposer (a drop-in for vLLM's V1 runner)."""

    implementation = "vllm-dflash"

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
        self.block_len = self.num_speculative_tokens + 1
        self._offsets = torch.arange(self.block_len, device=device, dtype=torch.int64)
        self._block_causal = not self.draft_config.any_non_causal
        self._backend = backend.resolve(spec, needs_non_causal=not self._block_causal)

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
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        if self._block_causal:
            return
        for group in self.draft_attn_groups:
            backend.check_non_causal(
                group.backend.get_name(),
                group.backend,
                field="drafter attention backend",
            )

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
            target_hidden_states, positions[:num_ctx], cad.slot_mapping[:num_ctx]
        )
        self.stats.context_tokens += num_ctx
        batch = cad.num_reqs
        k = self.block_len - 1
        if num_speculative_tokens is not None:
            k = min(num_speculative_tokens, k)
        self._last_draft_probs = None
        if k == 0:
            return torch.empty(batch, 0, dtype=torch.int64, device=self.device)

        with record_function("dflash.prepare_block"):
            block_cad = self._prepare_block(
                cad, next_token_ids, num_rejected_tokens_gpu
            )
            _, per_layer = self.build_per_group_and_layer_attn_metadata(block_cad)
        num_block = batch * self.block_len
        mode, num_padded, across_dp = self._determine_batch_execution_and_padding(
            num_block
        )
        with (
            record_function("dflash.block_forward"),
            compat.set_forward_context(
                per_layer,
                self.vllm_config,
                num_tokens=num_padded,
                num_tokens_across_dp=across_dp,
                cudagraph_runtime_mode=mode,
                slot_mapping=self._get_slot_mapping(num_padded, block_cad.slot_mapping),
            ),
        ):
            hidden = self.model(
                input_ids=self.input_ids[:num_padded],
                positions=self.positions[:num_padded],
            )
        # [B*Q, d] -> slots 1..k of every block -> [B*k, d]
        hidden = hidden[:num_block].view(batch, self.block_len, -1)[:, 1 : k + 1]
        with record_function("dflash.sample"):
            drafts, probs = compat.sample_draft_tokens(
                self, hidden.reshape(batch * k, -1), sampling_metadata
            )
        if probs is not None:
            self._last_draft_probs = probs.view(batch, k, -1).contiguous()
        self.stats.steps += 1
        self.stats.draft_tokens += batch * k
        return drafts.view(batch, k)

    def _prepare_block(
        self,
        cad: compat.CommonAttentionMetadata,
        next_token_ids: torch.Tensor,
        num_rejected: torch.Tensor | None,
    ) -> compat.CommonAttentionMetadata:
        """Fill the block's ids/positions buffers and return its metadata."""
        batch, q = cad.num_reqs, self.block_len
        # First block position = accepted length of each request: the
        # scheduled tokens the target rejected are excluded here and from
        # what the block attends to.
        accepted = cad.seq_lens[:batch].to(torch.int64)
        if num_rejected is not None:
            accepted = accepted - num_rejected[:batch]
        accepted = accepted.clamp_(min=0)
        pos = accepted[:, None] + self._offsets  # [B, Q]

        ids = self.input_ids[: batch * q].view(batch, q)
        ids.fill_(self.draft_config.mask_token_id)
        ids[:, 0] = next_token_ids[:batch]
        self.positions[: batch * q] = pos.view(-1)

        table = cad.block_table_tensor[:batch]
        block_idx = (pos // self.block_size).clamp_(max=table.shape[1] - 1)
        slots = table.gather(1, block_idx).to(torch.int64) * self.block_size + (
            pos % self.block_size
        )
        upper = getattr(cad, "seq_lens_cpu_upper_bound", None)
        starts_cpu = torch.arange(batch + 1, dtype=torch.int32) * q
        return compat.with_block_metadata(
            cad,
            query_start_loc=self.arange[: batch + 1] * q,  # on device: no H2D copy
            query_start_loc_cpu=starts_cpu,
            seq_lens=(accepted + q).to(cad.seq_lens.dtype),
            seq_lens_cpu_upper_bound=None if upper is None else upper + q,
            num_actual_tokens=batch * q,
            max_query_len=q,
            max_seq_len=cad.max_seq_len + q,
            slot_mapping=slots.view(-1),
            causal=self._block_causal,
        )

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


def prepare_draft_config(vllm_config: compat.VllmConfig) -> DFlashDraftConfig:
    """Resolve and validate the drafter against its target and the engine,
    and point the target's hidden-state capture at the drafter's layers."""
    spec = vllm_config.speculative_config
    assert spec is not None and spec.draft_model_config is not None
    hf = spec.draft_model_config.hf_config
    cfg = DFlashDraftConfig.from_hf_config(hf)
    target = vllm_config.model_config
    cfg.validate(
        target_hidden_size=target.get_hidden_size(),
        target_vocab_size=target.get_vocab_size(),
        target_num_layers=target.get_total_num_hidden_layers(),
        num_speculative_tokens=int(spec.num_speculative_tokens),
    )
    if len({(layer.causal, layer.sliding_window) for layer in cfg.layers}) > 1:
        # One attention-metadata group serves every draft layer here, so a
        # mix would run some layers with the wrong mask: refuse it.
        raise DFlashConfigError(
            "layer_types",
            list(getattr(hf, "layer_types", None) or []),
            "This drafter mixes sliding/causal and full/non-causal layers, which "
            "vllm-dflash 0.1 does not run yet (Gemma-4 drafters). Use a drafter "
            "whose layers all attend alike.",
        )
    sched = vllm_config.scheduler_config
    validate_token_budget(
        sched.max_num_batched_tokens,
        sched.max_num_seqs,
        int(spec.num_speculative_tokens),
    )
    # The runner's EAGLE-3 capture reads this attribute before any DFlash
    # default. Setting it here makes the +1 convention ours on every vLLM
    # release (0.20 forgot the +1 and fed the previous layer's output).
    hf.eagle_aux_hidden_state_layer_ids = list(cfg.aux_layer_ids)
    return cfg


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
    if language_model is not target_model:
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
