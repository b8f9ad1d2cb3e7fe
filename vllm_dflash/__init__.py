"""vllm-dflash: DFlash speculative decoding for stock vLLM, as a plugin.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: dflash``) in
every process it starts. Registration is cheap, idempotent and never touches
CUDA: it names the drafter architecture lazily and arranges for the V1 model
runner to build this package's proposer once that runner is imported (and,
on vLLM 0.20, for the scheduler and attention selector fixes of
``patching``).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__", "register"]

DRAFTER_ARCH = "DFlashDraftModel"
DRAFTER_CLASS = "vllm_dflash.model:DFlashDraftModel"
UNSUPPORTED_CLASS = "vllm_dflash.unsupported:UnsupportedVLLM"

_registered = False


def _logger() -> logging.Logger:
    from vllm_dflash.log import get_logger

    return get_logger("registration")


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _registered
    if _registered:
        return
    _registered = True

    from vllm import ModelRegistry

    from vllm_dflash import envs, patching, support

    log = _logger()
    version = support.vllm_version()
    if envs.use_native():
        if support.has_native_dflash():
            log.info(
                "vllm-dflash %s: VLLM_DFLASH_USE_NATIVE=1, vLLM %s runs its native "
                "DFlash implementation.",
                __version__,
                version,
            )
            return
        log.warning(
            "vllm-dflash: VLLM_DFLASH_USE_NATIVE=1 but vLLM %s has no native "
            "DFlash; using the plugin's implementation.",
            version,
        )

    # Refuses a bad DFlash config (or an unsupported vLLM) in the user's own
    # process, before any worker starts.
    patching.apply_on_import(patching.ENGINE_ARGS, patching.patch_engine_config_check)
    reason = support.unsupported_reason()
    if reason is not None:
        # Fail where DFlash is requested, not here: a server that does not use
        # DFlash must keep working with the plugin installed.
        log.error(reason)
        ModelRegistry.register_model(DRAFTER_ARCH, UNSUPPORTED_CLASS)
        return

    ModelRegistry.register_model(DRAFTER_ARCH, DRAFTER_CLASS)
    patching.apply_on_import(patching.V1_RUNNER, patching.patch_v1_runner_proposer)
    patching.apply_on_import(patching.VLLM_CONFIG, patching.patch_vllm_config)
    patching.apply_on_import(patching.V2_SPEC_DECODE, patching.patch_v2_speculator)
    patching.apply_on_import(patching.V2_RUNNER, patching.patch_v2_draft_length)
    if envs.capture_enabled():
        patching.override_capture_architectures(ModelRegistry, version)
    patching.apply_on_import(patching.CPU_KERNELS, patching.patch_cpu_expand_kernel)
    # Lookahead: vLLM 0.20 only (the patch checks its feature and stays out
    # otherwise); adaptive K: only with VLLM_DFLASH_ADAPTIVE_K=1.
    patching.apply_on_import(patching.SCHEDULER, patching.patch_scheduler)
    patching.apply_on_import(
        patching.ATTENTION_SELECTOR, patching.patch_attention_selector
    )
    if support.newer_than_tested():
        log.warning(
            "vllm-dflash %s is tested with %s; vLLM %s is newer. Please report "
            "problems.",
            __version__,
            support.TESTED,
            version,
        )
    log.info(
        "vllm-dflash %s: the plugin's DFlash implementation is active for "
        "method 'dflash' (vLLM %s; VLLM_DFLASH_USE_NATIVE=1 selects vLLM's own).",
        __version__,
        version,
    )
