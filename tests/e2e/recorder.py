"""Worker hook (see ``EngineSpec.worker_hook``): records the first DFlash step.

Saved to ``$DFLASH_RECORD_PATH``: the captured target features, positions and
next tokens the runner passed to the proposer, the draft logits the drafter
computed, the drafts it returned, the drafter's attention groups
((KV cache group, causal) per group; empty when one group serves all layers),
and which norms of the context path ran on vLLM's kernels.

With ``DFLASH_RECORD_MODULES=1`` the drafter is kept on its modules' own
forward for the context keys (no vLLM norm/RoPE kernels).
"""

from __future__ import annotations

import os
from typing import Any

import torch

_record: dict[str, Any] = {}


def record_first_step(worker: Any, phase: str) -> str:
    drafter = worker.model_runner.drafter
    if phase == "after":
        groups = getattr(drafter, "_groups", None) or []
        _record["attention_groups"] = [(g.kv_group, g.causal) for g in groups]
        model = drafter.model
        _record["context_kernels"] = [model._hidden_norm_kernel is not None] + [
            a.context_kernels is not None for a in model._attn_layers()
        ]
        torch.save(_record, os.environ["DFLASH_RECORD_PATH"])
        return type(drafter).__module__
    if os.environ.get("DFLASH_RECORD_MODULES") == "1":
        from vllm_dflash import compat

        compat.kernel_rms_norm_of = lambda norm: None
        compat.kernel_rope_of = lambda rope: None
    propose, logits = drafter.propose, drafter.model.compute_logits
    calls = {"propose": 0}

    def recording_propose(*args: Any, **kwargs: Any) -> torch.Tensor:
        first = calls["propose"] == 0
        if first:
            for key in ("target_hidden_states", "target_positions", "next_token_ids"):
                _record[key] = kwargs[key].detach().clone().cpu()
        out = propose(*args, **kwargs)
        if first:
            _record["drafts"] = out.detach().clone().cpu()
        calls["propose"] += 1
        return out

    def recording_logits(hidden: torch.Tensor) -> torch.Tensor:
        out = logits(hidden)
        if calls["propose"] == 0:
            _record["logits"] = out.detach().clone().cpu()
        return out

    drafter.propose = recording_propose
    drafter.model.compute_logits = recording_logits
    return type(drafter).__module__
