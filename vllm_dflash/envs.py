"""Environment variables read by vllm-dflash, documented in one place.

vLLM's ``SpeculativeConfig`` forbids unknown keys, so options of the plugin
travel here (or in the drafter's ``config.json``), never in
``--speculative-config``.

``VLLM_DFLASH_USE_NATIVE``
    ``1`` leaves vLLM untouched: ``method: "dflash"`` then runs vLLM's own
    DFlash implementation (vLLM >= 0.20). Default ``0``: the plugin's.

``VLLM_DFLASH_DRAFT_ATTENTION_BACKEND``
    Attention backend of the drafter only (e.g. ``FLASH_ATTN``), for vLLM
    releases without ``speculative_config.attention_backend`` (0.20 ... 0.25).
    Where both are set, the speculative config wins. Unset: vLLM chooses a
    backend for the drafter that can run its block, never the target's.

``VLLM_DFLASH_CAPTURE``
    ``0`` leaves every target architecture as vLLM registered it. Default
    ``1``: architectures whose vLLM class cannot return intermediate hidden
    states (``vllm_dflash.capture.CAPTURE_ARCHS``) get the plugin's capture.

``VLLM_DFLASH_ADAPTIVE_K``
    ``1``: the plugin chooses how many of the ``num_speculative_tokens``
    drafts to verify in each step (0 included), from the batch size, the
    measured per-position acceptance and the measured step time
    (``vllm_dflash.adaptive``); ``num_speculative_tokens`` is the maximum.
    Default ``0``: always ``num_speculative_tokens``. Ignored where the user
    gives ``num_speculative_tokens_per_batch_size`` (vLLM's static schedule)
    and on vLLM releases without dynamic speculative decoding (< 0.26).

``VLLM_DFLASH_ALLOW_KNOWN_CRASHES``
    ``1`` skips the start-up refusal of configurations that crashed
    mid-request on a GPU (``vllm_dflash.backend.refuse_known_crashes``), to
    re-test them on a new driver or build; never for serving. Default ``0``.

``VLLM_DFLASH_CACHE_DIR``
    Where ``vllm-dflash demo`` keeps the tiny target and the drafter trained
    for it (built once per recipe and version). Default
    ``$XDG_CACHE_HOME/vllm-dflash`` or ``~/.cache/vllm-dflash``.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is not a boolean; set it to 1 or 0.")


def use_native() -> bool:
    """Whether the user asked for vLLM's native DFlash instead of the plugin."""
    return _flag("VLLM_DFLASH_USE_NATIVE")


DRAFT_ATTENTION_BACKEND = "VLLM_DFLASH_DRAFT_ATTENTION_BACKEND"


def draft_attention_backend() -> str | None:
    """The drafter's attention backend chosen through the environment."""
    value = os.environ.get(DRAFT_ATTENTION_BACKEND, "").strip()
    return value.upper() or None


def capture_enabled() -> bool:
    """Whether the plugin adds hidden-state capture to targets that lack it."""
    if "VLLM_DFLASH_CAPTURE" not in os.environ:
        return True
    return _flag("VLLM_DFLASH_CAPTURE")


def allow_known_crashes() -> bool:
    """Whether to start configurations known to crash (for re-testing them)."""
    return _flag("VLLM_DFLASH_ALLOW_KNOWN_CRASHES")


def cache_dir() -> Path:
    """Folder for models vllm-dflash builds once and reuses (the demo's)."""
    explicit = os.environ.get("VLLM_DFLASH_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "vllm-dflash"


ADAPTIVE_K = "VLLM_DFLASH_ADAPTIVE_K"


def adaptive_k() -> bool:
    """Whether the plugin chooses the number of drafts per step
    (``vllm_dflash.adaptive``) instead of always ``num_speculative_tokens``."""
    if ADAPTIVE_K not in os.environ:
        return ADAPTIVE_K_DEFAULT
    return _flag(ADAPTIVE_K)


ADAPTIVE_K_DEFAULT = False
