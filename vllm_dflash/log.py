"""Loggers that print through vLLM's logging configuration.

vLLM configures the ``vllm`` logger namespace only; a plugin logger named
``vllm_dflash`` would be silently dropped, so ours live under ``vllm.dflash``.
"""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.dflash." + name.rsplit(".", 1)[-1])
