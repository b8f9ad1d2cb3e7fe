"""Stand-in drafter class registered when the installed vLLM is unsupported."""

from __future__ import annotations

from typing import Any

from vllm_dflash import support


class UnsupportedVLLMError(RuntimeError):
    pass


class UnsupportedVLLM:
    """Raises a clear error as soon as vLLM tries to build a DFlash drafter."""

    def __init__(self, *, vllm_config: Any = None, prefix: str = "") -> None:
        raise UnsupportedVLLMError(support.unsupported_reason() or "unsupported vLLM")
