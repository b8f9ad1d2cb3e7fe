"""The drafter's attention backend, chosen independently of the target's.

The reference deployment runs the target on ``TRITON_ATTN`` (vLLM forces it
for Gemma 4's mixed head sizes) and the drafter on ``FLASH_ATTN``. A DFlash
block is non-causal, so the drafter's backend must support non-causal
attention; one that does not is refused at start-up, because running it
causally would verify fine and silently lose most accepted tokens.

Precedence: ``speculative_config.attention_backend`` (vLLM >= 0.26), then
``VLLM_DFLASH_DRAFT_ATTENTION_BACKEND``, then vLLM's own choice for the
drafter (never the target's backend inherited blindly).
"""

from __future__ import annotations

from typing import Any

from vllm_dflash import envs
from vllm_dflash.config import DFlashConfigError

NON_CAUSAL_BACKENDS_HINT = (
    "FLASH_ATTN or FLEX_ATTENTION on CUDA (TRITON_ATTN and FLASHINFER from "
    "vLLM 0.26), CPU_ATTN on CPU (from vLLM 0.26)"
)
SPEC_FIELD = "speculative_config.attention_backend"


def _name(chosen: Any) -> str | None:
    """A backend setting (enum member or string) as its upper-case name."""
    return None if chosen is None else str(getattr(chosen, "name", chosen)).upper()


def requested_backend(speculative_config: Any) -> str | None:
    """The backend name the user asked for, or None for vLLM's default."""
    return _name(getattr(speculative_config, "attention_backend", None)) or (
        envs.draft_attention_backend()
    )


def target_backend(vllm_config: Any) -> str | None:
    """The target's backend name (``--attention-backend``), None if unset."""
    attention = getattr(vllm_config, "attention_config", None)
    return _name(getattr(attention, "backend", None))


def backend_class(name: str) -> type:
    from vllm_dflash import compat  # heavy: only where a backend is named

    try:
        member = compat.AttentionBackendEnum[name]
    except (KeyError, ValueError) as e:
        known = ", ".join(m.name for m in compat.AttentionBackendEnum)
        raise DFlashConfigError(
            "speculative_config.attention_backend", name, f"Known backends: {known}."
        ) from e
    return member.get_class()


def requested_field(speculative_config: Any) -> str:
    """Where the requested backend came from, for error messages."""
    if getattr(speculative_config, "attention_backend", None) is not None:
        return SPEC_FIELD
    return envs.DRAFT_ATTENTION_BACKEND


def check_non_causal(
    name: str, cls: type | None = None, *, field: str = SPEC_FIELD
) -> None:
    """Refuse a drafter backend that cannot attend non-causally."""
    cls = cls or backend_class(name)
    supports = getattr(cls, "supports_non_causal", None)
    if supports is None or not supports():
        raise DFlashConfigError(
            field,
            name,
            "The DFlash block is non-causal and this backend only runs causal "
            f"attention; choose {NON_CAUSAL_BACKENDS_HINT} (or "
            "VLLM_DFLASH_DRAFT_ATTENTION_BACKEND on vLLM < 0.26).",
        )


def resolve(speculative_config: Any, *, needs_non_causal: bool) -> str | None:
    """Validate and return the requested drafter backend (None: vLLM picks)."""
    name = requested_backend(speculative_config)
    if name is not None and needs_non_causal:
        check_non_causal(name, field=requested_field(speculative_config))
    return name


def backend_enum(name: str) -> Any:
    from vllm_dflash import compat

    return compat.AttentionBackendEnum[name]


# Below this vLLM release a FLEX_ATTENTION *target* crashed under DFlash:
# measured on an H200 with vLLM 0.20.0 (fp32, V1 runner, CUDA graphs), target
# and drafter on FLEX_ATTENTION: "CUDA error: an illegal memory access was
# encountered" in the first decode steps, while the same engine without
# speculation, and the same config on vLLM 0.26.0, ran losslessly. A later
# run isolated the side: TRITON_ATTN target + FLEX_ATTENTION drafter ran on
# 0.20.0 with greedy output identical to no speculation (and to 0.26.0), so
# only the target is refused. Not isolated further; the likely place is the
# target's (K+1)-token verify under FlexAttention's CUDA-graph block mask,
# whose metadata code changed between the two releases.
FLEX_SAFE_FROM = (0, 26)


def refuse_known_crashes(target_backend: str | None, vllm_version: str) -> None:
    """Refuse, at start-up, backend choices that crashed mid-request."""
    from vllm_dflash.support import version_tuple

    if version_tuple(vllm_version) >= FLEX_SAFE_FROM or envs.allow_known_crashes():
        return
    if target_backend == "FLEX_ATTENTION":
        raise DFlashConfigError(
            "attention_backend",
            target_backend,
            f"With DFlash on vLLM {vllm_version}, a FLEX_ATTENTION target crashed "
            "the engine mid-request (CUDA illegal memory access, measured on an "
            "H200). Run the target on TRITON_ATTN or FLASH_ATTN (the drafter may "
            "stay on FLEX_ATTENTION), or use vLLM >= 0.26, where this config runs.",
        )
